#!/usr/bin/env python3
"""Does CUDA's fused top-k MoE kernel still run when steering or capture is on?

llama.cpp's CUDA backend replaces the router's chain (gating, selection bias, argsort, get_rows,
normalisation) by one `topk_moe` kernel when the graph has exactly that shape. For each
architecture and condition this script decodes one prompt with every layer offloaded, in a
process of its own run under Nsight Compute (`ncu`), which lists every kernel launched. Fused
means one `topk_moe` launch per MoE layer; the kernel total shows what steering adds.

    python bench/cuda_fusion.py            # needs a CUDA build (CMAKE_ARGS=-DGGML_CUDA=on) and ncu
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
import tempfile
from pathlib import Path

CONDITIONS = ("idle", "bias", "mask", "force", "drop", "gain", "capture")
# deepseek2 twice: llama.cpp's fused kernel has no group-limited top-k, so groups never fuse
MODELS = {"qwen3moe": {}, "gpt-oss": {}, "deepseek2 (no groups)": {"n_expert_groups": 0, "n_group_used": 0}}


def decode_once(arch: str, overrides: dict, condition: str, cache: Path) -> None:
    """The profiled process: one prefill of 16 tokens under the condition."""
    import contextlib

    from mote_local.engine.model import Model
    from mote_local.steering.entries import Entry, Mode
    from mote_local.synthetic import tiny

    model = Model(tiny.tiny_model(arch, cache_dir=cache, **overrides), n_gpu_layers=99)
    values = {"bias": 1.0, "gain": 0.5}
    with model.session(n_ctx=64) as s, contextlib.ExitStack() as stack:
        if condition not in ("idle", "capture"):
            s.steer([Entry(layer, 1, Mode(condition), values.get(condition, 0.0)) for layer in model.layout.moe_layers])
        if condition == "capture":
            stack.enter_context(s.capture())
        s.decode([(0, list(range(10, 26)), 0)], outputs="last")
    print(len(model.layout.moe_layers))


def kernel_launches(arch_key: str, condition: str, cache: Path) -> tuple[int, int, int]:
    """(topk_moe launches, all kernel launches, MoE layers) of one profiled decode."""
    cmd = [
        "ncu",
        "--csv",
        "--metrics",
        "gpu__time_duration.sum",
        sys.executable,
        __file__,
        "--child",
        arch_key,
        condition,
        str(cache),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    lines = result.stdout.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if result.returncode != 0 or header is None:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}\n{result.stdout[-2000:]}")
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[header:]))))
    n_moe = int(next(line for line in lines[:header] if line.strip().isdigit()))
    launches = {r["ID"]: r["Kernel Name"] for r in rows}
    return sum("topk_moe" in name for name in launches.values()), len(launches), n_moe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=CONDITIONS)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "CONDITION", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        key, condition, cache = args.child
        decode_once(key.split()[0], MODELS[key], condition, Path(cache))
        return
    with tempfile.TemporaryDirectory() as cache:
        print("cells: topk_moe launches / MoE layers (all kernel launches)")
        print(f"{'model':<22} " + " ".join(f"{c:>10}" for c in args.conditions))
        for key in args.models:
            cells = []
            for condition in args.conditions:
                fused, total, n_moe = kernel_launches(key, condition, Path(cache))
                cells.append(f"{fused}/{n_moe} ({total})")
            print(f"{key:<22} " + " ".join(f"{c:>10}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
