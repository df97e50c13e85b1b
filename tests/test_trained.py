"""The shipped trained model (mote_local/data/trained): its identity, and that fTRI on it reproduces the
experts recorded in its model card (tools/train_moe/experiment.py made them with the same command)."""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files
from pathlib import Path

import pytest
from click.testing import CliRunner

from mote_local.cli.commands import main
from mote_local.modelfile.fingerprint import Fingerprint
from mote_local.modelfile.layout import read_layout

DATA = Path(str(files("mote_local").joinpath("data", "trained")))
RECORD = json.loads((DATA / "expected.json").read_text())
MODEL = DATA / RECORD["file"]


def test_shipped_model_is_the_recorded_one():
    digest = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert digest == RECORD["sha256"], "the shipped GGUF is not the one the model card describes"
    layout = read_layout(MODEL)
    fp = Fingerprint.of_layout(layout)
    assert (fp.arch, fp.n_layer, fp.n_expert, fp.n_expert_used) == tuple(RECORD["shape"])
    assert fp.router_sha256 == RECORD["router_sha256"]
    assert layout.file_type == "Q8_0"
    assert MODEL.stat().st_size <= 20 * 2**20


def test_ftri_reproduces_the_recorded_top_experts(tmp_path):
    rec = RECORD["ftri"]
    out = tmp_path / "ftri"
    result = CliRunner().invoke(
        main,
        [
            "ftri",
            str(MODEL),
            "--prompts",
            str(DATA / rec["prompts"]),
            "--behavior",
            "de",
            "--baseline",
            "en",
            "--scope",
            rec["scope"],
            "--method",
            rec["method"],
            "--top",
            str(len(rec["top"])),
            "--per-layer-cap",
            str(rec["per_layer_cap"]),
            "--n-boot",
            "20",
            "--raw",  # the recorded run fed plain text: the model ships no chat template (ChatML would be used)
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    top = json.loads((out / "ftri.json").read_text())["top"][rec["method"]]
    assert [(t["layer"], t["expert"]) for t in top] == [tuple(x) for x in rec["top"]]
    for got, want in zip(top, rec["scores"]):
        assert got["score"] == pytest.approx(want, abs=1e-4)
    profile = json.loads((out / "profile.json").read_text())
    assert {(e["layer"], e["expert"]) for e in profile["entries"]} == {tuple(x) for x in rec["top"]}


def test_demo_runs_the_experiment_on_the_trained_model(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--model", "trained", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    top4 = sorted(tuple(x) for x in RECORD["ftri"]["top"][:4])
    assert "drop the top 4: " + ", ".join(f"{l}:{e}" for l, e in top4) in result.output
    assert "switching them off does not stop German continuations" in result.output
    assert (tmp_path / "demo" / "report.html").is_file()
