#!/usr/bin/env python3
"""Steering and capture over llama.cpp's RPC backend: overhead against the same RPC setup idle, and the
requests per decode step that capture adds.

Starts N `mote rpc-server`s on loopback (GGML_RPC_DEBUG=1, so each logs every request it serves), loads
bench_engine's model with its layers spread over the servers and the local CPU (-ngl, -ts 1,1,…), then
times prefill and single-token decode under four conditions, interleaved round-robin over --reps rounds:
local idle (no servers), RPC idle, RPC steered (bench_engine's profile: 6 entries in every MoE layer) and
RPC capture. Ratios are per round against RPC idle; the median and the range over rounds are printed.
Requests per decode step are counted from the servers' logs.

    python bench/bench_rpc.py                       # 2 servers, 6 of 8 layers offloaded, Q8_0
    python bench/bench_rpc.py --servers 1 --n-gpu-layers 99
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import bench_model, decode_seconds, prefill_seconds, steering_profile

from mote_local.engine import rpc
from mote_local.engine.model import Model
from mote_local.errors import EngineError
from mote_local.synthetic import tiny

REQUEST = re.compile(r"^\[(\w+)\]", re.MULTILINE)


def start_servers(n: int, threads: int, logdir: Path) -> tuple[list[subprocess.Popen], list[str], list[Path]]:
    procs, endpoints, logs = [], [], []
    for i in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = logdir / f"server{i}.log"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "mote_local.cli", "rpc-server", "--port", str(port), "-t", str(threads)],
                stdout=subprocess.DEVNULL,
                stderr=log.open("w"),
                env=dict(os.environ, GGML_RPC_DEBUG="1"),
            )
        )
        endpoints.append(f"127.0.0.1:{port}")
        logs.append(log)
        deadline = time.monotonic() + 30
        while True:
            try:
                rpc.probe(endpoints[-1], timeout_ms=2000)
                break
            except EngineError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    return procs, endpoints, logs


def requests_during(logs: list[Path], action) -> collections.Counter:
    """The requests the servers logged while `action` ran."""
    sizes = [log.stat().st_size for log in logs]
    action()
    time.sleep(0.2)  # the servers' last lines
    counts: collections.Counter = collections.Counter()
    for log, size in zip(logs, sizes):
        with log.open() as f:
            f.seek(size)
            counts.update(REQUEST.findall(f.read()))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--n-gpu-layers", type=int, default=6, help="layers on the servers (of --n-layer)")
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--qtype", default="q8_0", choices=tiny.QTYPES)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of the client and of each server")
    args = ap.parse_args()

    path = bench_model(n_layer=args.n_layer, qtype=args.qtype)
    print(
        f"model: {path.name} ({path.stat().st_size / 2**20:.0f} MiB); {args.servers} loopback servers, "
        f"{args.n_gpu_layers} of {args.n_layer} layers on them, {args.threads} thread(s) per process"
    )
    with tempfile.TemporaryDirectory() as logdir, contextlib.ExitStack() as stack:
        procs, endpoints, logs = start_servers(args.servers, args.threads, Path(logdir))
        for proc in procs:
            stack.callback(proc.wait)
            stack.callback(proc.kill)
        local = stack.enter_context(Model(path))
        remote = stack.enter_context(
            Model(path, rpc_servers=endpoints, n_gpu_layers=args.n_gpu_layers, tensor_split=[1] * args.servers)
        )
        rng = np.random.default_rng(0)
        prompt = rng.integers(10, local.n_vocab, size=args.prefill).tolist()
        entries = steering_profile(remote)
        sessions = {
            m: stack.enter_context(m.session(n_ctx=1024, n_batch=args.prefill, n_threads=args.threads))
            for m in (local, remote)
        }
        conditions = {"local idle": local, "rpc idle": remote, "rpc steered": remote, "rpc capture": remote}
        times = {c: {"prefill": [], "decode": []} for c in conditions}
        per_step: dict[str, collections.Counter] = {}
        for rep in range(args.reps):
            for name, model in conditions.items():
                s = sessions[model]
                with contextlib.ExitStack() as cond:
                    if name == "rpc steered":
                        s.steer(entries)
                        cond.callback(s.clear_steering)
                    if name == "rpc capture":
                        cond.enter_context(s.capture())
                    prefill_seconds(s, prompt[:64], "last")  # warm-up: this condition's graphs are built
                    times[name]["prefill"].append(prefill_seconds(s, prompt, "last"))
                    times[name]["decode"].append(decode_seconds(s, prompt[:32], args.decode, rng))
                    if rep == 0 and model is remote:
                        n = 8
                        counts = requests_during(logs, functools.partial(decode_seconds, s, prompt[:32], n, rng))
                        prefix = requests_during(logs, functools.partial(decode_seconds, s, prompt[:32], 0, rng))
                        per_step[name] = collections.Counter(
                            {k: (counts[k] - prefix[k]) / n for k in counts if counts[k] - prefix[k] > 0}
                        )

    print(f"\n{'condition':<12} {'prefill tok/s':>14} {'decode tok/s':>13}   (median of {args.reps} rounds)")
    for name, t in times.items():
        print(
            f"{name:<12} {args.prefill / statistics.median(t['prefill']):>14.1f} "
            f"{args.decode / statistics.median(t['decode']):>13.1f}"
        )
    print()
    for name in ("local idle", "rpc steered", "rpc capture"):
        for phase in ("prefill", "decode"):
            ratios = [i / c for i, c in zip(times["rpc idle"][phase], times[name][phase])]
            print(
                f"{name} / rpc idle, {phase}: {statistics.median(ratios):.3f}x "
                f"(range {min(ratios):.3f}-{max(ratios):.3f})"
            )
    print("\nrequests the servers served per decode step (all servers together):")
    for name, counts in per_step.items():
        detail = ", ".join(f"{k} {v:g}" for k, v in sorted(counts.items()))
        print(f"  {name:<12} {sum(counts.values()):g}: {detail}")


if __name__ == "__main__":
    main()
