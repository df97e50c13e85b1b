"""Misuse of the engine API as real programs commit it: closed sessions, closed models, threads. Each case once
killed the interpreter (segfault, std::bad_alloc abort, GGML_ASSERT); now each is a clear Python error, checked in
a child process so that a crash fails the test instead of ending the run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from mote_local.engine import Model
from mote_local.errors import EngineError
from mote_local.steering import Entry, Mode


def _child(code: str, model_path, timeout: float = 120) -> subprocess.CompletedProcess:
    script = (
        "import sys\nfrom mote_local.engine import Model\nfrom mote_local.steering import Entry, Mode\n"
        "from mote_local.errors import EngineError\n"
        f"path = {str(model_path)!r}\n" + textwrap.dedent(code)
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "case",
    [
        # a closed session
        """
    m = Model(path); s = m.session(n_ctx=64); s.close()
    for call in (lambda: s.logits(m.tokenize("hello")), lambda: s.steer([Entry(1, 0, Mode.MASK)]),
                 lambda: s.generate("hello", max_tokens=2), lambda: s.clear_steering()):
        try:
            call()
        except EngineError as err:
            assert "it was closed" in str(err), err
        else:
            raise SystemExit("no error")
    s.close()  # twice is fine
    """,
        # a session whose model was closed
        """
    m = Model(path); s = m.session(n_ctx=64); m.close()
    for call in (lambda: s.steer([Entry(1, 0, Mode.MASK)]), lambda: s.logits([1, 2, 3]), lambda: m.tokenize("x"),
                 lambda: m.session()):
        try:
            call()
        except EngineError as err:
            assert "closed" in str(err), err
        else:
            raise SystemExit("no error")
    """,
        # a capture left open when its session closes: results stay readable
        """
    m = Model(path); s = m.session(n_ctx=64)
    with s.capture() as cap:
        s.logits(m.tokenize("hello there"))
        s.close()
    assert cap.stats().counts.sum() > 0
    """,
    ],
)
def test_use_after_close_is_an_error_not_a_crash(tiny_path, case):
    result = _child(case, tiny_path("qwen3moe"))
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-2000:]}"


def test_a_session_shared_by_threads_is_serialised(tiny_path):
    """One thread steers and clears, others decode and capture: no crash, and every decode sees either the
    steered or the unsteered model, never a mixture."""
    with Model(tiny_path("qwen3moe")) as model, model.session(n_ctx=128) as s:
        tokens = model.tokenize("what happened in the city yesterday")
        layer = model.layout.moe_layers[1]
        steering = [Entry(layer, e, Mode.MASK) for e in range(3)]
        plain = s.logits(tokens)[-1]
        s.steer(steering)
        steered = s.logits(tokens)[-1]
        s.clear_steering()
        assert not np.array_equal(plain, steered)

        errors: list[BaseException] = []
        seen: list[str] = []
        stop = threading.Event()

        def steerer():
            try:
                while not stop.is_set():
                    s.steer(steering)
                    s.clear_steering()
            except BaseException as err:
                errors.append(err)

        def decoder():
            try:
                for _ in range(25):
                    last = s.logits(tokens)[-1]
                    seen.append(
                        "plain"
                        if np.array_equal(last, plain)
                        else "steered"
                        if np.array_equal(last, steered)
                        else "mixed"
                    )
            except BaseException as err:
                errors.append(err)

        def capturer():
            # one capture at a time per session; other threads' decodes in between are counted too
            try:
                for _ in range(10):
                    with s.capture() as cap:
                        s.logits(tokens[:4])
                    assert cap.stats().tokens.max() >= 4
            except BaseException as err:
                errors.append(err)

        threads = (
            [threading.Thread(target=steerer)]
            + [threading.Thread(target=decoder) for _ in range(2)]
            + [threading.Thread(target=capturer)]
        )
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join(timeout=300)
        stop.set()
        threads[0].join(timeout=60)
        assert not errors, errors
        assert len(seen) == 50 and "mixed" not in seen


def test_model_close_closes_its_sessions(tiny_path):
    model = Model(tiny_path("qwen3moe"))
    sessions = [model.session(n_ctx=64) for _ in range(2)]
    model.close()
    assert all(s.closed for s in sessions)
    with pytest.raises(EngineError, match="its model was closed"):
        sessions[0].logits([1, 2])
    model.close()  # idempotent
