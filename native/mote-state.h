// mote-state.h — per-context steering and capture state (internal to the native code).
#pragma once

#include "mote.h"

#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace mote {

// Steering arrays of one layer; a flag is set only when its array differs from identity, and the
// flags alone decide which graph nodes exist (values change without a graph rebuild).
struct layer_steering {
    bool has_logit_bias = false; // mask, bias, or the force epsilon
    bool has_force      = false;
    bool has_selection  = false; // mask or force, folded into exp_probs_b
    bool has_keep       = false; // drop
    bool has_gain       = false;

    std::vector<float> logit_bias; // [n_expert] -inf (mask) or bias * strength
    std::vector<float> force;      // [n_expert] 1 where forced
    std::vector<float> selection;  // [n_expert] -inf (mask), +kForceSelection (force)
    std::vector<float> keep;       // [n_expert] 0 where dropped
    std::vector<float> gain;       // [n_expert]
};

struct seq_binding {
    int32_t label;
    int32_t pos_begin;
    int32_t pos_end; // < 0: unbounded
};

struct label_stats {
    std::vector<int64_t> counts;      // [n_layer * n_expert]
    std::vector<double>  weight_sums; // [n_layer * n_expert]
    std::vector<double>  prob_sums;   // [n_layer * n_expert], with MOTE_CAPTURE_PROBS
    std::vector<int64_t> tokens;      // [n_layer]
};

struct capture_state {
    bool    active = false;
    int32_t flags  = 0;
    std::unordered_map<int32_t, seq_binding> bindings; // seq_id -> binding
    std::map<int32_t, label_stats> stats;              // label -> stats
    // trace, row-major
    std::vector<int32_t> trace_meta;    // [rows * 4]
    std::vector<int32_t> trace_ids;     // [rows * n_expert_used]
    std::vector<float>   trace_weights; // [rows * n_expert_used]
    std::vector<float>   trace_probs;   // [rows * n_expert]
};

struct context_state {
    int32_t n_layer       = 0;
    int32_t n_expert      = 0;
    int32_t n_expert_used = 0;

    std::vector<layer_steering> layers; // empty while steering is idle
    int32_t n_entries = 0;

    capture_state capture;

    // The model's exp_probs_b per layer, read once from the backend when first folded.
    std::vector<std::vector<float>> model_selection_bias;
};

} // namespace mote
