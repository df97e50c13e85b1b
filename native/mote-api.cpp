// mote-api.cpp — the C API of mote.h: per-context state registry, validation, capture read-out.
#include "mote.h"
#include "mote-graph.h"
#include "mote-state.h"

#include "ggml-backend.h"
#include "llama-context.h"
#include "llama-model.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

namespace mote {

// A forced expert's selection score is raised by this so group-limited and bias-corrected
// routers (DeepSeek-V3/R1) select it; finite, so that sums of scores never give inf - inf.
static constexpr float kForceSelection = 1e6f;

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

namespace {

std::mutex g_registry_mutex;
std::unordered_map<const llama_context *, std::unique_ptr<context_state>> g_registry;

context_state & state_for_write(const llama_context * lctx) {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    auto & slot = g_registry[lctx];
    if (!slot) {
        const llama_hparams & hp = lctx->get_model().hparams;
        slot                = std::make_unique<context_state>();
        slot->n_layer       = (int32_t) hp.n_layer_all;
        slot->n_expert      = (int32_t) hp.n_expert;
        slot->n_expert_used = (int32_t) hp.n_expert_used_max();
        slot->n_seq_max     = (int32_t) lctx->n_seq_max();
        slot->model_selection_bias.resize(hp.n_layer_all);
        slot->routers.assign(hp.n_layer_all, mote_layer_router{});
        slot->layer_rpc_device.assign(hp.n_layer_all, nullptr);
        for (int32_t il = 0; il < (int32_t) hp.n_layer(); ++il) {
            ggml_backend_dev_t dev = lctx->get_model().dev_layer(il);
            if (dev != nullptr && strcmp(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev)), "RPC") == 0) {
                slot->layer_rpc_device[il] = dev;
            }
        }
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

const char * scope_name(int32_t scope) {
    switch (scope) {
        case MOTE_SCOPE_ALL:      return "all";
        case MOTE_SCOPE_PREFILL:  return "prefill";
        case MOTE_SCOPE_DECODE:   return "decode";
        case MOTE_SCOPE_THINKING: return "thinking";
        default:                  return "unknown";
    }
}

// The shape rules are checked against: a model's router, or what a graph showed.
struct shape_view {
    bool                 known = false; // false: only the rules that need no model
    int32_t              n_layer = 0, n_expert = 0, n_expert_groups = 0, n_group_used = 0;
    std::vector<int32_t> n_used;     // [n_layer] experts selected per token
    std::vector<uint8_t> moe_layers; // [n_layer]
};

std::string layer_list(const shape_view & s) {
    std::string out;
    int32_t first = -1;
    for (int32_t il = 0; il <= s.n_layer; ++il) {
        const bool on = il < s.n_layer && s.moe_layers[il];
        if (on && first < 0) {
            first = il;
        } else if (!on && first >= 0) {
            out += (out.empty() ? "" : ", ") + std::to_string(first) + (il - 1 > first ? ".." + std::to_string(il - 1) : "");
            first = -1;
        }
    }
    return out.empty() ? "none" : out;
}

// The steering contract's rules, one step each. check() applies them in this order and stops at the first
// violation: the arguments, each entry on its own, then, phase by phase, the entries that meet on one expert
// and (with a model) each layer's limits.

// On one expert, only bias + gain and drop + gain combine: every other pair of modes is a contradiction.
bool combinable(int32_t a, int32_t b) {
    auto pair = [&](int32_t x, int32_t y) { return (a == x && b == y) || (a == y && b == x); };
    return pair(MOTE_MODE_BIAS, MOTE_MODE_GAIN) || pair(MOTE_MODE_DROP, MOTE_MODE_GAIN);
}

// thinking is decoding too: decode entries apply inside thinking spans
bool applies_in(int32_t scope, int32_t phase) {
    return scope == MOTE_SCOPE_ALL || scope == phase || (phase == MOTE_SCOPE_THINKING && scope == MOTE_SCOPE_DECODE);
}

// Whether an entry takes its expert out of selection: a mask, or a -inf bias at a positive strength (at
// strength 0 every bias, -inf included, is ignored).
bool switches_off(const mote_entry & en, double strength) {
    return en.mode == MOTE_MODE_MASK || (en.mode == MOTE_MODE_BIAS && en.value == -INFINITY && strength > 0.0f);
}

int32_t check_arguments(const shape_view & shape, const mote_entry * entries, int32_t n_entries, double strength) {
    if (n_entries < 0 || (entries == nullptr && n_entries > 0)) {
        return fail("steering: null entries");
    }
    if (shape.known && shape.n_expert == 0) {
        return fail("this model has no experts (a dense model): steering needs a Mixture-of-Experts model");
    }
    if (!std::isfinite(strength)) {
        return fail("strength must be a finite number, got %g", strength);
    }
    return 0;
}

// An entry's layer, expert, mode and scope; with a model, also that the layer routes and the expert exists.
int32_t check_target(const shape_view & shape, const mote_entry & en) {
    if (en.layer < 0) {
        return fail("layer %d is out of range: layers are numbered from 0", en.layer);
    }
    if (en.expert < 0 || (shape.known && en.expert >= shape.n_expert)) {
        return shape.known ? fail("expert %d is out of range: this model has experts 0..%d per layer", en.expert,
                                  shape.n_expert - 1)
                           : fail("expert %d is out of range: experts are numbered from 0", en.expert);
    }
    if (en.mode < MOTE_MODE_MASK || en.mode > MOTE_MODE_GAIN) {
        return fail("unknown steering mode %d for layer %d expert %d", en.mode, en.layer, en.expert);
    }
    if (en.scope < MOTE_SCOPE_ALL || en.scope > MOTE_SCOPE_THINKING) {
        return fail("unknown steering scope %d for layer %d expert %d", en.scope, en.layer, en.expert);
    }
    if (shape.known && (en.layer >= shape.n_layer || !shape.moe_layers[en.layer])) {
        return fail("layer %d is not an MoE layer of this model: its MoE layers are %s", en.layer,
                    layer_list(shape).c_str());
    }
    return 0;
}

// A bias is finite or -inf, stays a 32-bit float once scaled, and a -inf one is never scaled negative.
int32_t check_bias(const mote_entry & en, double strength) {
    if (std::isnan(en.value) || en.value == INFINITY) {
        return fail("bias for layer %d expert %d must be finite or -inf, got %g", en.layer, en.expert, en.value);
    }
    if (std::isfinite(en.value) && !std::isfinite((float) (en.value * strength))) {
        return fail("bias %g for layer %d expert %d times strength %g overflows a 32-bit float", en.value, en.layer,
                    en.expert, strength);
    }
    if (en.value == -INFINITY && strength < 0.0f) {
        return fail("a -inf bias (layer %d expert %d) cannot be scaled by a negative strength: use -profile to "
                    "invert it (a -inf bias becomes a force)", en.layer, en.expert);
    }
    return 0;
}

int32_t check_gain(const mote_entry & en) {
    if (!std::isfinite(en.value) || en.value < 0.0f) {
        return fail("gain for layer %d expert %d must be a finite number >= 0, got %g", en.layer, en.expert,
                    en.value);
    }
    return 0;
}

// One entry on its own, whatever the others are.
int32_t check_entry(const shape_view & shape, const mote_entry & en, double strength) {
    if (check_target(shape, en) != 0) {
        return -1;
    }
    switch (en.mode) {
        case MOTE_MODE_BIAS: return check_bias(en, strength);
        case MOTE_MODE_GAIN: return check_gain(en);
        default:             return 0;
    }
}

// The entries in effect in one phase, by (layer, expert), each expert's in the order given.
using expert_entries = std::map<std::pair<int32_t, int32_t>, std::vector<const mote_entry *>>;

expert_entries entries_in(int32_t phase, const mote_entry * entries, int32_t n_entries) {
    expert_entries on;
    for (int32_t i = 0; i < n_entries; ++i) {
        if (applies_in(entries[i].scope, phase)) {
            on[{ entries[i].layer, entries[i].expert }].push_back(&entries[i]);
        }
    }
    return on;
}

// Two entries on one expert in one phase, x given before y. The same selection twice is one; a bias or gain
// of another scope adds to (multiplies) this phase's; two of one scope are a mistake.
int32_t check_pair(const mote_entry & x, const mote_entry & y) {
    if (x.mode != y.mode) {
        if (combinable(x.mode, y.mode)) {
            return 0;
        }
        return fail("contradictory entries for layer %d expert %d: %s (%s) cannot be combined with %s (%s); keep "
                    "one of them (on one expert only bias + gain and drop + gain combine)", x.layer, x.expert,
                    mode_name(x.mode), scope_name(x.scope), mode_name(y.mode), scope_name(y.scope));
    }
    const bool valued = x.mode == MOTE_MODE_BIAS || x.mode == MOTE_MODE_GAIN;
    if (!valued || x.scope != y.scope) {
        return 0;
    }
    const std::string scope = x.scope == MOTE_SCOPE_ALL ? "" : std::string(" (") + scope_name(x.scope) + ")";
    return fail("two %s entries for layer %d expert %d%s: give one (sum the biases, multiply the gains), or "
                "compose two profiles with +", mode_name(x.mode), x.layer, x.expert, scope.c_str());
}

// Every pair of entries that meet on one expert.
int32_t check_pairs(const expert_entries & on) {
    for (const auto & kv : on) {
        const std::vector<const mote_entry *> & list = kv.second;
        for (size_t a = 0; a < list.size(); ++a) {
            for (size_t b = 0; b < a; ++b) {
                if (check_pair(*list[b], *list[a]) != 0) {
                    return -1;
                }
            }
        }
    }
    return 0;
}

// What one phase's entries ask of one layer: experts switched off and forced, each counted once (an expert
// may carry the same selection in two scopes that both apply).
struct layer_load {
    int32_t           forced = 0;
    int32_t           masked = 0;
    std::set<int32_t> forced_groups; // the expert groups of forced experts (group-limited routing only)
};

std::vector<layer_load> loads_of(const shape_view & shape, const expert_entries & on, double strength) {
    std::vector<layer_load> loads(shape.n_layer);
    const int32_t group_size = shape.n_expert_groups > 1 ? shape.n_expert / shape.n_expert_groups : 0;
    for (const auto & [target, list] : on) {
        const auto [layer, expert] = target;
        layer_load & load          = loads[layer];
        auto         any           = [&](auto pred) { return std::any_of(list.begin(), list.end(), pred); };
        load.masked += any([strength](const mote_entry * en) { return switches_off(*en, strength); });
        if (any([](const mote_entry * en) { return en->mode == MOTE_MODE_FORCE; })) {
            load.forced += 1;
            if (group_size > 0) {
                load.forced_groups.insert(expert / group_size);
            }
        }
    }
    return loads;
}

// Per layer: at most k forced experts, masks leave at least k selectable, forced experts within the groups a
// token keeps. `during` names the phase, or is empty.
int32_t check_limits(const shape_view & shape, const std::vector<layer_load> & loads, const std::string & during) {
    for (int32_t il = 0; il < shape.n_layer; ++il) {
        const layer_load & load = loads[il];
        const int32_t      k    = shape.n_used[il];
        if (load.forced > k) {
            return fail("layer %d forces %d experts%s but this model selects only %d per token: force at most %d",
                        il, load.forced, during.c_str(), k, k);
        }
        if (shape.n_expert - load.masked < k) {
            return fail("layer %d masks %d of %d experts%s, leaving fewer than the %d each token needs: mask at "
                        "most %d per layer", il, load.masked, shape.n_expert, during.c_str(), k, shape.n_expert - k);
        }
        const int32_t groups = (int32_t) load.forced_groups.size();
        if (shape.n_expert_groups > 1 && groups > shape.n_group_used) {
            return fail("layer %d forces experts in %d expert groups%s but this model keeps only %d groups per "
                        "token: force experts of at most %d groups", il, groups, during.c_str(), shape.n_group_used,
                        shape.n_group_used);
        }
    }
    return 0;
}

// One layer's tables before any entry: every expert as upstream routes it.
layer_steering idle_layer(int32_t n_expert) {
    layer_steering ls;
    ls.logit_bias.assign(n_expert, 0.0f);
    ls.force.assign(n_expert, 0.0f);
    ls.selection.assign(n_expert, 0.0f);
    ls.keep.assign(n_expert, 1.0f);
    ls.gain.assign(n_expert, 1.0f);
    return ls;
}

// Writes one entry into its layer's tables; biases of several scopes add up, gains multiply.
void apply(layer_steering & ls, const mote_entry & en, double strength) {
    const int32_t e = en.expert;
    if (switches_off(en, strength)) {
        ls.logit_bias[e] = -INFINITY;
        ls.selection[e]  = -INFINITY;
        return;
    }
    switch (en.mode) {
        case MOTE_MODE_DROP:
            ls.keep[e] = 0.0f;
            break;
        case MOTE_MODE_FORCE:
            ls.force[e]     = 1.0f;
            ls.selection[e] = kForceSelection;
            break;
        case MOTE_MODE_BIAS:
            if (std::isfinite(en.value)) { // a -inf bias left here is at strength 0: ignored
                ls.logit_bias[e] += (float) (en.value * strength);
            }
            break;
        case MOTE_MODE_GAIN:
            ls.gain[e] *= en.value;
            break;
    }
}

// Sets the flags that say which of the layer's tables differ from identity (and so get graph nodes).
void mark_tables(layer_steering & ls) {
    auto differs = [](const std::vector<float> & table, float identity) {
        return std::any_of(table.begin(), table.end(), [identity](float v) { return v != identity; });
    };
    ls.has_logit_bias = differs(ls.logit_bias, 0.0f);
    ls.has_force      = differs(ls.force, 0.0f);
    ls.has_selection  = differs(ls.selection, 0.0f);
    ls.has_keep       = differs(ls.keep, 1.0f);
    ls.has_gain       = differs(ls.gain, 1.0f);
}

// One phase's tables, per layer; empty when no entry applies in the phase, so the graph stays upstream's.
phase_steering compile(const shape_view & shape, const expert_entries & on, double strength) {
    phase_steering layers;
    if (on.empty()) {
        return layers;
    }
    layers.assign(shape.n_layer, idle_layer(shape.n_expert));
    for (const auto & kv : on) {
        for (const mote_entry * en : kv.second) {
            apply(layers[en->layer], *en, strength);
        }
    }
    for (layer_steering & ls : layers) {
        mark_tables(ls);
    }
    return layers;
}

// Validates entries for every phase and, when `out` is given, compiles each phase's tables. Returns -1
// (with the error set) on the first violation.
int32_t check(const shape_view & shape, const mote_entry * entries, int32_t n_entries, double strength,
              std::array<phase_steering, std::size(kPhases)> * out) {
    if (check_arguments(shape, entries, n_entries, strength) != 0) {
        return -1;
    }
    for (int32_t i = 0; i < n_entries; ++i) {
        if (check_entry(shape, entries[i], strength) != 0) {
            return -1;
        }
    }
    // limits name the phase only when some entry is scoped to one
    const bool scoped =
        std::any_of(entries, entries + n_entries, [](const mote_entry & e) { return e.scope != MOTE_SCOPE_ALL; });
    for (size_t p = 0; p < std::size(kPhases); ++p) {
        const expert_entries on = entries_in(kPhases[p], entries, n_entries);
        if (check_pairs(on) != 0) {
            return -1;
        }
        if (!shape.known) {
            continue;
        }
        const std::string during = scoped ? std::string(" during ") + scope_name(kPhases[p]) : std::string();
        if (check_limits(shape, loads_of(shape, on, strength), during) != 0) {
            return -1;
        }
        if (out != nullptr) {
            (*out)[p] = compile(shape, on, strength);
        }
    }
    return 0;
}

// The shape of what a context's graph routes: MoE layers are those whose graph called the router.
shape_view shape_of(const llama_context * lctx, const context_state & st) {
    const llama_hparams & hp = lctx->get_model().hparams;
    shape_view s;
    s.known           = true;
    s.n_layer         = st.n_layer;
    s.n_expert        = st.n_expert;
    s.n_expert_groups = (int32_t) hp.n_expert_groups;
    s.n_group_used    = (int32_t) hp.n_group_used;
    s.n_used.resize(st.n_layer);
    s.moe_layers.resize(st.n_layer);
    for (int32_t il = 0; il < st.n_layer; ++il) {
        const mote_layer_router & r = st.routers[il];
        s.moe_layers[il] = r.n_calls > 0 && r.n_expert == st.n_expert;
        s.n_used[il]     = r.n_expert_used > 0 ? r.n_expert_used : (int32_t) hp.n_expert_used(il);
    }
    return s;
}

bool routes_anything(const context_state & st) {
    return std::any_of(st.routers.begin(), st.routers.end(), [](const mote_layer_router & r) { return r.n_calls > 0; });
}

// Why capture or steering cannot work on this context, or nullptr.
const char * unroutable(const context_state & st) {
    if (st.n_expert == 0) {
        return "this model has no experts (a dense model)";
    }
    if (!routes_anything(st)) {
        return "the engine's graph for this model routes no token through its experts (its expert tensors are "
               "loaded but unused by this architecture's graph)";
    }
    return nullptr;
}

// Compiles entries into `slot` (all or nothing: on error the slot keeps what it had).
int32_t set_slot(llama_context * ctx, steer_slot & slot, const mote_entry * entries, int32_t n_entries, double strength) {
    context_state & st = state_for_write(ctx);
    if (const char * why = unroutable(st)) {
        return fail("cannot steer: %s", why);
    }
    std::array<phase_steering, std::size(kPhases)> compiled;
    if (check(shape_of(ctx, st), entries, n_entries, strength, &compiled) != 0) {
        return -1;
    }
    slot.compiled = std::move(compiled);
    return 0;
}

} // namespace

context_state * state_of(const llama_context * lctx) {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    const auto it = g_registry.find(lctx);
    return it == g_registry.end() ? nullptr : it->second.get();
}

context_state * state_for_graph(const llama_context * lctx) {
    context_state & st = state_for_write(lctx);
    st.build_layer = -1;
    st.build_call  = 0;
    return &st;
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

int32_t mote_get_layer_router(const llama_context * ctx, int32_t layer, struct mote_layer_router * out) {
    const context_state * st = ctx ? state_of(ctx) : nullptr;
    if (st == nullptr || out == nullptr) {
        return fail("mote_get_layer_router: the context has built no graph yet");
    }
    if (layer < 0 || layer >= st->n_layer) {
        return fail("layer %d is out of range: the model has layers 0..%d", layer, st->n_layer - 1);
    }
    *out = st->routers[layer];
    return 0;
}

int32_t mote_steer_check(const struct mote_shape * shape, const mote_entry * entries, int32_t n_entries, double strength) {
    shape_view s;
    if (shape != nullptr) {
        if (shape->n_layer < 0 || shape->n_expert < 0 || shape->n_expert_used < 0) {
            return fail("mote_steer_check: bad shape");
        }
        s.known           = true;
        s.n_layer         = shape->n_layer;
        s.n_expert        = shape->n_expert;
        s.n_expert_groups = shape->n_expert_groups;
        s.n_group_used    = shape->n_group_used;
        s.n_used.assign(shape->n_layer, shape->n_expert_used);
        s.moe_layers.assign(shape->n_layer, 1);
        if (shape->moe_layers != nullptr) {
            std::copy_n(shape->moe_layers, shape->n_layer, s.moe_layers.begin());
        }
    }
    return check(s, entries, n_entries, strength, nullptr);
}

int32_t mote_steer_set(llama_context * ctx, const mote_entry * entries, int32_t n_entries, double strength) {
    if (ctx == nullptr || (entries == nullptr && n_entries > 0) || n_entries < 0) {
        return fail("mote_steer_set: null context or entries");
    }
    context_state & st = state_for_write(ctx);
    if (n_entries == 0) {
        st.base = steer_slot{ {}, st.base.phase };
        return 0;
    }
    return set_slot(ctx, st.base, entries, n_entries, strength);
}

int32_t mote_steer_set_seq(llama_context * ctx, int32_t seq_id, const mote_entry * entries, int32_t n_entries,
                           double strength) {
    if (ctx == nullptr || (entries == nullptr && n_entries > 0) || n_entries < 0) {
        return fail("mote_steer_set_seq: null context or entries");
    }
    context_state & st = state_for_write(ctx);
    if (seq_id < 0 || seq_id >= st.n_seq_max) {
        return fail("sequence id %d is out of range: this context has sequences 0..%d", seq_id, st.n_seq_max - 1);
    }
    if (n_entries == 0) {
        st.seqs.erase(seq_id);
        return 0;
    }
    steer_slot slot{ {}, st.base.phase };
    if (set_slot(ctx, slot, entries, n_entries, strength) != 0) {
        return -1;
    }
    st.seqs[seq_id] = std::move(slot);
    return 0;
}

int32_t mote_steer_phase(llama_context * ctx, int32_t phase) {
    if (ctx == nullptr || phase < MOTE_SCOPE_PREFILL || phase > MOTE_SCOPE_THINKING) {
        return fail("mote_steer_phase: phase must be prefill (1), decode (2) or thinking (3), got %d", phase);
    }
    context_state & st = state_for_write(ctx);
    st.base.phase = phase;
    for (auto & kv : st.seqs) {
        kv.second.phase = phase;
    }
    return 0;
}

int32_t mote_steer_phase_seq(llama_context * ctx, int32_t seq_id, int32_t phase) {
    if (ctx == nullptr || phase < MOTE_SCOPE_PREFILL || phase > MOTE_SCOPE_THINKING) {
        return fail("mote_steer_phase_seq: phase must be prefill (1), decode (2) or thinking (3), got %d", phase);
    }
    context_state & st = state_for_write(ctx);
    const auto it = st.seqs.find(seq_id);
    if (it == st.seqs.end()) {
        return fail("sequence %d has no steering of its own", seq_id);
    }
    it->second.phase = phase;
    return 0;
}

void mote_steer_clear(llama_context * ctx) {
    if (context_state * st = ctx ? state_of(ctx) : nullptr) {
        st->base = steer_slot{ {}, st->base.phase };
        st->seqs.clear();
    }
}

int32_t mote_capture_start(llama_context * ctx, int32_t flags) {
    if (ctx == nullptr) {
        return fail("mote_capture_start: null context");
    }
    if (flags & ~(MOTE_CAPTURE_PROBS | MOTE_CAPTURE_TRACE | MOTE_CAPTURE_OUTPUT_NORMS)) {
        return fail("unknown capture flags 0x%x", (unsigned) flags);
    }
    context_state & st = state_for_write(ctx);
    if (const char * why = unroutable(st)) {
        return fail("cannot capture routing: %s", why);
    }
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

int32_t mote_capture_read(const llama_context * ctx, int32_t label, int32_t n_layer, int32_t n_expert, int64_t * counts,
                          double * weight_sums, double * prob_sums, double * output_norms, int64_t * tokens) {
    const context_state * st = ctx ? state_of(ctx) : nullptr;
    if (st == nullptr || n_layer != st->n_layer || n_expert != st->n_expert) {
        return fail("mote_capture_read: buffers for %d layers x %d experts do not match the model's %d x %d", n_layer,
                    n_expert, st ? st->n_layer : 0, st ? st->n_expert : 0);
    }
    const auto it = st->capture.stats.find(label);
    if (it == st->capture.stats.end()) {
        return fail("no routing was captured for label %d", label);
    }
    const label_stats & s = it->second;
    if ((prob_sums && s.prob_sums.empty()) || (output_norms && s.output_norms.empty())) {
        return fail("mote_capture_read: probabilities or output norms were not captured (capture flags)");
    }
    if (counts) std::copy(s.counts.begin(), s.counts.end(), counts);
    if (weight_sums) std::copy(s.weight_sums.begin(), s.weight_sums.end(), weight_sums);
    if (prob_sums) std::copy(s.prob_sums.begin(), s.prob_sums.end(), prob_sums);
    if (output_norms) std::copy(s.output_norms.begin(), s.output_norms.end(), output_norms);
    if (tokens) std::copy(s.tokens.begin(), s.tokens.end(), tokens);
    return 0;
}

int64_t mote_capture_trace_rows(const llama_context * ctx) {
    const context_state * st = ctx ? state_of(ctx) : nullptr;
    return st ? (int64_t) st->capture.trace_meta.size() / 4 : 0;
}

int32_t mote_capture_trace_read(const llama_context * ctx, int64_t rows, int32_t n_expert_used, int32_t n_expert,
                                int32_t * meta, int32_t * ids, float * weights, float * probs) {
    const context_state * st = ctx ? state_of(ctx) : nullptr;
    if (st == nullptr) {
        return fail("no routing trace on this context");
    }
    const capture_state & c = st->capture;
    const int64_t have = (int64_t) c.trace_meta.size() / 4;
    if (rows != have || n_expert_used != st->n_expert_used || n_expert != st->n_expert ||
        (probs && (int64_t) c.trace_probs.size() != have * n_expert)) {
        return fail("mote_capture_trace_read: buffers for %lld rows x %d (of %d experts) do not match the trace's "
                    "%lld x %d (of %d)", (long long) rows, n_expert_used, n_expert, (long long) have,
                    st->n_expert_used, st->n_expert);
    }
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
