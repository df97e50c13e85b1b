"""The one module that binds native/mote.h (steering and routing capture in the patched engine).

Each binding carries the C prototype it mirrors. Raw ctypes stays in here: the rest of the package
calls the small Python functions at the bottom.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np

from mote_local.errors import EngineError

try:
    from mote_local_engine.llama_cpp import _internals as llama_internals
    from mote_local_engine.llama_cpp import llama_chat_format
    from mote_local_engine.llama_cpp import (
        llama_cpp as llama,  # the pinned bindings, private copy
    )
except (ImportError, OSError, RuntimeError) as err:  # not built, or the shared library failed to load
    raise EngineError(f"mote-local's engine is not available ({err}); install the package with "
                      "`pip install .` from the repository so that it builds the patched llama.cpp") from err

_lib = llama._lib

MOTE_ABI_VERSION = 1
MODE_MASK, MODE_DROP, MODE_FORCE, MODE_BIAS, MODE_GAIN = range(5)
CAPTURE_PROBS = 1
CAPTURE_TRACE = 2


# struct mote_entry { int32_t layer; int32_t expert; int32_t mode; float value; };
class mote_entry(ctypes.Structure):
    _fields_ = [("layer", ctypes.c_int32), ("expert", ctypes.c_int32), ("mode", ctypes.c_int32),
                ("value", ctypes.c_float)]


# struct mote_router_info { int32_t n_layer, n_expert, n_expert_used, n_expert_groups, n_group_used, gating; };
class mote_router_info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in
                ("n_layer", "n_expert", "n_expert_used", "n_expert_groups", "n_group_used", "gating")]


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
# int32_t mote_steer_set(struct llama_context * ctx, const struct mote_entry * entries, int32_t n_entries, float strength);
_steer_set = _bind("mote_steer_set", [_ctx, _P(mote_entry), _i32, _f32], _i32)
# void mote_steer_clear(struct llama_context * ctx);
_steer_clear = _bind("mote_steer_clear", [_ctx], None)
# int32_t mote_steer_count(const struct llama_context * ctx);
_steer_count = _bind("mote_steer_count", [_ctx], _i32)
# int32_t mote_capture_start(struct llama_context * ctx, int32_t flags);
_capture_start = _bind("mote_capture_start", [_ctx, _i32], _i32)
# void mote_capture_stop(struct llama_context * ctx);
_capture_stop = _bind("mote_capture_stop", [_ctx], None)
# int32_t mote_capture_bind(struct llama_context * ctx, int32_t seq_id, int32_t label, int32_t pos_begin, int32_t pos_end);
_capture_bind = _bind("mote_capture_bind", [_ctx, _i32, _i32, _i32, _i32], _i32)
# void mote_capture_unbind_all(struct llama_context * ctx);
_capture_unbind_all = _bind("mote_capture_unbind_all", [_ctx], None)
# int32_t mote_capture_labels(const struct llama_context * ctx, int32_t * out, int32_t cap);
_capture_labels = _bind("mote_capture_labels", [_ctx, _P(_i32), _i32], _i32)
# int32_t mote_capture_read(const struct llama_context * ctx, int32_t label, int64_t * counts, double * weight_sums,
#                           double * prob_sums, int64_t * tokens);
_capture_read = _bind("mote_capture_read", [_ctx, _i32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_void_p], _i32)
# int64_t mote_capture_trace_rows(const struct llama_context * ctx);
_capture_trace_rows = _bind("mote_capture_trace_rows", [_ctx], _i64)
# int32_t mote_capture_trace_read(const struct llama_context * ctx, int32_t * meta, int32_t * ids, float * weights, float * probs);
_capture_trace_read = _bind("mote_capture_trace_read", [_ctx, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                        ctypes.c_void_p], _i32)
# void mote_capture_reset(struct llama_context * ctx);
_capture_reset = _bind("mote_capture_reset", [_ctx], None)

if _abi_version() != MOTE_ABI_VERSION:
    raise EngineError(f"engine ABI {_abi_version()} does not match the Python package's {MOTE_ABI_VERSION}: "
                      "reinstall mote-local so both come from the same build")


# enum ggml_log_level { NONE = 0, DEBUG = 1, INFO = 2, WARN = 3, ERROR = 4, CONT = 5 };
# (the pinned bindings' own log callback maps these one step off and prints warnings as errors)
_LOG_ERROR, _LOG_CONT = 4, 5
_log = {"verbose": False, "level": 0}


# typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);
@llama.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level != _LOG_CONT:
        _log["level"] = level
    if _log["verbose"] or _log["level"] >= _LOG_ERROR:
        print(text.decode("utf-8", errors="replace"), end="", flush=True, file=sys.stderr)


llama.llama_log_set(_log_callback, ctypes.c_void_p(0))  # the module keeps _log_callback alive


def set_verbose(verbose: bool) -> None:
    """llama.cpp's log is process-wide: errors always, everything else only when verbose."""
    _log["verbose"] = verbose


def last_error() -> str:
    return (_last_error() or b"").decode("utf-8", "replace")


def router_info(model) -> mote_router_info:
    info = mote_router_info()
    if _router_info(model, ctypes.byref(info)) != 0:
        raise EngineError(last_error())
    return info


def steer_set(ctx, entries: list[tuple[int, int, int, float]], strength: float) -> str | None:
    """Applies entries (all or nothing); returns the engine's error message, or None."""
    array = (mote_entry * len(entries))(*[mote_entry(*e) for e in entries])
    return None if _steer_set(ctx, array, len(entries), strength) == 0 else last_error()


def steer_clear(ctx) -> None:
    _steer_clear(ctx)


def steer_count(ctx) -> int:
    return _steer_count(ctx)


def capture_start(ctx, flags: int) -> str | None:
    return None if _capture_start(ctx, flags) == 0 else last_error()


def capture_stop(ctx) -> None:
    _capture_stop(ctx)


def capture_bind(ctx, seq_id: int, label: int, pos_begin: int, pos_end: int) -> str | None:
    return None if _capture_bind(ctx, seq_id, label, pos_begin, pos_end) == 0 else last_error()


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


def capture_read(ctx, label: int, n_layer: int, n_expert: int, probs: bool):
    """(counts, weight_sums, prob_sums or None, tokens) of one label, as numpy arrays."""
    counts = np.zeros((n_layer, n_expert), dtype=np.int64)
    weights = np.zeros((n_layer, n_expert), dtype=np.float64)
    prob_sums = np.zeros((n_layer, n_expert), dtype=np.float64) if probs else None
    tokens = np.zeros(n_layer, dtype=np.int64)
    rc = _capture_read(ctx, label, _ptr(counts), _ptr(weights), _ptr(prob_sums) if probs else None, _ptr(tokens))
    if rc != 0:
        raise KeyError(last_error())
    return counts, weights, prob_sums, tokens


def capture_trace(ctx, n_expert_used: int, n_expert: int, probs: bool):
    """(meta [n, 4], ids [n, k], weights [n, k], probs [n, n_expert] or None)."""
    rows = _capture_trace_rows(ctx)
    meta = np.zeros((rows, 4), dtype=np.int32)
    ids = np.zeros((rows, n_expert_used), dtype=np.int32)
    weights = np.zeros((rows, n_expert_used), dtype=np.float32)
    p = np.zeros((rows, n_expert), dtype=np.float32) if probs else None
    if _capture_trace_read(ctx, _ptr(meta), _ptr(ids), _ptr(weights), _ptr(p) if probs else None) != 0:
        raise EngineError(last_error())
    return meta, ids, weights, p
