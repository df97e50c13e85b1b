"""The `mote` CLI and the chat REPL, driven like a person would, on tiny generated models."""

import filecmp
import json

import pytest
from click.testing import CliRunner

from mote_local.cli.commands import main
from mote_local.engine.model import Session
from mote_local.evaluation import super_experts
from mote_local.modelfile.layout import read_layout
from mote_local.steering.entries import Entry, Mode
from mote_local.steering.profile import Profile
from mote_local.synthetic import planted, tiny

PROMPT = "what happened in the city yesterday"
TRIGGER = planted.EXAMPLE_TRIGGER
pytestmark = pytest.mark.usefixtures("private_cache")


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
    off = Profile.from_entries(
        [Entry(l, e, Mode.MASK) for l in layout.moe_layers for e in (0, 1, 2, 3)], model_path=qwen
    )
    path = off.save(tmp_path / "off.json")
    assert generate(qwen, "--profile", path) == generate(qwen, "--off", all_layers(qwen, [0, 1, 2, 3]))
    # a profile for another model is refused unless forced (test_hardening: the override)
    r = CliRunner().invoke(main, ["run", str(tiny_path("olmoe")), "-p", PROMPT, "--profile", str(path)])
    assert r.exit_code == 1 and "--force-profile" in r.output
    r = CliRunner().invoke(main, ["run", qwen, "-p", PROMPT, "--off", "99:0"])
    assert r.exit_code == 1 and "not an MoE layer" in r.output
    r = CliRunner().invoke(main, ["run", qwen, "-p", PROMPT, "--bias", "1:2"])
    assert r.exit_code == 1 and "LAYER:EXPERT=VALUE" in r.output
    r = CliRunner().invoke(main, ["run", str(tiny_path(tiny.DENSE)), "-p", PROMPT])
    assert r.exit_code == 1 and "dense" in r.output


def test_profile_commands(qwen, tmp_path):
    layout = read_layout(qwen)
    a = Profile.from_entries([Entry(layout.moe_layers[0], 1, Mode.BIAS, 1.5)], model_path=qwen, name="a")
    b = Profile.from_entries(
        [Entry(layout.moe_layers[0], 1, Mode.BIAS, 0.5), Entry(layout.moe_layers[1], 2, Mode.DROP)],
        model_path=qwen,
        name="b",
    )
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
    script = (
        "\n".join(
            [
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
            ]
        )
        + "\n"
    )
    r = mote("chat", qwen, "-n", 8, input=script)
    out = r.output
    assert r.exit_code == 0
    assert f"steering: mask {l0}:0, mask {l0}:1" in out
    assert "routing of the last reply" in out and f"{l0}:0 mask" in out
    assert "unsteered" in out and " | " in out
    assert "LAYER:EXPERT=VALUE" in out  # /bias without a value
    assert "unknown command /bogus" in out
    assert "/strength needs a number" in out
    assert Profile.load(tmp_path / "chat.json").entries == (Entry(l0, 0, Mode.MASK), Entry(l0, 1, Mode.MASK))
    assert f"gain {l0}:3=2@decode" in out
    assert "steering cleared" in out and "none" in out
    assert "/quit" in out  # the help text
    assert "never read" not in out


def test_chat_trace_before_any_reply(qwen):
    out = mote("chat", qwen, input="/trace\n/diff\n").output
    assert "no reply yet" in out


# ---------------------------------------------------------------------------------------------- issue 13


def test_another_models_profile_names_the_override_flag_and_the_override_applies_it(qwen, tiny_path, tmp_path):
    other = Profile.from_entries([Entry(0, 1, Mode.MASK)], model_path=tiny_path("olmoe")).save(tmp_path / "o.json")
    refused = CliRunner().invoke(main, ["run", qwen, "-p", PROMPT, "-n", 4, "--profile", str(other)])
    assert refused.exit_code == 1 and "pass --force-profile to apply it anyway" in refused.output
    forced = generate(qwen, "--profile", other, "--force-profile")
    assert forced == generate(qwen, "--off", "0:1")
    chat = mote("chat", qwen, "-n", 4, "--profile", other, "--force-profile", input="/profile show\n")
    assert chat.exit_code == 0 and "mask 0:1" in chat.output
    assert "fits" in mote("profile", "validate", other, qwen, "--force-profile").output


