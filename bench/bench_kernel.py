#!/usr/bin/env python3
"""Prefill and decode on the CPU: mote-local's engine, with the experts' grouped matmul
(native/mote-moe-matmul.cpp), against stock llama.cpp's llama-bench, on the benchmark model (bench_engine.py's
shape) at Q8_0 and BF16 (issue 26).

Conditions, each run in a process of its own, interleaved in rounds that each start with the next condition:

    llama-bench stock        llama-bench from the pinned sdist, unpatched (--stock)
    llama-bench mote         the same tool linked to this engine (--mote)
    llama-bench mote, off    the same with MOTE_MOE_GEMM=0 (ggml-cpu's own expert matmuls)
    mote_local Session       the Python API as `mote run` drives it: the prompt in one decode call, then
                             single-token decode calls

Prefill: a --prompt-token prompt in one batch (n_batch = n_ubatch = 512); decode: --decode single-token steps
from an empty cache, as llama-bench's tg test does. llama-bench runs -r --reps repetitions after its warm-up
and reports their mean; the Session worker does the same (a warm-up, then --reps timed runs in one
session, its cache cleared before each test). Throughput per round; medians and min-max over rounds.

    python bench/bench_kernel.py build     # llama-bench in bench_serve.py's stock project and in this engine's
                                           # build folder (the one `pip install .` left in build/)
    python bench/bench_kernel.py run [--stock BIN] [--mote BIN] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import bench_model

REPO = Path(__file__).resolve().parent.parent


def _configured(project: Path, fix: str) -> Path:
    """``project``'s build folder (bench_serve.wheel_build_dir), which must have been configured."""
    from bench_serve import wheel_build_dir

    folder = wheel_build_dir(project)
    if not (folder / "CMakeCache.txt").exists():
        sys.exit(f"no configured build folder at {folder}: {fix}")
    return folder


def engine_build_dir() -> Path:
    """Where `pip install .` (scikit-build-core) built the installed engine."""
    return _configured(REPO, "run `pip install .` from the repository first")


def stock_build_dir() -> Path:
    """Where `bench_serve.py build` built the unpatched project."""
    from bench_serve import STOCK_PROJECT

    return _configured(STOCK_PROJECT, "run `python bench/bench_serve.py build` first")


def build(jobs: int) -> tuple[Path, Path]:
    import bench_serve

    bench_serve.build(jobs)  # configures and builds the unpatched project once
    stock_dir, mote_dir = stock_build_dir(), engine_build_dir()
    # pip configured the engine's folder with its own cmake, gone since: configure it again with this one
    configure = ["cmake", "-S", str(REPO), "-B", str(mote_dir), f"-DPython_EXECUTABLE={sys.executable}"]
    subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    for build_dir in (stock_dir, mote_dir):
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-bench", "-j", str(jobs)], check=True)
    return stock_dir / "bin" / "llama-bench", mote_dir / "bin" / "llama-bench"


def bf16_model(args) -> Path:
    """The benchmark shape with every quantizable tensor BF16 (routers and norms stay F32), from its f32 file."""
    from gguf import GGMLQuantizationType as QT

    from mote_local.modelfile.quantize import ROUTED_EXPERTS, Recipe, quantize

    f32 = Path(bench_model(n_layer=args.layers, qtype="f32"))
    dest = f32.with_name(f32.stem + "-bf16.gguf")
    if not dest.exists():
        quantize(f32, dest, Recipe("bf16", "every quantizable tensor BF16", ((ROUTED_EXPERTS, QT.BF16),), QT.BF16))
    return dest


# ------------------------------------------------------------------------------------------------ conditions


