"""Several machines, on loopback: a model's layers on two rpc-servers and the local CPU, against the same model
run locally. The servers compute with the same CPU kernels, so results must be bit-identical.

Scenarios that could abort or hang a process (a killed server, a busy one) run in a child process with a
timeout: a crash shows as its exit status, a hang as the timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from click.testing import CliRunner

from mote_local.cli.commands import main
from mote_local.engine import Model, rpc
from mote_local.errors import EngineError, InputError
from mote_local.steering.entries import Entry, Mode, Scope
from mote_local.synthetic.tiny import ARCHS

pytestmark = pytest.mark.timeout(180)

# 3 of the tiny models' 4 layers offloaded, split evenly: layers on server A, server B and the local CPU
OFFLOAD = dict(n_gpu_layers=3, tensor_split=[1, 1])
TEXT = "the quick brown fox jumps over the lazy dog and runs away"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER = [sys.executable, "-m", "mote_local.cli", "rpc-server", "-t", "1", "--port"]


def start_server(port: int) -> subprocess.Popen:
    """`mote rpc-server` on port, once it answers."""
    proc = subprocess.Popen(SERVER + [str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return start_server_wait(proc, port)


def start_server_wait(proc: subprocess.Popen, port: int) -> subprocess.Popen:
    deadline = time.monotonic() + 20
    while True:
        try:
            rpc.probe(f"127.0.0.1:{port}", timeout_ms=2000)
            return proc
        except EngineError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def servers():
    procs, endpoints = [], []
    try:
        for _ in range(2):
            port = free_port()
            procs.append(start_server(port))
            endpoints.append(f"127.0.0.1:{port}")
        yield endpoints
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def run(path, tokens, steering=(), *, rpc_servers=(), probs=False, **options):
    """Logits of every token and the routing trace of one pass, with `steering` applied."""
    placement = dict(OFFLOAD, rpc_servers=rpc_servers) if rpc_servers else options
    with Model(path, **placement) as m, m.session(n_ctx=128) as s:
        s.steer(list(steering))
        with s.capture(probs=probs, trace=True) as cap:
            logits = s.logits(tokens)
        return logits, cap.stats(), cap.trace()


def assert_same(local, remote):
    (l_logits, l_stats, l_trace), (r_logits, r_stats, r_trace) = local, remote
    assert np.array_equal(l_logits, r_logits)
    assert np.array_equal(l_stats.counts, r_stats.counts)
    assert np.array_equal(l_stats.weight_sums, r_stats.weight_sums)
    for field in ("layer", "pos", "ids", "weights"):
        assert np.array_equal(getattr(l_trace, field), getattr(r_trace, field)), field
    if l_trace.probs is not None:
        assert np.array_equal(l_trace.probs, r_trace.probs)


@pytest.mark.parametrize("arch", ARCHS)
def test_idle_run_equals_the_local_one(arch, tiny_path, servers):
    path = tiny_path(arch)
    with Model(path) as m:
        tokens = m.tokenize(TEXT)
    local = run(path, tokens, probs=True)
    remote = run(path, tokens, rpc_servers=servers, probs=True)
    assert_same(local, remote)
    assert local[1].counts.sum() > 0


STEERINGS = {
    "mask": [Entry(1, 2, Mode.MASK), Entry(3, 0, Mode.MASK)],
    "drop": [Entry(2, 1, Mode.DROP), Entry(3, 5, Mode.DROP)],
    "force": [Entry(1, 7, Mode.FORCE), Entry(2, 3, Mode.FORCE)],
    "bias": [Entry(1, 4, Mode.BIAS, 2.5), Entry(3, 6, Mode.BIAS, -1.0)],
    "gain": [Entry(2, 2, Mode.GAIN, 0.25), Entry(3, 1, Mode.GAIN, 3.0)],
    "pairs": [
        Entry(1, 4, Mode.BIAS, 1.5),
        Entry(1, 4, Mode.GAIN, 0.5),
        Entry(2, 6, Mode.DROP),
        Entry(2, 6, Mode.GAIN, 2.0),
        Entry(3, 0, Mode.MASK),
        Entry(3, 1, Mode.FORCE),
    ],
    "scoped": [Entry(1, 2, Mode.MASK, scope=Scope.PREFILL), Entry(2, 3, Mode.FORCE, scope=Scope.DECODE)],
}


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2", "gpt-oss"])
@pytest.mark.parametrize("name", STEERINGS)
def test_each_steering_mode_equals_the_local_one(arch, name, tiny_path, servers):
    path = tiny_path(arch)
    with Model(path) as m:
        tokens = m.tokenize(TEXT)
    local = run(path, tokens, STEERINGS[name])
    assert_same(local, run(path, tokens, STEERINGS[name], rpc_servers=servers))
    idle = run(path, tokens)
    assert not np.array_equal(local[0], idle[0])  # the steering acts on the layers the servers compute


def test_steering_changes_between_decode_calls(tiny_path, servers):
    path = tiny_path("qwen3moe")
    mask = [Entry(1, 2, Mode.MASK), Entry(2, 3, Mode.MASK), Entry(3, 0, Mode.MASK)]
    force = [Entry(3, 4, Mode.FORCE)]

    def trajectory(**placement):
        """One sequence decoded a token at a time while the steering changes between calls."""
        with Model(path, **placement) as m, m.session(n_ctx=128) as s:
            tokens = m.tokenize(TEXT)
            rows = [s.decode([(0, tokens[:4], 0)], outputs="last")]
            for i, steering in enumerate([mask, [], force, mask, []]):
                s.steer(steering)
                rows.append(s.decode([(0, [tokens[4 + i]], 4 + i)]))
            return np.concatenate(rows)

    local = trajectory()
    remote = trajectory(rpc_servers=servers, **OFFLOAD)
    assert np.array_equal(local, remote)
    assert not np.array_equal(remote[1], remote[2]) or not np.array_equal(remote[3], remote[4])


def test_generation_and_two_models_on_the_same_servers(tiny_path, servers):
    path = tiny_path("qwen3moe")
    with Model(path) as m, m.session(n_ctx=128) as s:
        s.steer([Entry(1, 2, Mode.DROP)])
        expected = s.generate(TEXT, max_tokens=12).tokens
    # the second model shares the process's connections (no new greeting, which the busy server would not answer)
    with Model(path, rpc_servers=servers, **OFFLOAD) as a, Model(path, rpc_servers=servers, **OFFLOAD) as b:
        for m in (a, b):
            with m.session(n_ctx=128) as s:
                s.steer([Entry(1, 2, Mode.DROP)])
                assert s.generate(TEXT, max_tokens=12).tokens == expected


def test_capture_reads_each_server_once_per_ubatch(tiny_path, tmp_path):
    """llama.cpp's RPC get_tensor is a blocking round trip: the routing taps of the layers one server holds are
    read with one request per tap kind (selected experts, weights), not one per layer. Counted from the requests
    the server logs (GGML_RPC_DEBUG)."""
    path = tiny_path("qwen3moe")
    port = free_port()
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        SERVER + [str(port)], stdout=subprocess.DEVNULL, stderr=log.open("w"), env={**os.environ, "GGML_RPC_DEBUG": "1"}
    )
    try:
        start_server_wait(proc, port)
        with Model(path, rpc_servers=[f"127.0.0.1:{port}"], n_gpu_layers=99) as m, m.session(n_ctx=64) as s:
            tokens = m.tokenize(TEXT)
            s.decode([(0, tokens[:4], 0)], outputs="last")

            def reads_of_one_step(pos: int) -> int:
                before = log.stat().st_size
                s.decode([(0, [tokens[pos]], pos)])
                time.sleep(0.3)  # the server's last lines
                with log.open() as f:
                    f.seek(before)
                    return f.read().count("[get_tensor]")

            idle = reads_of_one_step(4)
            with s.capture(trace=True) as cap:
                captured = reads_of_one_step(5)
            assert len(m.layout.moe_layers) == 4 and len(set(cap.trace().layer)) == 4
    finally:
        proc.kill()
        proc.wait()
    assert captured - idle == 2, (idle, captured)


def test_endpoints_are_checked_before_the_engine(tiny_path):
    path = tiny_path("qwen3moe")
    for bad in (["localhost"], ["host:0"], ["a b:1"], ["127.0.0.1:70000"]):
        with pytest.raises(InputError, match="is not HOST:PORT"):
            Model(path, rpc_servers=bad, n_gpu_layers=99)
    with pytest.raises(InputError, match="listed twice"):
        Model(path, rpc_servers=["127.0.0.1:5", "127.0.0.1:5"], n_gpu_layers=99)
    with pytest.raises(InputError, match="n_gpu_layers is 0"):
        Model(path, rpc_servers=["127.0.0.1:5"])
    with pytest.raises(InputError, match="tensor_split"):
        Model(path, tensor_split=[0, 0])
    port = free_port()
    with pytest.raises(EngineError, match=f"no rpc server answers at 127.0.0.1:{port}"):
        Model(path, rpc_servers=[f"127.0.0.1:{port}"], n_gpu_layers=99)


def child(script: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=timeout
    )


def test_a_killed_server_gives_a_clear_error_and_the_process_goes_on(tiny_path):
    path = tiny_path("qwen3moe")
    ports = [free_port(), free_port()]
    procs = [start_server(p) for p in ports]
    try:
        result = child(f"""
            import os, signal
            import numpy as np
            from mote_local.engine import Model
            from mote_local.errors import EngineError
            from mote_local.steering.entries import Entry, Mode
            servers = ["127.0.0.1:{ports[0]}", "127.0.0.1:{ports[1]}"]
            with Model({str(path)!r}) as local, local.session(n_ctx=128) as s:
                tokens = local.tokenize("hello there")
                expected = s.logits(tokens)
            m = Model({str(path)!r}, rpc_servers=servers, n_gpu_layers=3, tensor_split=[1, 1])
            s = m.session(n_ctx=128)
            s.steer([Entry(3, 1, Mode.MASK)])
            s.logits(tokens)
            os.kill({procs[1].pid}, signal.SIGKILL)
            for attempt in range(2):
                try:
                    s.logits(tokens)
                    print("no error")
                except EngineError as err:
                    print("error:", err)
            print("closed:", m.closed, s.closed)
            # a model without servers (all layers asked to offload) must not use the registered ones
            with Model({str(path)!r}, n_gpu_layers=99) as again, again.session(n_ctx=128) as s2:
                print("local after loss equal:", np.array_equal(s2.logits(tokens), expected))
        """)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"error: lost the connection to the rpc server 127.0.0.1:{ports[1]} (it stopped, or the "
        f"network broke); {path.name} is closed: restart `mote rpc-server` there and load the "
        "model again"
    )
    assert lines[1].startswith("error: this session cannot be used: its model was closed when the rpc server")
    assert lines[2:] == ["closed: True True", "local after loss equal: True"]
    assert "Traceback" not in result.stderr


def test_a_restarted_server_serves_a_new_model(tiny_path):
    path = tiny_path("qwen3moe")
    port = free_port()
    proc = start_server(port)
    try:
        result = child(f"""
            import subprocess
            from mote_local.engine import Model, rpc
            from mote_local.errors import EngineError
            servers = ["127.0.0.1:{port}"]
            m = Model({str(path)!r}, rpc_servers=servers, n_gpu_layers=99)
            s = m.session(n_ctx=64)
            tokens = m.tokenize("hello")
            before = s.logits(tokens)
            subprocess.run(["kill", "-9", "{proc.pid}"], check=True)
            try:
                s.logits(tokens)
            except EngineError as err:
                print("lost")
            server = subprocess.Popen({SERVER!r} + ["{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            import time
            for _ in range(100):
                try:
                    rpc.probe(servers[0], timeout_ms=1000)
                    break
                except EngineError:
                    time.sleep(0.1)
            with Model({str(path)!r}, rpc_servers=servers, n_gpu_layers=99) as m2, m2.session(n_ctx=64) as s2:
                print("same:", (s2.logits(tokens) == before).all())
            server.kill()
        """)
    finally:
        proc.kill()
        proc.wait()
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["lost", "same:", "True"]


def test_a_busy_server_is_named_not_waited_for(tiny_path, servers):
    path = tiny_path("qwen3moe")
    with Model(path, rpc_servers=servers[:1], n_gpu_layers=99):  # this process holds the server's one connection
        started = time.monotonic()
        result = child(
            f"""
            from mote_local.engine import Model
            from mote_local.errors import EngineError
            try:
                Model({str(path)!r}, rpc_servers=[{servers[0]!r}], n_gpu_layers=99)
            except EngineError as err:
                print(err)
        """,
            timeout=60,
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == (
        f"the rpc server at {servers[0]} did not answer within {rpc.PROBE_TIMEOUT_MS} "
        "ms: it serves one client at a time, is another process connected to it?"
    )
    assert elapsed < 40


def test_cli_run_over_rpc_equals_the_local_run(tiny_path, servers):
    path = str(tiny_path("qwen3moe"))
    args = ["run", path, "-p", TEXT, "-n", "10", "--off", "1:2,3:0", "--bias", "2:5=2"]
    local = CliRunner().invoke(main, args)
    remote = CliRunner().invoke(main, args + ["--rpc", ",".join(servers), "-ts", "1,1", "-ngl", "3"])
    assert local.exit_code == 0, local.output
    assert remote.exit_code == 0, remote.output
    assert remote.stdout == local.stdout and local.stdout.strip()
    local = CliRunner().invoke(main, ["inspect", path, "--json"])
    remote = CliRunner().invoke(main, ["inspect", path, "--json", "--rpc", ",".join(servers)])
    assert remote.exit_code == 0 and remote.stdout == local.stdout, remote.output


def test_mote_ftri_over_rpc_finds_what_it_finds_locally(planted_files, servers, tmp_path):
    """The whole fTRI pipeline (batched capture, statistics, profile) on the planted model spread over the servers:
    the same per-prompt activation maps, hence the same files, as the local run."""
    from mote_local.synthetic import planted

    path = str(planted_files[0])
    args = ["ftri", path, "--prompts", str(planted.prompts_path()), "--n-boot", "5"]
    local = CliRunner().invoke(main, args + ["--out", str(tmp_path / "local")])
    remote = CliRunner().invoke(
        main, args + ["--out", str(tmp_path / "remote"), "--rpc", ",".join(servers), "-ngl", "3", "-ts", "1,1"]
    )
    assert local.exit_code == 0, local.output
    assert remote.exit_code == 0, remote.output
    for name in ("profile.json", "ftri_mean_diff.csv"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_cli_refuses_bad_placement_in_one_line(tiny_path):
    path = str(tiny_path("qwen3moe"))
    port = free_port()
    cases = {
        ("--rpc", "nowhere"): "is not HOST:PORT",
        ("--rpc", f"127.0.0.1:{port}"): f"no rpc server answers at 127.0.0.1:{port}",
        ("--rpc", f"127.0.0.1:{port}", "-ts", "1,x"): "--tensor-split takes proportions",
    }
    for extra, message in cases.items():
        result = CliRunner().invoke(main, ["run", path, "-p", "hi", "-n", "2", *extra])
        assert result.exit_code == 1
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_mote_rpc_server_refuses_a_taken_port_and_outlives_a_client_that_leaves(servers):
    """A greeting whose client left before the answer (the probe of a busy server does that) must not kill the
    server (SIGPIPE), and a second server on a taken port is refused."""
    port = int(servers[0].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(bytes([14]) + (24).to_bytes(8, "little") + bytes(24))
    rpc.probe(servers[0])
    proc = start_server(port := free_port())
    try:
        taken = CliRunner().invoke(main, ["rpc-server", "--port", str(port)])
        assert taken.exit_code == 1
        assert f"cannot listen on 127.0.0.1:{port}" in taken.output
    finally:
        proc.kill()
        proc.wait()


def test_mote_serve_reports_a_lost_server_and_stops_serving(tiny_path, tmp_path):
    """A served model whose rpc server dies: the request in flight and every later one get HTTP 503 with the
    reason, /health says so; the process goes on (it can be restarted by whoever supervises it)."""
    import httpx
    from serve_live import live_server

    path = tiny_path("qwen3moe")
    port = free_port()
    proc = start_server(port)
    try:
        with (
            live_server(path, tmp_path, "--rpc", f"127.0.0.1:{port}", "-ngl", "99") as live,
            httpx.Client(base_url=live.url, timeout=30) as http,
        ):
            body = {"prompt": "hello there", "max_tokens": 4, "temperature": 0}
            assert http.post("/v1/completions", json=body).status_code == 200
            proc.kill()
            proc.wait()
            replies = [http.post("/v1/completions", json=body) for _ in range(2)]
            health = http.get("/health")
            assert live.process.poll() is None  # the server goes on
    finally:
        proc.kill()
        proc.wait()
    lost = f"the model is gone (lost the connection to the rpc server 127.0.0.1:{port}"
    assert [r.status_code for r in replies] == [503, 503]
    assert all(r.json()["error"]["message"].startswith(lost) for r in replies), replies[0].json()
    assert health.status_code == 503 and health.json()["error"]["message"].startswith(lost)


def test_chat_ends_with_the_reason_when_its_server_is_lost(tiny_path):
    from mote_local.cli.chat import Chat

    path = tiny_path("qwen3moe")
    port = free_port()
    proc = start_server(port)
    lines = iter(["hello", "again", "and again"])
    out: list[str] = []

    def read(prompt: str) -> str:
        line = next(lines)
        if line == "again":
            proc.kill()
            proc.wait()
        return line

    try:
        with Model(path, rpc_servers=[f"127.0.0.1:{port}"], n_gpu_layers=99) as m, m.session(n_ctx=256) as s:
            Chat(m, s, max_tokens=4, n_threads=1, write=lambda text="", end="\n": out.append(text)).loop(read)
    finally:
        proc.kill()
        proc.wait()
    errors = [line for line in out if line.startswith("error:")]
    assert errors == [
        f"error: lost the connection to the rpc server 127.0.0.1:{port} (it stopped, or the network "
        f"broke); {path.name} is closed: restart `mote rpc-server` there and load the model again"
    ]
    assert next(lines) == "and again"  # the chat ended instead of reading on
