// mote-server.cpp — per-request steering and routing in llama-server (see mote-server.h).
//
// A request's steering becomes its slot's own steering (mote_steer_set_seq), so requests steered
// differently still decode in one batch; its phase follows the slot's state before every decode.
// Routing is the engine's capture with a label per slot: the slot's totals when it took the request
// are subtracted from its totals at the end; the capture runs while any slot asks for routing.
#include "mote-server.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>

namespace mote_server {

namespace {

// the parsing below works on nlohmann's JSON; only the fields it reads cross over from llama-server's
using njson = nlohmann::ordered_json;

// Set once by init() on the decode thread before llama-server serves requests; read-only after.
struct server_model {
    int32_t              n_layer = 0, n_expert = 0, n_expert_used = 0, n_groups = 0, n_group_used = 0;
    std::vector<uint8_t> moe_layers;  // [n_layer]
    std::vector<int32_t> moe_list;    // the MoE layers, in order
    llama_token          think_open = LLAMA_TOKEN_NULL, think_close = LLAMA_TOKEN_NULL;
    std::map<std::string, request> profiles; // steering only
    int32_t              routing_slots = 0; // slots whose request asks for routing (decode thread)
    std::map<std::string, int64_t> rpc_lost;  // endpoint -> replies lost before the model loaded
};
std::mutex  g_gone_mutex;
std::string g_gone; // set once, by whichever thread sees the loss first
server_model g_model;

// the request fields mote-local adds
const char * const kFields[] = { "steering", "return_routing", "routing_detail" };
const char * const kModes[]  = { "mask", "drop", "force", "bias", "gain" };
const char * const kScopes[] = { "all", "prefill", "decode", "thinking" };

[[noreturn]] void bad(const std::string & what) { throw std::invalid_argument(what); }

std::string kind_of(const njson & v) {
    return v.is_string() ? "a string" : v.is_number() ? "a number" : v.is_boolean() ? "a boolean"
         : v.is_array() ? "an array" : v.is_object() ? "an object" : "null";
}

int32_t index_of(const char * const * names, int n, const std::string & name) {
    for (int i = 0; i < n; i++) {
        if (name == names[i]) {
            return i;
        }
    }
    return -1;
}

std::string names(const char * const * list, int n) {
    std::string out;
    for (int i = 0; i < n; i++) {
        out += (i ? ", " : "") + std::string(list[i]);
    }
    return out;
}

int32_t scope_of(const njson & v, const std::string & where) {
    const int32_t s = v.is_string() ? index_of(kScopes, 4, v.get<std::string>()) : -1;
    if (s < 0) {
        bad(where + ": unknown scope " + (v.is_string() ? "'" + v.get<std::string>() + "'" : kind_of(v)) +
            "; expected one of " + names(kScopes, 4));
    }
    return s;
}

int32_t nonneg_int(const njson & v, const std::string & where) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX) {
        bad(where + ": expected a non-negative integer, got " + (v.is_number() ? v.dump() : kind_of(v)));
    }
    return (int32_t) v.get<int64_t>();
}

