"""A live `mote serve` for tests: uvicorn in a thread, bound to 127.0.0.1 on a free port, always shut down;
and the planted model's fixtures the serve tests share (import them into a test module to use them)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from mote_local.engine import Model
from mote_local.serve.app import Backend, create_app
from mote_local.serve.settings import Settings

START_S = 30.0  # bound on start-up and shut-down


@dataclass
class Live:
    url: str
    backend: Backend

    @property
    def scheduler(self):
        return self.backend.scheduler


@contextlib.contextmanager
def live_server(model: Path | Model, **settings) -> Iterator[Live]:
    """Serves `model` (a path, or a loaded Model shared with the caller) until the block ends."""
    import uvicorn

    path = model.path if isinstance(model, Model) else model
    options = {"parallel": 4, "n_ctx": 1024, "n_threads": 1} | settings
    backend = Backend(Settings(model=path, **options), model if isinstance(model, Model) else None)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(backend), log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + START_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        try:
            yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}", backend)
        finally:
            server.should_exit = True
            thread.join(START_S)
            assert not thread.is_alive(), "the test server did not shut down"
    finally:
        sock.close()
        backend.close()


@pytest.fixture(scope="module")
def model(planted_files):
    """The planted model, loaded once per module and shared by its servers."""
    m = Model(planted_files[0])
    yield m
    m.close()
