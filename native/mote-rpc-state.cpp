// mote-rpc-state.cpp — the record behind mote-rpc.h, inside ggml-rpc.
#include "mote-rpc.h"

#include <map>
#include <mutex>

namespace mote {

namespace {

std::mutex                               g_mutex;
std::map<const void *, std::string>      g_endpoint_of; // live and past sockets; a reused address is rebound
std::map<std::string, int64_t>           g_lost;

} // namespace

void rpc_connected(const void * sock, const char * endpoint) {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_endpoint_of[sock] = endpoint;
}

void rpc_lost(const void * sock) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_endpoint_of.find(sock);
    ++g_lost[it == g_endpoint_of.end() ? std::string() : it->second];
}

int64_t rpc_lost_count(const std::string & endpoint) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_lost.find(endpoint);
    return it == g_lost.end() ? 0 : it->second;
}

} // namespace mote