// One entry in the profile format: {"layer", "expert", "mode", "value", "scope"}
mote_entry entry_from_object(const njson & row, const std::string & where) {
    if (!row.is_object()) {
        bad(where + ": expected an object or a 'KIND SPEC' string, got " + kind_of(row));
    }
    for (const auto & [key, _] : row.items()) {
        if (key != "layer" && key != "expert" && key != "mode" && key != "value" && key != "scope") {
            bad(where + ": unknown key '" + key + "'; an entry has layer, expert, mode, value, scope");
        }
    }
    for (const char * key : { "layer", "expert", "mode" }) {
        if (!row.contains(key)) {
            bad(where + "." + key + ": missing");
        }
    }
    mote_entry e{};
    e.layer  = nonneg_int(row["layer"], where + ".layer");
    e.expert = nonneg_int(row["expert"], where + ".expert");
    const njson & mode = row["mode"];
    e.mode = mode.is_string() ? index_of(kModes, 5, mode.get<std::string>()) : -1;
    if (e.mode < 0) {
        bad(where + ".mode: unknown mode " + (mode.is_string() ? "'" + mode.get<std::string>() + "'" : kind_of(mode)) +
            "; expected one of " + names(kModes, 5));
    }
    const bool valued = e.mode == MOTE_MODE_BIAS || e.mode == MOTE_MODE_GAIN;
    if (valued && !row.contains("value")) {
        bad(where + ".value: missing (a " + kModes[e.mode] + " entry needs a value)");
    }
    if (row.contains("value")) {
        const njson & v = row["value"];
        if (v.is_string() && v.get<std::string>() == "-inf") {
            e.value = -INFINITY;
        } else if (v.is_number()) {
            e.value = v.get<float>();
        } else {
            bad(where + ".value: expected a number or the string \"-inf\", got " + kind_of(v));
        }
    }
    e.scope = row.contains("scope") ? scope_of(row["scope"], where + ".scope") : MOTE_SCOPE_ALL;
    return e;
}

// "KIND LAYER:EXPERT[=VALUE][,...]", the CLI's flags (off, drop, force, bias, gain)
void entries_from_text(const std::string & text, int32_t scope, const std::string & where,
                       std::vector<mote_entry> & out) {
    static const std::map<std::string, int32_t> kinds = {
        { "off", MOTE_MODE_MASK }, { "drop", MOTE_MODE_DROP }, { "force", MOTE_MODE_FORCE },
        { "bias", MOTE_MODE_BIAS }, { "gain", MOTE_MODE_GAIN } };
    auto trim = [](std::string s) {
        s.erase(0, s.find_first_not_of(" \t"));
        s.erase(s.find_last_not_of(" \t") + 1);
        return s;
    };
    std::string body = trim(text);
    if (body.rfind("--", 0) == 0) {
        body = body.substr(2);
    }
    const size_t space = body.find(' ');
    const std::string kind = body.substr(0, space);
    const std::string spec = space == std::string::npos ? "" : trim(body.substr(space + 1));
    const auto it = kinds.find(kind);
    if (it == kinds.end() || spec.empty()) {
        bad(where + ": '" + text + "': expected KIND SPEC with KIND one of off, drop, force, bias, gain, "
            "e.g. 'drop 12:17' or 'bias 3:4=-2'");
    }
    const bool valued = it->second == MOTE_MODE_BIAS || it->second == MOTE_MODE_GAIN;
    const std::string form = valued ? "LAYER:EXPERT=VALUE" : "LAYER:EXPERT";
    size_t start = 0;
    while (true) {
        const size_t comma = spec.find(',', start);
        const std::string item = trim(spec.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
        auto fail = [&](const std::string & why) {
            bad(where + ": --" + kind + " '" + item + "': " + why + "; expected " + form + "[," + form + "...]");
        };
        if (item.empty()) {
            fail("empty item (a stray comma?)");
        }
        const size_t eq = item.find('=');
        if (valued && eq == std::string::npos) {
            fail("a value is required");
        }
        if (!valued && eq != std::string::npos) {
            fail("--" + kind + " takes no value");
        }
        const std::string target = item.substr(0, eq);
        const size_t colon = target.find(':');
        if (colon == std::string::npos) {
            fail("missing ':' between layer and expert");
        }
        mote_entry e{};
        const std::pair<const char *, std::string> parts[] = {
            { "layer", trim(target.substr(0, colon)) }, { "expert", trim(target.substr(colon + 1)) } };
        for (const auto & [what, digits] : parts) {
            if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) {
                fail(std::string(what) + " '" + digits + "' is not a non-negative integer");
            }
        }
        e.layer  = std::stoi(parts[0].second);
        e.expert = std::stoi(parts[1].second);
        e.mode   = it->second;
        e.scope  = scope;
        if (valued) {
            const std::string raw = trim(item.substr(eq + 1));
            char * end = nullptr;
            const float v = std::strtof(raw.c_str(), &end);
            if (raw.empty() || end != raw.c_str() + raw.size() || std::isnan(v)) {
                fail("'" + raw + "' is not a number");
            }
            e.value = v;
        }
        out.push_back(e);
        if (comma == std::string::npos) {
            break;
        }
        start = comma + 1;
    }
}

