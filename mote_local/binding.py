"""The one module that binds native/mote.h (steering and routing capture in the patched engine).

Each binding carries the C prototype it mirrors. Raw ctypes stays in here: the rest of the package
calls the small Python functions at the bottom. It sits below the model-file and steering layers
because the steering rules live in the native code (``steer_check``) and profiles are checked there.

One error rule for every function: it returns its value, or raises the MoteError subclass of its
concern (SteeringError for steering, CaptureError for capture, EngineError for the rest) carrying the
engine's one-line message, which says "this model" where a caller may put the model's name.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from mote_local.errors import CaptureError, EngineError, MoteError, SteeringError

try:
    from mote_local_engine.llama_cpp import _internals as llama_internals  # noqa: F401  (re-exported)
    from mote_local_engine.llama_cpp import llama_chat_format  # noqa: F401  (re-exported)
    from mote_local_engine.llama_cpp import (
        llama_cpp as llama,  # the pinned bindings, private copy
    )
except (ImportError, OSError, RuntimeError) as err:  # not built, or the shared library failed to load
    raise EngineError(
        f"mote-local's engine is not available ({err}); install the package with "
        "`pip install .` from the repository so that it builds the patched llama.cpp"
    ) from err

_lib = llama._lib

MOTE_ABI_VERSION = 4
# enum mote_mode { MOTE_MODE_MASK = 0, MOTE_MODE_DROP = 1, MOTE_MODE_FORCE = 2, MOTE_MODE_BIAS = 3,
#                  MOTE_MODE_GAIN = 4 };
MODE_CODES = {"mask": 0, "drop": 1, "force": 2, "bias": 3, "gain": 4}
# enum mote_scope { MOTE_SCOPE_ALL = 0, MOTE_SCOPE_PREFILL = 1, MOTE_SCOPE_DECODE = 2, MOTE_SCOPE_THINKING = 3 };
SCOPE_CODES = {"all": 0, "prefill": 1, "decode": 2, "thinking": 3}
# enum mote_capture_flags
CAPTURE_PROBS = 1
CAPTURE_TRACE = 2
CAPTURE_OUTPUT_NORMS = 4


# struct mote_entry { int32_t layer; int32_t expert; int32_t mode; float value; int32_t scope; };
class mote_entry(ctypes.Structure):
    _fields_ = [
        ("layer", ctypes.c_int32),
        ("expert", ctypes.c_int32),
        ("mode", ctypes.c_int32),
        ("value", ctypes.c_float),
        ("scope", ctypes.c_int32),
    ]


# struct mote_shape { int32_t n_layer, n_expert, n_expert_used, n_expert_groups, n_group_used;
#                     const uint8_t * moe_layers; };
class mote_shape(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int32) for name in ("n_layer", "n_expert", "n_expert_used", "n_expert_groups", "n_group_used")
    ] + [("moe_layers", ctypes.POINTER(ctypes.c_uint8))]


# struct mote_layer_router { int32_t n_calls, n_expert, n_expert_used, gating, norm_w; float w_scale;
#                            int32_t selection_bias; };
class mote_layer_router(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int32) for name in ("n_calls", "n_expert", "n_expert_used", "gating", "norm_w")),
        ("w_scale", ctypes.c_float),
        ("selection_bias", ctypes.c_int32),
    ]


# struct mote_router_info { int32_t n_layer, n_expert, n_expert_used, n_expert_groups, n_group_used, gating; };
class mote_router_info(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int32)
        for name in ("n_layer", "n_expert", "n_expert_used", "n_expert_groups", "n_group_used", "gating")
    ]


def _bind(name: str, argtypes: list, restype):
    fn = getattr(_lib, name)
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


_ctx = llama.llama_context_p_ctypes
_i32, _i64, _f32 = ctypes.c_int32, ctypes.c_int64, ctypes.c_float
_P = ctypes.POINTER

# int32_t mote_abi_version(void);
_abi_version = _bind("mote_abi_version", [], _i32)
# const char * mote_last_error(void);
_last_error = _bind("mote_last_error", [], ctypes.c_char_p)
# int32_t mote_get_router_info(const struct llama_model * model, struct mote_router_info * out);
_router_info = _bind("mote_get_router_info", [llama.llama_model_p_ctypes, _P(mote_router_info)], _i32)
# int32_t mote_get_layer_router(const struct llama_context * ctx, int32_t layer, struct mote_layer_router * out);
_layer_router = _bind("mote_get_layer_router", [_ctx, _i32, _P(mote_layer_router)], _i32)
# int32_t mote_steer_check(const struct mote_shape * shape, const struct mote_entry * entries, int32_t n_entries,
#                          double strength);
_steer_check = _bind("mote_steer_check", [_P(mote_shape), _P(mote_entry), _i32, ctypes.c_double], _i32)
# int32_t mote_steer_set(struct llama_context * ctx, const struct mote_entry * entries, int32_t n_entries,
#                        double strength);
_steer_set = _bind("mote_steer_set", [_ctx, _P(mote_entry), _i32, ctypes.c_double], _i32)
# int32_t mote_steer_set_seq(struct llama_context * ctx, int32_t seq_id, const struct mote_entry * entries,
#                            int32_t n_entries, double strength);
_steer_set_seq = _bind("mote_steer_set_seq", [_ctx, _i32, _P(mote_entry), _i32, ctypes.c_double], _i32)
# int32_t mote_steer_phase(struct llama_context * ctx, int32_t phase);
_steer_phase = _bind("mote_steer_phase", [_ctx, _i32], _i32)
# int32_t mote_steer_phase_seq(struct llama_context * ctx, int32_t seq_id, int32_t phase);
_steer_phase_seq = _bind("mote_steer_phase_seq", [_ctx, _i32, _i32], _i32)
# void mote_steer_clear(struct llama_context * ctx);
_steer_clear = _bind("mote_steer_clear", [_ctx], None)
# int32_t mote_capture_start(struct llama_context * ctx, int32_t flags);
_capture_start = _bind("mote_capture_start", [_ctx, _i32], _i32)
# void mote_capture_stop(struct llama_context * ctx);
_capture_stop = _bind("mote_capture_stop", [_ctx], None)
# int32_t mote_capture_bind(struct llama_context * ctx, int32_t seq_id, int32_t label, int32_t pos_begin,
#                           int32_t pos_end);
_capture_bind = _bind("mote_capture_bind", [_ctx, _i32, _i32, _i32, _i32], _i32)
# void mote_capture_unbind_all(struct llama_context * ctx);
_capture_unbind_all = _bind("mote_capture_unbind_all", [_ctx], None)
# int32_t mote_capture_labels(const struct llama_context * ctx, int32_t * out, int32_t cap);
_capture_labels = _bind("mote_capture_labels", [_ctx, _P(_i32), _i32], _i32)
# int32_t mote_capture_read(const struct llama_context * ctx, int32_t label, int32_t n_layer, int32_t n_expert,
#                           int64_t * counts, double * weight_sums, double * prob_sums, double * output_norms,
#                           int64_t * tokens);
_capture_read = _bind("mote_capture_read", [_ctx, _i32, _i32, _i32] + [ctypes.c_void_p] * 5, _i32)
# int64_t mote_capture_trace_rows(const struct llama_context * ctx);
_capture_trace_rows = _bind("mote_capture_trace_rows", [_ctx], _i64)
# int32_t mote_capture_trace_read(const struct llama_context * ctx, int64_t rows, int32_t n_expert_used,
#                                 int32_t n_expert, int32_t * meta, int32_t * ids, float * weights, float * probs);
_capture_trace_read = _bind("mote_capture_trace_read", [_ctx, _i64, _i32, _i32] + [ctypes.c_void_p] * 4, _i32)
# void mote_capture_reset(struct llama_context * ctx);
_capture_reset = _bind("mote_capture_reset", [_ctx], None)

# int32_t mote_rpc_probe(const char * endpoint, int32_t timeout_ms);
_rpc_probe = _bind("mote_rpc_probe", [ctypes.c_char_p, _i32], _i32)
# int32_t mote_rpc_add_server(const char * endpoint);
_rpc_add_server = _bind("mote_rpc_add_server", [ctypes.c_char_p], _i32)
# int32_t mote_rpc_model_devices(const char * const * endpoints, int32_t n_endpoints, void ** devices, int32_t cap);
_rpc_model_devices = _bind("mote_rpc_model_devices", [_P(ctypes.c_char_p), _i32, _P(ctypes.c_void_p), _i32], _i32)
# int64_t mote_rpc_lost_replies(const char * endpoint);
_rpc_lost_replies = _bind("mote_rpc_lost_replies", [ctypes.c_char_p], _i64)

# ggml's backend registry, reached through the engine's library (it links ggml): the buffer types that
# llama.cpp's -ot/--override-tensor names, looked up as llama.cpp's own argument parser does.
_ptr_t = ctypes.c_void_p
# void ggml_backend_load_all(void);
_backend_load_all = _bind("ggml_backend_load_all", [], None)
# size_t ggml_backend_dev_count(void);
_dev_count = _bind("ggml_backend_dev_count", [], ctypes.c_size_t)
# ggml_backend_dev_t ggml_backend_dev_get(size_t index);
_dev_get = _bind("ggml_backend_dev_get", [ctypes.c_size_t], _ptr_t)
# ggml_backend_buffer_type_t ggml_backend_dev_buffer_type(ggml_backend_dev_t device);
_dev_buffer_type = _bind("ggml_backend_dev_buffer_type", [_ptr_t], _ptr_t)
# const char * ggml_backend_buft_name(ggml_backend_buffer_type_t buft);
_buft_name = _bind("ggml_backend_buft_name", [_ptr_t], ctypes.c_char_p)


# struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; };
class llama_model_tensor_buft_override(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", _ptr_t)]


if _abi_version() != MOTE_ABI_VERSION:
    raise EngineError(
        f"engine ABI {_abi_version()} does not match the Python package's {MOTE_ABI_VERSION}: "
        "reinstall mote-local so both come from the same build"
    )


# enum ggml_log_level { NONE = 0, DEBUG = 1, INFO = 2, WARN = 3, ERROR = 4, CONT = 5 };
# (the pinned bindings' own log callback maps these one step off and prints warnings as errors)
_LOG_ERROR, _LOG_CONT = 4, 5
_log: dict[str, Any] = {"verbose": False, "level": 0, "sinks": []}


# typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);
@llama.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level != _LOG_CONT:
        _log["level"] = level
    decoded = text.decode("utf-8", errors="replace")
    for sink in _log["sinks"]:
        if level == _LOG_CONT and sink:
            sink[-1] += decoded
        else:
            sink.append(decoded)
    if _log["verbose"] or _log["level"] >= _LOG_ERROR:
        print(decoded, end="", flush=True, file=sys.stderr)


llama.llama_log_set(_log_callback, ctypes.c_void_p(0))  # the module keeps _log_callback alive


def set_verbose(verbose: bool) -> None:
    """llama.cpp's log is process-wide: errors always, everything else only when verbose."""
    _log["verbose"] = verbose


