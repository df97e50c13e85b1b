#!/usr/bin/env python3
"""`mote serve` (llama-server built with mote-local's engine) under load vs stock llama-server, on loopback.

Both servers serve the same GGUF (a mid-size random MoE from the project's factory, the shape of
bench_engine.py) with the same slots, context and threads; each is started alone, loaded by --clients
concurrent clients that send --requests requests each (/v1/completions, token-id prompts of --prompt
tokens, --max-tokens greedy tokens with the end-of-generation tokens forbidden, so every request does the
same work), then stopped. Conditions, in rounds (--rounds), interleaved and rotated (each round starts with
the next one) so that drift of the machine hits every condition alike:

    llama-server     stock llama.cpp tools/server from the pinned sdist, unsteered
    mote unsteered   mote serve, no request steered
    mote steered     mote serve, every request carrying a different steering (random entries in every layer)
    mote steered, stock kernel
                     the same with MOTE_MOE_GEMM=0: ggml-cpu's own expert matmuls, as in llama-server, so that
                     the cost of steering alone shows against llama-server

Reported per condition: throughput (completion tokens per second of wall time), request latency p50/p95,
errors. Cross-talk, after the timed load, on mote serve:

- masks held: all requests again at once with return_routing; each masks one expert per layer, which its own
  routing must never show, while its neighbours (other masks) select those experts;
- alone vs batched: a sample of the requests re-sent one at a time, greedy completions compared with those
  they got under load, on every server. On a random-weight model near-tied logits make a batch's different
  float accumulation order flip some greedy tokens; llama-server's own rate and mote's unsteered rate are
  that baseline.

    python bench/bench_serve.py build            # once: llama-server from the pinned sdist (unpatched), cached
    python bench/bench_serve.py run              # the benchmark (prints a markdown table)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import bench_model

REPO = Path(__file__).resolve().parent.parent
# stock llama-server, built like the engine (same CMake project, options and compiler flags, so that ccache serves
# every file the patches do not touch) but with no patch applied and no native/ source compiled in
STOCK_PROJECT = REPO / "build" / "stock-server"
SERVER_BIN = STOCK_PROJECT / "install" / "mote_local_engine" / "bin" / "mote-server"


def wheel_build_dir(project: Path) -> Path:
    """The CMake build folder of ``project`` as scikit-build-core names it (build-dir = build/{wheel_tag}): the
    engine's own, and the stock project's, which takes the same name so that ccache sees the same relative paths."""
    import sysconfig

    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return project / "build" / f"{tag}-{tag}-{sysconfig.get_platform().replace('-', '_').replace('.', '_')}"


def build(jobs: int) -> Path:
    """Stock llama-server (CPU) from the pinned sdist's vendored llama.cpp, no patches."""
    import re
    import shutil

    if SERVER_BIN.exists():
        return SERVER_BIN
    (STOCK_PROJECT / "patches").mkdir(parents=True, exist_ok=True)  # an empty series: the pinned source as it is
    (STOCK_PROJECT / "native").mkdir(exist_ok=True)
    (STOCK_PROJECT / "tools").mkdir(exist_ok=True)
    shutil.copy(REPO / "tools" / "upstream.py", STOCK_PROJECT / "tools" / "upstream.py")
    shutil.copy(REPO / "native" / "mote.h", STOCK_PROJECT / "native" / "mote.h")
    cmake = (REPO / "CMakeLists.txt").read_text()
    cmake = re.sub(r"^ *target_sources\((llama|ggml-rpc|server-context) PRIVATE native/.*\)\n", "", cmake, flags=re.M)
    (STOCK_PROJECT / "CMakeLists.txt").write_text(cmake)
    build_dir = wheel_build_dir(STOCK_PROJECT)
    env = os.environ | {"CCACHE_BASEDIR": os.environ.get("CCACHE_BASEDIR", str(REPO.parent))}
    subprocess.run(
        [
            "cmake",
            "-S",
            str(STOCK_PROJECT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
        ],
        check=True,
        env=env,
    )
    subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs)], check=True, env=env)
    subprocess.run(
        ["cmake", "--install", str(build_dir), "--component", "mote", "--prefix", str(STOCK_PROJECT / "install")],
        check=True,
        env=env,
    )
    return SERVER_BIN


