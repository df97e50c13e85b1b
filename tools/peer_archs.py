#!/usr/bin/env python3
"""Every MoE architecture llama.cpp ships, through mote-local: a peer test suite's models, probed one by one.

llama.cpp's own tests/test-llama-archs.cpp (in the pinned sdist) writes a random GGUF of every architecture it
knows (`-o DIR`). Built with its MoE fixture at 8 experts / 2 used (CMake option MOTE_PEER_ARCHS), it gives the
MoE architectures nobody here wrote. Each model is then probed in a child process (a crash is a result, not the
end of the run): what the engine's graph routes, idle bit-identity, capture, mask, force and drop — each either
works as the steering contract says or is refused with a clear message.

    python tools/peer_archs.py build              # configure + build mote-peer-archs (cached, ~10 min on 2 cores)
    python tools/peer_archs.py write --dest DIR   # the models
    python tools/peer_archs.py check DIR [--markdown FILE]
    python tools/peer_archs.py all [--markdown FILE]   # the three above
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
N_TOKENS = 8
PROBE_TIMEOUT_S = 300


def cache_root() -> Path:
    return Path(os.environ.get("MOTE_CACHE_DIR") or Path.home() / ".cache" / "mote-local") / "peer-archs"


def build(jobs: int = 2) -> Path:
    """Configures and builds the suite's model writer against this repository's engine; returns its path."""
    build_dir = cache_root() / "build"
    args = [
        "cmake",
        "-S",
        str(REPO),
        "-B",
        str(build_dir),
        "-G",
        "Ninja",
        "-DCMAKE_BUILD_TYPE=Release",
        "-DMOTE_PEER_ARCHS=ON",
    ]
    if shutil.which("ccache"):
        args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    subprocess.run(args, check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "mote-peer-archs", "-j", str(jobs)], check=True)
    return binary_path()


def binary_path() -> Path:
    return cache_root() / "build" / "mote-peer-archs"


def write(binary: Path, dest: Path, seed: int = 42) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    # the writer sits beside the build's bin/ of shared libraries
    env = dict(
        os.environ,
        LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(binary.parent / "bin"), os.environ.get("LD_LIBRARY_PATH")])),
    )
    subprocess.run([str(binary), "-s", str(seed), "-o", str(dest)], check=True, env=env)
    return sorted(dest.glob("*-moe.gguf"))


def probe(path: str) -> dict:
    """What mote-local does with one model (run in a child process)."""
    import numpy as np

    from mote_local.engine import Model
    from mote_local.errors import MoteError
    from mote_local.steering import Entry, Mode

    row: dict = {"model": Path(path).name}
    try:
        model = Model(path)
    except MoteError as err:
        return row | {"load": f"refused: {err}"}
    routers = model.routers
    moe = [i for i, r in enumerate(routers) if r.n_calls]
    row["moe_layers"] = moe
    if moe:
        first = routers[moe[0]]
        row |= {
            "gating": first.gating,
            "norm_w": first.norm_w,
            "w_scale": first.w_scale,
            "selection_bias": first.selection_bias,
            "calls": max(r.n_calls for r in routers),
            "n_expert": first.n_expert,
            "k": first.n_expert_used,
        }
    tokens = [(7 * i + 3) % model.n_vocab for i in range(N_TOKENS)]

    def attempt(name, fn):
        try:
            row[name] = fn()
        except MoteError as err:
            row[name] = f"refused: {err}"
        except AssertionError as err:
            row[name] = f"FAIL: {err}"

    def run(entries=(), trace=False):
        with model.session(n_ctx=64) as s:
            if entries:
                s.steer(entries)
            if not trace:
                return s.logits(tokens), None
            with s.capture(trace=True) as cap:
                logits = s.logits(tokens)
            return logits, cap

    def idle():
        plain, _ = run()
        with model.session(n_ctx=64) as s:
            s.steer([Entry(moe[0], 0, Mode.BIAS, 1.0)])
            s.clear_steering()
            cleared = s.logits(tokens)
        captured, _ = run(trace=True)
        assert np.array_equal(plain, cleared), "logits differ after steering was set and cleared"
        assert np.array_equal(plain, captured), "logits differ while capturing"
        assert np.isfinite(plain).all(), "non-finite logits"
        return "ok"

    def capture():
        _, cap = run(trace=True)
        counted = cap.stats().tokens[moe]
        assert (counted == N_TOKENS).all(), f"tokens counted per MoE layer {counted.tolist()}, not {N_TOKENS}"
        return "ok"

    def layer_ids(entries):
        logits, cap = run(entries, trace=True)
        assert np.isfinite(logits).all(), "non-finite logits"
        tr = cap.trace()
        rows = tr.layer == moe[0]
        return tr.ids[rows], tr.weights[rows]

    def mask():
        ids, _ = layer_ids([Entry(moe[0], 0, Mode.MASK)])
        assert not (ids == 0).any(), "the masked expert was selected"
        return "ok"

    def force():
        ids, _ = layer_ids([Entry(moe[0], 5, Mode.FORCE)])
        assert (ids == 5).any(axis=1).all(), "the forced expert was not selected for every token"
        return "ok"

    def drop():
        base_ids, _ = layer_ids([])
        expert = int(np.bincount(base_ids.ravel()).argmax())
        ids, weights = layer_ids([Entry(moe[0], expert, Mode.DROP)])
        assert np.array_equal(ids, base_ids), "drop changed the selection"
        assert (weights[ids == expert] == 0).all(), "the dropped expert kept a weight"
        return "ok"

    if not moe:
        attempt("steering", lambda: run([Entry(0, 0, Mode.MASK)]) and "accepted although nothing routes")
        attempt("capture", lambda: run(trace=True) and "accepted although nothing routes")
        return row
    for name, fn in (("idle", idle), ("capture", capture), ("mask", mask), ("force", force), ("drop", drop)):
        attempt(name, fn)
    model.close()
    return row


def check(models: list[Path]) -> list[dict]:
    rows = []
    for path in models:
        started = time.monotonic()
        try:
            done = subprocess.run(
                [sys.executable, __file__, "probe", str(path)], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            rows.append({"model": path.name, "load": f"FAIL: no answer within {PROBE_TIMEOUT_S} s"})
            continue
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"model": path.name, "load": f"CRASH (exit {done.returncode}): {tail[:160]}"})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        rows[-1]["seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps(rows[-1]), flush=True)
    return rows


COLUMNS = ("idle", "capture", "mask", "force", "drop")


def markdown(rows: list[dict]) -> str:
    def cell(v):
        if v is None:
            return ""
        return "ok" if v == "ok" else str(v).split(":")[0] if len(str(v)) > 40 else str(v)

    lines = [
        "| architecture | MoE layers | gating | top-k weights | calls/layer | " + " | ".join(COLUMNS) + " |",
        "|---|---|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        arch = r["model"].removesuffix("-moe.gguf")
        if "load" in r:
            lines.append(f"| {arch} | | | | | {r['load']} |" + " |" * (len(COLUMNS) - 1))
            continue
        if not r.get("moe_layers"):
            lines.append(
                f"| {arch} | none: the graph routes nothing | | | | "
                + " | ".join(cell(r.get(c) or r.get("steering" if c != "capture" else "capture")) for c in COLUMNS)
                + " |"
            )
            continue
        weights = ("normalised" if r["norm_w"] else "raw") + (f" x{r['w_scale']:g}" if r["w_scale"] != 1 else "")
        lines.append(
            f"| {arch} | {len(r['moe_layers'])} | {r['gating']}{' + selection bias' if r['selection_bias'] else ''}"
            f" | {weights} | {r['calls']} | " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    w = sub.add_parser("write")
    w.add_argument("--dest", type=Path, default=cache_root() / "models")
    c = sub.add_parser("check")
    c.add_argument("dir", type=Path)
    c.add_argument("--markdown", type=Path)
    a = sub.add_parser("all")
    a.add_argument("--markdown", type=Path)
    p = sub.add_parser("probe")
    p.add_argument("model")
    args = ap.parse_args(argv)
    if args.cmd == "probe":
        print(json.dumps(probe(args.model)))
        return 0
    if args.cmd == "build":
        print(build())
        return 0
    if args.cmd == "write":
        print("\n".join(map(str, write(binary_path(), args.dest))))
        return 0
    models = sorted(args.dir.glob("*-moe.gguf")) if args.cmd == "check" else write(build(), cache_root() / "models")
    rows = check(models)
    table = markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
