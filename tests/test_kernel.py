"""The experts' grouped matmul (native/mote-moe-matmul.cpp) against ggml-cpu's stock vec_dot path.

The switch is read once per process, so each side runs in a child process with its environment:
MOTE_MOE_GEMM=0 is the stock path; the default is the grouped path for experts with enough rows.

Every test runs at each x86 feature level this CPU has: the installed engine (GGML_NATIVE: AVX512 here), and
an AVX2 one, whose ggml-cpu (the kernel and the llamafile_sgemm it calls, compiled for AVX2/FMA/F16C) is built
from this repository and put in a copy of the installed engine, as GGML_CPU_ALL_VARIANTS would choose it on an
AVX2-only CPU.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from mote_local.modelfile.quantize import ROUTED_EXPERTS, Recipe, quantize
from mote_local.synthetic import tiny

REPO = Path(__file__).resolve().parent.parent

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
# the engine's own ggml-cpu (already loaded: dlopen returns it): what the grouped path computed, at which level
cpu = ctypes.CDLL(os.path.join(os.path.dirname(mote_local_engine.__file__), "lib", "libmote_ggml-cpu.so"))
experts, grouped_rows = ctypes.c_int64(), ctypes.c_int64()
cpu.mote_moe_gemm_counts(ctypes.byref(experts), ctypes.byref(grouped_rows))
np.savez(out, logits=np.concatenate(rows), counts=counts, grouped=[experts.value, grouped_rows.value],
         isa=[cpu.ggml_cpu_has_avx2(), cpu.ggml_cpu_has_avx512()])
"""
# the level of the second engine: what ggml's x86 variants call haswell (GGML_NATIVE off, no AVX512)
AVX2_OPTIONS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]


def _cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


CPU_FLAGS = _cpu_flags()


def _avx2_engine(dest: Path) -> Path:
    """A copy of the installed engine whose ggml-cpu is built at the AVX2 level; returns the folder to put
    first on a child's sys.path."""
    import mote_local_engine

    build_dir = dest / "build"
    configure = ["cmake", "-S", str(REPO), "-B", str(build_dir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release"]
    configure += [f"-DPython_EXECUTABLE={sys.executable}", "-DMOTE_SERVER=OFF", *AVX2_OPTIONS]
    env = dict(os.environ)
    if shutil.which("ccache"):  # sources under the build folder: relative to it, a rerun hits the cache
        configure += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        env["CCACHE_BASEDIR"] = str(build_dir)
    for command in (configure, ["cmake", "--build", str(build_dir), "--target", "ggml-cpu"]):
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, timeout=1200)
    engine = dest / "path" / "mote_local_engine"
    shutil.copytree(Path(mote_local_engine.__file__).parent, engine, ignore=shutil.ignore_patterns("bin"))
    (built,) = build_dir.rglob("libmote_ggml-cpu.so")
    shutil.copy(built, engine / "lib" / built.name)
    return engine.parent


@pytest.fixture(scope="module", params=["native", "avx2"])
def level(request, tmp_path_factory):
    """(name, folder to put first on the child's sys.path or None for the installed engine)"""
    if request.param == "native":
        return "native", None
    if "avx2" not in CPU_FLAGS or "avx512f" not in CPU_FLAGS:
        pytest.skip("the AVX2 level is a second level only on a CPU with AVX512 (the installed engine is native)")
    return "avx2", _avx2_engine(tmp_path_factory.mktemp("avx2"))


@pytest.fixture(scope="module")
def models(tiny_path, tmp_path_factory):
    """qtype -> path: the tiny generator's f32, f16 and Q8_0 files, and a BF16 one quantized from f32."""
    paths = {q: tiny_path(ARCH, qtype=q) for q in ("f32", "f16", "q8_0")}
    bf16 = Recipe("bf16", "every quantizable tensor BF16", ((ROUTED_EXPERTS, QT.BF16),), QT.BF16)
    paths["bf16"] = quantize(paths["f32"], tmp_path_factory.mktemp("bf16") / "bf16.gguf", bf16).path
    return paths


def run(level, path, tmp_path, n_tokens, env, decode=0):
    """(logits, routing counts, (experts, rows) the grouped path computed) of an n_tokens prompt (then `decode`
    single-token steps) in a child process with env, on the engine of `level`."""
    name, engine_path = level
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.npz"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MOTE_MOE_GEMM")} | env
    if engine_path is not None:
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(engine_path), os.environ.get("PYTHONPATH")]))
    subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(out), str(n_tokens), str(decode), json.dumps(tiny.WORDS)],
        env=child_env,
        check=True,
        timeout=120,
    )
    with np.load(out) as z:
        avx2, avx512 = z["isa"]
        assert avx2 and bool(avx512) == (name == "native" and "avx512f" in CPU_FLAGS), (name, z["isa"])
        return z["logits"], z["counts"], tuple(z["grouped"])


@pytest.mark.parametrize("qtype", ["f32", "f16", "bf16", "q8_0"])
def test_grouped_matches_stock_within_tolerance(level, models, tmp_path, qtype):
    stock, stock_counts, stock_grouped = run(level, models[qtype], tmp_path, N_PROMPT, {"MOTE_MOE_GEMM": "0"})
    grouped, grouped_counts, (experts, rows) = run(level, models[qtype], tmp_path, N_PROMPT, {})
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
def test_decode_and_few_rows_keep_the_stock_path_bit_identical(level, models, tmp_path, qtype):
    # a prompt shorter than the threshold, then single-token decodes: no expert reaches MIN_ROWS rows
    stock, _, _ = run(level, models[qtype], tmp_path, MIN_ROWS - 1, {"MOTE_MOE_GEMM": "0"}, decode=3)
    grouped, _, taken = run(level, models[qtype], tmp_path, MIN_ROWS - 1, {}, decode=3)
    assert taken == (0, 0)
    assert np.array_equal(stock, grouped)
    # with its threshold lowered to 2 rows the grouped path takes some of the prompt's experts
    forced, _, (experts, _) = run(
        level, models[qtype], tmp_path, MIN_ROWS - 1, {"MOTE_MOE_GEMM_MIN_ROWS": "2"}, decode=3
    )
    assert experts > 0
    assert float(np.abs(forced - stock).max() / np.abs(stock).max()) <= TOLERANCE[qtype]


def test_switch_off_wins_over_the_threshold(level, models, tmp_path):
    off, _, taken = run(
        level, models["q8_0"], tmp_path, N_PROMPT, {"MOTE_MOE_GEMM": "0", "MOTE_MOE_GEMM_MIN_ROWS": "2"}
    )
    assert taken == (0, 0)