# ------------------------------------------------------------------------------------------------ servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(kind: str, model: Path, args, port: int, env: dict[str, str]) -> subprocess.Popen:
    # the same llama-server flags for both: mote serve passes them on verbatim
    flags = [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        str(args.parallel * args.slot_ctx),
        "-np",
        str(args.parallel),
        "-t",
        str(args.threads),
        "-tb",
        str(args.threads),
        "-b",
        "512",
        "--kv-unified",
        "--no-webui",
    ]
    if kind == "llama-server":
        cmd = [str(SERVER_BIN), "-m", str(model), *flags]
    else:
        cmd = [sys.executable, "-m", "mote_local.cli", "serve", str(model), *flags]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=os.environ | env,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{kind} did not start")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# ------------------------------------------------------------------------------------------------ load


def _steering(rng: random.Random, layers: list[int], n_expert: int) -> dict:
    """A random steering touching every MoE layer: one expert dropped, one biased, one masked."""
    entries = []
    for layer in layers:
        a, b, c = rng.sample(range(n_expert), 3)
        entries += [f"drop {layer}:{a}", f"bias {layer}:{b}={rng.uniform(-3, 3):.2f}", f"off {layer}:{c}"]
    return {"entries": entries}


def _requests(args, vocab: int, eog: list[int], layers: list[int], n_expert: int, steered: bool) -> list[dict]:
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.clients * args.requests):
        body = {
            "model": "bench",
            "prompt": [rng.randrange(10, vocab) for _ in range(args.prompt)],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "logit_bias": {str(t): -100 for t in eog},
        }
        if steered:
            body["steering"] = _steering(rng, layers, n_expert)
        out.append(body)
    return out


