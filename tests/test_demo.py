"""`mote demo`, `mote eval` and the super-expert guard, end to end on the planted model."""

import json

from click.testing import CliRunner

from mote_local.cli.commands import main
from mote_local.steering.entries import Mode
from mote_local.steering.profile import Profile
from mote_local.synthetic import planted


def test_demo_end_to_end(tmp_path, monkeypatch, planted_files):
    monkeypatch.setenv("MOTE_CACHE_DIR", str(planted_files[0].parent.parent))
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    line = next(l for l in r.output.splitlines() if "planted experts ranked" in l)
    assert {part.split(" #")[1] for part in line.split("ranked ")[1].split(", ")} == {"1", "2"}
    assert "0.0% [0.0%" in r.output.split("\nprofile")[1].split("\n")[0]  # the profile removed the behaviour
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "random control" in html and "data:image/png;base64," in html
    data = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert data["partial"] is False


def test_eval_cli_and_super_expert_guard(tmp_path, monkeypatch, planted_files):
    monkeypatch.setenv("MOTE_CACHE_DIR", str(tmp_path / "cache"))
    path, truth = planted_files
    profile = Profile.from_entries(truth.entries(Mode.DROP), model_path=path).save(tmp_path / "truth.json")
    r = CliRunner().invoke(
        main,
        [
            "eval",
            str(path),
            "--prompts",
            str(planted.prompts_path()),
            "--class",
            "trigger",
            "--profile",
            str(profile),
            "--n-random",
            "2",
            "-n",
            "12",
            "--out",
            str(tmp_path / "eval"),
        ],
    )
    assert r.exit_code == 0, r.output
    rows = {line.split("  ")[0].strip(): line for line in r.output.splitlines()}
    assert "100.0%" in rows["unsteered"] and "0.0%" in rows["profile"]
    assert "100.0%" in rows["random control (pooled)"]
    assert (tmp_path / "eval" / "report.html").exists()

    # the guard: found by inspect, then every command that switches the expert off warns
    r = CliRunner().invoke(main, ["inspect", str(path), "--super-experts"])
    layer, expert = truth.super_expert
    assert r.exit_code == 0 and f"layer {layer} expert {expert}" in r.output
    r = CliRunner().invoke(main, ["run", str(path), "-p", "hello", "-n", "4", "--drop", f"{layer}:{expert}"])
    assert r.exit_code == 0 and "super-expert" in r.output


def test_eval_needs_a_profile(planted_files):
    r = CliRunner().invoke(main, ["eval", str(planted_files[0]), "--prompts", str(planted.prompts_path())])
    assert r.exit_code == 2 and "--profile" in r.output
