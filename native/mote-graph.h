// mote-graph.h — what the patched llama.cpp sources call. Each function returns its input
// unchanged, adding no node, while the context has no steering and no capture, so an idle graph is
// exactly upstream's graph.
#pragma once

#include "llama-graph.h"

#include <cstdint>

struct llama_context;

namespace mote {

struct context_state;

// The context's state, or nullptr before its first graph build.
context_state * state_of(const llama_context * lctx);

// The context's state, created on first use; called for every graph build, which it starts.
context_state * state_for_graph(const llama_context * lctx);

// Graph topology key: two graph builds with the same key have the same nodes, so llama.cpp may
// reuse a graph whose key matches. 0 while idle.
uint64_t graph_key(const context_state * st);

// Frees the context's state; called from llama_context's destructor.
void release(const llama_context * lctx);

// Router logits [n_expert, n_tokens] after mask / bias / force. Called first in every router call,
// it also records the call for mote_get_layer_router.
ggml_tensor * steer_logits(const llm_graph_context & g, ggml_tensor * logits, int il);

// The selection-bias tensor to add to the gated probabilities: the model's own exp_probs_b with
// mask / force folded in (one add, so fused top-k MoE kernels still match), or exp_probs_b.
ggml_tensor * selection_bias(const llm_graph_context & g, ggml_tensor * exp_probs_b, int il);

// Weights [1, n_expert_used, n_tokens] after drop, before the arch's own top-k normalisation.
ggml_tensor * drop_weights(const llm_graph_context & g, ggml_tensor * weights, ggml_tensor * selected,
                           llama_expert_gating_func_type gating, bool norm_w, int il);

// Final weights after gain; registers the routing tap when capture is on.
ggml_tensor * finish_weights(const llm_graph_context & g, ggml_tensor * weights, ggml_tensor * selected,
                             ggml_tensor * probs, llama_expert_gating_func_type gating, bool norm_w, float w_scale,
                             int il);

// Registers the tap of the selected experts' outputs [n_embd, n_expert_used, n_tokens] (before
// weighting) when capture counts output norms.
void tap_expert_outputs(const llm_graph_context & g, ggml_tensor * experts, int il);

// Accumulates the routing of the ubatch just computed; called after each ubatch of a decode.
void after_ubatch(const llama_context * lctx, ggml_backend_sched_t sched, const llm_graph_result * res,
                  const llama_ubatch & ubatch);

} // namespace mote
