// mote-graph.cpp — the graph side of steering and capture: nodes added to build_moe_ffn and the
// per-ubatch read-out of the routing tap.
//
// Steering values live in one graph input (set before every ubatch), so they reach any backend
// without host-side hooks, and changing only values keeps llama.cpp's graph reuse.
#include "mote-graph.h"
#include "mote-state.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

namespace mote {

// A forced expert's logit is lifted to the token's maximum plus this.
static constexpr float kForceEpsilon = 1e-3f;
// Subtracted from forced experts' logits when looking for the best remaining one: finite, so a
// token whose other experts are all masked still gets a finite lift.
static constexpr float kForceExclude = 1e30f;

namespace {

// The per-expert tables steering reads, one row each of the graph's packed steering input.
enum class table_kind { logit_bias, force, selection, keep, gain };

class steer_input : public llm_graph_input_i {
public:
    struct table {
        int32_t       layer;
        table_kind    kind;
        ggml_tensor * model_selection; // for `selection`: the model's exp_probs_b it replaces
    };

    // A layer's tap: rows [offset, offset + t->ne[1]) of chain `chain`'s tail, the graph output read.
    struct tap {
        ggml_tensor * t      = nullptr;
        int32_t       chain  = -1;
        int64_t       offset = 0;
    };
    enum tap_kind { ids_tap, weights_tap, probs_tap, norms_tap, n_tap_kinds };
    struct layer_taps {
        tap ids;     // I32 [n_expert_used, rows]
        tap weights; // F32 [n_expert_used, rows]
        tap probs;   // F32 [n_expert, rows]
        tap norms;   // F32 [n_expert_used, rows]: L2 norm of each selected expert's output
    };
    // Taps of one kind concatenated along their rows: those of consecutive layers on one rpc-server,
    // whose get_tensor is a blocking round trip per tensor (elsewhere a chain holds one layer's tap).
    struct tap_chain {
        ggml_tensor * tail;
        const void *  device; // the layers' RPC device, nullptr for a single local tap
    };

    steer_input(context_state * st, int32_t n_layer) : st(st), taps(n_layer) {}

    void set_input(const llama_ubatch * ubatch) override;

    // the topology is covered by graph_key() in llm_graph_params; values are set every ubatch
    bool can_reuse(const llm_graph_params & params) override {
        GGML_UNUSED(params);
        return true;
    }

    context_state * st;
    // F32 [n_expert, rows * n_slots]: every steering table of the graph in one tensor, so that a ubatch
    // costs one upload (a synchronised copy per table would dominate a GPU decode step); a table has a
    // row per steering slot (the context's, then one per sequence) while sequences steer on their own
    ggml_tensor *           values  = nullptr;
    int32_t                 n_slots = 1;
    std::vector<table>      tables; // table index -> what it holds
    std::vector<float>      host;
    std::vector<layer_taps> taps;
    std::vector<tap_chain>  chains;
    int32_t                 open_chain[n_tap_kinds] = { -1, -1, -1, -1 }; // the chain a kind's next tap may join
    // I32: each token's steering slot, for all tokens of the ubatch and for its output tokens (the
    // last layer routes only those)
    ggml_tensor * slot_all = nullptr;
    ggml_tensor * slot_out = nullptr;
};

// Which tables a layer's graph needs: the union over the context's and the sequences' steerings.
struct layer_flags {
    bool logit_bias = false, force = false, selection = false, keep = false, gain = false;

