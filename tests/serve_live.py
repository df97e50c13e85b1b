"""A live `mote serve` for tests: the installed server (llama-server with mote-local's call sites) started through
the launcher on 127.0.0.1 and a free port, always stopped; and the planted model's fixtures the serve tests share
(import them into a test module to use them)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mote_local.engine import Model
from mote_local.serve.launcher import prepare

START_S = 60.0  # bound on start-up and shut-down


@dataclass
class Live:
    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(
    model: Path | Model,
    tmp_path: Path,
    *args: str,
    profiles: dict[str, Path] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Live]:
    """Serves `model` with `mote serve MODEL [--profile NAME=FILE]… ARGS…` until the block ends (SIGTERM)."""
    path = model.path if isinstance(model, Model) else Path(model)
    port = free_port()
    defaults = ["--host", "127.0.0.1", "--port", str(port), "-np", "4", "-c", "1024", "-t", "1", "--no-webui"]
    launch = prepare(path, [f"{n}={p}" for n, p in (profiles or {}).items()], [*defaults, *args])
    log = tmp_path / f"server-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            launch.argv, stdout=out, stderr=subprocess.STDOUT, env=os.environ | launch.env | (env or {})
        )
    live = Live(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + START_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{live.output()[-3000:]}")
            try:
                if httpx.get(live.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{live.output()[-3000:]}")
            time.sleep(0.1)
        yield live
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(START_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise AssertionError("the server did not stop on SIGTERM") from None


@pytest.fixture(scope="module")
def model(planted_files):
    """The planted model, loaded once per module for the reference runs."""
    m = Model(planted_files[0])
    yield m
    m.close()