async def _load(url: str, bodies: list[dict], clients: int) -> tuple[float, list[float], list[dict | None]]:
    """Each client sends its share of the bodies one after another; returns wall time, latencies, replies."""
    replies: list[dict | None] = [None] * len(bodies)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:

        async def client(k: int):
            for i in range(k, len(bodies), clients):
                t0 = time.perf_counter()
                r = await c.post("/v1/completions", json=bodies[i])
                latencies.append(time.perf_counter() - t0)
                replies[i] = r.json() if r.status_code == 200 else None

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        return time.perf_counter() - t0, latencies, replies


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run(args) -> None:
    from mote_local.engine import Model

    if not SERVER_BIN.exists():
        sys.exit(f"no llama-server at {SERVER_BIN}: run `python {sys.argv[0]} build` first")
    model = Path(bench_model(n_layer=args.layers, qtype=args.qtype))
    with Model(model) as m:
        vocab, layers, n_expert = m.n_vocab, list(m.layout.moe_layers), m.layout.n_expert
        eog = [t for t in range(vocab) if m.is_eog(t)]
    load_before = f"{os.getloadavg()[0]:.2f}"
    conditions = {
        "llama-server": ("llama-server", False, {}),
        "mote unsteered": ("mote", False, {}),
        "mote steered": ("mote", True, {}),
        "mote steered, stock kernel": ("mote", True, {"MOTE_MOE_GEMM": "0"}),
    }
    results: dict[str, list[dict]] = {name: [] for name in conditions}
    checks: dict[str, str] = {}
    names = list(conditions)
    for rnd in range(args.rounds):
        first = rnd % len(names)
        for name in names[first:] + names[:first]:  # each round starts with the next condition
            kind, steered, env = conditions[name]
            bodies = _requests(args, vocab, eog, layers, n_expert, steered)
            port = _free_port()
            proc = _start(kind, model, args, port, env)
            try:
                url = f"http://127.0.0.1:{port}"
                wall, latencies, replies = asyncio.run(_load(url, bodies, args.clients))
                errors = sum(r is None for r in replies)
                tokens = sum(r["usage"]["completion_tokens"] for r in replies if r)
                results[name].append({"wall": wall, "tokens": tokens, "errors": errors, "latencies": latencies})
                print(
                    f"round {rnd + 1} {name}: {tokens / wall:.1f} tok/s, p50 {_pct(latencies, 50):.2f} s, "
                    f"errors {errors}",
                    file=sys.stderr,
                )
                if rnd == 0:
                    checks[name] = _alone_vs_batched(url, bodies, replies, args)
                    if steered and not env:
                        checks["masks held"] = _masks_held(url, bodies, args.clients)
            finally:
                _stop(proc)

    def tput(runs: list[dict]) -> float:
        return sum(r["tokens"] for r in runs) / sum(r["wall"] for r in runs)

    def ratio(name: str, to: str) -> str:
        """Pooled ratio of two conditions, with the range of the per-round ratios (the spread)."""
        rounds = [tput([a]) / tput([b]) for a, b in zip(results[name], results[to])]
        return f"{tput(results[name]) / tput(results[to]):.2f}x ({min(rounds):.2f}-{max(rounds):.2f})"

    print(f"\nload average before / after: {load_before} / {os.getloadavg()[0]:.2f}")
    print(
        f"model: {model.name} ({model.stat().st_size / 2**20:.0f} MiB, {len(layers)} MoE layers, {n_expert} experts),"
        f" {args.clients} clients x {args.requests} requests, prompt {args.prompt} tokens, {args.max_tokens} new "
        f"tokens each, --parallel {args.parallel}, -t {args.threads}, {args.rounds} rounds\n"
    )
    print("| condition | throughput (tok/s) | vs llama-server (per-round range) | latency p50 (s) | p95 (s) | errors |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        lat = [x for r in runs for x in r["latencies"]]
        print(
            f"| {name} | {tput(runs):.1f} | {ratio(name, 'llama-server')} | {_pct(lat, 50):.2f} | "
            f"{_pct(lat, 95):.2f} | {sum(r['errors'] for r in runs)} |"
        )
    print(f"\nsteered vs unsteered, same server: {ratio('mote steered', 'mote unsteered')}")
    print()
    print(f"cross-talk, masks held: {checks['masks held']}")
    for name in conditions:
        print(f"alone vs batched, {name}: {checks[name]}")


def _alone_vs_batched(url: str, bodies: list[dict], replies: list[dict | None], args) -> str:
    """A sample of the requests re-sent one at a time: how many completions differ from the batched ones, and
    after how many tokens (the common prefix, in characters) they part."""
    sample = random.Random(args.seed + 1).sample(range(len(bodies)), min(args.check, len(bodies)))
    parted = []
    with httpx.Client(base_url=url, timeout=600) as c:
        for i in sample:
            alone = c.post("/v1/completions", json=bodies[i]).json()["choices"][0]["text"]
            batched = replies[i]["choices"][0]["text"] if replies[i] else ""
            if alone != batched:
                parted.append(len(os.path.commonprefix([alone, batched])))
    where = f" (common prefix {sorted(parted)} of ~{len(batched)} chars)" if parted else ""
    return f"{len(parted)} of {len(sample)} differ{where}"


def _masks_held(url: str, bodies: list[dict], clients: int) -> str:
    """All requests at once with return_routing: a request's own masked experts never appear in its routing;
    how often its neighbours select them shows that the masks were not everyone's."""
    masked_bodies = [b | {"return_routing": True} for b in bodies]
    _, _, replies = asyncio.run(_load(url, masked_bodies, clients))
    leaks, by_others, missing = 0, 0, sum(r is None for r in replies)
    masks = [
        [tuple(map(int, e.split()[1].split(":"))) for e in b["steering"]["entries"] if e.startswith("off ")]
        for b in bodies
    ]
    for i, reply in enumerate(replies):
        if reply is None:
            continue
        routing = reply["routing"]
        row = {layer: k for k, layer in enumerate(routing["layers"])}
        leaks += sum(routing["counts"][row[layer]][expert] for layer, expert in masks[i])
        for j, other in enumerate(masks):
            if j != i:
                by_others += sum(
                    routing["counts"][row[layer]][expert] for layer, expert in other if (layer, expert) not in masks[i]
                )
    return (
        f"{leaks} selections of a request's own masked experts in {len(replies) - missing} requests "
        f"({missing} failed); experts its neighbours masked were selected {by_others} times in its own routing"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build stock llama-server from the pinned sdist (cached)")
    b.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    r = sub.add_parser("run", help="run the benchmark")
    r.add_argument("--clients", type=int, default=16)
    r.add_argument("--requests", type=int, default=4, help="requests per client")
    r.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    r.add_argument("--max-tokens", type=int, default=32)
    r.add_argument("--parallel", type=int, default=16, help="slots (both servers)")
    r.add_argument("--slot-ctx", type=int, default=256, help="positions per slot")
    r.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads, both servers (1: on a shared 2-core box two threads stall each other)",
    )
    r.add_argument("--layers", type=int, default=8)
    r.add_argument("--qtype", default="q8_0")
    r.add_argument("--rounds", type=int, default=2)
    r.add_argument("--check", type=int, default=8, help="requests re-sent alone (alone vs batched)")
    r.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.command == "build":
        print(build(args.jobs))
    else:
        run(args)


if __name__ == "__main__":
    main()
