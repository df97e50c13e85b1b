#!/usr/bin/env python3
"""Engine overhead: steering active vs idle, routing capture on vs off, side by side in one run.

Builds (or reuses, cached) a mid-size random MoE GGUF in a realistic shape with the project's model
factory, then times prefill (one batch of --prefill tokens) and decode (--decode single-token steps)
under each condition. Conditions are interleaved round-robin and each figure is the median of
--reps runs, so that drift of the machine hits every condition alike.

    python bench/bench_engine.py                     # defaults: qwen3moe shape, 8 layers, 64 experts, top-8, Q8_0
    python bench/bench_engine.py --n-gpu-layers 99   # on a GPU build
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np

from mote_local.engine.model import Model, Session
from mote_local.steering.entries import Entry, Mode
from mote_local.synthetic import tiny


def bench_model(
    arch: str = "qwen3moe",
    n_layer: int = 8,
    n_embd: int = 1024,
    n_expert: int = 64,
    n_expert_used: int = 8,
    n_ff_exp: int = 512,
    qtype: str = "q8_0",
):
    """The benchmark's model from the factory (cached): a realistic MoE shape, several hundred MB."""
    return tiny.tiny_model(
        arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=16,
        n_head_kv=4,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_ff_exp=n_ff_exp,
        n_ff=4 * n_ff_exp,
        n_ctx=1024,
        qtype=qtype,
    )


def steering_profile(model: Model) -> list[Entry]:
    """A realistic profile: in every MoE layer two experts off, one forced, three biased."""
    entries = []
    for layer in model.layout.moe_layers:
        entries += [Entry(layer, 0, Mode.MASK), Entry(layer, 1, Mode.DROP), Entry(layer, 2, Mode.FORCE)]
        entries += [Entry(layer, 3 + i, Mode.BIAS, 0.5 * (i + 1)) for i in range(3)]
    return entries


def prefill_seconds(s: Session, tokens: list[int], outputs: str) -> float:
    s.reset()
    t0 = time.perf_counter()
    s.decode([(0, tokens, 0)], outputs=outputs)
    return time.perf_counter() - t0


def decode_seconds(s: Session, prompt: list[int], n: int, rng: np.random.Generator) -> float:
    s.reset()
    s.decode([(0, prompt, 0)], outputs="last")
    steps = rng.integers(10, s.model.n_vocab, size=n).tolist()
    t0 = time.perf_counter()
    for i, tok in enumerate(steps):
        s.decode([(0, [tok], len(prompt) + i)], outputs="last")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen3moe", choices=tiny.ARCHS)
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=1024)
    ap.add_argument("--n-expert", type=int, default=64)
    ap.add_argument("--n-expert-used", type=int, default=8)
    ap.add_argument("--n-ff-exp", type=int, default=512)
    ap.add_argument("--qtype", default="q8_0", choices=tiny.QTYPES)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    path = bench_model(
        args.arch, args.n_layer, args.n_embd, args.n_expert, args.n_expert_used, args.n_ff_exp, args.qtype
    )
    print(f"model: {path} ({path.stat().st_size / 2**20:.0f} MiB, ready in {time.perf_counter() - t0:.1f} s)")

    model = Model(path, n_gpu_layers=args.n_gpu_layers)
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, model.n_vocab, size=args.prefill).tolist()
    entries = steering_profile(model)
    # one context for every condition: separate contexts would each keep a CPU thread pool spinning
    s = model.session(n_ctx=1024, n_batch=args.prefill, n_threads=args.threads)
    conditions = ("idle", "steered", "capture")
    times = {c: {"prefill": [], "prefill_all": [], "decode": []} for c in conditions}
    counted = 0
    for _ in range(args.reps):
        for name in conditions:
            with contextlib.ExitStack() as stack:
                if name == "steered":
                    s.steer(entries)
                    stack.callback(s.clear_steering)
                if name == "capture":
                    cap = stack.enter_context(s.capture())
                prefill_seconds(s, prompt[:64], "last")  # warm-up: this condition's graphs are built
                # capture makes every token an output; "prefill_all" gives every condition that work
                times[name]["prefill"].append(prefill_seconds(s, prompt, "last"))
                times[name]["prefill_all"].append(prefill_seconds(s, prompt, "all"))
                times[name]["decode"].append(decode_seconds(s, prompt[:32], args.decode, rng))
            if name == "capture":
                counted += int(cap.stats().tokens[model.layout.moe_layers[0]])

    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()}
    print(
        f"\n{args.arch}: {args.n_layer} layers, {args.n_expert} experts, top-{args.n_expert_used}, "
        f"n_embd {args.n_embd}, expert FFN {args.n_ff_exp}, {args.qtype}; {len(entries)} steering entries; "
        f"median of {args.reps} interleaved runs; capture counted {counted} tokens per layer"
    )
    print(f"{'condition':<10} {'prefill tok/s':>14} {'prefill(all outputs) tok/s':>27} {'decode tok/s':>13}")
    for name in conditions:
        m = med[name]
        print(
            f"{name:<10} {args.prefill / m['prefill']:>14.1f} {args.prefill / m['prefill_all']:>27.1f} "
            f"{args.decode / m['decode']:>13.1f}"
        )
    idle = med["idle"]
    for name in ("steered", "capture"):
        m = med[name]
        print(
            f"{name} / idle: prefill {idle['prefill'] / m['prefill']:.3f}x, "
            f"prefill with all outputs {idle['prefill_all'] / m['prefill_all']:.3f}x, "
            f"decode {idle['decode'] / m['decode']:.3f}x"
        )
    s.close()
    model.close()


if __name__ == "__main__":
    main()
