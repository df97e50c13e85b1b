#!/usr/bin/env python3
"""Capture-friendly quantization (issue 15): routing agreement with f32 and capture speed, per recipe.

On bench_ftri's model (its cached build: model-f32.gguf, model-q8_0.gguf, model-q4_k_m.gguf, prompts.json), each
configuration is quantized from the f32 GGUF with mote_local.modelfile.quantize (llama.cpp's quantizer with
per-tensor types), then measured as bench_ftri measures fidelity, with bench_ftri's own workers and comparisons:

  routing   per-token top-k expert sets of the first --trace-prompts prompts (flash attention off, same
            settings as f32), against f32: identical sets, mean set overlap (top_sets_agreement)
  fTRI      `mote ftri`'s capture (capture_activations, batch 32, CAPTURE_MODEL_OPTIONS) over all prompts:
            mean_diff top-10 overlap with f32's (ftri_compare), and its prompt tok/s and peak RSS

Configurations: the recipes of `mote quantize` (capture, capture-q8, capture-q4: routed experts Q6_K / Q8_0 /
Q4_K, output Q8_0, everything else F16), llama.cpp's plain Q8_0 / Q4_K_M / F16 / BF16, routed experts at Q4_K /
Q5_K / Q6_K with everything else Q8_0 or F16, and the single-group sensitivity runs: Q8_0 everywhere except one
tensor group at Q4_K. Every worker runs in its own process; the recipes whose speed is reported are measured in
--rounds interleaved rounds (median and range reported).

    python bench/bench_quant.py --results bench/RESULTS.md        # ~40 min on 2 cores
    python bench/bench_quant.py --workdir /tmp/bq                 # on bench_ftri --quick --workdir /tmp/bq's model
    python bench/bench_quant.py --report-only --results bench/RESULTS.md   # the table again from results.json
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

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import bench_ftri as bf  # noqa: E402
import hf_qwen3moe as hfq  # noqa: E402

SECTION = "## Capture-friendly quantization (issue 15)"


def recipes() -> dict[str, object]:
    """Every configuration quantized here, by name: `mote quantize`'s recipes and the measurement's own."""
    from mote_local.modelfile.quantize import GROUPS, QT, RECIPES, ROUTED_EXPERTS, Recipe

    out: dict[str, object] = dict(RECIPES)
    out["f16"] = Recipe("f16", "every quantizable tensor F16", (), QT.F16)
    out["bf16"] = Recipe("bf16", "every quantizable tensor BF16", (), QT.BF16)
    for group in (
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate_exps",
        "ffn_up_exps",
        "ffn_down_exps",
        "token_embd",
        "output",
    ):
        out[f"q8+{group}@q4_k"] = Recipe(
            f"q8+{group}@q4_k", f"Q8_0, {group} Q4_K", ((GROUPS[group], QT.Q4_K),), QT.Q8_0
        )
    out["q8+attn@q4_k"] = Recipe("q8+attn@q4_k", "Q8_0, every attention tensor Q4_K", ((r"\.attn_", QT.Q4_K),), QT.Q8_0)
    for experts in (QT.Q4_K, QT.Q5_K, QT.Q6_K):  # routed experts lower, everything else Q8_0
        name = f"q8+exps@{experts.name.lower()}"
        out[name] = Recipe(
            name, f"routed experts {experts.name}, everything else Q8_0", ((ROUTED_EXPERTS, experts),), QT.Q8_0
        )
    for experts in (QT.Q4_K, QT.Q6_K, QT.Q8_0):  # the rest near lossless (output too): what the experts alone cost
        name = f"f16+exps@{experts.name.lower()}"
        out[name] = Recipe(
            name, f"routed experts {experts.name}, everything else F16", ((ROUTED_EXPERTS, experts),), QT.F16
        )
    return out


MAIN = ("q8_0_llama", "q4_k_m", "capture", "capture-q8", "capture-q4")  # speed rounds, interleaved


def quantize_worker(cfg: dict) -> dict:
    from mote_local.modelfile.layout import read_layout
    from mote_local.modelfile.quantize import group_types, quantize

    recipe = recipes()[cfg["recipe"]]
    t0 = time.perf_counter()
    res = quantize(cfg["src"], cfg["dst"], recipe, force=True)
    return {
        "quantize_s": time.perf_counter() - t0,
        "size_mib": res.size_bytes / 2**20,
        "types": group_types(read_layout(cfg["dst"]).tensor_types),
    }


def run_quantize(workdir: Path, log: Path, **cfg) -> dict:
    out = workdir / f"q-{cfg['recipe']}.json"
    with open(log, "a") as logf:
        logf.write(f"\n===== quantize {json.dumps(cfg)}\n")
        logf.flush()
        r = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({**cfg, "out_json": str(out)})],
            cwd=ROOT,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    if r.returncode != 0:
        raise RuntimeError(f"quantizing {cfg['recipe']} failed (exit {r.returncode}); see {log}")
    return json.loads(out.read_text())


def default_workdir() -> Path:
    ready = Path("/tmp/requests/bench-model-ready")
    if ready.exists() and ready.read_text().strip():
        return Path(ready.read_text().strip())
    return Path.home() / ".cache" / "mote-local" / "bench-ftri" / hfq.HfSpec().key()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="bench_ftri's build folder (default: its cache)")
    ap.add_argument("--trace-prompts", type=int, default=64)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved speed rounds of the main configurations")
    ap.add_argument("--only", default=None, help="comma-separated configurations (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the sensitivity GGUFs (default: removed once measured)")
    ap.add_argument("--report-only", action="store_true", help="the table from the last run's results.json")
    ap.add_argument(
        "--resume", action="store_true", help="keep the last run's results.json and measure only what it lacks"
    )
    ap.add_argument("--results", type=Path, default=None, help="append (or replace) the section in this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        cfg = json.loads(args.worker)
        Path(cfg["out_json"]).write_text(json.dumps(quantize_worker(cfg)))
        return

    t_start = time.perf_counter()
    argv = "python bench/bench_quant.py" + "".join(f" {a}" for a in sys.argv[1:])  # the command, as run
    workdir = args.workdir or default_workdir()
    prompts_file = workdir / "prompts.json"
    needed = [workdir / f"model-{q}.gguf" for q in ("f32", "q8_0", "q4_k_m")] + [prompts_file]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        sys.exit(
            f"bench_quant needs bench_ftri's build: missing {', '.join(missing)} "
            "(run `python bench/bench_ftri.py` first, or give --workdir)"
        )
    qdir = workdir / "quant"
    qdir.mkdir(exist_ok=True)
    log = qdir / "bench.log"
    if not args.report_only:
        log.write_text("")
    run = bf.Runner(qdir, log, verbose=True)
    data = json.loads(prompts_file.read_text())
    ids, is_behavior = data["ids"], np.array(data["is_behavior"], dtype=bool)
    common = dict(prompts=str(prompts_file), threads=os.cpu_count() or 1)
    cap = bf.capture_options()
    print(f"workdir {workdir}; load average {os.getloadavg()}", flush=True)
    if args.report_only:
        saved = json.loads((qdir / "results.json").read_text())
        report = analyse(
            args, saved["argv"], saved["names"], saved["Q"], saved["R"], qdir, ids, is_behavior, saved["total_s"]
        )
        print("\n" + report)
        if args.results:
            write_section(args.results, report)
        return

    all_recipes = recipes()
    # `mote quantize --recipe q8_0` gives llama.cpp's Q8_0 tensor for tensor: bench_ftri's file stands for both
    names = ["f32", "q8_0_llama", "q4_k_m"] + [n for n in all_recipes if n != "q8_0"]
    if args.only:
        names = ["f32"] + [n for n in args.only.split(",") if n != "f32"]
    paths = {
        "f32": workdir / "model-f32.gguf",
        "q8_0_llama": workdir / "model-q8_0.gguf",
        "q4_k_m": workdir / "model-q4_k_m.gguf",
    }
    Q: dict[str, dict] = {}
    R: dict[str, dict] = {}
    done: list[str] = []
    spent = 0.0
    if args.resume and (qdir / "results.json").exists():
        saved = json.loads((qdir / "results.json").read_text())
        Q, R, done, spent = saved["Q"], saved["R"], saved["names"], saved["total_s"]
        argv = saved["argv"] + "`, then `" + argv
        names = list(dict.fromkeys(done + names))
        for name in done:
            paths.setdefault(name, qdir / f"model-{name}.gguf")
    npz = lambda name: str(qdir / f"{name}.npz")  # noqa: E731

    def measure(name: str) -> None:
        if name not in paths:
            paths[name] = qdir / f"model-{name}.gguf"
            Q[name] = run_quantize(qdir, log, recipe=name, src=str(paths["f32"]), dst=str(paths[name]))
            print(f"  quantized {name}: {Q[name]}", flush=True)
        R[f"trace_{name}"] = run(
            "mote_session",
            gguf=str(paths[name]),
            batch_size=32,
            n_ubatch=512,
            kv_unified=True,
            flash_attn="off",
            trace=True,
            n_prompts=args.trace_prompts,
            out_npz=npz(f"trace_{name}"),
            **common,
        )
        R[f"ftri_{name}_r0"] = run(
            "mote_ftri",
            gguf=str(paths[name]),
            scope="prompt",
            batch_size=32,
            model_params=cap,
            out_npz=npz(f"ftri_{name}_r0"),
            **common,
        )

    def save() -> None:  # after every configuration: an interrupted run can still be reported (--report-only)
        (qdir / "results.json").write_text(
            json.dumps(
                {
                    "Q": Q,
                    "R": R,
                    "argv": argv,
                    "names": [n for n in names if f"ftri_{n}_r0" in R],
                    "total_s": spent + time.perf_counter() - t_start,
                },
                indent=1,
                default=str,
            )
        )

    for name in names:
        if name in done:
            continue
        measure(name)
        save()
        if not args.keep and name not in MAIN and paths[name].parent == qdir:
            paths[name].unlink(missing_ok=True)  # a sensitivity file: measured, not needed again
    for rnd in range(1, args.rounds):  # further speed rounds of the main configurations, interleaved
        for name in [n for n in MAIN if n in names and f"ftri_{n}_r{rnd}" not in R]:
            R[f"ftri_{name}_r{rnd}"] = run(
                "mote_ftri",
                gguf=str(paths[name]),
                scope="prompt",
                batch_size=32,
                model_params=cap,
                out_npz=npz(f"ftri_{name}_r{rnd}"),
                **common,
            )
            save()

    report = analyse(args, argv, names, Q, R, qdir, ids, is_behavior, spent + time.perf_counter() - t_start)
    print("\n" + report)
    if args.results:
        write_section(args.results, report)


def write_section(path: Path, report: str) -> None:
    bf.append_section(path, report, SECTION)
    print(f"\nwritten to {path}")


def analyse(args, argv, names, Q, R, qdir: Path, ids, is_behavior, total_s: float) -> str:
    load = lambda name, key="counts": np.load(qdir / f"{name}.npz")[key]  # noqa: E731
    ref_trace, ref_counts = load("trace_f32", "trace"), load("ftri_f32_r0")
    k = ref_trace.shape[-1]
    loads = [x for r in R.values() if "load_avg" in r for x in r["load_avg"]]
    n_trace = min(args.trace_prompts, len(ids))
    n_tok = sum(len(s) for s in ids[:n_trace])
    lines: list[str] = []
    w = lines.append
    w(SECTION)
    w("")
    w(f"Command: `{argv}` from the repository root ({time.strftime('%Y-%m-%d')}); whole run {total_s / 60:.1f} min.")
    w(
        f"Machine: {bf._cpu_name()}, {os.cpu_count()} cores, {bf._mem_gib():.0f} GiB RAM, 1-min load average "
        f"{min(loads):.1f}–{max(loads):.1f} around the workers (2.0 = both cores busy, which a worker alone does; more "
        "means other jobs shared the machine)."
    )
    w(
        f'Model: bench_ftri\'s (section "fTRI capture vs transformers"), every configuration quantized from its f32 '
        f"GGUF with `mote_local.modelfile.quantize` (llama.cpp's quantizer, per-tensor types); Q8_0 (llama) and "
        f"Q4_K_M are bench_ftri's own `llama_model_quantize` files. Routing: per-token top-{k} sets of the first "
        f"{n_trace} prompts ({n_tok} tokens × every layer), flash attention off, against f32 under the "
        f"same settings. fTRI: mean_diff top-{args.top} over all {len(ids)} prompts from `capture_activations` "
        f"(batch 32, `mote ftri`'s options) against f32's. Speed: that capture's prompt tok/s, one run, or the median "
        "(range) of runs in interleaved rounds."
    )
    w("")
    w(
        f"| configuration | routed experts | other weights | GGUF MiB | top-{k} set identical | mean set overlap | "
        f"fTRI top-{args.top} overlap | count corr | capture tok/s | peak RSS MiB |"
    )
    w("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        speeds = [R[key]["tok_s"] for key in R if key.startswith(f"ftri_{name}_r")]
        speed = f"{statistics.median(speeds):.0f}" + (
            f" ({min(speeds):.0f}–{max(speeds):.0f}, {len(speeds)} runs)" if len(speeds) > 1 else ""
        )
        rss = max(R[key]["rss_mb"] for key in R if key.startswith(f"ftri_{name}_r"))
        types = Q[name]["types"] if name in Q else _types(qdir.parent / _CACHED[name])
        size = Q[name]["size_mib"] if name in Q else (qdir.parent / _CACHED[name]).stat().st_size / 2**20
        experts = sorted({t for g, v in types.items() if g.endswith("_exps") for t in v.split(", ")})
        other = sorted(
            {t for g, v in types.items() if not g.endswith("_exps") and g != "router" for t in v.split(", ")}
        )
        label = {
            "q8_0_llama": "Q8_0 (llama.cpp's ftype)",
            "q4_k_m": "Q4_K_M (llama.cpp's ftype)",
            "f32": "F32 (the reference)",
        }.get(name, f"`{name}`")
        if name == "f32":
            agree = "— | — | — | —"
        else:
            st = bf.top_sets_agreement(load(f"trace_{name}", "trace"), ref_trace)
            f = bf.ftri_compare(load(f"ftri_{name}_r0"), ref_counts, is_behavior, args.top, k)
            agree = (
                f"{100 * st['set_identical']:.1f}% | {100 * st['mean_overlap']:.1f}% | "
                f"{f['top_overlap']}/{args.top} | {f['count_corr']:.4f}"
            )
        w(f"| {label} | {', '.join(experts)} | {', '.join(other)} | {size:.0f} | {agree} | {speed} | {rss:.0f} |")
    w("")
    return "\n".join(lines)


_CACHED = {"f32": "model-f32.gguf", "q8_0_llama": "model-q8_0.gguf", "q4_k_m": "model-q4_k_m.gguf"}


def _types(path: Path) -> dict[str, str]:
    from mote_local.modelfile.layout import read_layout
    from mote_local.modelfile.quantize import group_types

    return group_types(read_layout(path).tensor_types)


if __name__ == "__main__":
    main()
