"""The `mote` CLI and the chat REPL, driven like a person would, on tiny generated models."""

import json

import pytest
from click.testing import CliRunner

from mote_local.cli.commands import main
from mote_local.modelfile.layout import read_layout
from mote_local.steering.entries import Entry, Mode
from mote_local.steering.profile import Profile
from mote_local.synthetic import tiny

PROMPT = "what happened in the city yesterday"


@pytest.fixture(scope="module")
def qwen(tiny_path):
    return str(tiny_path("qwen3moe"))


def mote(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def all_layers(path, experts, suffix=""):
    layout = read_layout(path)
    return ",".join(f"{l}:{e}{suffix}" for l in layout.moe_layers for e in experts)


def generate(model, *flags):
    r = mote("run", model, "-p", PROMPT, "-n", 12, *flags)
    assert r.exit_code == 0, r.output
    return r.output


def test_inspect_fields(tiny_path):
    r = mote("inspect", tiny_path("deepseek2"))
    assert r.exit_code == 0
    for text in ("deepseek2", "top-4", "4 groups (2 used)", "sigmoid", "shared experts", "quantization"):
        assert text in r.output
    data = json.loads(mote("inspect", tiny_path("qwen2moe"), "--json").output)
    assert data["arch"] == "qwen2moe" and data["n_shared_experts"] == 1 and data["norm_weights"] is False
    assert "dense" in mote("inspect", tiny_path(tiny.DENSE)).output


def test_inspect_bad_file(tmp_path):
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing.gguf")])
    assert r.exit_code == 1 and "model file not found" in r.output
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    r = CliRunner().invoke(main, ["inspect", str(junk)])
    assert r.exit_code == 1 and "not a GGUF file" in r.output


def test_run_idle_is_deterministic_and_each_flag_steers(qwen):
    idle = generate(qwen)
    assert idle == generate(qwen)
    busy = [0, 1, 2, 3]
    changed = {
        "--off": generate(qwen, "--off", all_layers(qwen, busy)),
        "--drop": generate(qwen, "--drop", all_layers(qwen, busy)),
        "--force": generate(qwen, "--force", all_layers(qwen, [5])),
        "--bias": generate(qwen, "--bias", all_layers(qwen, [6, 7], "=4")),
        "--gain": generate(qwen, "--gain", all_layers(qwen, busy, "=4")),
    }
    for flag, out in changed.items():
        assert out != idle, flag
    # strength 0 turns biases off again
    assert generate(qwen, "--bias", all_layers(qwen, [6, 7], "=4"), "--strength", 0) == idle


def test_run_compare_shows_both(qwen):
    idle = generate(qwen).strip()
    r = mote("run", qwen, "-p", PROMPT, "-n", 12, "--compare", "--off", all_layers(qwen, [0, 1, 2, 3]))
    lines = r.output.splitlines()
    assert lines[0].startswith("unsteered:") and lines[1].startswith("steered:")
    assert lines[0].removeprefix("unsteered:").strip() == idle
    assert lines[1].removeprefix("steered:").strip() != idle


def test_run_with_profiles_and_errors(qwen, tiny_path, tmp_path):
    layout = read_layout(qwen)
    off = Profile.from_entries([Entry(l, e, Mode.MASK) for l in layout.moe_layers for e in (0, 1, 2, 3)],
                               model_path=qwen)
    path = off.save(tmp_path / "off.json")
    assert generate(qwen, "--profile", path) == generate(qwen, "--off", all_layers(qwen, [0, 1, 2, 3]))
    # a profile for another model is refused unless forced
    r = CliRunner().invoke(main, ["run", str(tiny_path("olmoe")), "-p", PROMPT, "--profile", str(path)])
    assert r.exit_code == 1 and "--force" in r.output
    r = CliRunner().invoke(main, ["run", qwen, "-p", PROMPT, "--off", "99:0"])
    assert r.exit_code == 1 and "not an MoE layer" in r.output
    r = CliRunner().invoke(main, ["run", qwen, "-p", PROMPT, "--bias", "1:2"])
    assert r.exit_code == 1 and "LAYER:EXPERT=VALUE" in r.output
    r = CliRunner().invoke(main, ["run", str(tiny_path(tiny.DENSE)), "-p", PROMPT])
    assert r.exit_code == 1 and "dense" in r.output


def test_profile_commands(qwen, tmp_path):
    layout = read_layout(qwen)
    a = Profile.from_entries([Entry(layout.moe_layers[0], 1, Mode.BIAS, 1.5)], model_path=qwen, name="a")
    b = Profile.from_entries([Entry(layout.moe_layers[0], 1, Mode.BIAS, 0.5), Entry(layout.moe_layers[1], 2, Mode.DROP)],
                             model_path=qwen, name="b")
    pa, pb = a.save(tmp_path / "a.json"), b.save(tmp_path / "b.gguf")
    assert mote("profile", "merge", pa, pb, "-o", tmp_path / "m.json").exit_code == 0
    merged = Profile.load(tmp_path / "m.json")
    assert {(e.mode, e.value) for e in merged.entries} == {(Mode.BIAS, 2.0), (Mode.DROP, 0.0)}
    assert mote("profile", "convert", tmp_path / "m.json", tmp_path / "m.gguf").exit_code == 0
    assert Profile.load(tmp_path / "m.gguf") == merged
    shown = mote("profile", "show", tmp_path / "m.gguf").output
    assert "2 entries" in shown and "qwen3moe" in shown and "bias" in shown
    assert "fits" in mote("profile", "validate", tmp_path / "m.json", qwen).output


def test_chat_repl_commands(qwen, tmp_path):
    layout = read_layout(qwen)
    l0 = layout.moe_layers[0]
    script = "\n".join([
        "what happened in the city",
        f"/off {l0}:0,{l0}:1",
        "/trace",
        "/diff",
        "/bias 1:2",
        "/bogus",
        "/strength x",
        f"/profile save {tmp_path / 'chat.json'}",
        "/profile show",
        "/scope decode",
        f"/gain {l0}:3=2",
        "/profile show",
        "/reset",
        "/profile show",
        "/help",
        "/quit",
        "never read",
    ]) + "\n"
    r = mote("chat", qwen, "-n", 8, input=script)
    out = r.output
    assert r.exit_code == 0
    assert f"steering: mask {l0}:0, mask {l0}:1" in out
    assert "routing of the last reply" in out and f"{l0}:0 mask" in out
    assert "unsteered" in out and " | " in out
    assert "LAYER:EXPERT=VALUE" in out                      # /bias without a value
    assert "unknown command /bogus" in out
    assert "/strength needs a number" in out
    assert Profile.load(tmp_path / "chat.json").entries == (Entry(l0, 0, Mode.MASK), Entry(l0, 1, Mode.MASK))
    assert f"gain {l0}:3=2@decode" in out
    assert "steering and history cleared" in out and "none" in out
    assert "/quit" in out                                    # the help text
    assert "never read" not in out


def test_chat_trace_before_any_reply(qwen):
    out = mote("chat", qwen, input="/trace\n/diff\n").output
    assert "no reply yet" in out