void check(const std::vector<mote_entry> & entries, double strength, const std::string & where) {
    mote_shape shape{ g_model.n_layer, g_model.n_expert, g_model.n_expert_used, g_model.n_groups,
                      g_model.n_group_used, g_model.moe_layers.data() };
    if (mote_steer_check(&shape, entries.data(), (int32_t) entries.size(), strength) != 0) {
        bad(where + ": " + mote_last_error());
    }
}

double strength_of(const njson & v, const std::string & where) {
    if (!v.is_number() || !std::isfinite(v.get<double>())) {
        bad(where + ": expected a finite number, got " + (v.is_number() ? v.dump() : kind_of(v)));
    }
    return v.get<double>();
}

// The compiled profiles `mote serve` hands over: {"NAME": {"strength": S, "entries": [entry objects]}}
void load_profiles(const char * path) {
    std::ifstream in(path);
    if (!in) {
        throw std::runtime_error(std::string("MOTE_SERVER_PROFILES: cannot read ") + path);
    }
    njson doc;
    try {
        doc = njson::parse(in);
        if (!doc.is_object()) {
            bad("expected an object of profiles");
        }
        for (const auto & [name, profile] : doc.items()) {
            const std::string where = "profile " + name;
            request r;
            r.strength = strength_of(profile.value("strength", njson(1.0)), where + ".strength");
            const njson & rows = profile.at("entries");
            for (size_t i = 0; i < rows.size(); i++) {
                r.entries.push_back(entry_from_object(rows[i], where + ".entries[" + std::to_string(i) + "]"));
            }
            check(r.entries, r.strength, where);
            g_model.profiles[name] = std::move(r);
        }
    } catch (const std::exception & err) {
        throw std::runtime_error(std::string("MOTE_SERVER_PROFILES ") + path + ": " + err.what());
    }
}

llama_token single_token(const llama_vocab * vocab, const char * text) {
    llama_token ids[2];
    const int n = llama_tokenize(vocab, text, (int32_t) strlen(text), ids, 2, false, true);
    return n == 1 && llama_vocab_is_control(vocab, ids[0]) ? ids[0] : LLAMA_TOKEN_NULL;
}

void update_thinking(bool & thinking, llama_token token) {
    if (token == g_model.think_open && token != LLAMA_TOKEN_NULL) {
        thinking = true;
    } else if (token == g_model.think_close && token != LLAMA_TOKEN_NULL) {
        thinking = false;
    }
}

// The label's totals (zeros before anything was counted for it)
void read_totals(const llama_context * ctx, int32_t label, std::vector<int64_t> & counts,
                 std::vector<double> & weights, std::vector<int64_t> & tokens) {
    const size_t n = (size_t) g_model.n_layer * g_model.n_expert;
    counts.assign(n, 0);
    weights.assign(n, 0.0);
    tokens.assign(g_model.n_layer, 0);
    mote_capture_read(ctx, label, g_model.n_layer, g_model.n_expert, counts.data(), weights.data(), nullptr,
                      nullptr, tokens.data());
}

} // namespace

