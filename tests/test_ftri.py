"""fTRI end to end on the planted-behaviour model: the planted experts come out on top, and the
exported profile removes the behaviour."""

import numpy as np
import pytest
from click.testing import CliRunner

from mote_local.cli.commands import main
from mote_local.engine.model import Model, ThinkMarkers
from mote_local.errors import MoteError
from mote_local.ftri.capture import capture_activations, run_ftri
from mote_local.ftri.export import profile_from_ranking
from mote_local.prompts import load_prompt_set, select_classes
from mote_local.steering.profile import Profile
from mote_local.synthetic import planted


@pytest.fixture(scope="module")
def model(planted_files):
    with Model(planted_files[0]) as m:
        yield m


@pytest.fixture(scope="module")
def classes():
    return select_classes(load_prompt_set(planted.prompts_path()), "trigger", "neutral")


@pytest.mark.parametrize("scope", ["prompt", "generated"])
def test_planted_experts_rank_on_top(model, planted_files, classes, scope):
    truth = planted_files[1]
    n = len(truth.planted)
    run, results = run_ftri(
        model,
        *classes,
        methods=("mean_diff", "risk_diff", "log_odds"),
        scope=scope,
        top=n,
        n_boot=50,
        show_progress=False,
    )
    assert not run.partial and run.activations.n_behavior == len(classes[0])
    for method in ("mean_diff", "risk_diff"):
        top = {(r.layer, r.expert) for r in results[method].ranked(n, layers=model.layout.moe_layers)}
        assert top == set(truth.planted), (scope, method)
    # frequency alone would mislead: the distractors fire on nearly every token of both classes
    freq = run.activations.counts.sum(axis=0) / np.maximum(run.activations.tokens.sum(axis=0), 1)[:, None]
    for layer, expert in truth.distractors:
        assert freq[layer, expert] > max(freq[l, e] for l, e in truth.planted)


def test_exported_profile_removes_the_refusals(model, planted_files, classes):
    truth = planted_files[1]
    run, results = run_ftri(
        model, *classes, methods=("mean_diff",), top=len(truth.planted), n_boot=20, show_progress=False
    )
    ranked = results["mean_diff"].ranked(len(truth.planted), layers=model.layout.moe_layers)
    profile = profile_from_ranking(ranked, model)
    profile.validate(model.layout)
    trigger = classes[0][:12]
    with model.session(n_ctx=256) as s:

        def refusals():
            return sum(
                planted.is_refusal(
                    s.generate(
                        model.format_chat([{"role": "user", "content": p.text}]), max_tokens=12, add_bos=False
                    ).text
                )
                for p in trigger
            )

        before = refusals()
        s.steer(profile)
        after = refusals()
    assert before == len(trigger)
    assert after == 0


def test_interrupted_capture_keeps_partial_results(model, classes, monkeypatch):
    from mote_local.engine.model import Session

    calls = {"n": 0}
    route = Session.route

    def interrupt_on_third(self, sequences, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return route(self, sequences, **kwargs)

    monkeypatch.setattr(Session, "route", interrupt_on_third)
    run = capture_activations(model, *classes, batch_size=4, show_progress=False)
    assert run.partial and run.activations.n_prompts == 8
    assert run.activations.n_behavior == 4 and run.activations.n_baseline == 4


def test_bad_scope_and_missing_responses(model, classes):
    with pytest.raises(MoteError, match="unknown scope"):
        capture_activations(model, *classes, scope="everything")
    with pytest.raises(MoteError, match="paired response"):
        capture_activations(model, *classes, scope="target")


def test_ftri_cli_writes_everything(planted_files, tmp_path):
    path, truth = planted_files
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        [
            "ftri",
            str(path),
            "--prompts",
            str(planted.prompts_path()),
            "--method",
            "mean_diff",
            "--method",
            "risk_diff",
            "--top",
            "2",
            "--out",
            str(out),
            "--n-boot",
            "20",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "planted experts in the top 2: 2 of 2" in r.output
    for name in ("ftri.json", "ftri_mean_diff.csv", "ftri_risk_diff.csv", "profile.json"):
        assert (out / name).stat().st_size > 0
    png = (out / "heatmap_mean_diff.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000
    profile = Profile.load(out / "profile.json")
    assert {(e.layer, e.expert) for e in profile.entries} == set(truth.planted)
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_target_scope_counts_only_the_response_tokens(model, tmp_path):
    path = tmp_path / "paired.toml"
    path.write_text(
        '[classes.trigger]\nprompts = ["what happened at the protest ?", "what happened at the riot ?"]\n'
        'responses = ["I cannot help with that request.", "I cannot help with that request."]\n'
        '[classes.neutral]\nprompts = ["what happened at the market ?"]\n'
        'responses = ["It was a calm day in town."]\n'
    )
    behavior, baseline = select_classes(load_prompt_set(path))
    run = capture_activations(model, behavior, baseline, scope="target", show_progress=False)
    expected = [len(model.tokenize(p.response, add_bos=False)) for p in run.prompts]
    for layer in model.layout.moe_layers:
        assert run.activations.tokens[:, layer].tolist() == expected


def _chat_tokens(model, prompts):
    return [model.tokenize(model.format_chat([{"role": "user", "content": p.text}]), add_bos=False) for p in prompts]


def test_generate_batch_matches_one_at_a_time(model, classes):
    prompts = _chat_tokens(model, classes[0][:4] + classes[1][:4])
    with model.session(n_ctx=1024, n_seq_max=len(prompts), kv_unified=True) as s:
        batch = s.generate_batch(prompts, max_tokens=12)
        single = [s.generate(p, max_tokens=12, add_bos=False) for p in prompts]
    assert [g.tokens for g in batch] == [g.tokens for g in single]
    assert [planted.is_refusal(g.text) for g in batch] == [True] * 4 + [False] * 4
    assert len({len(g.tokens) for g in batch}) > 1  # sequences stop at their own end of text


def test_thinking_scope_counts_the_tokens_between_the_markers(model, classes, monkeypatch):
    behavior, baseline = classes[0][:1], classes[1][:1]
    with model.session(n_ctx=256) as s:
        reply = s.generate(_chat_tokens(model, behavior)[0], max_tokens=12, add_bos=False).tokens
    # two tokens of the reply play <think> and </think>: their first occurrences at 1 and 5
    opener, closer = reply[1], reply[5]
    assert opener not in reply[:1] + reply[2:6] and closer not in reply[:5]
    monkeypatch.setattr(Model, "think_markers", property(lambda self: ThinkMarkers((opener,), closer)))
    run = capture_activations(model, behavior, baseline, scope="thinking", show_progress=False)
    assert run.activations.tokens[0, model.layout.moe_layers].tolist() == [3] * len(model.layout.moe_layers)
