// mote.h — the only interface between mote-local's Python package and its native code.
//
// Steering and routing capture are per llama_context. Every function validates its input and
// reports failure through its return value; the message of the last failure on the calling
// thread is available from mote_last_error(). No function aborts the process on bad input.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#    define MOTE_API __declspec(dllexport)
#else
#    define MOTE_API __attribute__((visibility("default")))
#endif

struct llama_context;
struct llama_model;

#define MOTE_ABI_VERSION 1

// Steering modes (see the steering contract in the project's design brief).
enum mote_mode {
    MOTE_MODE_MASK  = 0, // never selected; the slot goes to the next-best expert
    MOTE_MODE_DROP  = 1, // selected as usual, weight zeroed before any top-k normalisation
    MOTE_MODE_FORCE = 2, // selected for every token with the token's top router logit (+epsilon)
    MOTE_MODE_BIAS  = 3, // additive bias on the router logit before gating (value, scaled by strength)
    MOTE_MODE_GAIN  = 4, // expert output multiplied by value >= 0 after weighting and normalisation
};

struct mote_entry {
    int32_t layer;
    int32_t expert;
    int32_t mode;  // enum mote_mode
    float   value; // bias or gain; ignored for mask, drop, force
};

// Router layout as the engine sees it.
struct mote_router_info {
    int32_t n_layer;
    int32_t n_expert;        // 0 for a dense model
    int32_t n_expert_used;
    int32_t n_expert_groups; // > 1 for group-limited routing (DeepSeek-V3/R1)
    int32_t n_group_used;
    int32_t gating;          // llama.cpp's llama_expert_gating_func_type
};

// Capture flags.
enum mote_capture_flags {
    MOTE_CAPTURE_PROBS = 1, // also accumulate the full router probabilities
    MOTE_CAPTURE_TRACE = 2, // also keep a per-token trace
};

MOTE_API int32_t      mote_abi_version(void);
MOTE_API const char * mote_last_error(void);

MOTE_API int32_t mote_get_router_info(const struct llama_model * model, struct mote_router_info * out);

// Replaces the context's steering with the given entries, all or nothing: on error the previous
// steering stays in place. strength scales every bias. n_entries == 0 clears steering.
MOTE_API int32_t mote_steer_set(struct llama_context * ctx, const struct mote_entry * entries, int32_t n_entries, float strength);
MOTE_API void    mote_steer_clear(struct llama_context * ctx);
// Number of entries in effect (0 when idle).
MOTE_API int32_t mote_steer_count(const struct llama_context * ctx);

// Capture accumulates per label: counts [n_layer * n_expert], weight sums [n_layer * n_expert],
// optional probability sums [n_layer * n_expert] and tokens counted per layer [n_layer].
// Only tokens of sequences bound with mote_capture_bind() and inside [pos_begin, pos_end) count.
MOTE_API int32_t mote_capture_start(struct llama_context * ctx, int32_t flags);
MOTE_API void    mote_capture_stop(struct llama_context * ctx);
// pos_end < 0 means no upper bound. Rebinding a sequence replaces its previous binding.
MOTE_API int32_t mote_capture_bind(struct llama_context * ctx, int32_t seq_id, int32_t label, int32_t pos_begin, int32_t pos_end);
MOTE_API void    mote_capture_unbind_all(struct llama_context * ctx);
// Writes up to cap label ids; returns the number of labels.
MOTE_API int32_t mote_capture_labels(const struct llama_context * ctx, int32_t * out, int32_t cap);
// Any output pointer may be NULL. Returns 0, or -1 for an unknown label.
MOTE_API int32_t mote_capture_read(const struct llama_context * ctx, int32_t label,
                                   int64_t * counts, double * weight_sums, double * prob_sums, int64_t * tokens);
// Trace rows: meta [n * 4] = (label, seq_id, pos, layer), ids and weights [n * n_expert_used],
// probs [n * n_expert] (only with MOTE_CAPTURE_PROBS). Returns the number of rows.
MOTE_API int64_t mote_capture_trace_rows(const struct llama_context * ctx);
MOTE_API int32_t mote_capture_trace_read(const struct llama_context * ctx, int32_t * meta, int32_t * ids, float * weights, float * probs);
// Forgets accumulated counts and the trace; keeps bindings and flags.
MOTE_API void    mote_capture_reset(struct llama_context * ctx);

#ifdef __cplusplus
}
#endif