void init(llama_context * ctx) {
    g_model = server_model{}; // llama-server loads the model again after sleeping
    const llama_model * model = llama_get_model(ctx);
    mote_router_info info{};
    if (mote_get_router_info(model, &info) != 0) {
        throw std::runtime_error(std::string("mote: ") + mote_last_error());
    }
    g_model.n_layer       = info.n_layer;
    g_model.n_expert      = info.n_expert;
    g_model.n_expert_used = info.n_expert_used;
    g_model.n_groups      = info.n_expert_groups;
    g_model.n_group_used  = info.n_group_used;
    g_model.moe_layers.assign(info.n_layer, 0);
    for (int32_t il = 0; il < info.n_layer; il++) {
        mote_layer_router r{};
        if (mote_get_layer_router(ctx, il, &r) == 0 && r.n_calls > 0) {
            g_model.moe_layers[il] = 1;
            g_model.moe_list.push_back(il);
        }
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    g_model.think_open  = single_token(vocab, "<think>");
    g_model.think_close = single_token(vocab, "</think>");
    if (const char * path = std::getenv("MOTE_SERVER_PROFILES")) {
        load_profiles(path);
    }
    if (const char * list = std::getenv("MOTE_SERVER_RPC")) {
        std::stringstream endpoints(list);
        for (std::string endpoint; std::getline(endpoints, endpoint, ',');) {
            if (!endpoint.empty()) {
                g_model.rpc_lost[endpoint] = mote_rpc_lost_replies(endpoint.c_str());
            }
        }
    }
}

const std::string & gone() {
    std::lock_guard<std::mutex> lock(g_gone_mutex);
    if (g_gone.empty()) {
        for (const auto & [endpoint, before] : g_model.rpc_lost) {
            if (mote_rpc_lost_replies(endpoint.c_str()) > before) {
                g_gone = "the model is gone (lost the connection to the rpc server " + endpoint +
                         "): restart mote serve once the server is back";
                break;
            }
        }
    }
    return g_gone;
}

void carry_fields(const json & from, json & to) {
    for (const char * key : kFields) {
        if (from.contains(key)) {
            to[key] = from.at(key);
        }
    }
}

std::shared_ptr<const request> parse_request(const json & request_body) {
    njson body = njson::object();
    for (const char * key : kFields) {
        if (request_body.contains(key) && !request_body.at(key).is_null()) {
            body[key] = njson::parse(request_body.at(key).dump());
        }
    }
    const bool has_steering = body.contains("steering");
    const bool has_routing  = body.contains("return_routing");
    const bool has_detail   = body.contains("routing_detail");
    if (!has_steering && !has_routing && !has_detail) {
        return nullptr;
    }
    auto req = std::make_shared<request>();
    if (has_routing) {
        if (!body["return_routing"].is_boolean()) {
            bad("return_routing: expected true or false, got " + kind_of(body["return_routing"]));
        }
        req->routing = body["return_routing"].get<bool>() ? routing_detail::counts : routing_detail::none;
    }
    if (has_detail) {
        const njson & d = body["routing_detail"];
        if (!d.is_string() || (d.get<std::string>() != "counts" && d.get<std::string>() != "tokens")) {
            bad("routing_detail: expected \"counts\" or \"tokens\", got " + (d.is_string() ? "'" + d.get<std::string>() + "'" : kind_of(d)));
        }
        if (req->routing == routing_detail::none) {
            bad("routing_detail: needs \"return_routing\": true");
        }
        req->routing = d.get<std::string>() == "tokens" ? routing_detail::tokens : routing_detail::counts;
    }
    if (req->routing != routing_detail::none && g_model.moe_list.empty()) {
        bad("return_routing: this model routes nothing (no MoE layer): there is no routing to return");
    }
    if (has_steering) {
        const njson & s = body["steering"];
        if (!s.is_object()) {
            bad("steering: expected an object {\"profile\", \"entries\", \"strength\", \"scope\"}, got " + kind_of(s));
        }
        for (const auto & [key, _] : s.items()) {
            if (key != "profile" && key != "entries" && key != "strength" && key != "scope" && key != "force") {
                bad("steering: unknown key '" + key + "'; expected profile, entries, strength, scope");
            }
        }
        bool any = false;
        if (s.contains("profile") && !s["profile"].is_null()) {
            const njson & p = s["profile"];
            if (!p.is_string()) {
                bad("steering.profile: expected the name of a profile this server loaded (--profile NAME=FILE), got " +
                    kind_of(p) + "; put the entries of an inline profile in steering.entries");
            }
            const auto it = g_model.profiles.find(p.get<std::string>());
            if (it == g_model.profiles.end()) {
                std::string have;
                for (const auto & [name, _] : g_model.profiles) {
                    have += (have.empty() ? "" : ", ") + name;
                }
                bad("steering.profile: unknown profile '" + p.get<std::string>() + "'; this server has " +
                    (have.empty() ? "none (start it with --profile NAME=FILE)" : have));
            }
            req->entries  = it->second.entries;
            req->strength = it->second.strength;
            any = true;
        }
        const int32_t scope = s.contains("scope") && !s["scope"].is_null() ? scope_of(s["scope"], "steering.scope")
                                                                           : MOTE_SCOPE_ALL;
        if (s.contains("entries") && !s["entries"].is_null()) {
            const njson & rows = s["entries"];
            if (!rows.is_array()) {
                bad("steering.entries: expected an array, got " + kind_of(rows));
            }
            for (size_t i = 0; i < rows.size(); i++) {
                const std::string where = "steering.entries[" + std::to_string(i) + "]";
                if (rows[i].is_string()) {
                    entries_from_text(rows[i].get<std::string>(), scope, where, req->entries);
                } else {
                    req->entries.push_back(entry_from_object(rows[i], where));
                }
            }
            any = any || !rows.empty();
        }
        const bool has_strength = s.contains("strength") && !s["strength"].is_null();
        if (has_strength) {
            req->strength = strength_of(s["strength"], "steering.strength");
        }
        if (!any && (has_strength || (s.contains("scope") && !s["scope"].is_null()))) {
            bad("steering: strength and scope need a profile or entries to act on");
        }
        check(req->entries, req->strength, "steering");
    }
    return req;
}

bool prompt_outputs(const slot_state & slot) {
    return slot.req && slot.req->routing != routing_detail::none;
}

void output_limits(int32_t n_batch, int32_t & total, int32_t & per_seq) {
    total   = std::max(total, n_batch);
    per_seq = std::max(per_seq, n_batch);
}

bool launch(slot_state & slot, std::shared_ptr<const request> req, llama_context * ctx, int32_t seq_id,
            const std::vector<llama_token> & prompt, std::string & error) {
    slot.req      = std::move(req);
    slot.phase    = 0;
    slot.thinking = false;
    for (const llama_token t : prompt) {
        update_thinking(slot.thinking, t); // a template may open the span in the prompt
    }
    if (!slot.req) {
        return true;
    }
    if (!slot.req->entries.empty()) {
        if (mote_steer_set_seq(ctx, seq_id, slot.req->entries.data(), (int32_t) slot.req->entries.size(),
                               slot.req->strength) != 0) {
            error = std::string("steering: ") + mote_last_error();
            slot.req.reset();
            return false;
        }
        slot.steered = true;
    }
    if (slot.req->routing != routing_detail::none) {
        if (g_model.routing_slots == 0 && mote_capture_start(ctx, MOTE_CAPTURE_TRACE) != 0) {
            error = std::string("return_routing: ") + mote_last_error();
            release(slot, ctx, seq_id);
            return false;
        }
        g_model.routing_slots++;
        mote_capture_bind(ctx, seq_id, seq_id, 0, -1);
        read_totals(ctx, seq_id, slot.counts0, slot.weights0, slot.tokens0);
        slot.trace0 = mote_capture_trace_rows(ctx);
    }
    return true;
}

void before_decode(slot_state & slot, llama_context * ctx, int32_t seq_id, bool generating) {
    if (!slot.req || slot.req->entries.empty()) {
        return;
    }
    const int32_t phase = !generating ? MOTE_SCOPE_PREFILL : slot.thinking ? MOTE_SCOPE_THINKING : MOTE_SCOPE_DECODE;
    if (phase != slot.phase && mote_steer_phase_seq(ctx, seq_id, phase) == 0) {
        slot.phase = phase;
    }
}

void on_token(slot_state & slot, llama_token token) {
    update_thinking(slot.thinking, token);
}

json routing(const slot_state & slot, const llama_context * ctx, int32_t seq_id) {
    if (!prompt_outputs(slot)) {
        return nullptr;
    }
    std::vector<int64_t> counts, tokens;
    std::vector<double>  weights;
    read_totals(ctx, seq_id, counts, weights, tokens); // the slot's seq_id is its label (see launch)
    njson out_tokens = njson::array(), out_counts = njson::array(), out_weights = njson::array();
    for (const int32_t il : g_model.moe_list) {
        out_tokens.push_back(tokens[il] - slot.tokens0[il]);
        njson c = njson::array(), w = njson::array();
        for (int32_t e = 0; e < g_model.n_expert; e++) {
            const size_t i = (size_t) il * g_model.n_expert + e;
            c.push_back(counts[i] - slot.counts0[i]);
            w.push_back(weights[i] - slot.weights0[i]);
        }
        out_counts.push_back(std::move(c));
        out_weights.push_back(std::move(w));
    }
    njson out = { { "layers", g_model.moe_list }, { "n_expert", g_model.n_expert },
                 { "n_expert_used", g_model.n_expert_used }, { "tokens", out_tokens },
                 { "counts", out_counts }, { "weight_sums", out_weights } };
    if (slot.req->routing == routing_detail::tokens) {
        const int64_t rows = mote_capture_trace_rows(ctx);
        const int32_t k    = g_model.n_expert_used;
        std::vector<int32_t> meta(rows * 4), ids(rows * k);
        std::vector<float>   w(rows * k);
        mote_capture_trace_read(ctx, rows, k, g_model.n_expert, meta.data(), ids.data(), w.data(), nullptr);
        std::map<int32_t, size_t> column; // layer -> index among the MoE layers
        for (size_t i = 0; i < g_model.moe_list.size(); i++) {
            column[g_model.moe_list[i]] = i;
        }
        // position -> [layer][k] ids and weights
        std::map<int32_t, std::pair<std::vector<std::vector<int32_t>>, std::vector<std::vector<float>>>> at;
        for (int64_t r = slot.trace0; r < rows; r++) {
            const int32_t * m = &meta[r * 4]; // label, seq_id, pos, layer
            if (m[0] != seq_id || !column.count(m[3])) {
                continue;
            }
            auto & [row_ids, row_w] = at[m[2]];
            if (row_ids.empty()) {
                row_ids.assign(column.size(), std::vector<int32_t>(k, -1));
                row_w.assign(column.size(), std::vector<float>(k, 0.0f));
            }
            const size_t c = column[m[3]];
            row_ids[c].assign(&ids[r * k], &ids[r * k] + k);
            row_w[c].assign(&w[r * k], &w[r * k] + k);
        }
        njson positions = njson::array(), experts = njson::array(), weights_k = njson::array();
        for (const auto & [pos, row] : at) {
            positions.push_back(pos);
            experts.push_back(row.first);
            weights_k.push_back(row.second);
        }
        out["positions"] = std::move(positions);
        out["experts"]   = std::move(experts);
        out["weights"]   = std::move(weights_k);
    }
    return json::parse(out.dump());
}

bool release(slot_state & slot, llama_context * ctx, int32_t seq_id) {
    if (slot.req && !slot.req->entries.empty()) {
        mote_steer_set_seq(ctx, seq_id, nullptr, 0, 1.0);
    }
    if (slot.req && slot.req->routing != routing_detail::none) {
        if (--g_model.routing_slots == 0) {
            mote_capture_stop(ctx);
        } else {
            mote_capture_bind(ctx, seq_id, seq_id, 0, 0); // counts nothing until it is bound again
        }
    }
    slot.req.reset();
    const bool steered = slot.steered;
    slot.steered = false;
    return steered;
}

json with_routing(json response, const json & routing) {
    if (routing.is_null()) {
        return response;
    }
    if (response.is_array() && !response.empty()) {
        // chunks, or the events of the Anthropic and Responses streams ({"event", "data"})
        json & last = response.back();
        (last.contains("event") && last.contains("data") ? last["data"] : last)["routing"] = routing;
    } else if (response.is_object()) {
        response["routing"] = routing;
    }
    return response;
}

} // namespace mote_server