def _checked(rc: int, error: type[MoteError]) -> int:
    """rc, unless the call failed (rc < 0): then `error` with the engine's message."""
    if rc < 0:
        raise error((_last_error() or b"").decode("utf-8", "replace"))
    return rc


def router_info(model) -> mote_router_info:
    info = mote_router_info()
    _checked(_router_info(model, ctypes.byref(info)), EngineError)
    return info


def layer_router(ctx, layer: int) -> mote_layer_router:
    out = mote_layer_router()
    _checked(_layer_router(ctx, layer, ctypes.byref(out)), EngineError)
    return out


def _entries(entries: list[tuple[int, int, int, float, int]]):
    return (mote_entry * len(entries))(*[mote_entry(*e) for e in entries])


def steer_check(shape: dict | None, entries: list[tuple[int, int, int, float, int]], strength: float) -> None:
    """The engine's steering rules applied to entries (layer, expert, mode, value, scope) for a router shape
    (n_layer, n_expert, n_expert_used, n_expert_groups, n_group_used, moe_layers), or without one (None);
    raises SteeringError with the reason they are refused."""
    native_shape = None
    if shape is not None:
        layers = (ctypes.c_uint8 * shape["n_layer"])(
            *[int(il in shape["moe_layers"]) for il in range(shape["n_layer"])]
        )
        native_shape = ctypes.byref(
            mote_shape(
                shape["n_layer"],
                shape["n_expert"],
                shape["n_expert_used"],
                shape["n_expert_groups"],
                shape["n_group_used"],
                layers,
            )
        )
    _checked(_steer_check(native_shape, _entries(entries), len(entries), strength), SteeringError)


