"""`mote serve` under bad input and bad clients: every case gets a clean OpenAI-shaped HTTP error or a clean
cancel, frees its sequence slot, and the server keeps serving. Also the API key, 200 concurrent
connections, a full queue, and SIGTERM / SIGINT on the real `mote serve` process."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from mote_local.engine import Model
from serve_live import live_server, model  # noqa: F401 (fixtures)

TRIGGER = "what happened at the protest yesterday ?"
T = 30.0  # seconds: bound on any one request
SLOT_CTX = 256  # the servers below: -c 1024 over 4 slots


@pytest.fixture(scope="module")
def server(model):
    with live_server(model, max_body_bytes=64 * 1024) as live:
        yield live


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=T) as c:
        yield c


def _messages(text: str = TRIGGER) -> list[dict]:
    return [{"role": "user", "content": text}]


def _endless(model: Model) -> dict:
    """Sampling fields that keep the planted model talking: its end-of-generation tokens are forbidden."""
    eog = [t for t in range(model.n_vocab) if model.is_eog(t)]
    return {"logit_bias": {str(t): -100 for t in eog}, "temperature": 0}


def _wait_idle(http, seconds: float = 10.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        health = http.get("/health").json()
        if health["slots_processing"] == 0 and health["requests_waiting"] == 0:
            return health
        assert time.monotonic() < deadline, f"slots still busy after {seconds} s: {health}"
        time.sleep(0.05)


def _still_serves(http) -> None:
    r = http.post("/v1/chat/completions", json={"messages": _messages(), "temperature": 0, "max_tokens": 12})
    assert r.status_code == 200 and "cannot help" in r.json()["choices"][0]["message"]["content"]


# ------------------------------------------------------------------------------------------------ bad requests

BAD = [
    # (path, body (bytes: sent as is), status, code or None, a fragment of the message)
    ("/v1/chat/completions", b"{", 400, None, "not valid JSON"),
    ("/v1/chat/completions", b"", 400, None, "body"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, ""),
    ("/v1/chat/completions", {"messages": _messages(), "foo": 1}, 400, None, "unknown field 'foo'"),
    ("/v1/chat/completions", {}, 400, None, "messages: required"),
    ("/v1/chat/completions", {"messages": []}, 400, None, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, None, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, None, "messages.0.content"),
    ("/v1/chat/completions", {"messages": _messages(), "n": 2}, 400, None, "n:"),
    ("/v1/chat/completions", {"messages": _messages(), "tools": []}, 400, None, "unknown field 'tools'"),
    ("/v1/chat/completions", {"messages": _messages(), "logprobs": True}, 400, None, "logprobs"),
    ("/v1/chat/completions", {"messages": _messages(), "max_tokens": 0}, 400, None, "max_tokens"),
    ("/v1/chat/completions", {"messages": _messages(), "max_tokens": -5}, 400, None, "max_tokens"),
    ("/v1/chat/completions", {"messages": _messages(), "max_tokens": 10**30}, 400, None, "max_tokens"),
    ("/v1/chat/completions", {"messages": _messages(), "max_tokens": "many"}, 400, None, "max_tokens"),
    ("/v1/chat/completions", {"messages": _messages(), "temperature": 5}, 400, None, "temperature"),
    ("/v1/chat/completions", {"messages": _messages(), "top_p": 0}, 400, None, "top_p"),
    ("/v1/chat/completions", {"messages": _messages(), "stop": ["a", "b", "c", "d", "e"]}, 400, None, "stop"),
    ("/v1/chat/completions", {"messages": _messages(), "stop": [""]}, 400, None, "stop string is empty"),
    ("/v1/chat/completions", {"messages": _messages(), "logit_bias": {"abc": 1}}, 400, None, "not a token id"),
    ("/v1/chat/completions", {"messages": _messages(), "logit_bias": {"99999999": 1}}, 400, None, "out of range"),
    ("/v1/chat/completions", {"messages": _messages(), "logit_bias": {"5": 500}}, 400, None, "[-100, 100]"),
    ("/v1/chat/completions", {"messages": _messages(), "steering": {"profile": "nope"}}, 400, "invalid_steering",
     "unknown profile"),
    ("/v1/chat/completions", {"messages": _messages(), "steering": {"entries": ["drop 1:99"]}}, 400,
     "invalid_steering", "out of range"),
    ("/v1/chat/completions", {"messages": _messages(" ".join(["protest"] * 400))}, 400, "context_length_exceeded",
     "a request here holds at most 256"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, None, "one prompt per request"),
    ("/v1/completions", {"prompt": []}, 400, None, "empty"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, None, "out of range"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, None, "echo"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, None, "best_of"),
    ("/v1/nothing", {}, 404, "not_found", "no such endpoint"),
]


@pytest.mark.parametrize("path, body, status, code, fragment", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_openai_shaped_errors(http, path, body, status, code, fragment):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"]
    assert "\n" not in error["message"]  # one line
    assert error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code


def test_wrong_methods_and_bodies_too_large(http):
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"] == "GET is not allowed on /v1/chat/completions"
    big = json.dumps({"messages": _messages("x" * 100_000)}).encode()
    r = http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 10_000

    r = http.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_the_server_keeps_serving_after_bad_requests(http, server):
    for path, body, *_ in BAD:
        http.post(path, content=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert _wait_idle(http)["slots_idle"] == 4
    _still_serves(http)


def test_absurd_max_tokens_is_clipped_to_the_context(http, model):
    r = http.post("/v1/completions", json={"prompt": TRIGGER, "max_tokens": 10**6, **_endless(model)})
    assert r.status_code == 200
    out = r.json()
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["total_tokens"] == SLOT_CTX


# ------------------------------------------------------------------------------------------------ bad clients

@pytest.fixture(scope="module")
def long_server(model):
    """One slot of 1024 positions: room for a generation long enough to hang up in the middle of."""
    with live_server(model, parallel=1, n_ctx=1024) as live:
        yield live


def test_a_client_that_disconnects_mid_stream_frees_its_slot(long_server, model):
    body = {"messages": _messages(), "stream": True, "max_tokens": 1000, **_endless(model)}
    steps_before = long_server.scheduler.steps
    with httpx.Client(base_url=long_server.url, timeout=T) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few chunks, then hang up
            assert sum(line.startswith("data: ") for line in got) >= 3
        _wait_idle(c)
        # cancelled, not run to its 1000 tokens (one decode step per token)
        assert long_server.scheduler.steps - steps_before < 600
        _still_serves(c)


def test_a_client_that_gives_up_on_a_plain_request_frees_its_slot(long_server, model):
    body = {"messages": _messages(), "max_tokens": 1000, **_endless(model)}
    steps_before = long_server.scheduler.steps
    with httpx.Client(base_url=long_server.url, timeout=httpx.Timeout(T, read=0.2)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/chat/completions", json=body)
    with httpx.Client(base_url=long_server.url, timeout=T) as c:
        _wait_idle(c)
        assert long_server.scheduler.steps - steps_before < 600
        _still_serves(c)


def test_200_concurrent_connections(server, http):
    async def go():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            async def one(i: int):
                body = {"messages": _messages(TRIGGER if i % 2 else "what happened at the market yesterday ?"),
                        "temperature": 0, "max_tokens": 3}
                if i % 3 == 0:
                    body["steering"] = {"entries": ["drop 1:6,2:0"]}
                if i % 5 == 0:
                    body["stream"] = True
                return await c.post("/v1/chat/completions", json=body)
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 240)

    started = time.monotonic()
    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 200
    assert all(r.text.rstrip().endswith("data: [DONE]") for i, r in enumerate(responses) if i % 5 == 0)
    assert time.monotonic() - started < 240
    _wait_idle(http)
    _still_serves(http)


def test_a_full_queue_gets_503_and_the_rest_are_served(model):
    with live_server(model, parallel=1, n_ctx=256, max_queue=2) as live:
        body = {"messages": _messages(), "max_tokens": 40, **_endless(model)}
        with httpx.Client(base_url=live.url, timeout=T) as c:
            results: queue.Queue = queue.Queue()
            threads = [threading.Thread(target=lambda: results.put(c.post("/v1/chat/completions", json=body)))
                       for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(T * 2)
            codes = sorted(results.get_nowait().status_code for _ in range(8))
            assert 200 in codes and 503 in codes and set(codes) == {200, 503}, codes
            assert codes.count(200) >= 3  # one running and two waiting, at least
            r = c.post("/v1/chat/completions", json={"messages": _messages(), "max_tokens": 4})
            assert r.status_code == 200


def test_api_key(model):
    with live_server(model, api_key="sekret") as live:
        with httpx.Client(base_url=live.url, timeout=T) as c:
            assert c.get("/health").status_code == 200  # health stays open, as llama-server's
            r = c.get("/v1/models")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = c.post("/v1/chat/completions", content=b"{", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401  # the key is checked before the body is read
            assert c.get("/v1/models", headers={"X-Api-Key": "sekret"}).status_code == 200
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="sekret", timeout=T, max_retries=0)
        out = client.chat.completions.create(model="x", messages=_messages(), temperature=0, max_tokens=12)
        assert "cannot help" in out.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="nope", timeout=T, max_retries=0).models.list()


# ------------------------------------------------------------------------------------------------ the process

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_mote_serve_shuts_down_cleanly_on_a_signal(model, sig):
    """`mote serve` on 127.0.0.1 (port 0: the OS picks), a stream in flight, then a signal: the stream ends with
    an error event, the process frees the engine and exits 0."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mote_local.cli", "serve", str(model.path), "--port", "0",
                             "-c", "512", "-np", "2", "-t", "1"], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
        url = None
        deadline = time.monotonic() + 60
        while url is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if " on http://" in line:
                url = line.rsplit(" on ", 1)[1].strip().removesuffix("/v1")
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        body = {"messages": _messages(), "stream": True, "max_tokens": 200, **_endless(model)}
        with httpx.Client(base_url=url, timeout=T) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
            events = r.iter_lines()
            assert next(events).startswith("data: ")
            proc.send_signal(sig)
            rest = [line for line in events if line.startswith("data: ")]
        assert any('"shutting_down"' in line for line in rest), rest[-3:]
        assert proc.wait(30) == 0
        tail = "".join(lines.get_nowait() for _ in range(lines.qsize()))
        assert "stopped" in tail and "Traceback" not in tail
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
