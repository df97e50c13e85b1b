"""The profile fTRI exports: only experts with evidence, in the direction asked, never a flagged super-expert
unless insisted on; graded router biases from the log odds ratio (issue 12)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mote_local.cli.commands import main
from mote_local.engine.model import Model
from mote_local.errors import MoteError
from mote_local.ftri.capture import capture_activations, run_ftri
from mote_local.ftri.export import export_profile, profile_from_ranking
from mote_local.ftri.outputs import read_ranking
from mote_local.ftri.stats import FtriResult, analyse, score
from mote_local.prompts import load_prompt_set, select_classes
from mote_local.steering.entries import Mode
from mote_local.steering.profile import Profile
from mote_local.synthetic import planted


@pytest.fixture(scope="module")
def model(planted_files):
    with Model(planted_files[0]) as m:
        yield m


@pytest.fixture(scope="module")
def capture(model):
    behavior, baseline = select_classes(load_prompt_set(planted.prompts_path()), "trigger", "neutral")
    run = capture_activations(model, behavior, baseline, show_progress=False)
    return run, analyse(run.activations, "mean_diff", n_boot=100)


def test_default_export_holds_only_the_experts_with_evidence(planted_files, tmp_path):
    """Issue 12, reproduction 1: `mote ftri MODEL --prompts P` (top 10 by default) on the planted model used to
    write a profile that forced the zero-score super-expert 0:3 and distractors 1:0 and 2:1 and dropped
    experts whose intervals include 0. Two experts carry signal; the profile holds those two and says so."""
    path, truth = planted_files
    out = tmp_path / "ftri"
    r = CliRunner().invoke(
        main, ["ftri", str(path), "--prompts", str(planted.prompts_path()), "--out", str(out), "--n-boot", "100"]
    )
    assert r.exit_code == 0, r.output
    profile = Profile.load(out / "profile.json")
    assert {(e.layer, e.expert) for e in profile.entries} == set(truth.planted)
    assert {e.mode for e in profile.entries} == {Mode.DROP}  # nothing forced
    assert "profile: 2 expert(s) more active on the behaviour with evidence" in r.output
    assert "exported 2 (--top 10)" in r.output
    record = json.loads((out / "ftri.json").read_text())["export"]
    assert record["n_qualified"] == 2 and record["top"] == 10
    assert sorted(map(tuple, record["exported"])) == sorted(truth.planted)
    assert profile.metadata["export"]["n_qualified"] == 2
    header, *rows = (out / "ftri_mean_diff.csv").read_text().splitlines()
    assert header.endswith("band_low,band_high,stability,evidence")
    assert sum(row.endswith(",1") for row in rows) >= 2


def test_export_follows_the_sign(model, capture, planted_files):
    run, result = capture
    truth = planted_files[1]
    pos = export_profile(result, model, top=10)
    assert [(r.layer, r.expert) for r in pos.chosen] == list(truth.planted) and pos.n_qualified == 2
    neg = export_profile(result, model, top=10, sign="negative")
    # experts that lose their slot to the planted ones on trigger prompts: forced on, at most k per layer
    assert neg.chosen and all(r.score < 0 for r in neg.chosen)
    assert {e.mode for e in neg.profile.entries} == {Mode.FORCE}
    neg.profile.validate(model.layout)
    assert any("the engine would refuse it" in why for _, why in neg.skipped)
    both = export_profile(result, model, top=10, sign="abs")
    for e, r in zip(both.profile.entries, sorted(both.chosen, key=lambda r: (r.layer, r.expert))):
        assert e.mode is (Mode.DROP if r.score > 0 else Mode.FORCE)
    forced = export_profile(result, model, top=10, force_positive=True)
    assert {e.mode for e in forced.profile.entries} == {Mode.FORCE}
    masked = export_profile(result, model, top=1, off_mode="mask")
    assert [e.mode for e in masked.profile.entries] == [Mode.MASK] and masked.n_qualified == 2


def test_threshold_and_evidence_kind(model, capture):
    _, result = capture
    assert export_profile(result, model, threshold=0.6).chosen == []
    loose = export_profile(result, model, evidence="per-expert", threshold=0.0)
    assert loose.n_qualified >= 2
    summary = export_profile(result, model, threshold=0.6).summary()
    assert "0 expert(s)" in summary and "no expert qualified" in summary


def test_a_flagged_super_expert_is_never_steered_unless_asked(model):
    """A result in which the super-expert 0:3 has the strongest evidence of all: left out, and the summary says
    why; with include_super_experts it is switched off like any other."""
    scores = np.zeros((4, 8))
    scores[0, 3], scores[1, 6] = 0.9, 0.5
    res = FtriResult(
        "mean_diff",
        scores=scores,
        ci_low=scores - 0.05,
        ci_high=scores + 0.05,
        stability=np.zeros((4, 8)),
        top_n=10,
        sign="positive",
        n_behavior=30,
        n_baseline=30,
        se=np.full((4, 8), 0.02),
        band_crit=3.0,
    )
    export = export_profile(res, model, top=10, super_experts={(0, 3)})
    assert [(e.layer, e.expert) for e in export.profile.entries] == [(1, 6)]
    assert export.n_qualified == 2
    assert [(r.layer, r.expert) for r, _ in export.skipped] == [(0, 3)]
    assert "super-expert" in export.summary() and "--include-super-experts" in export.summary()
    anyway = export_profile(res, model, top=10, super_experts={(0, 3)}, include_super_experts=True)
    assert [(e.layer, e.expert) for e in anyway.profile.entries] == [(0, 3), (1, 6)]
    forced = export_profile(res, model, top=10, super_experts={(0, 3)}, force_positive=True)
    assert (0, 3) not in {(e.layer, e.expert) for e in forced.profile.entries}


def test_graded_export_is_a_bias_proportional_to_the_log_odds_ratio(model, capture, planted_files):
    run, result = capture
    log_ratio = score(run.activations, "log_odds")
    export = export_profile(result, model, graded=0.5, log_ratio=log_ratio)
    assert [(e.layer, e.expert) for e in export.profile.entries] == list(planted_files[1].planted)
    for e in export.profile.entries:
        assert e.mode is Mode.BIAS and e.value == pytest.approx(-0.5 * log_ratio[e.layer, e.expert])
        assert e.value < -3  # the planted experts' odds rise ~1400-fold on trigger prompts
    with pytest.raises(MoteError, match="--graded takes alpha > 0"):
        export_profile(result, model, graded=0.0, log_ratio=log_ratio)
    with pytest.raises(MoteError, match="needs the log_odds scores"):
        export_profile(result, model, graded=1.0)


def test_graded_profile_composes_with_strength(model, capture, planted_files):
    """The graded profile removes the refusals at strength 1; at strength 0 it steers nothing."""
    run, result = capture
    profile = export_profile(result, model, graded=1.0, log_ratio=score(run.activations, "log_odds")).profile
    prompt = model.format_chat([{"role": "user", "content": "What happened at the riot yesterday?"}])
    with model.session(n_ctx=256) as s:
        before = s.generate(prompt, max_tokens=10, add_bos=False).text
        s.steer(profile)
        steered = s.generate(prompt, max_tokens=10, add_bos=False).text
        s.steer(profile * 0.0)
        unscaled = s.generate(prompt, max_tokens=10, add_bos=False).text
    assert planted.is_refusal(before) and not planted.is_refusal(steered) and unscaled == before


def test_cli_graded_and_sign_options(planted_files, tmp_path):
    path, truth = planted_files
    out = tmp_path / "graded"
    r = CliRunner().invoke(
        main,
        [
            "ftri",
            str(path),
            "--prompts",
            str(planted.prompts_path()),
            "--out",
            str(out),
            "--n-boot",
            "50",
            "--graded",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    profile = Profile.load(out / "profile.json")
    assert {e.mode for e in profile.entries} == {Mode.BIAS} and all(e.value < 0 for e in profile.entries)
    assert "bias 1:6=" in r.output
    r = CliRunner().invoke(
        main,
        [
            "ftri",
            str(path),
            "--prompts",
            str(planted.prompts_path()),
            "--out",
            str(out),
            "--n-boot",
            "50",
            "--threshold",
            "0.7",
        ],
    )
    assert r.exit_code == 0, r.output
    assert Profile.load(out / "profile.json").entries == ()
    assert "no expert qualified" in r.output


def test_profile_from_ranking_leaves_out_experts_without_a_score(model, capture):
    _, result = capture
    ranked = result.ranked(10, layers=model.layout.moe_layers)
    assert any(r.score == 0 for r in ranked)
    profile = profile_from_ranking(ranked, model)
    assert all(e.mode is Mode.DROP for e in profile.entries)
    assert len(profile.entries) == sum(r.score > 0 for r in ranked)


def test_read_ranking_for_a_sweep(planted_files, tmp_path):
    path, truth = planted_files
    out = tmp_path / "rank"
    r = CliRunner().invoke(
        main,
        [
            "ftri",
            str(path),
            "--prompts",
            str(planted.prompts_path()),
            "--out",
            str(out),
            "--n-boot",
            "50",
            "--method",
            "risk_diff",
            "--method",
            "mean_diff",
        ],
    )
    assert r.exit_code == 0, r.output
    layers = (0, 1, 2, 3)  # the planted model's MoE layers
    ranking = read_ranking(out, layers)
    assert ranking.method == "risk_diff" and ranking.experts[:2] == list(truth.planted)
    assert ranking.evidence == set(truth.planted) and len(ranking.experts) == 32
    other = read_ranking(out / "ftri.json", layers, method="mean_diff", exclude=[truth.planted[0]])
    assert other.experts[0] == truth.planted[1] and other.left_out == [truth.planted[0]]
    with pytest.raises(MoteError, match="has no 'log_odds' ranking; it has risk_diff, mean_diff"):
        read_ranking(out, layers, method="log_odds")
    with pytest.raises(MoteError, match="no fTRI result at"):
        read_ranking(tmp_path / "missing", layers)
    (tmp_path / "other.json").write_text('{"format": "mote-profile"}')
    with pytest.raises(MoteError, match="is not an fTRI result"):
        read_ranking(tmp_path / "other.json", layers)


def test_reap_ranks_the_planted_experts_from_the_captured_output_norms(model, planted_files, tmp_path):
    """The capture sums gate weight x expert output norm natively when a method needs it; reap ranks the planted
    experts first (they write the refusal mode only on trigger prompts) and the distractors, busy on both
    classes, below 0 (on trigger prompts they share their token with a planted expert)."""
    path, truth = planted_files
    behavior, baseline = select_classes(load_prompt_set(planted.prompts_path()), "trigger", "neutral")
    run, results = run_ftri(
        model, behavior, baseline, methods=("reap", "mean_diff"), top=2, n_boot=50, show_progress=False
    )
    norms = run.activations.output_norm_sums
    assert norms is not None and norms.shape == run.activations.counts.shape
    assert np.all(norms[run.activations.counts == 0] == 0) and norms.sum() > 0
    reap = results["reap"]
    assert [(r.layer, r.expert) for r in reap.ranked(2, layers=model.layout.moe_layers)] == list(truth.planted)
    assert all(reap.qualified()[p] for p in truth.planted)
    assert all(reap.scores[d] < 0 for d in truth.distractors)
    plain, _ = run_ftri(model, behavior[:2], baseline[:2], methods=("mean_diff",), n_boot=10, show_progress=False)
    assert plain.activations.output_norm_sums is None  # measured only when asked for
    r = CliRunner().invoke(
        main,
        [
            "ftri",
            str(path),
            "--prompts",
            str(planted.prompts_path()),
            "--method",
            "reap",
            "--top",
            "2",
            "--n-boot",
            "50",
            "--out",
            str(tmp_path / "reap"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert {(e.layer, e.expert) for e in Profile.load(tmp_path / "reap" / "profile.json").entries} == set(truth.planted)
    assert (tmp_path / "reap" / "ftri_reap.csv").exists()