def test_super_expert_warning_needs_no_earlier_scan_and_names_the_flag(planted_files, tmp_path, monkeypatch):
    path, truth = planted_files
    layer, expert = truth.super_expert
    measured = []
    measure = super_experts._kl_switched_off
    monkeypatch.setattr(
        super_experts,
        "_kl_switched_off",
        lambda model, toks, experts, *a: (measured.extend(experts), measure(model, toks, experts, *a))[1],
    )
    r = CliRunner().invoke(main, ["run", str(path), "-p", "hello", "-n", 4, "--off", f"{layer}:{expert}"])
    assert r.exit_code == 0
    assert f"warning: --off {layer}:{expert} switches off layer {layer} expert {expert}, a super-expert" in r.stderr
    assert "super-expert" in r.stderr and "the profile" not in r.stderr
    n_layer_experts = len(read_layout(path).moe_layers) * read_layout(path).n_expert
    assert (layer, expert) in measured and len(measured) < n_layer_experts / 2  # a spot check, not a scan
    # a profile file is named as the origin, and the measurements are reused
    profile = Profile.from_entries([Entry(layer, expert, Mode.DROP)], model_path=path).save(tmp_path / "p.json")
    measured.clear()
    r = CliRunner().invoke(main, ["run", str(path), "-p", "hello", "-n", 4, "--profile", str(profile)])
    assert f"warning: the profile {profile} switches off layer {layer} expert {expert}" in r.stderr
    assert measured == []
    # an ordinary expert gets no warning
    planted_expert = truth.planted[0]
    r = CliRunner().invoke(main, ["run", str(path), "-p", "hello", "-n", 4, "--drop", "{}:{}".format(*planted_expert)])
    assert r.exit_code == 0 and "warning" not in r.stderr


def test_n_minus_one_generates_to_the_end_and_n_zero_says_it_generated_nothing(planted_files):
    path = str(planted_files[0])
    r = mote("run", path, "--chat", "-p", TRIGGER, "-n", -1)
    assert r.stdout.strip() == planted.REFUSAL_TEXT
    r = mote("run", path, "--chat", "-p", TRIGGER, "-n", 0)
    assert r.exit_code == 0 and r.stdout == "" and "nothing generated: -n 0" in r.stderr
    r = mote("chat", path, "-n", -1, input=TRIGGER + "\n")
    assert planted.REFUSAL_TEXT in r.output
    r = CliRunner().invoke(main, ["chat", path, "-n", 0])
    assert r.exit_code == 2 and "-n 0 would make every reply empty" in r.stderr


@pytest.fixture
def session_threads(monkeypatch):
    """The n_threads of every Session opened, in order."""
    seen = []
    init = Session.__init__

    def record(self, model, *args, n_threads=None, **kwargs):
        seen.append(n_threads or model.n_threads)  # a session's own count, else its model's default
        init(self, model, *args, n_threads=n_threads, **kwargs)

    monkeypatch.setattr(Session, "__init__", record)
    return seen


def test_threads_reach_every_context_a_command_opens(qwen, planted_files, tmp_path, session_threads):
    generate(qwen, "-t", 1, "--off", "1:2")  # the run's context and the super-expert check's
    assert session_threads == [1, 1]
    session_threads.clear()
    r = mote(
        "ftri",
        planted_files[0],
        "--prompts",
        planted.prompts_path(),
        "--n-boot",
        5,
        "--out",
        tmp_path / "f",
        "--threads",
        2,
    )
    assert r.exit_code == 0 and session_threads == [2]
    session_threads.clear()
    assert mote("chat", qwen, "-t", 1, input="hi\n").exit_code == 0 and session_threads == [1]
    session_threads.clear()
    prompts = tmp_path / "two.txt"
    prompts.write_text("what happened at the protest yesterday ?\nwhat happened at the market yesterday ?\n")
    r = mote(
        "eval",
        planted_files[0],
        "--prompts",
        prompts,
        "--off",
        "1:6",
        "-n",
        2,
        "--n-random",
        1,
        "-t",
        1,
        "--out",
        tmp_path / "e",
    )
    assert r.exit_code == 0, r.output
    assert session_threads and set(session_threads) == {1}