def steer_set(ctx, entries: list[tuple[int, int, int, float, int]], strength: float) -> None:
    """Applies entries (all or nothing, every phase validated); raises SteeringError with the engine's reason."""
    _checked(_steer_set(ctx, _entries(entries), len(entries), strength), SteeringError)


def steer_set_seq(ctx, seq_id: int, entries: list[tuple[int, int, int, float, int]], strength: float) -> None:
    """A sequence's own steering (no entries: back to the context's); raises SteeringError with the reason."""
    _checked(_steer_set_seq(ctx, seq_id, _entries(entries), len(entries), strength), SteeringError)


def steer_phase(ctx, phase: int, seq_id: int | None = None) -> None:
    _checked(_steer_phase(ctx, phase) if seq_id is None else _steer_phase_seq(ctx, seq_id, phase), SteeringError)


def steer_clear(ctx) -> None:
    _steer_clear(ctx)


def capture_start(ctx, flags: int) -> None:
    _checked(_capture_start(ctx, flags), CaptureError)


def capture_stop(ctx) -> None:
    _capture_stop(ctx)


def capture_bind(ctx, seq_id: int, label: int, pos_begin: int, pos_end: int) -> None:
    _checked(_capture_bind(ctx, seq_id, label, pos_begin, pos_end), CaptureError)


def capture_unbind_all(ctx) -> None:
    _capture_unbind_all(ctx)


def capture_reset(ctx) -> None:
    _capture_reset(ctx)


