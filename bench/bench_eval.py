"""`mote eval` decoded in batches (issue 25) against the sequential path it replaced, and against llama.cpp's own
`llama-batched-bench` at the same number of parallel sequences.

    python3 bench/bench_eval.py sweep --old DIR [--rounds 2] [--prompts 12] [--sizes 1,2]
    python3 bench/bench_eval.py peer --bench BIN [--rounds 2] [-np 32] [--prompts 32] [-n 16]

``sweep``: the README's sweep (`mote eval --sweep` on the planted model, 8 tokens, 3 random seeds) on the first
``--prompts`` prompts of each class, run by this tree's `mote` and by the tree in ``--old`` (e.g. `git archive
15cf668 mote_local | tar -x -C DIR`), each in a process of its own, in shuffled interleaved rounds.

``peer``: generated tokens/s of `mote eval` (unsteered, profile, 3 random seeds, forced = 6 conditions; capability
cost off; generated tokens over the whole run, prefill included) against `llama-batched-bench -npl NP` (its
generated tokens over its whole time T, prefill included; its S_TG, generation alone, is printed beside) on the
same generated model. ``--bench`` is a llama-batched-bench built from the pinned sdist (plain cmake on
vendor/llama.cpp, target llama-batched-bench). The machine's load average is recorded before every run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mote(tree: Path, args: list[str]) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    load = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mote_local.cli", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"mote {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return wall, f"load {load:.1f}"


def prompt_subset(src: Path, n: int, dest: Path) -> Path:
    from mote_local.prompts import load_prompt_set

    ps = load_prompt_set(src)
    lines = [f"[classes.{name}]\nprompts = {json.dumps([p.text for p in ps.prompts(name)[:n]])}" for name in ps.names]
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def sweep_bench(a) -> None:
    from mote_local.synthetic import planted

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    model, prompts = planted.export(work)
    subset = prompt_subset(prompts, a.prompts, work / "subset.toml")
    mote(ROOT, ["ftri", str(model), "--prompts", str(prompts), "--out", str(work / "ftri"), "--n-boot", "20"])
    args = [
        "eval",
        str(model),
        "--prompts",
        str(subset),
        "--sweep",
        a.sizes,
        "--ftri",
        str(work / "ftri"),
        "-n",
        "8",
        "--n-random",
        "3",
    ]
    trees = {"before (sequential)": Path(a.old), "after (batched)": ROOT}
    times: dict[str, list[tuple[float, str]]] = {k: [] for k in trees}
    for r in range(a.rounds):
        order = list(trees)
        random.Random(r).shuffle(order)
        for name in order:
            wall, load = mote(trees[name], args + ["--out", str(work / f"out-{r}-{name[:5]}")])
            times[name].append((wall, load))
            print(f"round {r + 1}: {name:20s} {wall:7.1f} s  ({load})", flush=True)
    report = json.loads((work / "out-0-after/sweep.json").read_text())
    n_gen = sum(len(v) for v in report["generations"].values())
    before = [w for w, _ in times["before (sequential)"]]
    after = [w for w, _ in times["after (batched)"]]
    print(f"\n{n_gen} generations per run ({a.prompts * 2} prompts, sizes {a.sizes}, 8 tokens, 3 seeds)")
    for name, ws in (("before", before), ("after", after)):
        print(f"{name}: median {statistics.median(ws):.1f} s (range {min(ws):.1f}-{max(ws):.1f})")
    ratios = [b / x for b in before for x in after]
    print(
        f"speed-up: {statistics.median(before) / statistics.median(after):.2f}x "
        f"(pairwise range {min(ratios):.2f}-{max(ratios):.2f}x)"
    )


def peer_bench(a) -> None:
    from mote_local.engine.model import Model
    from mote_local.evaluation import evaluate as ev
    from mote_local.steering.entries import Entry, Mode
    from mote_local.synthetic import tiny

    path = tiny.tiny_model(
        "qwen3moe",
        n_layer=a.layers,
        n_embd=a.embd,
        n_head=8,
        n_head_kv=4,
        n_expert=a.experts,
        n_expert_used=a.used,
        n_ff_exp=a.ff,
        n_ff=4 * a.ff,
        n_ctx=1024,
        qtype="q8_0",
    )
    prompts = [
        f"the {w} of the city was calm and the people went home early"
        for w in (
            "market",
            "river",
            "king",
            "story",
            "dog",
            "night",
            "road",
            "school",
            "rain",
            "bridge",
            "square",
            "garden",
            "harbour",
            "station",
            "library",
            "forest",
        )
    ] * 4
    prompts = prompts[: a.prompts]
    with Model(path) as m:
        n_prompt = round(statistics.mean(len(m.prompt_tokens(p, chat=False)) for p in prompts))
        profile = [Entry(layer, 0, Mode.DROP) for layer in m.layout.moe_layers]
    print(
        f"model {path.name}: {a.layers} layers, {a.experts} experts top-{a.used}, hidden {a.embd}, Q8_0, "
        f"{path.stat().st_size / 2**20:.0f} MiB; prompts of ~{n_prompt} tokens, {a.n} new tokens, -np {a.np}"
    )
    results: dict[str, list[float]] = {"mote eval": [], "llama-batched-bench": []}
    for r in range(a.rounds):
        order = list(results)
        random.Random(r).shuffle(order)
        for name in order:
            load = os.getloadavg()[0]
            if name == "mote eval":
                with Model(path) as m:
                    t = time.perf_counter()
                    res = ev.evaluate(
                        m,
                        prompts,
                        profile,
                        n_random=3,
                        max_tokens=a.n,
                        chat=False,
                        measure_cost=False,
                        exclude_super_experts=False,
                        n_parallel=a.np,
                        show_progress=False,
                    )
                    wall = time.perf_counter() - t
                tokens = sum(g["n_tokens"] for gens in res.generations.values() for g in gens)
                rate = tokens / wall
                detail = f"{tokens} tokens in {wall:.1f} s"
            else:
                proc = subprocess.run(
                    [
                        a.bench,
                        "-m",
                        str(path),
                        "-c",
                        str(a.np * (n_prompt + a.n) + 256),
                        "-b",
                        "2048",
                        "-ub",
                        "512",
                        "-npp",
                        str(n_prompt),
                        "-ntg",
                        str(a.n),
                        "-npl",
                        str(a.np),
                        "-t",
                        str(os.cpu_count()),
                    ],
                    capture_output=True,
                    text=True,
                )
                row = [l for l in proc.stdout.splitlines() if re.match(r"\|\s+\d+\s+\|", l)]
                if proc.returncode or not row:
                    raise SystemExit(f"llama-batched-bench failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                cells = [c.strip() for c in row[-1].strip("|").split("|")]
                rate = a.np * a.n / float(cells[8])  # generated tokens over its whole time, as for mote eval
                detail = (
                    f"generated tokens / T {rate:.1f} t/s; S_TG (generation alone) {float(cells[7]):.1f} "
                    f"t/s, S_PP {float(cells[5]):.1f} t/s"
                )
            results[name].append(rate)
            print(f"round {r + 1}: {name:20s} {rate:7.1f} tok/s  ({detail}; load {load:.1f})", flush=True)
    mo, bb = results["mote eval"], results["llama-batched-bench"]
    ratios = [x / y for x in mo for y in bb]
    print(
        f"\nmote eval / llama-batched-bench: {statistics.median(mo) / statistics.median(bb):.2f}x "
        f"(pairwise range {min(ratios):.2f}-{max(ratios):.2f}x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--old", required=True, help="A tree holding the sequential mote_local (the PYTHONPATH).")
    s.add_argument("--rounds", type=int, default=2)
    s.add_argument("--prompts", type=int, default=12, help="Prompts per class (the README's sweep: 36).")
    s.add_argument("--sizes", default="1,2", help="The README's sweep: 1,2,5,10,20.")
    p = sub.add_parser("peer")
    p.add_argument("--bench", required=True, help="llama-batched-bench built from the pinned sdist.")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("-np", "--np", type=int, default=32)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("-n", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--embd", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--used", type=int, default=8)
    p.add_argument("--ff", type=int, default=512)
    a = ap.parse_args()
    sweep_bench(a) if a.what == "sweep" else peer_bench(a)


if __name__ == "__main__":
    main()
