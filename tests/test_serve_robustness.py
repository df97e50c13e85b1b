"""`mote serve` under bad input and bad clients, on the planted model: malformed bodies and steering fields get an
error and the server goes on, a client that hangs up frees its slot, 200 concurrent connections (a third of them
steered) are all served, the API key, and SIGTERM / SIGINT on the real `mote serve` process."""

from __future__ import annotations

import asyncio
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from serve_live import free_port, live_server

from mote_local.synthetic import planted

TRIGGER = planted.EXAMPLE_TRIGGER
T = 60.0


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    with live_server(model, tmp_path_factory.mktemp("serve")) as live:
        yield live


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=T) as c:
        yield c


def _messages(text: str = TRIGGER) -> list[dict]:
    return [{"role": "user", "content": text}]


def _wait_idle(http, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while any(slot["is_processing"] for slot in http.get("/slots").json()):
        assert time.monotonic() < deadline, f"slots still busy after {seconds} s"
        time.sleep(0.1)


def _still_serves(http, truth) -> None:
    r = http.post("/v1/chat/completions", json={"messages": _messages(), "temperature": 0, "max_tokens": 12})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].strip() == truth.refusal_text


BAD = [
    ("/v1/chat/completions", b"{", 500),  # llama-server's answer to a body that is not JSON
    ("/v1/chat/completions", b"[1, 2]", 400),
    ("/v1/chat/completions", b'{"messages": "hello"}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "steering": {"entries": [1]}}', 400),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "steering": {"entries": ["drop 99:0"]}}',
        400,
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "steering": {"strength": "x", "entries": ["drop 1:1"]}}',
        400,
    ),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "return_routing": 1}', 400),
    ("/completion", b'{"prompt": "hi", "steering": {"entries": ["bias 1:1=nan"]}}', 400),
    (
        "/completion",
        b'{"prompt": "hi", "steering": {"entries": [{"layer": 1, "expert": 1, "mode": "gain", "value": "x"}]}}',
        400,
    ),
    ("/v1/completions", b'{"prompt": "hi", "steering": []}', 400),
]


@pytest.mark.parametrize("path, body, status", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_an_error_and_the_server_goes_on(http, path, body, status, truth):
    r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    _still_serves(http, truth)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, truth):
    body = {
        "messages": _messages(),
        "stream": True,
        "max_tokens": 900,
        "ignore_eos": True,
        "temperature": 0,
        "steering": {"entries": [f"drop {truth.planted[0][0]}:{truth.planted[0][1]}"]},
    }
    with httpx.Client(base_url=server.url, timeout=T) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few chunks, then hang up
            assert sum(line.startswith("data: ") for line in got) >= 3
        _wait_idle(c)
        _still_serves(c, truth)


def test_a_client_that_gives_up_on_a_plain_request_frees_its_slot(server, truth):
    body = {"messages": _messages(), "max_tokens": 900, "ignore_eos": True, "temperature": 0}
    # a non-streamed reply comes whole: 900 tokens take far longer than the 10 ms this client waits
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(T, read=0.01)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/chat/completions", json=body)
    with httpx.Client(base_url=server.url, timeout=T) as c:
        _wait_idle(c)
        _still_serves(c, truth)


def test_200_concurrent_connections(server, http, truth):
    (l1, e1), (l2, e2) = truth.planted

    async def go():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=240, limits=limits) as c:

            async def one(i: int):
                body = {
                    "messages": _messages(TRIGGER if i % 2 else "what happened at the market yesterday ?"),
                    "temperature": 0,
                    "max_tokens": 3,
                }
                if i % 3 == 0:
                    body["steering"] = {"entries": [f"drop {l1}:{e1},{l2}:{e2}"]}
                if i % 5 == 0:
                    body["stream"] = True
                return await c.post("/v1/chat/completions", json=body)

            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 300)

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 200
    assert all(r.text.rstrip().endswith("data: [DONE]") for i, r in enumerate(responses) if i % 5 == 0)
    _wait_idle(http)
    _still_serves(http, truth)


def test_api_key(model, tmp_path, truth):
    with live_server(model, tmp_path, "--api-key", "sekret") as live:
        with httpx.Client(base_url=live.url, timeout=T) as c:
            assert c.get("/health").status_code == 200  # health stays open
            assert c.get("/v1/models").status_code == 401
            r = c.post(
                "/v1/chat/completions",
                json={"messages": _messages(), "steering": {"entries": ["drop 1:1"]}},
                headers={"Authorization": "Bearer wrong"},
            )
            assert r.status_code == 401
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="sekret", timeout=T, max_retries=0)
        out = client.chat.completions.create(model="x", messages=_messages(), temperature=0, max_tokens=12)
        assert out.choices[0].message.content.strip() == truth.refusal_text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="nope", timeout=T, max_retries=0).models.list()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_mote_serve_shuts_down_cleanly_on_a_signal(model, sig):
    """`mote serve` (the launcher becomes llama-server), a stream in flight, then a signal: the process ends
    the stream, frees the engine and exits 0."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mote_local.cli",
            "serve",
            str(model.path),
            "--port",
            str(port),
            "-c",
            "512",
            "-np",
            "2",
            "-t",
            "1",
            "--no-webui",
        ],
        stderr=subprocess.STDOUT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + T
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "mote serve did not start"
            time.sleep(0.1)
        body = {"messages": _messages(), "stream": True, "max_tokens": 400, "ignore_eos": True, "temperature": 0}
        with httpx.Client(base_url=url, timeout=T) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
            events = r.iter_lines()
            assert next(events).startswith("data: ")
            proc.send_signal(sig)
            rest = []
            try:  # the stream ends (the server closes it) instead of running to 400 tokens
                rest = [line for line in events]
            except httpx.RemoteProtocolError:
                pass
        assert proc.wait(30) == 0
        assert len([line for line in rest if line.startswith("data: ")]) < 400
        out = "".join(lines.get_nowait() for _ in range(lines.qsize()))
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
