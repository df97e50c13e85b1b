#!/usr/bin/env python3
"""Decode cost of each steering mode alone, of bench_engine's full profile, and of capture.

Same model as bench/bench_engine.py; one context; a 32-token prompt, then --steps single-token decodes,
best of --reps, for each condition in turn. Where bench_engine.py says how much steering costs, this
says which mode the cost comes from (on a GPU: which added nodes and uploads dominate a decode step).

    python bench/engine_modes.py --n-gpu-layers 99
"""

from __future__ import annotations

import argparse
import contextlib
import time

from bench_engine import bench_model, steering_profile

from mote_local.engine.model import Model
from mote_local.steering.entries import Entry, Mode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    model = Model(bench_model(), n_gpu_layers=args.n_gpu_layers)
    layers = model.layout.moe_layers
    conditions = {
        "idle": None,
        "bias-only": [Entry(l, 3, Mode.BIAS, 0.5) for l in layers],
        "mask-only": [Entry(l, 0, Mode.MASK) for l in layers],
        "drop-only": [Entry(l, 1, Mode.DROP) for l in layers],
        "force-only": [Entry(l, 2, Mode.FORCE) for l in layers],
        "gain-only": [Entry(l, 2, Mode.GAIN, 0.5) for l in layers],
        "full": steering_profile(model),
        "capture": "capture",
    }
    prompt = list(range(10, 42))
    with model.session(n_ctx=1024, n_batch=512) as s:
        for name, condition in conditions.items():
            with contextlib.ExitStack() as stack:
                if condition == "capture":
                    stack.enter_context(s.capture())
                elif condition:
                    s.steer(condition)
                    stack.callback(s.clear_steering)
                best = float("inf")
                for _ in range(args.reps):
                    s.reset()
                    s.decode([(0, prompt, 0)], outputs="last")
                    t0 = time.perf_counter()
                    for i in range(args.steps):
                        s.decode([(0, [100 + i], len(prompt) + i)], outputs="last")
                    best = min(best, time.perf_counter() - t0)
            print(
                f"{name:<12} decode {args.steps / best:8.1f} tok/s  {best / args.steps * 1e6:7.1f} us/token", flush=True
            )
    model.close()


if __name__ == "__main__":
    main()
