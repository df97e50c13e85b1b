"""The chat REPL as a daily user drives it: toggles that replace each other, /reset and /clear, REPL-worded
errors, Ctrl-C and Ctrl-D, and line editing with history in a real pseudo-terminal."""

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mote_local.cli.commands import main
from mote_local.engine.model import Session
from mote_local.ftri.outputs import FTRI_FORMAT
from mote_local.steering.entries import Entry, Mode
from mote_local.steering.profile import Profile
from mote_local.synthetic import planted

pytestmark = pytest.mark.usefixtures("private_cache")


ROOT = Path(__file__).resolve().parents[1]


def chat(model, *lines, args=()):
    r = CliRunner().invoke(
        main,
        ["chat", str(model), "-n", "12", *map(str, args)],
        input="".join(line + "\n" for line in lines),
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    return r.output


def test_a_toggle_replaces_what_its_expert_cannot_keep_and_unset_removes_it(planted_files):
    out = chat(
        planted_files[0],
        "/bias 1:6=-5",
        "/bias 1:6=-inf",
        "/off 1:6",
        "/gain 2:0=2",
        "/bias 2:0=1",
        "/unset 1:6",
        "/unset 3:3",
        "/quit",
    )
    steering = [line.split("steering: ", 1)[1] for line in out.splitlines() if "steering: " in line]
    assert steering == [
        "bias 1:6=-5",
        "bias 1:6=-inf",
        "mask 1:6",
        "mask 1:6, gain 2:0=2",
        "mask 1:6, bias 2:0=1, gain 2:0=2",
        "bias 2:0=1, gain 2:0=2",
        "bias 2:0=1, gain 2:0=2 (3:3 had no steering)",
    ]
    assert "error" not in out


def test_reset_clears_the_steering_and_clear_the_conversation(planted_files):
    out = chat(
        planted_files[0],
        planted.EXAMPLE_TRIGGER,
        "/drop 1:6,2:0",
        "/reset",
        "/diff",
        "/off 1:6",
        "/clear",
        "/trace",
        "/profile show",
        "/quit",
    )
    assert "steering cleared (the conversation goes on" in out
    assert "unsteered" in out and " | " in out  # /diff after /reset: the last turn is still there
    assert "conversation cleared (steering: mask 1:6)" in out
    assert "no reply yet" in out  # /trace after /clear
    assert "> mask 1:6" in out  # /profile show after /clear: the steering stays


def test_errors_name_the_repl_command_not_the_cli_flag(planted_files):
    out = chat(planted_files[0], "/bias 1:2", "/off 1-2", "/drop", "/quit")
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 3 and all("--" not in e for e in errors), errors
    assert "/bias '1:2': a value is required" in errors[0] and "e.g. /bias 3:17=-2.5" in errors[0]
    assert "/off '1-2'" in errors[1] and "/drop needs LAYER:EXPERT" in errors[2]


def test_trace_has_a_legend(planted_files):
    out = chat(planted_files[0], planted.EXAMPLE_TRIGGER, "/trace", "/quit")
    legend = next(line for line in out.splitlines() if line.startswith("shades: "))
    assert "'  ' 0%" in legend and "'@@' 100%" in legend


def test_ctrl_c_in_diff_marks_what_was_cut_short(planted_files, monkeypatch):
    calls, interrupt_at = [], {2, 4}
    generate = Session.generate

    def interrupted(_text):
        raise KeyboardInterrupt

    def generate_or_interrupt(self, prompt, **kw):
        calls.append(1)
        if len(calls) in interrupt_at:  # Ctrl-C on the first token of this reply
            kw["on_token"] = interrupted
        return generate(self, prompt, **kw)

    monkeypatch.setattr(Session, "generate", generate_or_interrupt)
    out = chat(planted_files[0], planted.EXAMPLE_TRIGGER, "/diff", "/diff", "/quit")
    assert "unsteered [interrupted]" in out and "steered [not generated: interrupted]" in out  # 2nd call
    assert "steered [interrupted]" in out.split("not generated")[1]  # 4th call


def test_ctrl_d_finishes_the_prompt_line(planted_files):
    out = chat(planted_files[0], "/help")
    assert out.endswith("> \n")


def test_profile_save_never_creates_a_directory(planted_files, tmp_path):
    out = chat(planted_files[0], "/off 1:6", f"/profile save {tmp_path / 'missing' / 'p.json'}", "/quit")
    assert f"the directory {tmp_path / 'missing'} does not exist" in out
    assert not (tmp_path / "missing").exists()


def test_profile_load_of_another_models_profile_and_of_ftri_json(planted_files, tiny_path, tmp_path):
    other = Profile.from_entries([Entry(1, 6, Mode.DROP)], model_path=tiny_path("qwen3moe")).save(tmp_path / "o.json")
    ftri_json = tmp_path / "ftri.json"
    ftri_json.write_text(json.dumps({"format": FTRI_FORMAT, "version": 1}))
    out = chat(
        planted_files[0],
        f"/profile load {other}",
        f"/profile load --any-model {other}",
        "/profile show",
        f"/profile load {ftri_json}",
        "/quit",
    )
    assert f"load it with /profile load --any-model {other} to apply it anyway" in out
    assert f"loaded {other}: drop 1:6" in out
    assert f"is an fTRI result, not a steering profile: use {tmp_path / 'profile.json'}" in out


def test_switching_off_a_super_expert_warns_without_an_earlier_scan(planted_files):
    path, truth = planted_files
    layer, expert = truth.super_expert
    out = chat(path, f"/off {layer}:{expert}", "/drop {}:{}".format(*truth.planted[0]), "/quit")
    warnings = [line for line in out.splitlines() if "warning:" in line]
    assert len(warnings) == 1  # once, when it is switched off; not again on the next toggle
    assert f"layer {layer} expert {expert} is a super-expert of {path.name}" in warnings[0]
    assert f"/unset {layer}:{expert} switches it back on" in warnings[0]


# ---------------------------------------------------------------------------------------------- a terminal


class Terminal:
    """The chat in a pseudo-terminal: what a person types, byte for byte, and what the screen shows."""

    def __init__(self, args, env):
        self.fd, child = pty.openpty()
        self.proc = subprocess.Popen(
            args, stdin=child, stdout=child, stderr=child, env=env, cwd=ROOT, start_new_session=True
        )
        os.close(child)
        self.screen = b""

    def expect(self, text: str, count: int = 1, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.screen.count(text.encode()) < count:
            assert time.monotonic() < deadline, f"{text!r} x{count} not seen; screen:\n{self.screen.decode()}"
            if select.select([self.fd], [], [], 0.5)[0]:
                try:
                    self.screen += os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    break

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.fd)


UP, LEFT, ENTER = "\x1b[A", "\x1b[D", "\r"


def test_line_editing_and_history_in_a_terminal(planted_files, tmp_path):
    pytest.importorskip("readline", reason="this Python has no readline: the chat reads plain lines")
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOTE_CACHE_DIR": str(cache), "TERM": "xterm"}
    term = Terminal([sys.executable, "-m", "mote_local.cli", "chat", str(planted_files[0]), "-n", "12"], env)
    try:
        term.expect("> ")
        term.type(planted.EXAMPLE_TRIGGER + ENTER)
        term.expect(planted.REFUSAL_TEXT)
        term.expect("> ", 2)
        term.type(UP + ENTER)  # the last line again
        term.expect(planted.REFUSAL_TEXT, 2)
        term.expect("> ", 3)
        term.type("/profile sow" + LEFT * 2 + "h" + ENTER)  # a letter put in the middle of the line
        term.expect("none")
        term.type("/quit" + ENTER)
        assert term.proc.wait(timeout=60) == 0
    finally:
        term.close()
    assert b"^[[A" not in term.screen and b"unknown command" not in term.screen
    history = (cache / "chat-history").read_text().splitlines()
    assert history[-3:] == [planted.EXAMPLE_TRIGGER, "/profile show", "/quit"]
