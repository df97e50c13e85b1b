// mote-rpc.cpp — several machines: mote.h's functions over llama.cpp's RPC backend.
//
// llama.cpp's RPC client aborts the process when a server is missing, busy with another client (an
// rpc-server serves one at a time) or of another protocol version; mote_rpc_probe finds out first, on
// a connection of its own, within a timeout.
#include "mote.h"
#include "mote-rpc.h"
#include "mote-state.h"

#include "ggml-backend.h"
#include "ggml-rpc.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef MSG_NOSIGNAL
#    define MSG_NOSIGNAL 0 // macOS: SO_NOSIGPIPE on the socket instead
#endif

namespace mote {

namespace {

// ggml-rpc's greeting: command byte 14 (fixed across protocol versions), a 64-bit request size and the
// client's 24 transport-capability bytes (none: plain TCP); the reply is a 64-bit size and 28 bytes
// that start with the server's major.minor.patch.
constexpr uint8_t  kHelloCommand  = 14;
constexpr uint64_t kHelloRequest  = 24;
constexpr uint64_t kHelloResponse = 28;

struct fd_closer {
    int fd;
    ~fd_closer() { if (fd >= 0) { close(fd); } }
};

bool split_endpoint(const std::string & endpoint, std::string & host, std::string & port) {
    const size_t colon = endpoint.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == endpoint.size()) {
        return false;
    }
    host = endpoint.substr(0, colon);
    port = endpoint.substr(colon + 1);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
        host = host.substr(1, host.size() - 2); // [IPv6]:port
    }
    return port.find_first_not_of("0123456789") == std::string::npos;
}

// Waits for fd to be ready for events within timeout_ms; false on timeout.
bool wait_for(int fd, short events, int timeout_ms) {
    pollfd p = { fd, events, 0 };
    int rc;
    do {
        rc = poll(&p, 1, timeout_ms);
    } while (rc < 0 && errno == EINTR);
    return rc > 0;
}

bool send_all(int fd, const uint8_t * data, size_t size, int timeout_ms) {
    while (size > 0) {
        if (!wait_for(fd, POLLOUT, timeout_ms)) {
            return false;
        }
        const ssize_t n = send(fd, data, size, MSG_NOSIGNAL);
        if (n <= 0) {
            return false;
        }
        data += n;
        size -= (size_t) n;
    }
    return true;
}

// 1: received, 0: the peer closed the connection, -1: timeout or error
int recv_all(int fd, uint8_t * data, size_t size, int timeout_ms) {
    while (size > 0) {
        if (!wait_for(fd, POLLIN, timeout_ms)) {
            return -1;
        }
        const ssize_t n = recv(fd, data, size, 0);
        if (n == 0) {
            return 0;
        }
        if (n < 0) {
            return -1;
        }
        data += n;
        size -= (size_t) n;
    }
    return 1;
}

int32_t probe(const char * endpoint, int32_t timeout_ms) {
    std::string host, port;
    if (endpoint == nullptr || !split_endpoint(endpoint, host, port)) {
        return fail("rpc server '%s' is not HOST:PORT (e.g. 192.168.1.10:50052)", endpoint ? endpoint : "");
    }
    addrinfo hints = {};
    hints.ai_socktype = SOCK_STREAM;
    addrinfo * found = nullptr;
    if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &found); rc != 0) {
        return fail("rpc server %s: cannot resolve host '%s' (%s)", endpoint, host.c_str(), gai_strerror(rc));
    }
    std::string refused = "no address";
    for (addrinfo * ai = found; ai != nullptr; ai = ai->ai_next) {
        fd_closer s { socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol) };
        if (s.fd < 0) {
            continue;
        }
        fcntl(s.fd, F_SETFL, fcntl(s.fd, F_GETFL, 0) | O_NONBLOCK);
#ifdef SO_NOSIGPIPE
        const int on = 1;
        setsockopt(s.fd, SOL_SOCKET, SO_NOSIGPIPE, &on, sizeof(on));
