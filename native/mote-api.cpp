// mote-api.cpp — the C API of mote.h: per-context state registry, validation, capture read-out.
#include "mote.h"
#include "mote-graph.h"
#include "mote-state.h"

#include "llama-context.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <memory>
#include <string>

namespace mote {

// A forced expert's selection score is raised by this so group-limited and bias-corrected
// routers (DeepSeek-V3/R1) select it; finite, so that sums of scores never give inf - inf.
static constexpr float kForceSelection = 1e6f;

namespace {

std::mutex g_registry_mutex;
std::unordered_map<const llama_context *, std::unique_ptr<context_state>> g_registry;
thread_local std::string g_last_error;

int32_t fail(const char * fmt, ...) {
    char buf[512];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    g_last_error = buf;
    return -1;
}

context_state & state_for_write(const llama_context * lctx) {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    auto & slot = g_registry[lctx];
    if (!slot) {
        const llama_hparams & hp = lctx->get_model().hparams;
        slot                = std::make_unique<context_state>();
        slot->n_layer       = (int32_t) hp.n_layer_all;
        slot->n_expert      = (int32_t) hp.n_expert;
        slot->n_expert_used = (int32_t) hp.n_expert_used_max();
        slot->model_selection_bias.resize(hp.n_layer_all);
    }
    return *slot;
}

const char * mode_name(int32_t mode) {
    switch (mode) {
        case MOTE_MODE_MASK:  return "mask";
        case MOTE_MODE_DROP:  return "drop";
        case MOTE_MODE_FORCE: return "force";
        case MOTE_MODE_BIAS:  return "bias";
        case MOTE_MODE_GAIN:  return "gain";
        default:              return "unknown";
    }
}

// Compiles entries into per-layer arrays; returns -1 (with the error set) on the first bad entry.
int32_t compile(const llama_hparams & hp, const mote_entry * entries, int32_t n_entries, float strength,
                std::vector<layer_steering> & out) {
    const int32_t n_layer  = (int32_t) hp.n_layer_all;
    const int32_t n_expert = (int32_t) hp.n_expert;
    if (n_expert == 0) {
        return fail("the model has no experts (a dense model): steering needs a Mixture-of-Experts model");
    }
    if (!std::isfinite(strength)) {
        return fail("strength must be a finite number, got %g", strength);
    }
    out.assign(n_layer, {});
    for (auto & ls : out) {
        ls.logit_bias.assign(n_expert, 0.0f);
        ls.force.assign(n_expert, 0.0f);
        ls.selection.assign(n_expert, 0.0f);
        ls.keep.assign(n_expert, 1.0f);
        ls.gain.assign(n_expert, 1.0f);
    }
    // modes set per (layer, expert), as bits of enum mote_mode
    std::vector<uint8_t> seen((size_t) n_layer * n_expert, 0);
    constexpr uint8_t kSelection = 1u << MOTE_MODE_MASK | 1u << MOTE_MODE_DROP | 1u << MOTE_MODE_FORCE;

    for (int32_t i = 0; i < n_entries; ++i) {
        const mote_entry & en = entries[i];
        if (en.layer < 0 || en.layer >= n_layer) {
            return fail("layer %d is out of range: the model has layers 0..%d", en.layer, n_layer - 1);
        }
        if (en.expert < 0 || en.expert >= n_expert) {
            return fail("expert %d is out of range: the model has experts 0..%d per layer", en.expert, n_expert - 1);
        }
        if (en.mode < MOTE_MODE_MASK || en.mode > MOTE_MODE_GAIN) {
            return fail("unknown steering mode %d for layer %d expert %d", en.mode, en.layer, en.expert);
        }
        uint8_t & modes = seen[(size_t) en.layer * n_expert + en.expert];
        const uint8_t bit = 1u << en.mode;
        if (modes & bit) {
            return fail("duplicate %s entry for layer %d expert %d", mode_name(en.mode), en.layer, en.expert);
        }
        const bool contradictory =
            ((bit & kSelection) && (modes & kSelection)) ||
            (en.mode == MOTE_MODE_BIAS && (modes & (1u << MOTE_MODE_MASK | 1u << MOTE_MODE_FORCE))) ||
            ((en.mode == MOTE_MODE_MASK || en.mode == MOTE_MODE_FORCE) && (modes & 1u << MOTE_MODE_BIAS)) ||
            (en.mode == MOTE_MODE_GAIN && (modes & (1u << MOTE_MODE_MASK | 1u << MOTE_MODE_DROP))) ||
            ((en.mode == MOTE_MODE_MASK || en.mode == MOTE_MODE_DROP) && (modes & 1u << MOTE_MODE_GAIN));
        if (contradictory) {
            return fail("contradictory entries for layer %d expert %d: %s cannot be combined with an earlier entry",
                        en.layer, en.expert, mode_name(en.mode));
        }
        modes |= bit;

        layer_steering & ls = out[en.layer];
        const int32_t e = en.expert;
        switch (en.mode) {
            case MOTE_MODE_MASK:
                ls.logit_bias[e] = -INFINITY;
                ls.selection[e]  = -INFINITY;
                break;
            case MOTE_MODE_DROP:
                ls.keep[e] = 0.0f;
                break;
            case MOTE_MODE_FORCE:
                ls.force[e]     = 1.0f;
                ls.selection[e] = kForceSelection;
                break;
            case MOTE_MODE_BIAS:
                if (std::isnan(en.value) || en.value == INFINITY) {
                    return fail("bias for layer %d expert %d must be finite or -inf, got %g", en.layer, e, en.value);
                }
                if (en.value == -INFINITY) {
                    if (strength < 0.0f) {
                        return fail("a -inf bias (layer %d expert %d) cannot be scaled by a negative strength", en.layer, e);
                    }
                    if (strength > 0.0f) {
                        ls.logit_bias[e] = -INFINITY;
                        ls.selection[e]  = -INFINITY;
                    }
                } else {
                    ls.logit_bias[e] = en.value * strength;
                }
                break;
            case MOTE_MODE_GAIN:
                if (!std::isfinite(en.value) || en.value < 0.0f) {
                    return fail("gain for layer %d expert %d must be a finite number >= 0, got %g", en.layer, e, en.value);
                }
                ls.gain[e] = en.value;
                break;
        }
    }

    for (int32_t il = 0; il < n_layer; ++il) {
        const int32_t n_used = (int32_t) hp.n_expert_used(il);
        layer_steering & ls = out[il];
        int32_t n_forced = 0, n_masked = 0;
        std::vector<bool> forced_groups(std::max<uint32_t>(hp.n_expert_groups, 1), false);
        for (int32_t e = 0; e < n_expert; ++e) {
            n_forced += ls.force[e] != 0.0f;
            n_masked += ls.logit_bias[e] == -INFINITY;
            if (ls.force[e] != 0.0f && hp.n_expert_groups > 1) {
                forced_groups[e / (n_expert / hp.n_expert_groups)] = true;
            }
            ls.has_logit_bias |= ls.logit_bias[e] != 0.0f;
            ls.has_selection |= ls.selection[e] != 0.0f;
            ls.has_keep |= ls.keep[e] != 1.0f;
            ls.has_gain |= ls.gain[e] != 1.0f;
        }
        ls.has_force = n_forced > 0;
        if (n_forced > n_used) {
            return fail("layer %d forces %d experts but the model selects only %d per token", il, n_forced, n_used);
        }
        if (n_expert - n_masked < n_used) {
            return fail("layer %d masks %d of %d experts, leaving fewer than the %d each token needs", il, n_masked,
                        n_expert, n_used);
        }
        const int32_t n_forced_groups = (int32_t) std::count(forced_groups.begin(), forced_groups.end(), true);
        if (hp.n_expert_groups > 1 && n_forced_groups > (int32_t) hp.n_group_used) {
            return fail("layer %d forces experts in %d expert groups but the router keeps only %u groups per token", il,
                        n_forced_groups, hp.n_group_used);
        }
    }
    return 0;
}

} // namespace

context_state * state_of(const llama_context * lctx) {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    const auto it = g_registry.find(lctx);
    return it == g_registry.end() ? nullptr : it->second.get();
}

void release(const llama_context * lctx) {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    g_registry.erase(lctx);
}

} // namespace mote

