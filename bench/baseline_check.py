#!/usr/bin/env python3
"""Which transformers configuration is fastest when the machine is quiet: the best of each family that
bench_ftri.py's (time-budgeted, once-each) screening saw, rerun side by side with mote-local's prompt-scope
capture at Q8_0 and Q4_K_M, shuffled anew in each round; ratios against the fastest transformers configuration
within each round (median, min-max). Reuses bench_ftri's cached model, prompts and workers.

    python bench/bench_ftri.py ...                  # once: builds the model, writes prompts.json and screening.json
    python bench/baseline_check.py --rounds 3       # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_ftri as bf  # noqa: E402

# the families' best configurations in bench_ftri's screening, by the grid's names
CONTENDERS = ("4.57 eager loop bf16 b64", "4.57 eager loop f32 b128", "5.x eager f32 b64", "5.x grouped_mm bf16 b16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True, help="bench_ftri's cache folder (with screening.json)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    screening = json.loads((args.workdir / "screening.json").read_text())["S"]
    run = bf.Runner(args.workdir, args.workdir / "baseline_check.log", verbose=True)
    common = dict(prompts=str(args.workdir / "prompts.json"), threads=os.cpu_count() or 1)
    cap = bf.capture_options()
    plan = {name: dict(kind="hf_prompt", **screening[name]["cfg"]["run"]) for name in CONTENDERS}
    for q in ("q8_0", "q4_k_m"):
        plan[f"mote {q}"] = dict(
            kind="mote_ftri",
            gguf=str(args.workdir / f"model-{q}.gguf"),
            scope="prompt",
            batch_size=32,
            model_params=cap,
        )
    rounds = bf.interleaved_rounds(run, plan, args.rounds, lambda i, key: str(args.workdir / f"bc{i}.npz"), common)

    print(
        f"\n{'configuration':<28} {'tok/s median':>12} {'min-max':>15} {'peak RSS MiB':>13} "
        f"{'x fastest transformers (per round)':>36}"
    )
    for key in plan:
        tps = [rr[key]["tok_s"] for rr in rounds]
        ratios = [rr[key]["tok_s"] / max(rr[n]["tok_s"] for n in CONTENDERS) for rr in rounds]
        rss = statistics.median(rr[key]["rss_mb"] for rr in rounds)
        print(
            f"{key:<28} {statistics.median(tps):>12.1f} {min(tps):>7.1f}-{max(tps):<7.1f} {rss:>13.0f} "
            f"{statistics.median(ratios):>26.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        )
    loads = [rr[k]["load_avg"] for rr in rounds for k in rr]
    print(f"1-min load average around the workers: {min(l[0] for l in loads):.1f}-{max(l[1] for l in loads):.1f}")


if __name__ == "__main__":
    main()
