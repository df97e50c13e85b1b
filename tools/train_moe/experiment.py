"""The language experiment on the trained model, with mote's own commands only.

For every fTRI method and every N: `mote ftri` ranks the experts on German vs English prompts (the same
held-out paragraphs, paired) and writes a profile that drops the top N (at most top-k per layer, so that
the forced-on control stays possible); `mote eval` then generates from the German prompts with the German
detector (behaviour = the continuation is German) and measures perplexity on held-out German text, and
again from the English prompts with perplexity on held-out English text. Each eval runs the profile, a
random control of the same size and layer distribution (3 seeds, pooled) and the same experts forced on, all
of them and every prompt decoded together in batches (`mote eval`'s one generation path; --parallel sets -np).

    python3 tools/train_moe/experiment.py                       # all methods, N in 1 2 4 8 16
    python3 tools/train_moe/experiment.py --methods mean_diff --ns 4
    python3 tools/train_moe/experiment.py record --method mean_diff --top 8   # expected.json for the test
    python3 tools/train_moe/experiment.py merge OUT DIR1 DIR2 …   # one table and plot from parallel runs

Writes OUT/results.json, OUT/table.md and OUT/experiment.png (default OUT: build/trained/experiment), and
keeps every command's own output (ftri.json, heatmaps, report.json/html) under OUT.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "mote_local" / "data" / "trained"
METHODS = ("mean_diff", "risk_diff", "log_odds", "weight_mass")


def run(cmd: list[str], log) -> str:
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = " ".join(shlex.quote(c) for c in cmd)
    log.write(f"$ {line}\n{proc.stdout}{proc.stderr[-2000:] if proc.returncode else ''}\n")
    log.flush()
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {line}\n{proc.stderr[-3000:]}")
    print(f"  {time.time() - started:5.1f} s  {line[:150]}", flush=True)
    return proc.stdout


def detector_accuracy(detector: Path, n_chars: int = 150) -> dict[str, float]:
    """Share of held-out windows of each language that the detector calls German (~48 tokens each)."""
    from mote_local.evaluation.detectors import Detector

    d = Detector.from_file(detector)
    out = {}
    for path in sorted((ROOT / "build/trained/data").glob("heldout.*.txt")):
        text = " ".join(path.read_text(encoding="utf-8").split())
        windows = [text[i : i + n_chars] for i in range(0, len(text) - n_chars, n_chars)]
        out[path.suffixes[0][1:]] = round(sum(d.detect(w) for w in windows) / len(windows), 4)
    return out


def condition_rows(report: dict) -> dict[str, dict]:
    rows = {}
    for c in report["conditions"]:
        rows[c["name"]] = {k: c.get(k) for k in ("rate", "ci", "delta", "delta_ci", "hits", "n", "kl", "perplexity")}
        rows[c["name"]]["entries"] = [f"{e['layer']}:{e['expert']}" for e in c.get("entries", [])]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DATA / "trained-q8_0.gguf")
    ap.add_argument("--out", type=Path, default=ROOT / "build/trained/experiment")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--ns", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--scope", default="prompt", choices=["prompt", "target"])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--n-random", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each mote command (-t).")
    ap.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="Sequences each `mote eval` decodes together (-np; default: its own choice).",
    )
    ap.add_argument("--mote", default=f"{sys.executable} -m mote_local.cli", help="How to call the mote CLI.")
    args = ap.parse_args()
    mote = shlex.split(args.mote)
    threads = ["-t", str(args.threads)]
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = DATA / ("prompts.toml" if args.scope == "prompt" else "prompts_target.toml")
    eval_prompts = DATA / "prompts.toml"
    detector = DATA / "german.txt"
    info = json.loads(run(mote + ["inspect", str(args.model), "--json"], open(args.out / "commands.log", "a")))
    k = info["n_expert_used"]
    results = {
        "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
        "scope": args.scope,
        "max_tokens": args.max_tokens,
        "n_random": args.n_random,
        "per_layer_cap": k,
        "detector": str(detector.relative_to(ROOT)),
        "detector_accuracy": detector_accuracy(detector),
        "runs": [],
    }
    previous = args.out / "results.json"
    if previous.exists():  # runs of an earlier invocation with the same settings are kept, not repeated
        old = json.loads(previous.read_text())
        if all(old.get(k) == results[k] for k in ("model", "scope", "max_tokens", "n_random", "per_layer_cap")):
            results["runs"] = old["runs"]
    log = open(args.out / "commands.log", "a")
    for method in args.methods:
        for n in args.ns:
            if any(r["method"] == method and r["n"] == n for r in results["runs"]):
                continue
            where = args.out / f"{args.scope}_{method}_{n}"
            run(
                mote
                + [
                    "ftri",
                    str(args.model),
                    "--prompts",
                    str(prompts),
                    "--behavior",
                    "de",
                    "--baseline",
                    "en",
                    "--scope",
                    args.scope,
                    "--method",
                    method,
                    "--top",
                    str(n),
                    "--per-layer-cap",
                    str(k),
                    "--out",
                    str(where / "ftri"),
                    *threads,
                ],
                log,
            )
            ftri = json.loads((where / "ftri" / "ftri.json").read_text())
            row = {"method": method, "n": n, "top": ftri["top"][method]}
            experts = sorted((t["layer"], t["expert"]) for t in row["top"])
            same = [r for r in results["runs"] if sorted((t["layer"], t["expert"]) for t in r["top"]) == experts]
            if same:  # another method chose the same experts: the evaluation would repeat itself
                row.update({k: same[0][k] for k in ("de", "en", "notes_de", "notes_en")}, same_as=same[0]["method"])
                results["runs"].append(row)
                continue
            for cls, neutral in (("de", "heldout_de.txt"), ("en", "heldout_en.txt")):
                run(
                    mote
                    + [
                        "eval",
                        str(args.model),
                        "--prompts",
                        str(eval_prompts),
                        "--class",
                        cls,
                        "--profile",
                        str(where / "ftri" / "profile.json"),
                        "--detector",
                        str(detector),
                        "--neutral",
                        str(DATA / neutral),
                        "--n-random",
                        str(args.n_random),
                        "-n",
                        str(args.max_tokens),
                        "--out",
                        str(where / f"eval_{cls}"),
                        *threads,
                        *(["-np", str(args.parallel)] if args.parallel else []),
                    ],
                    log,
                )
                report = json.loads((where / f"eval_{cls}" / "report.json").read_text())
                row[cls] = condition_rows(report)
                row[f"notes_{cls}"] = report["settings"].get("notes", [])
            results["runs"].append(row)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
    results["runs"].sort(key=lambda r: (list(METHODS).index(r["method"]), r["n"]))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(table(results))
    plot(results, args.out / "experiment.png")
    print(table(results))


def _pct(r: dict | None, key: str = "rate", ci: str = "ci") -> str:
    if not r or r.get(key) is None:
        return "—"
    lo, hi = r[ci] or (None, None)
    scale = 100
    if key == "delta":
        return f"{r[key] * scale:+.0f} [{lo * scale:+.0f}, {hi * scale:+.0f}]"
    return f"{r[key] * scale:.0f}% [{lo * scale:.0f}, {hi * scale:.0f}]"


def _ppl(r: dict | None) -> str:
    if not r or r.get("perplexity") is None:
        return "—"
    return f"{r['perplexity']:.1f}" + (f" ({r['kl']:.3f})" if r.get("kl") else "")


def table(results: dict) -> str:
    head = (
        "| method | N | condition | German rate, German prompts | Δ pp vs unsteered | German rate, English "
        "prompts | ppl German (KL) | ppl English (KL) |\n|---|---:|---|---|---|---|---:|---:|"
    )
    lines = [head]
    shown_unsteered = False
    for row in results["runs"]:
        for cond in ("unsteered", "profile", "random", "forced"):
            if cond == "unsteered" and shown_unsteered:
                continue
            de, en = row["de"].get(cond), row["en"].get(cond)
            label = {"profile": "top-N off", "random": "random N off", "forced": "top-N forced on"}.get(cond, cond)
            m, n = ("—", "0") if cond == "unsteered" else (row["method"], str(row["n"]))
            lines.append(
                f"| {m} | {n} | {label} | {_pct(de)} | {_pct(de, 'delta', 'delta_ci')} | {_pct(en)} | "
                f"{_ppl(de)} | {_ppl(en)} |"
            )
        shown_unsteered = True
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    methods = sorted({r["method"] for r in results["runs"]}, key=list(METHODS).index)
    for i, method in enumerate(methods):
        rows = [r for r in results["runs"] if r["method"] == method]
        ns = [r["n"] for r in rows]
        for cond, style in (("profile", "-o"), ("random", ":x")):
            rates = [r["de"][cond]["rate"] * 100 for r in rows]
            lo = [r["de"][cond]["ci"][0] * 100 for r in rows]
            hi = [r["de"][cond]["ci"][1] * 100 for r in rows]
            label = f"{method}: top-N off" if cond == "profile" else f"{method}: random N off"
            a.plot(ns, rates, style, color=f"C{i}", label=label)
            if cond == "profile":
                a.fill_between(ns, lo, hi, color=f"C{i}", alpha=0.12)
            ppl = [r["de"][cond]["perplexity"] for r in rows]
            ppl_en = [r["en"][cond]["perplexity"] for r in rows]
            if cond == "profile":
                b.plot(ns, ppl, "-o", color=f"C{i}", label=f"{method}: German text")
                b.plot(ns, ppl_en, "--s", color=f"C{i}", label=f"{method}: English text")
    base = results["runs"][0]["de"]["unsteered"]
    a.axhline(base["rate"] * 100, color="grey", lw=0.8, label="unsteered")
    b.axhline(base["perplexity"], color="grey", lw=0.8)
    b.axhline(results["runs"][0]["en"]["unsteered"]["perplexity"], color="grey", lw=0.8, ls="--")
    a.set_xscale("log", base=2)
    b.set_xscale("log", base=2)
    a.set_xlabel("experts switched off (N)")
    b.set_xlabel("experts switched off (N)")
    a.set_ylabel("continuations in German, German prompts (%)")
    b.set_ylabel("perplexity, held-out text")
    b.set_yscale("log")
    a.legend(fontsize=6)
    b.legend(fontsize=6)
    a.set_title("behaviour: German continuation (95% CI shaded)", fontsize=9)
    b.set_title("capability cost (grey: unsteered)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def record(model: Path, method: str, n: int, mote: list[str], out: Path) -> None:
    """expected.json beside the model: its identity and the top experts of one fTRI run (tests/test_trained.py
    reruns that command and compares)."""
    import hashlib

    from mote_local.modelfile.fingerprint import Fingerprint

    fp = Fingerprint.of(model)
    where = out / "record"
    run(
        mote
        + [
            "ftri",
            str(model),
            "--prompts",
            str(DATA / "prompts.toml"),
            "--behavior",
            "de",
            "--baseline",
            "en",
            "--scope",
            "prompt",
            "--method",
            method,
            "--top",
            str(n),
            "--per-layer-cap",
            str(fp.n_expert_used),
            "--n-boot",
            "20",
            "--out",
            str(where),
            "-t",
            "1",
        ],
        open(out / "commands.log", "a"),
    )
    top = json.loads((where / "ftri.json").read_text())["top"][method]
    rec = {
        "file": model.name,
        "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        "shape": [fp.arch, fp.n_layer, fp.n_expert, fp.n_expert_used],
        "router_sha256": fp.router_sha256,
        "ftri": {
            "prompts": "prompts.toml",
            "scope": "prompt",
            "method": method,
            "per_layer_cap": fp.n_expert_used,
            "top": [[t["layer"], t["expert"]] for t in top],
            "scores": [round(t["score"], 6) for t in top],
        },
    }
    (DATA / "expected.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {DATA / 'expected.json'}")


def merge(out: Path, dirs: list[Path]) -> None:
    """One table and plot from several experiment folders (runs made in parallel)."""
    merged = None
    for d in dirs:
        r = json.loads((d / "results.json").read_text())
        if merged is None:
            merged = r
        else:
            have = {(x["method"], x["n"]) for x in merged["runs"]}
            merged["runs"] += [x for x in r["runs"] if (x["method"], x["n"]) not in have]
    merged["runs"].sort(key=lambda r: (list(METHODS).index(r["method"]), r["n"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    (out / "table.md").write_text(table(merged))
    plot(merged, out / "experiment.png")
    print(table(merged))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "merge":
        merge(Path(sys.argv[2]), [Path(d) for d in sys.argv[3:]])
    elif len(sys.argv) > 1 and sys.argv[1] == "record":
        ap = argparse.ArgumentParser(prog="experiment.py record")
        ap.add_argument("--model", type=Path, default=DATA / "trained-q8_0.gguf")
        ap.add_argument("--method", default="mean_diff")
        ap.add_argument("--top", type=int, default=8)
        ap.add_argument("--out", type=Path, default=ROOT / "build/trained/experiment")
        ap.add_argument("--mote", default=f"{sys.executable} -m mote_local.cli")
        a = ap.parse_args(sys.argv[2:])
        a.out.mkdir(parents=True, exist_ok=True)
        record(a.model, a.method, a.top, shlex.split(a.mote), a.out)
    else:
        main()