#endif
        int err = 0;
        if (connect(s.fd, ai->ai_addr, ai->ai_addrlen) != 0) {
            err = errno == EINPROGRESS ? (wait_for(s.fd, POLLOUT, timeout_ms) ? 0 : ETIMEDOUT) : errno;
            socklen_t len = sizeof(err);
            if (err == 0) {
                getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &err, &len);
            }
        }
        if (err != 0) {
            refused = strerror(err);
            continue;
        }
        uint8_t request[1 + sizeof(uint64_t) + kHelloRequest] = { kHelloCommand };
        memcpy(request + 1, &kHelloRequest, sizeof(uint64_t));
        uint8_t reply[sizeof(uint64_t) + kHelloResponse];
        const int got = send_all(s.fd, request, sizeof(request), timeout_ms)
                      ? recv_all(s.fd, reply, sizeof(reply), timeout_ms) : -1;
        freeaddrinfo(found);
        if (got < 0) {
            return fail("the rpc server at %s did not answer within %d ms: it serves one client at a time, is "
                        "another process connected to it?", endpoint, (int) timeout_ms);
        }
        uint64_t size = 0;
        memcpy(&size, reply, sizeof(size));
        if (got == 0 || size != kHelloResponse) {
            return fail("the server at %s closed the connection or is not an rpc-server of RPC protocol %d.x: "
                        "start `mote rpc-server` of this mote-local version there", endpoint, RPC_PROTO_MAJOR_VERSION);
        }
        const uint8_t * version = reply + sizeof(uint64_t);
        if (version[0] != RPC_PROTO_MAJOR_VERSION || version[1] > RPC_PROTO_MINOR_VERSION) {
            return fail("the rpc server at %s speaks RPC protocol %d.%d.%d, this engine %d.%d.%d: start `mote "
                        "rpc-server` of this mote-local version there", endpoint, version[0], version[1], version[2],
                        RPC_PROTO_MAJOR_VERSION, RPC_PROTO_MINOR_VERSION, RPC_PROTO_PATCH_VERSION);
        }
        return 0;
    }
    freeaddrinfo(found);
    return fail("no rpc server answers at %s (%s): start one there with `mote rpc-server --host HOST --port %s`",
                endpoint, refused.c_str(), port.c_str());
}

} // namespace

} // namespace mote

using namespace mote;

extern "C" {

int32_t mote_rpc_probe(const char * endpoint, int32_t timeout_ms) {
    return probe(endpoint, timeout_ms);
}

int32_t mote_rpc_add_server(const char * endpoint) {
    // not registered with ggml: llama.cpp's default device selection (any other model of the process) would
    // then use the server, and abort once it is gone
    ggml_backend_reg_t reg = ggml_backend_rpc_add_server(endpoint);
    if (reg == nullptr) {
        return fail("the rpc server at %s offers no device", endpoint);
    }
    return (int32_t) ggml_backend_reg_dev_count(reg);
}

int32_t mote_rpc_model_devices(const char * const * endpoints, int32_t n_endpoints, void ** devices, int32_t cap) {
    std::vector<ggml_backend_dev_t> out;
    for (int32_t i = 0; i < n_endpoints; ++i) {
        ggml_backend_reg_t reg = ggml_backend_rpc_add_server(endpoints[i]); // registered: looked up, no traffic
        for (size_t d = 0; reg != nullptr && d < ggml_backend_reg_dev_count(reg); ++d) {
            out.push_back(ggml_backend_reg_dev_get(reg, d));
        }
    }
    // then the local GPUs llama.cpp picks by default: discrete ones, else integrated ones
    for (enum ggml_backend_dev_type type : { GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU }) {
        const size_t before = out.size();
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            if (ggml_backend_dev_type(dev) == type) {
                out.push_back(dev);
            }
        }
        if (out.size() > before) {
            break;
        }
    }
    if ((int32_t) out.size() + 1 > cap) {
        return fail("mote_rpc_model_devices: %zu devices do not fit %d slots", out.size(), (int) cap);
    }
    std::copy(out.begin(), out.end(), devices);
    devices[out.size()] = nullptr;
    return (int32_t) out.size();
}

int64_t mote_rpc_lost_replies(const char * endpoint) {
    return rpc_lost_count(endpoint == nullptr ? "" : endpoint);
}

} // extern "C"
