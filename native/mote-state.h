// mote-state.h — per-context steering and capture state (internal to the native code).
#pragma once

#include "mote.h"

#include <array>
#include <cstdint>
#include <iterator>
#include <map>
#include <unordered_map>
#include <vector>

namespace mote {

// Sets the calling thread's mote_last_error() message; returns -1.
int32_t fail(const char * fmt, ...) __attribute__((format(printf, 1, 2)));

// Steering arrays of one layer; a flag is set only when its array differs from identity, and the
// flags alone decide which graph nodes exist (values change without a graph rebuild).
struct layer_steering {
    bool has_logit_bias = false; // mask or bias
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

// The compiled steering of one phase: empty when no entry applies in it.
using phase_steering = std::vector<layer_steering>;

// Phases a generation passes through (enum mote_scope without ALL).
constexpr int32_t kPhases[] = { MOTE_SCOPE_PREFILL, MOTE_SCOPE_DECODE, MOTE_SCOPE_THINKING };

struct seq_binding {
    int32_t label;
    int32_t pos_begin;
    int32_t pos_end; // < 0: unbounded
};

struct label_stats {
    std::vector<int64_t> counts;       // [n_layer * n_expert]
    std::vector<double>  weight_sums;  // [n_layer * n_expert]
    std::vector<double>  prob_sums;    // [n_layer * n_expert], with MOTE_CAPTURE_PROBS
    std::vector<double>  output_norms; // [n_layer * n_expert], with MOTE_CAPTURE_OUTPUT_NORMS
    std::vector<int64_t> tokens;       // [n_layer]
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

// One steering: its entries compiled once per phase, and the phase in effect.
struct steer_slot {
    std::array<phase_steering, std::size(kPhases)> compiled;
    int32_t                                        phase = MOTE_SCOPE_PREFILL;

    // the compiled steering in effect, empty while idle
    const phase_steering & layers() const { return compiled[phase - MOTE_SCOPE_PREFILL]; }
};

struct context_state {
    int32_t n_layer       = 0;
    int32_t n_expert      = 0;
    int32_t n_expert_used = 0;
    int32_t n_seq_max     = 1;

    // the whole context's steering, and sequences' own steerings, which replace it for their tokens
    steer_slot                   base;
    std::map<int32_t, steer_slot> seqs;

    capture_state capture;

    // Layers whose weights an rpc-server holds: their routing taps are concatenated per server (see
    // mote-graph.cpp), so capture reads each server once per ubatch, not once per layer.
    std::vector<const void *> layer_rpc_device; // [n_layer] the layer's RPC device, or nullptr

    // The model's exp_probs_b per layer, read once from the backend when first folded.
    std::vector<std::vector<float>> model_selection_bias;

    // What the graph builds showed about each layer's router; and, during a build, the layer of the
    // router call being built and its index within the layer (1 for the first call).
    std::vector<mote_layer_router> routers;
    int32_t                        build_layer = -1;
    int32_t                        build_call  = 0;
    int64_t                        build_tokens = 0; // tokens the call routes

    // Graphs steer per token (a table row per sequence slot) while any sequence has its own steering.
    bool per_sequence() const { return !seqs.empty(); }
    // slot 0: the context's steering; slot 1 + s: sequence s
    int32_t n_slots() const { return per_sequence() ? n_seq_max + 1 : 1; }
    const steer_slot * slot(int32_t index) const {
        if (index == 0) {
            return &base;
        }
        const auto it = seqs.find(index - 1);
        return it == seqs.end() ? &base : &it->second;
    }
};

} // namespace mote
