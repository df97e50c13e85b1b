"""The experts' grouped matmul (native/mote-moe-matmul.cpp) against ggml-cpu's stock vec_dot path.

The switch is read once per process, so each side runs in a child process with its environment:
MOTE_MOE_GEMM=0 is the stock path; the default is the grouped path for experts with enough rows.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from mote_local.modelfile.quantize import ROUTED_EXPERTS, Recipe, quantize
from mote_local.synthetic import tiny

ARCH = "qwen3moe"
N_PROMPT = 64  # 8 experts, 2 used: ~16 rows per expert

# max |grouped - stock| / max |stock| over the logits of every position (f32 KV cache). Both paths take the
# same operands and accumulate in f32; only the order of the sums may differ. Measured here: f32 3.8e-7; BF16
# and Q8_0 0 (at these widths their block products run lane for lane as in vec_dot); F16 3.2e-4, because
# an F16 model's other matmuls round their f32 inputs to f16, which turns last-bit differences of the experts'
# output into f16 steps (1e-3 relative). The bounds leave about 3x room.
TOLERANCE = {"f32": 1e-6, "f16": 1e-3, "bf16": 1e-5, "q8_0": 1e-5}
MIN_ROWS = 4  # native/mote-moe-matmul.cpp's DEFAULT_MIN_ROWS

_CHILD = r"""
import ctypes, json, os, sys
import numpy as np
import mote_local_engine
from mote_local.engine.model import Model
path, out, n_tokens, decode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# f32 KV cache: last-bit differences of the matmul are not rounded to f16 on the way to the logits
with Model(path) as model, model.session(n_ctx=256, type_k=0, type_v=0, flash_attn="off") as s:
    tokens = (model.tokenize(" ".join(json.loads(sys.argv[5])), add_bos=True) * n_tokens)[:n_tokens]
    with s.capture() as cap:
        rows = [s.logits(tokens)]
        for i in range(decode):
            rows.append(s.decode([(0, [tokens[i]], len(tokens) + i)]))
        counts = cap.stats().counts
# the engine's own ggml-cpu (already loaded: dlopen returns it): what the grouped path computed
cpu = ctypes.CDLL(os.path.join(os.path.dirname(mote_local_engine.__file__), "lib", "libmote_ggml-cpu.so"))
experts, grouped_rows = ctypes.c_int64(), ctypes.c_int64()
cpu.mote_moe_gemm_counts(ctypes.byref(experts), ctypes.byref(grouped_rows))
np.savez(out, logits=np.concatenate(rows), counts=counts, grouped=[experts.value, grouped_rows.value])
"""


@pytest.fixture(scope="module")
def models(tiny_path, tmp_path_factory):
    """qtype -> path: the tiny generator's f32, f16 and Q8_0 files, and a BF16 one quantized from f32."""
    paths = {q: tiny_path(ARCH, qtype=q) for q in ("f32", "f16", "q8_0")}
    bf16 = Recipe("bf16", "every quantizable tensor BF16", ((ROUTED_EXPERTS, QT.BF16),), QT.BF16)
    paths["bf16"] = quantize(paths["f32"], tmp_path_factory.mktemp("bf16") / "bf16.gguf", bf16).path
    return paths


def run(path, tmp_path, n_tokens, env, decode=0):
    """(logits, routing counts, (experts, rows) the grouped path computed) of an n_tokens prompt (then `decode`
    single-token steps) in a child process with env."""
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.npz"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MOTE_MOE_GEMM")} | env
    subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(out), str(n_tokens), str(decode), json.dumps(tiny.WORDS)],
        env=child_env,
        check=True,
        timeout=120,
    )
    with np.load(out) as z:
        return z["logits"], z["counts"], tuple(z["grouped"])


@pytest.mark.parametrize("qtype", ["f32", "f16", "bf16", "q8_0"])
def test_grouped_matches_stock_within_tolerance(models, tmp_path, qtype):
    stock, stock_counts, stock_grouped = run(models[qtype], tmp_path, N_PROMPT, {"MOTE_MOE_GEMM": "0"})
    grouped, grouped_counts, (experts, rows) = run(models[qtype], tmp_path, N_PROMPT, {})
    assert stock_grouped == (0, 0)  # switched off: every expert took the stock path
    # each of an MoE layer's three expert matmuls (gate, up, down) took every expert with enough rows
    enough = grouped_counts >= MIN_ROWS
    assert enough.sum() > grouped_counts.size // 2
    assert (experts, rows) == (3 * enough.sum(), 3 * grouped_counts[enough].sum())
    assert np.isfinite(grouped).all()
    error = float(np.abs(grouped - stock).max() / np.abs(stock).max())
    assert error <= TOLERANCE[qtype], error
    np.testing.assert_array_equal(grouped_counts, stock_counts)  # routing unchanged


@pytest.mark.parametrize("qtype", ["bf16", "q8_0"])
def test_decode_and_few_rows_keep_the_stock_path_bit_identical(models, tmp_path, qtype):
    # a prompt shorter than the threshold, then single-token decodes: no expert reaches MIN_ROWS rows
    stock, _, _ = run(models[qtype], tmp_path, MIN_ROWS - 1, {"MOTE_MOE_GEMM": "0"}, decode=3)
    grouped, _, taken = run(models[qtype], tmp_path, MIN_ROWS - 1, {}, decode=3)
    assert taken == (0, 0)
    assert np.array_equal(stock, grouped)
    # with its threshold lowered to 2 rows the grouped path takes some of the prompt's experts
    forced, _, (experts, _) = run(models[qtype], tmp_path, MIN_ROWS - 1, {"MOTE_MOE_GEMM_MIN_ROWS": "2"}, decode=3)
    assert experts > 0
    assert float(np.abs(forced - stock).max() / np.abs(stock).max()) <= TOLERANCE[qtype]


def test_switch_off_wins_over_the_threshold(models, tmp_path):
    off, _, taken = run(models["q8_0"], tmp_path, N_PROMPT, {"MOTE_MOE_GEMM": "0", "MOTE_MOE_GEMM_MIN_ROWS": "2"})
    assert taken == (0, 0)
