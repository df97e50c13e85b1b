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

#define MOTE_ABI_VERSION 4

// Steering modes (the steering contract: README, "Python API").
enum mote_mode {
    MOTE_MODE_MASK  = 0, // never selected; the slot goes to the next-best expert
    MOTE_MODE_DROP  = 1, // selected as usual, weight zeroed before any top-k normalisation
    MOTE_MODE_FORCE = 2, // selected for every token: logit lifted to the best remaining one (+epsilon)
    MOTE_MODE_BIAS  = 3, // additive bias on the router logit before gating (value, scaled by strength)
    MOTE_MODE_GAIN  = 4, // expert output multiplied by value >= 0 after weighting and normalisation
};

// The phases of a generation in which an entry applies.
enum mote_scope {
    MOTE_SCOPE_ALL      = 0, // every phase
    MOTE_SCOPE_PREFILL  = 1, // the prompt
    MOTE_SCOPE_DECODE   = 2, // generated tokens
    MOTE_SCOPE_THINKING = 3, // generated tokens inside a thinking span
};

struct mote_entry {
    int32_t layer;
    int32_t expert;
    int32_t mode;  // enum mote_mode
    float   value; // bias or gain; ignored for mask, drop, force
    int32_t scope; // enum mote_scope
};

// The router shape a set of entries is checked against without a context (e.g. a profile's target).
struct mote_shape {
    int32_t         n_layer;
    int32_t         n_expert;
    int32_t         n_expert_used;
    int32_t         n_expert_groups; // > 1 for group-limited routing
    int32_t         n_group_used;
    const uint8_t * moe_layers;      // [n_layer], non-zero where the layer routes; NULL: every layer
};

// What the context's graph does in one layer, observed when llama.cpp built it (contexts build
// their graphs when created, so this is known from the start).
struct mote_layer_router {
    int32_t n_calls;        // router calls in the layer per graph (0: the layer routes nothing)
    int32_t n_expert;       // experts the first call routes over
    int32_t n_expert_used;  // experts selected per token
    int32_t gating;         // llama_expert_gating_func_type of the first call
    int32_t norm_w;         // 1 when the selected weights are normalised to sum 1
    float   w_scale;        // factor applied to the weights (0 or 1: none)
    int32_t selection_bias; // 1 when selection adds a per-expert bias (exp_probs_b)
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
    MOTE_CAPTURE_OUTPUT_NORMS = 4, // also accumulate weight x L2 norm of each selected expert's output
                                   // (before weighting; an arch that weights before the FFN, llama4,
                                   // reports the weighted output's norm)
};

MOTE_API int32_t      mote_abi_version(void);
MOTE_API const char * mote_last_error(void);

MOTE_API int32_t mote_get_router_info(const struct llama_model * model, struct mote_router_info * out);
// Returns 0, or -1 for a layer out of range.
MOTE_API int32_t mote_get_layer_router(const struct llama_context * ctx, int32_t layer, struct mote_layer_router * out);

// The steering rules, in one place: validates a complete entry set (every phase) against a router
// shape, committing nothing. shape NULL checks only what needs no model (values, modes, scopes,
// duplicates and contradictions on one expert). Returns 0, or -1 with the reason in mote_last_error().
MOTE_API int32_t mote_steer_check(const struct mote_shape * shape, const struct mote_entry * entries, int32_t n_entries,
                                  double strength);
// Replaces the context's steering with the given entries, validated against what its graph routes,
// all or nothing: on error the previous steering stays in place. strength scales every bias.
// n_entries == 0 clears steering.
MOTE_API int32_t mote_steer_set(struct llama_context * ctx, const struct mote_entry * entries, int32_t n_entries, double strength);
// A sequence's own steering, which replaces the context's for that sequence's tokens (same rules, all
// or nothing); n_entries == 0 returns the sequence to the context's steering. Sequences steered
// differently decode in one batch: each token reads its own sequence's tables.
MOTE_API int32_t mote_steer_set_seq(struct llama_context * ctx, int32_t seq_id, const struct mote_entry * entries,
                                    int32_t n_entries, double strength);