using namespace mote;

extern "C" {

int32_t mote_abi_version(void) {
    return MOTE_ABI_VERSION;
}

const char * mote_last_error(void) {
    return g_last_error.c_str();
}

int32_t mote_get_router_info(const llama_model * model, struct mote_router_info * out) {
    if (model == nullptr || out == nullptr) {
        return fail("mote_get_router_info: null argument");
    }
    const llama_hparams & hp = model->hparams;
    out->n_layer         = (int32_t) hp.n_layer_all;
    out->n_expert        = (int32_t) hp.n_expert;
    out->n_expert_used   = (int32_t) hp.n_expert_used_max();
    out->n_expert_groups = (int32_t) hp.n_expert_groups;
    out->n_group_used    = (int32_t) hp.n_group_used;
    out->gating          = (int32_t) hp.expert_gating_func;
    return 0;
}

int32_t mote_steer_set(llama_context * ctx, const mote_entry * entries, int32_t n_entries, float strength) {
    if (ctx == nullptr || (entries == nullptr && n_entries > 0) || n_entries < 0) {
        return fail("mote_steer_set: null context or entries");
    }
    if (n_entries == 0) {
        mote_steer_clear(ctx);
        return 0;
    }
    std::vector<layer_steering> layers;
    if (compile(ctx->get_model().hparams, entries, n_entries, strength, layers) != 0) {
        return -1; // previous steering stays in place
    }
    context_state & st = state_for_write(ctx);
    st.layers    = std::move(layers);
    st.n_entries = n_entries;
    return 0;
}

void mote_steer_clear(llama_context * ctx) {
    if (context_state * st = ctx ? state_of(ctx) : nullptr) {
        st->layers.clear();
        st->n_entries = 0;
    }
}

int32_t mote_steer_count(const llama_context * ctx) {
    const context_state * st = ctx ? state_of(ctx) : nullptr;
    return st ? st->n_entries : 0;
}

int32_t mote_capture_start(llama_context * ctx, int32_t flags) {
    if (ctx == nullptr) {
        return fail("mote_capture_start: null context");
    }
    if (ctx->get_model().hparams.n_expert == 0) {
        return fail("the model has no experts (a dense model): routing capture needs a Mixture-of-Experts model");
    }
    if (flags & ~(MOTE_CAPTURE_PROBS | MOTE_CAPTURE_TRACE)) {
        return fail("unknown capture flags 0x%x", (unsigned) flags);
    }
    context_state & st = state_for_write(ctx);
    st.capture        = {};
    st.capture.active = true;
    st.capture.flags  = flags;
    return 0;
}

void mote_capture_stop(llama_context * ctx) {
    if (context_state * st = ctx ? state_of(ctx) : nullptr) {
        st->capture = {};
    }
}

int32_t mote_capture_bind(llama_context * ctx, int32_t seq_id, int32_t label, int32_t pos_begin, int32_t pos_end) {
    context_state * st = ctx ? state_of(ctx) : nullptr;
    if (st == nullptr || !st->capture.active) {
        return fail("capture is not active on this context: start it first");
    }
    if (seq_id < 0 || pos_begin < 0 || (pos_end >= 0 && pos_end < pos_begin)) {
        return fail("bad capture binding: seq_id %d, positions [%d, %d)", seq_id, pos_begin, pos_end);
    }
    st->capture.bindings[seq_id] = { label, pos_begin, pos_end };
    return 0;
}

void mote_capture_unbind_all(llama_context * ctx) {
    if (context_state * st = ctx ? state_of(ctx) : nullptr) {
        st->capture.bindings.clear();
    }
}

int32_t mote_capture_labels(const llama_context * ctx, int32_t * out, int32_t cap) {
    const context_state * st = ctx ? state_of(ctx) : nullptr;
    if (st == nullptr) {
        return 0;
    }
    int32_t n = 0;
    for (const auto & kv : st->capture.stats) {
        if (out != nullptr && n < cap) {
            out[n] = kv.first;
        }
        ++n;
    }
    return n;
}

int32_t mote_capture_read(const llama_context * ctx, int32_t label, int64_t * counts, double * weight_sums,
                          double * prob_sums, int64_t * tokens) {
    const context_state * st = ctx ? state_of(ctx) : nullptr;
    const auto it = st ? st->capture.stats.find(label) : decltype(st->capture.stats)::const_iterator{};
    if (st == nullptr || it == st->capture.stats.end()) {
        return fail("no routing was captured for label %d", label);
    }
    const label_stats & s = it->second;
    if (counts) std::copy(s.counts.begin(), s.counts.end(), counts);
    if (weight_sums) std::copy(s.weight_sums.begin(), s.weight_sums.end(), weight_sums);
    if (prob_sums) std::copy(s.prob_sums.begin(), s.prob_sums.end(), prob_sums);
    if (tokens) std::copy(s.tokens.begin(), s.tokens.end(), tokens);
    return 0;
}

int64_t mote_capture_trace_rows(const llama_context * ctx) {
    const context_state * st = ctx ? state_of(ctx) : nullptr;
    return st ? (int64_t) st->capture.trace_meta.size() / 4 : 0;
}

int32_t mote_capture_trace_read(const llama_context * ctx, int32_t * meta, int32_t * ids, float * weights, float * probs) {
    const context_state * st = ctx ? state_of(ctx) : nullptr;
    if (st == nullptr) {
        return fail("no routing trace on this context");
    }
    const capture_state & c = st->capture;
    if (meta) std::copy(c.trace_meta.begin(), c.trace_meta.end(), meta);
    if (ids) std::copy(c.trace_ids.begin(), c.trace_ids.end(), ids);
    if (weights) std::copy(c.trace_weights.begin(), c.trace_weights.end(), weights);
    if (probs) std::copy(c.trace_probs.begin(), c.trace_probs.end(), probs);
    return 0;
}

void mote_capture_reset(llama_context * ctx) {
    if (context_state * st = ctx ? state_of(ctx) : nullptr) {
        st->capture.stats.clear();
        st->capture.trace_meta.clear();
        st->capture.trace_ids.clear();
        st->capture.trace_weights.clear();
        st->capture.trace_probs.clear();
    }
}

} // extern "C"