def test_ftri_baseline_prompts_file_is_the_baseline_next_to_a_prompt_set_with_classes(planted_files, tmp_path):
    baseline = tmp_path / "calm.txt"
    baseline.write_text("What happened at the market yesterday?\nWho organized the picnic near the river?\n")
    r = mote(
        "ftri",
        planted_files[0],
        "--prompts",
        planted.prompts_path(),
        "--baseline-prompts",
        baseline,
        "--n-boot",
        5,
        "--top",
        2,
        "--out",
        tmp_path / "f",
    )
    assert r.exit_code == 0, r.output
    assert "36 behaviour (trigger) vs 2 baseline (calm) prompts" in r.output
    assert json.loads((tmp_path / "f" / "ftri.json").read_text())["n_baseline"] == 2
    r = CliRunner().invoke(
        main,
        [
            "ftri",
            str(planted_files[0]),
            "--prompts",
            str(planted.prompts_path()),
            "--baseline-prompts",
            str(baseline),
            "--baseline",
            "neutral",
        ],
    )
    assert r.exit_code == 2 and "give one of them" in r.stderr


def test_ftri_refuses_the_thinking_scope_on_a_model_without_think_markers(planted_files, tmp_path):
    r = CliRunner().invoke(
        main,
        [
            "ftri",
            str(planted_files[0]),
            "--prompts",
            str(planted.prompts_path()),
            "--scope",
            "thinking",
            "--out",
            str(tmp_path / "f"),
        ],
    )
    assert r.exit_code == 1 and "<think>" in r.stderr and "choose another scope" in r.stderr
    assert not (tmp_path / "f").exists()


def test_ftri_out_must_be_a_directory_and_its_json_is_not_a_profile(planted_files, qwen, tmp_path):
    prompts = tmp_path / "prompts.toml"
    prompts.write_bytes(planted.prompts_path().read_bytes())
    r = CliRunner().invoke(main, ["ftri", str(planted_files[0]), "--prompts", str(prompts), "--out", str(prompts)])
    assert r.exit_code == 2 and "is a file; --out names a directory" in r.stderr
    assert (
        mote(
            "ftri", planted_files[0], "--prompts", prompts, "--n-boot", 5, "--top", 2, "--out", tmp_path / "f"
        ).exit_code
        == 0
    )
    ftri_json = tmp_path / "f" / "ftri.json"
    r = CliRunner().invoke(main, ["run", str(planted_files[0]), "-p", "hi", "--profile", str(ftri_json)])
    assert r.exit_code == 1 and "is an fTRI result, not a steering profile" in r.stderr
    assert str(tmp_path / "f" / "profile.json") in r.stderr


def test_demo_export_writes_the_walk_through_files_with_full_paths(planted_files, tmp_path, monkeypatch):
    monkeypatch.setenv("MOTE_CACHE_DIR", str(planted_files[0].parent.parent))
    monkeypatch.chdir(tmp_path)
    r = mote("demo", "--export", "walk")
    target = (tmp_path / "walk").resolve()
    assert f"wrote {target / 'planted.gguf'}" in r.output and f"wrote {target / 'prompts.toml'}" in r.output
    assert filecmp.cmp(target / "planted.gguf", planted_files[0], shallow=False)
    assert filecmp.cmp(target / "prompts.toml", planted.prompts_path(), shallow=False)
    assert mote("demo", "--export", "walk").exit_code == 0  # again: the same files, nothing to refuse
    (target / "prompts.toml").write_text("mine")
    r = CliRunner().invoke(main, ["demo", "--export", "walk"])
    assert r.exit_code == 1 and "prompts.toml already exists" in r.stderr
    assert (target / "prompts.toml").read_text() == "mine"
