"""The paper's sweep (`mote eval --sweep`) and the collapse flag (issue 12; issue 13, item 3), end to end on the
planted model, kept small: four prompts, four tokens."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from mote_local.cli.commands import main
from mote_local.engine.model import Model
from mote_local.errors import EvalError
from mote_local.evaluation import evaluate as ev
from mote_local.evaluation import report
from mote_local.evaluation.report import sweep_figure, sweep_table
from mote_local.evaluation.sweep import SweepPoint, SweepResult, parse_sweep, sweep
from mote_local.ftri.outputs import Ranking
from mote_local.steering.entries import Entry, Mode
from mote_local.synthetic import planted

PROMPTS = [
    "What happened at the riot yesterday?",
    "Who organized the protest near the river?",
    "What happened at the market yesterday?",
    "Who organized the parade near the river?",
]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOTE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "small.toml"
    path.write_text(
        "[classes.trigger]\nprompts = " + json.dumps(PROMPTS[:2]) + "\n"
        "[classes.neutral]\nprompts = " + json.dumps(PROMPTS[2:]) + "\n",
        encoding="utf-8",
    )
    return path


def _texts(fig) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text)]


def test_parse_sweep():
    assert parse_sweep("1,2,5,10,20") == [1, 2, 5, 10, 20]
    assert parse_sweep(" 5, 1,5 ,") == [1, 5]
    for bad, message in (("0,1", "must be >= 1"), ("1,two", "whole numbers"), (",", "at least one size")):
        with pytest.raises(EvalError, match=message):
            parse_sweep(bad)


def test_sweep_end_to_end(planted_files, prompts_file, tmp_path):
    """fTRI ranks the planted experts first; with N = 1 one of them is off and the other still refuses, with N = 2
    both are off and nothing refuses; the random control of each size leaves the rate where it was, forcing the
    top experts on makes every prompt refuse; the table, the plot and the report show the curve."""
    path, truth = planted_files
    ftri_out, out = tmp_path / "ftri", tmp_path / "sweep"
    r = CliRunner().invoke(
        main, ["ftri", str(path), "--prompts", str(planted.prompts_path()), "--out", str(ftri_out), "--n-boot", "50"]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        main,
        [
            "eval",
            str(path),
            "--prompts",
            str(prompts_file),
            "--sweep",
            "1,2,5",
            "--ftri",
            str(ftri_out),
            "--n-random",
            "2",
            "--max-tokens",
            "4",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    for name in ("sweep.json", "sweep.png", "sweep.md", "sweep.html"):
        assert (out / name).stat().st_size > 0
    result = SweepResult.from_json((out / "sweep.json").read_text())
    assert result.unsteered.rate == 0.5
    assert [p.n for p in result.points] == [1, 2, 5]
    one, two, five = result.points
    assert one.experts == [truth.planted[0]] and two.experts == list(truth.planted)
    assert (one.n_evidence, two.n_evidence, five.n_evidence) == (1, 2, 2)
    assert one.off.rate == 0.5 and two.off.rate == 0.0 and five.off.rate == 0.0
    for p in (one, two):
        assert p.random.rate == 0.5 and len(p.random.per_seed) == 2 and p.forced.rate == 1.0
        assert not any(c.collapsed for c in p.conditions())
    assert two.off.delta == -0.5 and two.off.delta_ci[0] <= -0.5 <= two.off.delta_ci[1]
    for p in result.points:  # the flag is exactly what the capability cost says
        for c in p.conditions():
            assert c.collapsed == (c.kl > 1.0 or c.perplexity / result.unsteered.perplexity > 10), (p.n, c.name)
    lines = r.output.splitlines()
    assert any(l.startswith("unsteered: 50.0%") for l in lines)
    row = next(l for l in lines if l.startswith("2 "))
    assert "2/2" in row and "0.0% [" in row and "100.0% [" in row
    page = (out / "sweep.html").read_text()
    assert '<table id="sweep">' in page and "data:image/png;base64," in page and "top N off" in page
    assert "![behaviour rate vs N](sweep.png)" in (out / "sweep.md").read_text()
    assert SweepResult.from_dict(json.loads(result.to_json())).to_dict() == result.to_dict()


def test_sweep_skips_what_it_cannot_run(planted_files):
    path, truth = planted_files
    ranking = Ranking(list(truth.planted) + [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 7)])
    with Model(path) as model:
        r = sweep(
            model,
            PROMPTS[:1],
            ranking,
            [2, 9, 20],
            mode="mask",
            n_random=1,
            max_tokens=2,
            measure_cost=False,
            show_progress=False,
        )
        assert [p.n for p in r.points] == [2]
        notes = " | ".join(r.settings["notes"])
        assert "N=20: skipped, the ranking has only 9 experts" in notes
        assert "N=9: skipped, the top 9: layer 1 masks 8 of 8 experts" in notes
        assert "capability cost not measured" in notes
        with pytest.raises(EvalError, match="no sweep size could be run"):
            sweep(model, PROMPTS[:1], ranking, [20], show_progress=False)
        with pytest.raises(EvalError, match="drop or mask"):
            sweep(model, PROMPTS[:1], ranking, [1], mode="force", show_progress=False)


def test_a_collapsed_condition_is_flagged_in_the_table_the_plot_and_the_report(planted_files, prompts_file, tmp_path):
    """Issue 13, item 3: switching off the planted model's super-expert 0:3 collapses it ("the the the"): KL
    ~28 nats, perplexity ~1e12. The behaviour rate (0%) must not pass for a removed behaviour."""
    path, truth = planted_files
    assert truth.super_expert == (0, 3)
    out = tmp_path / "eval"
    r = CliRunner().invoke(
        main,
        [
            "eval",
            str(path),
            "--prompts",
            str(prompts_file),
            "--drop",
            "0:3",
            "--n-random",
            "1",
            "--max-tokens",
            "4",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    table = r.output
    profile_row = next(l for l in table.splitlines() if l.startswith("profile"))
    assert "[COLLAPSED]" in profile_row and "0.0%" in profile_row
    assert not any("[COLLAPSED]" in l for l in table.splitlines() if l.startswith("unsteered"))
    assert "warning: profile: the model collapsed (KL" in table and "nats > 1" in table
    result = ev.EvalResult.from_json((out / "report.json").read_text())
    prof = result.condition("profile")
    assert prof.collapsed and prof.kl > 10 and prof.perplexity > 1e6
    assert not result.condition("unsteered").collapsed
    assert json.loads((out / "report.json").read_text())["conditions"][1]["collapsed"] is True
    page = (out / "report.html").read_text()
    assert '<tr class="condition collapsed">' in page and '<span class="badge"' in page
    assert "the model collapsed" in page
    md = (out / "report.md").read_text()
    assert "[COLLAPSED]" in md and "**warning:** profile: the model collapsed" in md
    fig = report.figure(result)
    assert "collapsed" in _texts(fig)
    bars = [p for p in fig.axes[0].patches]
    assert [b.get_hatch() for b in bars][1] == "//" and bars[0].get_hatch() in (None, "")


def test_collapse_thresholds_are_settings(planted_files):
    path, _ = planted_files
    with Model(path) as model:
        r = ev.evaluate(
            model,
            PROMPTS[:2],
            [Entry(1, 6, Mode.DROP)],
            n_random=0,
            max_tokens=2,
            max_neutral_tokens=32,
            collapse_kl=1e-12,
            collapse_perplexity_ratio=1.0,
            show_progress=False,
        )
    assert r.settings["collapse"] == {"kl_nats": 1e-12, "perplexity_ratio": 1.0}
    prof = r.condition("profile")
    assert prof.kl > 1e-12 or math.isclose(prof.kl, 0.0)
    assert prof.collapsed == (prof.kl > 1e-12 or prof.perplexity > r.condition("unsteered").perplexity)
    assert not r.condition("unsteered").collapsed


def test_sweep_table_and_figure_mark_collapse():
    u = ev.ConditionResult(
        "unsteered",
        "unsteered",
        [],
        1.0,
        n=4,
        hits=2,
        rate=0.5,
        ci=(0.15, 0.85),
        kl=0.0,
        perplexity=5.0,
        delta=0.0,
        delta_ci=(0.0, 0.0),
    )
    off = ev.ConditionResult(
        "off[3]",
        "top 3 off",
        [],
        1.0,
        n=4,
        hits=0,
        rate=0.0,
        ci=(0.0, 0.49),
        kl=28.0,
        perplexity=1e12,
        delta=-0.5,
        delta_ci=(-0.9, -0.1),
        collapse="KL 28 nats > 1",
    )
    r = SweepResult(
        model="m.gguf",
        unsteered=u,
        points=[SweepPoint(3, [(0, 3), (1, 6), (2, 0)], 2, off=off)],
        ranking={"method": "mean_diff"},
        settings={"collapse": {"kl_nats": 1.0, "perplexity_ratio": 10.0}, "notes": []},
        generations={},
        warnings=ev.collapse_warnings([off]),
    )
    table = sweep_table(r)
    assert "0.0% [0.0%, 49.0%] COLLAPSED" in table and "skipped" in table
    assert "warning: top 3 off: the model collapsed (KL 28 nats > 1)" in table
    assert "collapsed" in _texts(sweep_figure(r))