def capture_labels(ctx) -> list[int]:
    n = _capture_labels(ctx, None, 0)
    out = (_i32 * n)()
    _capture_labels(ctx, out, n)
    return list(out)


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(ctypes.c_void_p)


def _opt(a: np.ndarray | None) -> ctypes.c_void_p | None:
    return None if a is None else _ptr(a)


def capture_read(ctx, label: int, n_layer: int, n_expert: int, probs: bool, output_norms: bool):
    """(counts, weight_sums, prob_sums or None, output_norm_sums or None, tokens) of one label, as numpy
    arrays sized by the engine's own dimensions (the engine refuses buffers of another size, and a label it
    did not count: CaptureError)."""
    counts = np.zeros((n_layer, n_expert), dtype=np.int64)
    weights = np.zeros((n_layer, n_expert), dtype=np.float64)
    prob_sums = np.zeros((n_layer, n_expert), dtype=np.float64) if probs else None
    norm_sums = np.zeros((n_layer, n_expert), dtype=np.float64) if output_norms else None
    tokens = np.zeros(n_layer, dtype=np.int64)
    _checked(
        _capture_read(
            ctx, label, n_layer, n_expert, _ptr(counts), _ptr(weights), _opt(prob_sums), _opt(norm_sums), _ptr(tokens)
        ),
        CaptureError,
    )
    return counts, weights, prob_sums, norm_sums, tokens


def capture_trace(ctx, n_expert_used: int, n_expert: int, probs: bool):
    """(meta [n, 4], ids [n, k], weights [n, k], probs [n, n_expert] or None)."""
    rows = _capture_trace_rows(ctx)
    meta = np.zeros((rows, 4), dtype=np.int32)
    ids = np.zeros((rows, n_expert_used), dtype=np.int32)
    weights = np.zeros((rows, n_expert_used), dtype=np.float32)
    p = np.zeros((rows, n_expert), dtype=np.float32) if probs else None
    _checked(
        _capture_trace_read(ctx, rows, n_expert_used, n_expert, _ptr(meta), _ptr(ids), _ptr(weights), _opt(p)),
        CaptureError,
    )
    return meta, ids, weights, p


def rpc_probe(endpoint: str, timeout_ms: int) -> None:
    """Raises EngineError, with the reason, unless an rpc-server of this engine's protocol answers at endpoint."""
    _checked(_rpc_probe(endpoint.encode(), timeout_ms), EngineError)


def rpc_add_server(endpoint: str) -> int:
    """Connects to an (answering) rpc-server and lists its devices, unregistered; returns their number."""
    return _checked(_rpc_add_server(endpoint.encode()), EngineError)


def rpc_model_devices(endpoints: list[str]) -> ctypes.Array:
    """The NULL-terminated device list (llama_model_params.devices) of a model on these added endpoints."""
    raw = (ctypes.c_char_p * max(1, len(endpoints)))(*(e.encode() for e in endpoints))
    cap = 64 + len(endpoints) * 8
    devices = (ctypes.c_void_p * cap)()
    _checked(_rpc_model_devices(raw, len(endpoints), devices, cap), EngineError)
    return devices


def rpc_lost_replies(endpoint: str) -> int:
    return _rpc_lost_replies(endpoint.encode())


def buffer_types() -> dict[str, int]:
    """Every registered device's buffer type by name ("CPU", "CUDA0", …), as llama.cpp's -ot parser lists them
    (rpc servers are not registered: see engine/rpc.py)."""
    _backend_load_all()
    found = {}
    for i in range(_dev_count()):
        buft = _dev_buffer_type(_dev_get(i))
        if buft:
            found[_buft_name(buft).decode()] = buft
    return found


def tensor_buft_overrides(overrides: list[tuple[str, int]]):
    """The NULL-terminated llama_model_tensor_buft_override array of (pattern, buffer type) pairs, and the
    pattern bytes it points into: the caller keeps both alive as long as the model (llama.cpp reads the
    patterns while loading and keeps the pointer)."""
    patterns = [ctypes.create_string_buffer(p.encode()) for p, _ in overrides]
    array = (llama_model_tensor_buft_override * (len(overrides) + 1))()
    for slot, buf, (_, buft) in zip(array, patterns, overrides):
        slot.pattern = ctypes.cast(buf, ctypes.c_char_p)
        slot.buft = buft
    return array, patterns


@contextlib.contextmanager
def log_lines() -> Iterator[list[str]]:
    """llama.cpp's log while the block runs, every level, as lines (tests read what the engine reports:
    tensor placement, cache types, batch sizes); printing to stderr is unchanged."""
    lines: list[str] = []
    _log["sinks"].append(lines)
    try:
        yield lines
    finally:
        _log["sinks"].remove(lines)
