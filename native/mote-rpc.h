// mote-rpc.h — what llama.cpp's RPC client tells mote-local about its connections.
//
// Compiled into ggml-rpc (mote-rpc-state.cpp) and called from two call sites in ggml-rpc.cpp: a
// server that dies or a connection that breaks is recorded against its endpoint instead of aborting
// the process; the waiting call then returns and mote-local refuses to go on with the model that
// used the server (mote_rpc_lost_replies in mote.h).
#pragma once

#include <cstdint>
#include <string>

#define MOTE_RPC_EXPORT __attribute__((visibility("default")))

namespace mote {

// ggml-rpc opened a connection to endpoint on sock (used as an identity only).
MOTE_RPC_EXPORT void    rpc_connected(const void * sock, const char * endpoint);
// A request on sock got no reply.
MOTE_RPC_EXPORT void    rpc_lost(const void * sock);
// Replies lost on connections to endpoint since the process started.
MOTE_RPC_EXPORT int64_t rpc_lost_count(const std::string & endpoint);

} // namespace mote