// Selects the phase (MOTE_SCOPE_PREFILL, _DECODE or _THINKING) whose entries apply from the next decode,
// for the context and every sequence; _seq for one sequence's own steering.
MOTE_API int32_t mote_steer_phase(struct llama_context * ctx, int32_t phase);
MOTE_API int32_t mote_steer_phase_seq(struct llama_context * ctx, int32_t seq_id, int32_t phase);
// Clears the context's steering and every sequence's.
MOTE_API void    mote_steer_clear(struct llama_context * ctx);

// Capture accumulates per label: counts [n_layer * n_expert], weight sums [n_layer * n_expert],
// optional probability sums and output-norm sums [n_layer * n_expert] and tokens counted per layer
// [n_layer]. Only tokens of sequences bound with mote_capture_bind() and inside [pos_begin, pos_end)
// count. Refused, with a reason, when the model's graph routes nothing.
MOTE_API int32_t mote_capture_start(struct llama_context * ctx, int32_t flags);
MOTE_API void    mote_capture_stop(struct llama_context * ctx);
// pos_end < 0 means no upper bound. Rebinding a sequence replaces its previous binding.
MOTE_API int32_t mote_capture_bind(struct llama_context * ctx, int32_t seq_id, int32_t label, int32_t pos_begin, int32_t pos_end);
MOTE_API void    mote_capture_unbind_all(struct llama_context * ctx);
// Writes up to cap label ids; returns the number of labels.
MOTE_API int32_t mote_capture_labels(const struct llama_context * ctx, int32_t * out, int32_t cap);
// Buffers hold n_layer * n_expert values (tokens: n_layer), which must be the model's; any output
// pointer may be NULL. Returns 0, or -1 for an unknown label, other dimensions, or sums not captured.
MOTE_API int32_t mote_capture_read(const struct llama_context * ctx, int32_t label, int32_t n_layer, int32_t n_expert,
                                   int64_t * counts, double * weight_sums, double * prob_sums, double * output_norms,
                                   int64_t * tokens);
// Trace rows: meta [rows * 4] = (label, seq_id, pos, layer), ids and weights [rows * n_expert_used],
// probs [rows * n_expert] (only with MOTE_CAPTURE_PROBS). rows must equal mote_capture_trace_rows()
// and the dimensions the model's; returns 0, or -1 when they do not.
MOTE_API int64_t mote_capture_trace_rows(const struct llama_context * ctx);
MOTE_API int32_t mote_capture_trace_read(const struct llama_context * ctx, int64_t rows, int32_t n_expert_used,
                                         int32_t n_expert, int32_t * meta, int32_t * ids, float * weights, float * probs);
// Forgets accumulated counts and the trace; keeps bindings and flags.
MOTE_API void    mote_capture_reset(struct llama_context * ctx);

// Several machines: llama.cpp's RPC backend, endpoints "HOST:PORT" of running rpc-servers.
// Asks the server for its greeting on a connection of its own within timeout_ms: llama.cpp's client
// aborts the process on a server that is missing, busy with another client or of another protocol
// version. Returns 0, or -1 with the reason in mote_last_error().
MOTE_API int32_t mote_rpc_probe(const char * endpoint, int32_t timeout_ms);
// Connects to the server and lists its devices (once per endpoint and process; the server must answer),
// without registering them with ggml, so that llama.cpp's default device selection never uses them.
// Returns their number, or -1.
MOTE_API int32_t mote_rpc_add_server(const char * endpoint);
// The devices a model on these (added) endpoints loads onto, NULL-terminated in devices[cap]: each
// endpoint's devices in the order given, then the local GPUs (discrete, else integrated), as llama.cpp's
// default selection would add them. Returns the number of devices, or -1.
MOTE_API int32_t mote_rpc_model_devices(const char * const * endpoints, int32_t n_endpoints, void ** devices,
                                        int32_t cap);
// Replies lost on connections to endpoint (its server died or the connection broke) since the process
// started: such a failure no longer aborts; the call that waited returns and the model must be dropped.
MOTE_API int64_t mote_rpc_lost_replies(const char * endpoint);

#ifdef __cplusplus
}
#endif