    bool any() const { return logit_bias || force || selection || keep || gain; }
};

layer_flags flags_of(const context_state * st, int32_t il) {
    layer_flags f;
    auto add = [&](const steer_slot & slot) {
        const phase_steering & layers = slot.layers();
        if ((size_t) il < layers.size()) {
            const layer_steering & ls = layers[il];
            f.logit_bias |= ls.has_logit_bias;
            f.force |= ls.has_force;
            f.selection |= ls.has_selection;
            f.keep |= ls.has_keep;
            f.gain |= ls.has_gain;
        }
    };
    add(st->base);
    for (const auto & kv : st->seqs) {
        add(kv.second);
    }
    return f;
}

// What a table holds for an expert when its steering slot has nothing there.
float identity(table_kind kind) {
    return kind == table_kind::keep || kind == table_kind::gain ? 1.0f : 0.0f;
}

void steer_input::set_input(const llama_ubatch * ubatch) {
    if (values == nullptr || values->buffer == nullptr) {
        return;
    }
    const size_t n_expert = (size_t) values->ne[0];
    host.assign(ggml_nelements(values), 0.0f);
    static const layer_steering kIdle; // a slot with nothing in this layer: empty arrays
    for (size_t row = 0; row < tables.size() * n_slots; ++row) {
        const table &          t      = tables[row / n_slots];
        float *                dst    = host.data() + row * n_expert;
        const phase_steering & layers = st->slot((int32_t) (row % n_slots))->layers();
        const layer_steering & ls     = (size_t) t.layer < layers.size() ? layers[t.layer] : kIdle;
        if (ls.logit_bias.empty() && t.kind != table_kind::selection) {
            std::fill_n(dst, n_expert, identity(t.kind));
            continue;
        }
        switch (t.kind) {
            case table_kind::logit_bias: std::copy_n(ls.logit_bias.data(), n_expert, dst); break;
            case table_kind::force:      std::copy_n(ls.force.data(), n_expert, dst); break;
            case table_kind::keep:       std::copy_n(ls.keep.data(), n_expert, dst); break;
            case table_kind::gain:       std::copy_n(ls.gain.data(), n_expert, dst); break;
            case table_kind::selection: {
                std::vector<float> & model_b = st->model_selection_bias[t.layer];
                if (model_b.empty()) {
                    model_b.resize(ggml_nelements(t.model_selection));
                    ggml_backend_tensor_get(t.model_selection, model_b.data(), 0, ggml_nbytes(t.model_selection));
                }
                for (size_t e = 0; e < n_expert; ++e) {
                    dst[e] = model_b[e] + (ls.selection.empty() ? 0.0f : ls.selection[e]);
                }
                break;
            }
        }
    }
    ggml_backend_tensor_set(values, host.data(), 0, ggml_nbytes(values));

    // each token's slot: its sequence's own steering, or the context's
    std::vector<int32_t> all, out;
    for (uint32_t i = 0; i < ubatch->n_tokens; ++i) {
        const llama_seq_id seq  = ubatch->seq_id[i][0];
        const int32_t      slot = st->seqs.count(seq) ? 1 + seq : 0;
        all.push_back(slot);
        if (ubatch->output != nullptr && ubatch->output[i]) {
            out.push_back(slot);
        }
    }
    if (slot_all != nullptr && slot_all->buffer != nullptr) {
        ggml_backend_tensor_set(slot_all, all.data(), 0, ggml_nbytes(slot_all));
    }
    if (slot_out != nullptr && slot_out->buffer != nullptr && (int64_t) out.size() == slot_out->ne[0]) {
        ggml_backend_tensor_set(slot_out, out.data(), 0, ggml_nbytes(slot_out));
    }
}

steer_input & input_of(const llm_graph_context & g) {
    for (auto & inp : g.res->inputs) {
        if (auto * si = dynamic_cast<steer_input *>(inp.get())) {
            return *si;
        }
    }
    auto * added = g.res->add_input(std::make_unique<steer_input>(g.mote, g.mote->n_layer));
    return *static_cast<steer_input *>(added);
}

// Table `kind` of layer il from the packed steering input: [n_expert], or, while sequences steer on
// their own, [n_expert, n_tokens] (each token's row picked by its steering slot).
// Each token's steering slot for a router call over n_tokens tokens: the ubatch's tokens, or, in the last
// layer, its output tokens.
ggml_tensor * slot_index(const llm_graph_context & g, steer_input & in, int64_t n_tokens) {
    const bool      all = n_tokens == (int64_t) g.ubatch.n_tokens;
    ggml_tensor *& t   = all ? in.slot_all : in.slot_out;
    if (t == nullptr) {
        t = ggml_new_tensor_1d(g.ctx0, GGML_TYPE_I32, n_tokens);
        ggml_set_input(t);
        ggml_set_name(t, all ? "mote_slot" : "mote_slot_out");
    }
    return t;
}

ggml_tensor * new_table(const llm_graph_context & g, table_kind kind, int il, const char * name,
                        ggml_tensor * model_selection = nullptr) {
    steer_input & in = input_of(g);
    const context_state * st = g.mote;
    if (in.values == nullptr) {
        int64_t n_tables = 0; // an upper bound: a hook may add no node (e.g. an arch without exp_probs_b)
        for (int32_t l = 0; l < st->n_layer; ++l) {
            const layer_flags f = flags_of(st, l);
            n_tables += f.logit_bias + f.force + f.selection + f.keep + f.gain;
        }
        in.n_slots = st->n_slots();
        in.values  = ggml_new_tensor_2d(g.ctx0, GGML_TYPE_F32, st->n_expert, n_tables * in.n_slots);
        ggml_set_input(in.values);
        ggml_set_name(in.values, "mote_steering");
    }
    // a layer that calls its router more than once (grovemoe) reads the same row again
    size_t row = 0;
    while (row < in.tables.size() && !(in.tables[row].layer == il && in.tables[row].kind == kind)) {
        ++row;
    }
    if (row == in.tables.size()) {
        GGML_ASSERT((int64_t) (row + 1) * in.n_slots <= in.values->ne[1]); // counted from the same flags
        in.tables.push_back({ il, kind, model_selection });
    }
    ggml_tensor * t = nullptr;
    if (in.n_slots == 1) {
        t = ggml_view_1d(g.ctx0, in.values, in.values->ne[0], row * in.values->nb[1]);
    } else {
        ggml_tensor * rows = ggml_view_2d(g.ctx0, in.values, in.values->ne[0], in.n_slots, in.values->nb[1],
                                          row * in.n_slots * in.values->nb[1]);
        t = ggml_get_rows(g.ctx0, rows, slot_index(g, in, st->build_tokens));
    }
    ggml_format_name(t, "%s-%d", name, il);
    // expanded now, so that the view node sits ahead of the router's nodes: CUDA fuses the router
    // only when its nodes are adjacent
    ggml_build_forward_expand(g.gf, t);
    return t;
}

// table [n_expert] or [n_expert, n_tokens] -> its value for each selected expert, [1, n_expert_used, n_tokens]
ggml_tensor * per_selected(ggml_context * ctx, ggml_tensor * table, ggml_tensor * selected) {
    const int64_t n_expert = table->ne[0];
    const int64_t n_tokens = selected->ne[1];
    ggml_tensor * rows = table->ne[1] == n_tokens && n_tokens > 1
                             ? ggml_reshape_3d(ctx, table, 1, n_expert, n_tokens)
                             : ggml_repeat_4d(ctx, ggml_reshape_3d(ctx, table, 1, n_expert, 1), 1, n_expert, n_tokens, 1);
    return ggml_get_rows(ctx, rows, selected);
}

// The layer's steering flags (over every steering slot) when it has any, else nullptr.
const layer_flags * steering_of(const llm_graph_context & g, int il, layer_flags & out) {
    const context_state * st = g.mote;
    if (st == nullptr || il < 0 || il >= st->n_layer) {
        return nullptr;
    }
    out = flags_of(st, il);
    return out.any() ? &out : nullptr;
}

// The router of layer il, when the call being built is the layer's first: weight-level steering
// (drop, gain) and capture act on the first call only; a later call of the same layer routes other
// experts from the same logits (grovemoe's adjugate experts) and gets the logit-level steering.
mote_layer_router * first_call(const llm_graph_context & g, int il) {
    context_state * st = g.mote;
    if (st == nullptr || il < 0 || il >= st->n_layer || st->build_layer != il || st->build_call != 1) {
        return nullptr;
    }
    return &st->routers[il];
}

void set_tap(const llm_graph_context & g, steer_input::tap & slot, steer_input::tap_kind kind, ggml_tensor * src,
             const char * name, int il) {
    steer_input & in = input_of(g);
    // [width, rows]: a token per row (weights come as [1, n_expert_used, rows]), as chains join rows
    const int64_t width = src->ne[0] * (ggml_n_dims(src) > 2 ? src->ne[1] : 1);
    slot.t = ggml_cont_2d(g.ctx0, src, width, ggml_nelements(src) / width);
    ggml_format_name(slot.t, "%s-%d", name, il);
    const void * device = g.mote->layer_rpc_device[il];
    const int32_t open = in.open_chain[kind];
    if (device != nullptr && open >= 0 && in.chains[open].device == device &&
        in.chains[open].tail->ne[0] == slot.t->ne[0]) {
        steer_input::tap_chain & chain = in.chains[open];
        slot.chain  = open;
        slot.offset = chain.tail->ne[1];
        chain.tail->flags &= ~GGML_TENSOR_FLAG_OUTPUT; // only the chain's last tensor is read
        chain.tail = ggml_concat(g.ctx0, chain.tail, slot.t, 1);
        ggml_format_name(chain.tail, "%s-chain-%d", name, il);
    } else {
        slot.chain  = (int32_t) in.chains.size();
        slot.offset = 0;
        in.chains.push_back({ slot.t, device });
        in.open_chain[kind] = device != nullptr ? slot.chain : -1;
    }
    ggml_set_output(in.chains[slot.chain].tail);
    ggml_build_forward_expand(g.gf, in.chains[slot.chain].tail);
}

} // namespace

uint64_t graph_key(const context_state * st) {
    if (st == nullptr) {
        return 0;
    }
    uint64_t h = 1469598103934665603ull; // FNV-1a
    auto mix   = [&h](uint64_t v) {
        h ^= v;
        h *= 1099511628211ull;
    };
    bool any = false;
    for (int32_t il = 0; il < st->n_layer; ++il) {
        const layer_flags f    = flags_of(st, il);
        const uint64_t    bits = (uint64_t) f.logit_bias | (uint64_t) f.force << 1 | (uint64_t) f.selection << 2 |
                              (uint64_t) f.keep << 3 | (uint64_t) f.gain << 4;
        any |= bits != 0;
        mix(bits);
    }
    mix((uint64_t) st->n_slots());
    if (st->capture.active) {
        any = true;
        mix(0x100u | (uint64_t) st->capture.flags);
    }
    return any ? h : 0;
}

ggml_tensor * steer_logits(const llm_graph_context & g, ggml_tensor * logits, int il) {
    context_state * st = g.mote;
    if (st == nullptr || il < 0 || il >= st->n_layer) {
        return logits;
    }
    if (st->build_layer == il) {
        st->build_call += 1;
    } else {
        st->build_layer = il;
        st->build_call  = 1;
    }
    mote_layer_router & r = st->routers[il];
    r.n_calls = std::max(r.n_calls, st->build_call);
    if (st->build_call == 1) {
        r.n_expert = (int32_t) logits->ne[0];
    }

    st->build_tokens = logits->ne[1];
    layer_flags flags;
    const layer_flags * ls = steering_of(g, il, flags);
    if (ls == nullptr || (!ls->logit_bias && !ls->force) || logits->ne[0] != st->n_expert || logits->ne[1] == 0) {
        return logits;
    }
    ggml_tensor * out = logits;
    if (ls->logit_bias) {
        out = ggml_add(g.ctx0, out, new_table(g, table_kind::logit_bias, il, "mote_logit_bias"));
    }
    if (ls->force) {
        // forced experts take the best remaining (unmasked, unforced) logit + eps:
        //   out * (1 - force) + force * top
        // written so that a masked expert's -inf is never multiplied by 0
        const int64_t n_expert = out->ne[0];
        const int64_t n_tokens = out->ne[1];
        if (!ggml_is_contiguous(out)) {
            out = ggml_cont(g.ctx0, out);
        }
        ggml_tensor * force     = new_table(g, table_kind::force, il, "mote_force");
        ggml_tensor * remaining = ggml_add(g.ctx0, out, ggml_scale(g.ctx0, force, -kForceExclude));
        ggml_tensor * top_id    = ggml_argsort_top_k(g.ctx0, remaining, 1); // [1, n_tokens]
        ggml_tensor * top       = ggml_get_rows(g.ctx0, ggml_reshape_3d(g.ctx0, remaining, 1, n_expert, n_tokens), top_id);
        top = ggml_scale_bias(g.ctx0, ggml_reshape_2d(g.ctx0, top, 1, n_tokens), 1.0f, kForceEpsilon); // [1, n_tokens]
        ggml_tensor * kept   = ggml_mul(g.ctx0, out, ggml_scale_bias(g.ctx0, force, -1.0f, 1.0f));
        ggml_tensor * lifted = ggml_mul(g.ctx0, ggml_repeat(g.ctx0, top, out), force);
        out = ggml_add(g.ctx0, kept, lifted);
    }
    g.cb(out, "mote_logits", il);
    return out;
}

ggml_tensor * selection_bias(const llm_graph_context & g, ggml_tensor * exp_probs_b, int il) {
    if (mote_layer_router * r = first_call(g, il)) {
        r->selection_bias = exp_probs_b != nullptr;
    }
    layer_flags flags;
    const layer_flags * ls = steering_of(g, il, flags);
    if (ls == nullptr || !ls->selection || exp_probs_b == nullptr || ggml_nelements(exp_probs_b) != g.mote->n_expert) {
        return exp_probs_b;
    }
    return new_table(g, table_kind::selection, il, "mote_selection_bias", exp_probs_b);
}

ggml_tensor * drop_weights(const llm_graph_context & g, ggml_tensor * weights, ggml_tensor * selected,
                           llama_expert_gating_func_type gating, bool norm_w, int il) {
    layer_flags flags;
    const layer_flags * ls = steering_of(g, il, flags);
    if (ls == nullptr || !ls->keep || weights->ne[2] == 0 || first_call(g, il) == nullptr) {
        return weights;
    }
    ggml_tensor * keep = new_table(g, table_kind::keep, il, "mote_keep");
    ggml_tensor * w    = ggml_mul(g.ctx0, weights, per_selected(g.ctx0, keep, selected));
    if (gating == LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT && !norm_w) {
        // the softmax over the selected logits already normalised: renormalise over the survivors
        const int64_t n_used   = w->ne[1];
        const int64_t n_tokens = w->ne[2];
        ggml_tensor * w2  = ggml_reshape_2d(g.ctx0, w, n_used, n_tokens);
        ggml_tensor * sum = ggml_clamp(g.ctx0, ggml_sum_rows(g.ctx0, w2), 6.103515625e-5f, INFINITY);
        w = ggml_reshape_3d(g.ctx0, ggml_div(g.ctx0, w2, sum), 1, n_used, n_tokens);
    }
    g.cb(w, "mote_weights_dropped", il);
    return w;
}

ggml_tensor * finish_weights(const llm_graph_context & g, ggml_tensor * weights, ggml_tensor * selected,
                             ggml_tensor * probs, llama_expert_gating_func_type gating, bool norm_w, float w_scale,
                             int il) {
    mote_layer_router * r = first_call(g, il);
    if (r == nullptr) {
        return weights;
    }
    r->n_expert_used = (int32_t) weights->ne[1];
    r->gating        = (int32_t) gating;
    r->norm_w        = norm_w;
    r->w_scale       = w_scale;
    context_state * st = g.mote;
    if (weights->ne[2] == 0) {
        return weights;
    }
    layer_flags flags;
    const layer_flags * ls = steering_of(g, il, flags);
    if (ls != nullptr && ls->gain) {
        ggml_tensor * gain = new_table(g, table_kind::gain, il, "mote_gain");
        weights = ggml_mul(g.ctx0, weights, per_selected(g.ctx0, gain, selected));
        g.cb(weights, "mote_weights_gain", il);
    }
    if (st->capture.active && probs->ne[1] == st->n_expert) {
        // the router's nodes enter the graph first, in upstream's order, so that CUDA still fuses
        // them; the taps follow
        ggml_build_forward_expand(g.gf, weights);
        auto & taps = input_of(g).taps[il];
        set_tap(g, taps.ids, steer_input::ids_tap, selected, "mote_tap_ids", il);
        set_tap(g, taps.weights, steer_input::weights_tap, weights, "mote_tap_weights", il);
        if (st->capture.flags & MOTE_CAPTURE_PROBS) {
            ggml_tensor * p = ggml_reshape_2d(g.ctx0, probs, probs->ne[1], probs->ne[2]);
            if (gating == LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT) {
                p = ggml_soft_max(g.ctx0, p); // probs are raw logits for this gating
            }
            set_tap(g, taps.probs, steer_input::probs_tap, p, "mote_tap_probs", il);
        }
    }
    return weights;
}

void tap_expert_outputs(const llm_graph_context & g, ggml_tensor * experts, int il) {
    const context_state * st = g.mote;
    if (first_call(g, il) == nullptr || !st->capture.active || !(st->capture.flags & MOTE_CAPTURE_OUTPUT_NORMS) ||
        experts->ne[2] == 0) {
        return;
    }
    auto & taps = input_of(g).taps[il];
    if (taps.ids.t == nullptr) {
        return; // no routing tap in this layer: norms could not be attributed
    }
    // [n_embd, n_expert_used, n_tokens] -> [n_expert_used, n_tokens]
    ggml_tensor * sq    = ggml_sqr(g.ctx0, ggml_cont(g.ctx0, experts));
    ggml_tensor * norms = ggml_sqrt(g.ctx0, ggml_sum_rows(g.ctx0, sq));
    set_tap(g, taps.norms, steer_input::norms_tap, ggml_reshape_2d(g.ctx0, norms, experts->ne[1], experts->ne[2]),
            "mote_tap_norms", il);
}

namespace {

// Queues the copy of a chain's tail into host memory on the backend that computed it; the caller
// synchronises once for all chains (a synchronised copy per tap would stall a GPU decode step once
// per layer).
std::vector<uint8_t> queue_read(ggml_backend_sched_t sched, ggml_tensor * t) {
    std::vector<uint8_t> out(ggml_nbytes(t));
    ggml_backend_t backend = ggml_backend_sched_get_tensor_backend(sched, t);
    if (backend != nullptr) {
        ggml_backend_tensor_get_async(backend, t, out.data(), 0, out.size());
    } else {
        ggml_backend_tensor_get(t, out.data(), 0, out.size());
    }
    return out;
}

// A layer's tap inside its chain's bytes (rows of 4-byte values: aligned for T), or nullptr for no tap.
template <typename T> const T * tap_values(const std::vector<std::vector<uint8_t>> & chains,
                                           const steer_input::tap & tap) {
    if (tap.t == nullptr) {
        return nullptr;
    }
    return reinterpret_cast<const T *>(chains[tap.chain].data() + tap.offset * tap.t->nb[1]);
}

label_stats & stats_for(context_state & st, int32_t label) {
    label_stats & s = st.capture.stats[label];
    if (s.counts.empty()) {
        const size_t n = (size_t) st.n_layer * st.n_expert;
        s.counts.assign(n, 0);
        s.weight_sums.assign(n, 0.0);
        s.tokens.assign(st.n_layer, 0);
        if (st.capture.flags & MOTE_CAPTURE_PROBS) {
            s.prob_sums.assign(n, 0.0);
        }
        if (st.capture.flags & MOTE_CAPTURE_OUTPUT_NORMS) {
            s.output_norms.assign(n, 0.0);
        }
    }
    return s;
}

const steer_input * steer_input_of(const llm_graph_result * res) {
    for (const auto & inp : res->inputs) {
        if (const auto * in = dynamic_cast<const steer_input *>(inp.get())) {
            return in;
        }
    }
    return nullptr;
}

// Every chain's tail in host memory: the copies are queued on their backends, then synchronised once.
std::vector<std::vector<uint8_t>> read_chains(ggml_backend_sched_t sched, const steer_input & in) {
    std::vector<std::vector<uint8_t>> chains(in.chains.size());
    for (size_t c = 0; c < chains.size(); ++c) {
        chains[c] = queue_read(sched, in.chains[c].tail);
    }
    ggml_backend_sched_synchronize(sched);
    return chains;
}

// The ubatch token index of every output row (a layer that routed only the output tokens has one tap row each).
std::vector<uint32_t> output_tokens_of(const llama_ubatch & ubatch) {
    std::vector<uint32_t> out;
    for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
        if (ubatch.output != nullptr && ubatch.output[i]) {
            out.push_back(i);
        }
    }
    return out;
}

// One layer's routing in a ubatch: views into the chains' bytes, a row per token the layer routed.
struct layer_read {
    const int32_t * ids     = nullptr; // [rows, n_used]
    const float *   weights = nullptr; // [rows, n_used]
    const float *   probs   = nullptr; // [rows, n_expert], when captured
    const float *   norms   = nullptr; // [rows, n_used], when captured
    int64_t         n_used  = 0;
    int64_t         rows    = 0; // 0: nothing to count in this layer
    // the ubatch token of each row: every token, or only the output tokens
    const std::vector<uint32_t> * tokens = nullptr; // nullptr: row r is token r
};

layer_read read_layer(const steer_input::layer_taps & taps, const std::vector<std::vector<uint8_t>> & chains,
                      const llama_ubatch & ubatch, const std::vector<uint32_t> & output_tokens) {
    layer_read rd;
    if (taps.ids.t == nullptr) {
        return rd;
    }
    const int64_t rows = taps.ids.t->ne[1];
    if (rows != (int64_t) ubatch.n_tokens && rows != (int64_t) output_tokens.size()) {
        return rd; // rows cannot be attributed to tokens
    }
    rd.ids     = tap_values<int32_t>(chains, taps.ids);
    rd.weights = tap_values<float>(chains, taps.weights);
    rd.probs   = tap_values<float>(chains, taps.probs);
    if (taps.norms.t != nullptr && taps.norms.t->ne[1] == rows) {
        rd.norms = tap_values<float>(chains, taps.norms);
    }
    rd.n_used = taps.ids.t->ne[0];
    rd.rows   = rows;
    rd.tokens = rows == (int64_t) ubatch.n_tokens ? nullptr : &output_tokens;
    return rd;
}

// The binding under which sequence seq counts at position pos, or nullptr.
const seq_binding * binding_at(const capture_state & cap, llama_seq_id seq, llama_pos pos) {
    const auto b = cap.bindings.find(seq);
    if (b == cap.bindings.end() || pos < b->second.pos_begin || (b->second.pos_end >= 0 && pos >= b->second.pos_end)) {
        return nullptr;
    }
    return &b->second;
}

// Adds row r of layer il to a label's counts and sums.
void accumulate(label_stats & ls, const layer_read & rd, int64_t r, int32_t il, int32_t n_expert) {
    const size_t    base    = (size_t) il * n_expert;
    const int32_t * ids     = rd.ids + r * rd.n_used;
    const float *   weights = rd.weights + r * rd.n_used;
    for (int64_t j = 0; j < rd.n_used; ++j) {
        const int32_t e = ids[j];
        if (e < 0 || e >= n_expert) {
            continue;
        }
        ls.counts[base + e] += 1;
        ls.weight_sums[base + e] += weights[j];
        if (rd.norms != nullptr && !ls.output_norms.empty()) {
            ls.output_norms[base + e] += (double) weights[j] * rd.norms[r * rd.n_used + j];
        }
    }
    if (rd.probs != nullptr && !ls.prob_sums.empty()) {
        for (int32_t e = 0; e < n_expert; ++e) {
            ls.prob_sums[base + e] += rd.probs[r * n_expert + e];
        }
    }
    ls.tokens[il] += 1;
}

// Appends row r of layer il to the trace.
void append_trace(capture_state & cap, const layer_read & rd, int64_t r, int32_t il, int32_t n_expert, int32_t label,
                  llama_seq_id seq, llama_pos pos) {
    const int64_t row = r * rd.n_used;
    cap.trace_meta.insert(cap.trace_meta.end(), { label, seq, pos, il });
    cap.trace_ids.insert(cap.trace_ids.end(), rd.ids + row, rd.ids + row + rd.n_used);
    cap.trace_weights.insert(cap.trace_weights.end(), rd.weights + row, rd.weights + row + rd.n_used);
    if (rd.probs != nullptr) {
        cap.trace_probs.insert(cap.trace_probs.end(), rd.probs + r * n_expert, rd.probs + (r + 1) * n_expert);
    }
}

// Counts row r of layer il once for each bound sequence its token belongs to.
void count_row(context_state & st, const layer_read & rd, int64_t r, int32_t il, const llama_ubatch & ubatch) {
    const uint32_t  i   = rd.tokens == nullptr ? (uint32_t) r : (*rd.tokens)[r];
    const llama_pos pos = ubatch.pos[i];
    for (int32_t s = 0; s < ubatch.n_seq_id[i]; ++s) {
        const llama_seq_id  seq = ubatch.seq_id[i][s];
        const seq_binding * b   = binding_at(st.capture, seq, pos);
        if (b == nullptr) {
            continue;
        }
        accumulate(stats_for(st, b->label), rd, r, il, st.n_expert);
        if (st.capture.flags & MOTE_CAPTURE_TRACE) {
            append_trace(st.capture, rd, r, il, st.n_expert, b->label, seq, pos);
        }
    }
}

} // namespace

void after_ubatch(const llama_context * lctx, ggml_backend_sched_t sched, const llm_graph_result * res,
                  const llama_ubatch & ubatch) {
    context_state * st = state_of(lctx);
    if (st == nullptr || !st->capture.active || st->capture.bindings.empty() || res == nullptr) {
        return;
    }
    const steer_input * in = steer_input_of(res);
    if (in == nullptr) {
        return;
    }
    ggml_backend_sched_synchronize(sched); // the ubatch is computed before any tap is read
    const std::vector<std::vector<uint8_t>> chains        = read_chains(sched, *in);
    const std::vector<uint32_t>             output_tokens = output_tokens_of(ubatch);
    for (int32_t il = 0; il < st->n_layer; ++il) {
        const layer_read rd = read_layer(in->taps[il], chains, ubatch, output_tokens);
        for (int64_t r = 0; r < rd.rows; ++r) {
            count_row(*st, rd, r, il, ubatch);
        }
    }
}

} // namespace mote
