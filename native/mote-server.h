// mote-server.h — per-request steering and routing in llama-server: what the call sites of
// patches/0005 reach. Only the C API of mote.h is used, so the server needs no engine internals.
//
// Threads: parse_request() runs on llama-server's HTTP threads and reads only what init() set up;
// everything else runs on its one decode thread.
#pragma once

#include "llama.h"
#include "mote.h"

#include "json.h"

#include <memory>
#include <string>
#include <vector>

namespace mote_server {

using json = common_json; // llama-server's JSON

enum class routing_detail { none, counts, tokens };

// A request's steering (every phase, already checked against the model) and the routing it asks for.
struct request {
    std::vector<mote_entry> entries;
    double                  strength = 1.0;
    routing_detail          routing  = routing_detail::none;
};

// What a slot holds while it serves a request.
struct slot_state {
    std::shared_ptr<const request> req;
    int32_t phase    = 0;     // the sequence's steering phase in the engine (0: not set yet)
    bool    thinking = false; // inside a thinking span of the model's template
    bool    steered  = false; // its cache cells were computed with steering
    // routing: the label's totals and the trace rows before this request
    std::vector<int64_t> counts0;
    std::vector<double>  weights0;
    std::vector<int64_t> tokens0;
    int64_t              trace0 = 0;
};

// At model load, on the decode thread: the router shape, the thinking markers and the named profiles
// of $MOTE_SERVER_PROFILES (written by `mote serve`). Throws std::runtime_error.
void init(llama_context * ctx);

// The request fields `steering`, `return_routing` and `routing_detail`: nullptr when the request has none.
// Invalid input throws std::invalid_argument with one line (an HTTP 400 before any slot starts).
std::shared_ptr<const request> parse_request(const json & body);

// Copies those fields from a request body into the body llama-server converts it to (Anthropic's /v1/messages).
void carry_fields(const json & from, json & to);

// Outputs a slot's prompt tokens need: with routing, every prompt token is an output, so that the last
// layer (where llama.cpp computes only output rows) routes all of them.
bool prompt_outputs(const slot_state & slot);
// The output limits of the context: llama-server keeps one row per sequence; routing needs a batch's.
void output_limits(int32_t n_batch, int32_t & total, int32_t & per_seq);

// A slot takes a request: its steering goes onto the slot's sequence, its routing capture is bound.
// Returns false with the engine's message in error.
bool launch(slot_state & slot, std::shared_ptr<const request> req, llama_context * ctx, int32_t seq_id,
            const std::vector<llama_token> & prompt, std::string & error);
// Before each decode: the phase of the slot's tokens in the batch (prompt, generated, thinking).
void before_decode(slot_state & slot, llama_context * ctx, int32_t seq_id, bool generating);
// A token sampled for the slot (follows the thinking markers).
void on_token(slot_state & slot, llama_token token);
// The `routing` of the slot's request so far; null when it asked for none.
json routing(const slot_state & slot, const llama_context * ctx, int32_t seq_id);
// The slot is released: its steering and capture binding go. Returns true when its cache cells were
// computed with steering (the caller forgets them, so no later request reuses them).
bool release(slot_state & slot, llama_context * ctx, int32_t seq_id);

// Non-empty once an rpc server of $MOTE_SERVER_RPC (the --rpc endpoints `mote serve` checked) lost a reply:
// the model is gone, and every request, running or new, and /health get HTTP 503 with this reason.
const std::string & gone();

// A response (an object, or the stream's chunks) with `routing` added to it (the last chunk).
json with_routing(json response, const json & routing);

} // namespace mote_server