def llama_bench(binary: Path, model: Path, args, env: dict[str, str]) -> dict[str, float]:
    cmd = [str(binary), "-m", str(model), "-p", str(args.prompt_tokens), "-n", str(args.decode), "-b", "512"]
    cmd += ["-ub", "512", "-t", str(args.threads), "-r", str(args.reps), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{binary} failed:\n{proc.stderr[-2000:]}")
    out: dict[str, float] = {}
    for test in json.loads(proc.stdout):
        out["prefill" if test["n_prompt"] else "decode"] = test["avg_ts"]
    return out


def session_worker(model: str, prompt_tokens: int, decode: int, reps: int, threads: int) -> dict[str, float]:
    """Tokens/s of the prompt in one decode call and of single-token decode steps, each from an empty cache."""
    import numpy as np

    from mote_local.engine.model import Model

    rng = np.random.default_rng(0)
    with Model(model, n_threads=threads) as m, m.session(n_ctx=prompt_tokens + decode, n_batch=512) as s:
        tokens = [int(t) for t in rng.integers(10, m.n_vocab, prompt_tokens)]
        times: dict[str, list[float]] = {"prefill": [], "decode": []}
        for rep in range(reps + 1):  # the first is the warm-up; each test starts from an empty cache
            s.reset()
            t0 = time.perf_counter()
            s.decode([(0, tokens, 0)], outputs="last")
            prefill = time.perf_counter() - t0
            s.reset()
            t0 = time.perf_counter()
            for i in range(decode):
                s.decode([(0, [tokens[i]], i)], outputs="last")
            steps = time.perf_counter() - t0
            if rep:
                times["prefill"].append(prompt_tokens / prefill)
                times["decode"].append(decode / steps)
    return {kind: statistics.mean(v) for kind, v in times.items()}


def session(model: Path, args) -> dict[str, float]:
    worker = [sys.executable, __file__, "worker", str(model), str(args.prompt_tokens), str(args.decode)]
    worker += [str(args.reps), str(args.threads)]
    proc = subprocess.run(worker, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"the Session worker failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ run


def run(args) -> None:
    models = {"Q8_0": Path(bench_model(n_layer=args.layers, qtype="q8_0")), "BF16": bf16_model(args)}
    conditions = {
        "llama-bench stock": lambda model: llama_bench(args.stock, model, args, {}),
        "llama-bench mote": lambda model: llama_bench(args.mote, model, args, {}),
        "llama-bench mote, MOTE_MOE_GEMM=0": lambda model: llama_bench(args.mote, model, args, {"MOTE_MOE_GEMM": "0"}),
        "mote_local Session": lambda model: session(model, args),
    }
    names = list(conditions)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    loads = [os.getloadavg()[0]]
    for rnd in range(args.rounds):
        first = rnd % len(names)
        for qtype, model in models.items():
            for name in names[first:] + names[:first]:
                r = conditions[name](model)
                results.setdefault((qtype, name), []).append(r)
                loads.append(os.getloadavg()[0])
                print(f"round {rnd + 1} {qtype} {name}: {r}", file=sys.stderr, flush=True)

    def spread(values: list[float], fmt: str = "{:.1f}") -> str:
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    print(
        f"\nmodels: {', '.join(f'{q} {p.name} ({p.stat().st_size / 2**20:.0f} MiB)' for q, p in models.items())}; "
        f"prompt {args.prompt_tokens} tokens, {args.decode} decode steps, -t {args.threads}, {args.reps} reps, "
        f"{args.rounds} rounds; 1-min load average {min(loads):.2f}-{max(loads):.2f}\n"
    )
    print("| type | condition | prefill tok/s | × stock | decode tok/s | × stock |")
    print("|---|---|---:|---:|---:|---:|")
    for qtype in models:
        stock = results[(qtype, "llama-bench stock")]
        for name in names:
            runs = results[(qtype, name)]
            cells = []
            for kind in ("prefill", "decode"):
                ratios = [r[kind] / s[kind] for r, s in zip(runs, stock)]  # within a round
                cells += [spread([r[kind] for r in runs]), spread(ratios, "{:.2f}")]
            print(f"| {qtype} | {name} | " + " | ".join(cells) + " |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        model, prompt_tokens, decode, reps, threads = sys.argv[2], *map(int, sys.argv[3:7])
        print(json.dumps(session_worker(model, prompt_tokens, decode, reps, threads)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build both llama-bench binaries")
    b.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    r = sub.add_parser("run", help="run the benchmark (prints a markdown table)")
    r.add_argument("--stock", type=Path, help="stock llama-bench (default: the one `build` made)")
    r.add_argument("--mote", type=Path, help="llama-bench linked to this engine (default: the one `build` made)")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--reps", type=int, default=3, help="llama-bench -r, and the Session worker's timed runs")
    r.add_argument("--prompt-tokens", type=int, default=512)
    r.add_argument("--decode", type=int, default=32)
    r.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    r.add_argument("--layers", type=int, default=8)
    args = p.parse_args()
    if args.command == "build":
        print(*build(args.jobs), sep="\n")
        return
    args.stock = args.stock or stock_build_dir() / "bin" / "llama-bench"
    args.mote = args.mote or engine_build_dir() / "bin" / "llama-bench"
    for binary in (args.stock, args.mote):
        if not binary.exists():
            sys.exit(f"no llama-bench at {binary}: run `python {sys.argv[0]} build` first, or pass --stock/--mote")
    run(args)


if __name__ == "__main__":
    main()
