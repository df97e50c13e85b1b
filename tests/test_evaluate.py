"""Evaluation and reports: detectors, intervals, control profiles, capability cost, the super-expert guard, the
report files; the planted model's acceptance test when mote_local.synthetic.planted is available."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from mote_local import errors
from mote_local.engine.model import Model
from mote_local.evaluation import (
    controls,
    cost,
    detectors,
    intervals,
    report,
    run,
    super_experts,
)
from mote_local.evaluation import evaluate as ev
from mote_local.steering.entries import Entry, Mode, Scope, off_experts
from mote_local.steering.profile import Profile
from mote_local.synthetic import tiny

PROMPTS = ["what happened in the city yesterday", "tell me a story about the king", "why did the people leave"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own super-expert cache."""
    monkeypatch.setenv("MOTE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------------------------------------- detectors


def test_default_phrases_are_case_insensitive_substrings():
    d = detectors.Detector()
    assert d("i CANNOT do that")
    assert d("Well... I'm sorry, but no.")
    assert d("I can\u2019t help you with this")  # typographic apostrophe
    assert d("As an AI language model, ...")
    assert not d("Sure, here is the story of the king.")
    assert d.matches("I'm sorry, I cannot") == ["I cannot", "I'm sorry"]


def test_empty_response_is_not_the_behaviour():
    d = detectors.Detector(phrases=["x"], regexes=[r"^\s*$"])  # even a pattern that matches emptiness
    assert not d("")
    assert not d("   \n")
    assert d.matches("") == []


def test_regexes_and_bad_regex():
    d = detectors.Detector(phrases=[], regexes=[r"\brefuse[sd]?\b", re.compile(r"NOPE")])
    assert d("They Refused to answer")  # strings compile case-insensitive
    assert not d("nope")  # compiled patterns keep their own flags
    assert d("NOPE")
    assert not d("refusenik")
    with pytest.raises(errors.DetectorError, match=r"bad regular expression '\(unclosed'"):
        detectors.Detector(regexes=["(unclosed"])
    with pytest.raises(errors.DetectorError, match="at least one phrase or regex"):
        detectors.Detector(phrases=[], regexes=[])
    with pytest.raises(errors.DetectorError):
        detectors.Detector(phrases="I cannot")  # one string, not a list


def test_detector_from_file(tmp_path):
    f = tmp_path / "det.txt"
    f.write_text("# refusals\nno way\n\n  not today  \nre:^\\s*sorry\\b\n", encoding="utf-8")
    d = detectors.Detector.from_file(f)
    assert d.phrases == ("no way", "not today")
    assert [r.pattern for r in d.regexes] == [r"^\s*sorry\b"]
    assert d("Sorry, can't.") and d("NO WAY!") and not d("I am so sorry")
    bad = tmp_path / "bad.txt"
    bad.write_text("fine\nre:[oops\n", encoding="utf-8")
    with pytest.raises(errors.DetectorError, match=r"bad\.txt:2: bad regular expression '\[oops'"):
        detectors.Detector.from_file(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(errors.DetectorError, match="no phrases"):
        detectors.Detector.from_file(empty)
    with pytest.raises(errors.DetectorError, match="not found"):
        detectors.Detector.from_file(tmp_path / "missing.txt")


def _judge_model(path: Path, answer: str) -> Path:
    """A tiny model whose head can only say "yes" or "no", and always says ``answer``: every embedding
    carries +20 in dim 0 (which the residual stream keeps positive), the output norm reads only dim 0, and
    only the yes/no rows of the head are non-zero, with opposite signs."""
    spec = tiny.spec_for("qwen3moe", seed=99)
    vocab = tiny.make_vocab()
    w = tiny.make_weights(spec)
    w["token_embd.weight"][:, 0] = 20.0
    w["output_norm.weight"][:] = 0.0
    w["output_norm.weight"][0] = 1.0
    head = w["output.weight"]
    head[:] = 0.0
    sign = 1.0 if answer == "yes" else -1.0
    for piece in ("\u2581yes", "\u2581Yes"):
        head[vocab.id_of(piece), 0] = 5.0 * sign
    for piece in ("\u2581no", "\u2581No"):
        head[vocab.id_of(piece), 0] = -5.0 * sign
    return tiny.write_model(spec, path, weights=w)


def test_judge_reads_yes_or_no_logits(model_dir):
    yes = _judge_model(model_dir / "judge-yes.gguf", "yes")
    no = _judge_model(model_dir / "judge-no.gguf", "no")
    with detectors.JudgeDetector(yes, n_ctx=256) as judge:
        vocab = tiny.make_vocab()
        assert vocab.id_of("\u2581yes") in judge.yes_ids and vocab.id_of("\u2581No") in judge.no_ids
        y, n = judge.scores("the king left the city", "tell me a story")
        assert y > n
        assert judge("the king left the city", "tell me a story")
        assert judge.detect("the king left the city") is True  # deterministic: same verdict again
        assert not judge("")  # empty: never the behaviour, not shown to the judge
        assert judge.describe()["kind"] == "judge"
    with detectors.JudgeDetector(no, n_ctx=256) as judge:
        assert not judge("the king left the city", "tell me a story")


def test_judge_on_a_plain_tiny_model_follows_its_logits(load):
    model = load("qwen3moe")
    judge = detectors.JudgeDetector(model, n_ctx=256)  # a loaded model stays open
    y, n = judge.scores("we went home early")
    assert judge("we went home early") == (y > n)
    judge.close()
    assert model.tokenize("hello")  # still usable


# ---------------------------------------------------------------------------------------------- controls

PROFILE = [
    Entry(1, 2, Mode.MASK),
    Entry(1, 5, Mode.BIAS, -2.0),
    Entry(1, 5, Mode.GAIN, 0.5),
    Entry(2, 4, Mode.DROP, scope=Scope.DECODE),
]


def test_random_control_matches_size_layers_and_modes(load):
    layout = load("qwen3moe").layout

    def shape(entries):
        by_layer = {}
        for e in entries:
            by_layer.setdefault(e.layer, []).append((e.mode, e.value, e.scope))
        return {k: sorted(v) for k, v in by_layer.items()}

    own = {(e.layer, e.expert) for e in PROFILE}
    draws = []
    for seed in range(6):
        ctl = controls.random_control(PROFILE, layout, seed)
        assert shape(ctl) == shape(PROFILE)
        assert len({(e.layer, e.expert) for e in ctl}) == len(own)
        assert not own & {(e.layer, e.expert) for e in ctl}
        # the bias and gain that shared one expert still share one
        assert len({e.expert for e in ctl if e.mode in (Mode.BIAS, Mode.GAIN)}) == 1
        assert ctl == controls.random_control(PROFILE, layout, seed)  # deterministic by seed
        draws.append(tuple(ctl))
    assert len(set(draws)) > 1
    ctl = controls.random_control(PROFILE, layout, 0, exclude=[(2, x) for x in range(8) if x not in (4, 7)])
    assert [e.expert for e in ctl if e.layer == 2] == [7]
    with pytest.raises(errors.EvalError, match="layer 3: the profile steers 5 of 8 experts"):
        controls.random_control([Entry(3, x, Mode.DROP) for x in range(5)], layout, 0)


def test_forced_counterpart():
    entries = [
        Entry(1, 2, Mode.MASK),
        Entry(2, 4, Mode.DROP, scope=Scope.DECODE),
        Entry(3, 1, Mode.BIAS, -math.inf),
        Entry(3, 2, Mode.BIAS, 1.0),
        Entry(0, 0, Mode.GAIN, 2.0),
    ]
    assert controls.forced_counterpart(entries) == [
        Entry(1, 2, Mode.FORCE),
        Entry(2, 4, Mode.FORCE, scope=Scope.DECODE),
        Entry(3, 1, Mode.FORCE),
    ]
    assert off_experts(entries) == [(1, 2), (2, 4), (3, 1)]
    assert off_experts(entries, strength=0.0) == [(1, 2), (2, 4)]  # a -inf bias scaled to nothing is no switch-off
    assert controls.forced_counterpart(entries, strength=0.0) == [
        Entry(1, 2, Mode.FORCE),
        Entry(2, 4, Mode.FORCE, scope=Scope.DECODE),
    ]
    assert controls.forced_counterpart([Entry(3, 2, Mode.BIAS, 1.0)]) == []


# ---------------------------------------------------------------------------------------------- cost


def test_kl_is_zero_unsteered_and_positive_when_a_busy_expert_is_masked(load):
    model = load("qwen3moe")
    chunks = cost.text_chunks(model, cost.load_neutral_text(), 64, 127)  # BOS + 2 x 63
    assert len(chunks) == 2 and all(len(c) <= 64 and c[0] == model.bos_token for c in chunks)
    layer = model.layout.moe_layers[1]
    with model.session(n_ctx=128) as s:
        with s.capture() as cap:
            s.logits(chunks[0])
        busy = int(np.argmax(cap.stats().counts[layer]))
        costs = cost.capability_cost(
            s, chunks, {"unsteered": ([], 1.0), "mask": ([Entry(layer, busy, Mode.MASK)], 1.0)}
        )
    kl0, ppl0 = costs["unsteered"]
    kl1, ppl1 = costs["mask"]
    assert kl0 == 0.0
    assert kl1 > 1e-3
    for ppl in (ppl0, ppl1):
        assert math.isfinite(ppl) and ppl > 1


def test_log_softmax_is_stable():
    big = np.array([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]], dtype=np.float32)
    lp = cost._log_softmax64(big)
    assert np.all(np.isfinite(lp[:, :2])) and lp[0, 0] == 0.0
    assert np.allclose(lp[1], -math.log(3))


def test_neutral_text_sources(tmp_path):
    text = cost.load_neutral_text()
    assert 20 <= text.count(".") <= 40 and "\n" not in text  # the default's lines, joined
    f = tmp_path / "mine.txt"
    f.write_text("One line.\nTwo lines.\n", encoding="utf-8")
    assert cost.resolve_text(f) == ("One line.\nTwo lines.\n", str(f))  # a file, as it is
    assert cost.resolve_text("just text")[0] == "just text"
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(errors.EvalError, match="empty"):
        cost.load_neutral_text(tmp_path / "empty.txt")


def test_infinite_cost_survives_json_and_table():
    c = ev.ConditionResult(
        "profile", "profile", [], 1.0, n=2, hits=1, rate=0.5, ci=(0.1, 0.9), kl=math.inf, perplexity=math.inf
    )
    r = ev.EvalResult(
        model="m.gguf", conditions=[c], profile={"entries": []}, settings={"notes": []}, samples=[], generations={}
    )
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["conditions"][0]["kl"] == "inf"
    assert ev.EvalResult.from_dict(d).conditions[0].perplexity == math.inf
    assert report.format_table(r).splitlines()[2].split()[-2:] == ["inf", "inf"]


# ---------------------------------------------------------------------------------------------- evaluate


class Says:
    """A detector: the response contains ``word`` (a plain callable works as a detector too)."""

    def __init__(self, word: str, interrupt_at: int | None = None):
        self.word, self.interrupt_at, self.calls = word, interrupt_at, 0

    def detect(self, response: str, prompt: str | None = None) -> bool:
        self.calls += 1
        if self.interrupt_at is not None and self.calls >= self.interrupt_at:
            raise KeyboardInterrupt
        return self.word in response.lower().split()

    def describe(self):
        return {"kind": "word", "word": self.word}


TINY_PROFILE = [Entry(1, 3, Mode.DROP), Entry(2, 5, Mode.MASK)]


@pytest.fixture(scope="module")
def tiny_result(tiny_path, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp, Model(tiny_path("qwen3moe")) as model:
        mp.setenv("MOTE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return ev.evaluate(
            model,
            PROMPTS,
            TINY_PROFILE,
            detector=lambda r: "the" in r.lower().split(),
            n_random=2,
            max_tokens=8,
            max_neutral_tokens=96,
            chunk_tokens=64,
            show_progress=False,
        )


def test_evaluate_conditions(tiny_result):
    r = tiny_result
    assert not r.partial
    assert [c.name for c in r.conditions] == ["unsteered", "profile", "random", "forced"]
    assert [s.name for s in r.condition("random").per_seed] == ["random[seed=0]", "random[seed=1]"]
    for c in r.conditions:
        n = len(PROMPTS) * (2 if c.name == "random" else 1)
        assert c.n == n and 0 <= c.hits <= n
        assert c.ci[0] <= c.rate <= c.ci[1]
        assert c.delta_ci[0] <= c.delta <= c.delta_ci[1]
        assert c.kl is not None and c.kl >= 0 and math.isfinite(c.perplexity) and c.perplexity > 1
    base = r.condition("unsteered")
    assert base.kl == 0.0 and base.delta == 0.0
    assert r.condition("profile").kl > 0
    forced = r.condition("forced")
    assert {(e["layer"], e["expert"], e["mode"]) for e in forced.entries} == {(1, 3, "force"), (2, 5, "force")}
    seeds = r.condition("random").per_seed
    assert r.condition("random").hits == sum(s.hits for s in seeds)
    assert r.condition("random").kl == pytest.approx(np.mean([s.kl for s in seeds]))
    assert len(r.samples) == len(PROMPTS)
    assert set(r.samples[0]["responses"]) == {"unsteered", "profile", "random", "forced"}
    assert r.samples[0]["responses"]["unsteered"] == r.generations["unsteered"][0]["text"]
    assert r.profile["n_experts"] == 2 and r.profile["experts_per_layer"] == {"1": 1, "2": 1}
    assert r.settings["detector"]["kind"] == "callable"


def test_evaluate_is_deterministic_and_json_round_trips(tiny_result, tiny_path):
    d = tiny_result.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = ev.EvalResult.from_dict(json.loads(text))
    assert back.to_dict() == d
    assert ev.EvalResult.from_json(tiny_result.to_json()).to_dict() == d
    again = ev.evaluate(
        tiny_path("qwen3moe"),
        PROMPTS[:1],
        TINY_PROFILE,
        n_random=1,
        max_tokens=8,
        measure_cost=False,
        show_progress=False,
    )  # a path: loaded and freed by evaluate
    assert again.generations["unsteered"][0]["text"] == tiny_result.generations["unsteered"][0]["text"]
    assert again.generations["profile"][0]["text"] == tiny_result.generations["profile"][0]["text"]
    assert again.condition("profile").kl is None


def test_evaluate_partial_on_keyboard_interrupt_and_resume(load, tmp_path):
    """Ctrl-C keeps what was judged, in the result and in the output folder; --resume finishes the run with the
    very results of an uninterrupted one, and says what it resumed."""
    model = load("qwen3moe")
    kw = dict(n_random=1, max_tokens=4, max_neutral_tokens=64, chunk_tokens=32, show_progress=False, n_parallel=2)
    whole = ev.evaluate(model, PROMPTS, TINY_PROFILE, detector=Says("the"), **kw)
    det = Says("the", interrupt_at=5)
    r = ev.evaluate(model, PROMPTS, TINY_PROFILE, detector=det, out_dir=tmp_path, **kw)
    assert r.partial
    assert sum(c.n for c in r.conditions) == 4  # the fifth verdict was the Ctrl-C
    assert all(c.kl is None for c in r.conditions)
    assert any("interrupted" in n for n in r.settings["notes"])
    json.dumps(r.to_dict(), allow_nan=False)
    assert "PARTIAL" in report.format_table(r)
    again = Says("the")
    done = ev.evaluate(model, PROMPTS, TINY_PROFILE, detector=again, out_dir=tmp_path, resume=True, **kw)
    assert not done.partial and again.calls == 4 * len(PROMPTS) - 4
    assert done.settings["resumed"] == {"pairs": 4 * len(PROMPTS), "generations": 4, "costs": 0}
    assert any(n.startswith(f"resumed from {tmp_path}: 4 of 12 generations") for n in done.settings["notes"])
    assert done.generations == whole.generations
    assert [c.to_dict() for c in done.conditions] == [c.to_dict() for c in whole.conditions]
    third = ev.evaluate(model, PROMPTS, TINY_PROFILE, detector=Says("the"), out_dir=tmp_path, resume=True, **kw)
    assert third.settings["resumed"]["generations"] == 12 and third.settings["resumed"]["costs"] == 4
    assert [c.to_dict() for c in third.conditions] == [c.to_dict() for c in whole.conditions]
    fresh = ev.evaluate(model, PROMPTS, TINY_PROFILE, detector=Says("the"), out_dir=tmp_path, **kw)
    assert fresh.settings["resumed"]["generations"] == 0  # without resume the folder starts afresh
    with pytest.raises(errors.EvalError, match="give out_dir"):
        ev.evaluate(model, PROMPTS, TINY_PROFILE, resume=True)


def test_evaluate_warns_about_super_experts_and_keeps_controls_off_them(load, monkeypatch):
    model = load("qwen3moe")
    monkeypatch.setattr(run, "cached_super_experts", lambda path: {(1, 3), (2, 0), (2, 1), (2, 2)})
    profile = Profile.from_entries(TINY_PROFILE, name="tiny") * 2.0  # a Profile: its strength times ours
    r = ev.evaluate(model, PROMPTS[:1], profile, 0.5, n_random=3, max_tokens=2, measure_cost=False, show_progress=False)
    assert r.profile["name"] == "tiny" and r.profile["strength"] == 1.0
    assert any("super-expert(s) 1:3" in w for w in r.warnings)
    assert r.settings["random_excluded_super_experts"] == [[1, 3], [2, 0], [2, 1], [2, 2]]
    for s in r.condition("random").per_seed:
        assert not {(e["layer"], e["expert"]) for e in s.entries} & {(1, 3), (2, 0), (2, 1), (2, 2)}


def test_evaluate_bad_input(load):
    model = load("qwen3moe")
    with pytest.raises(errors.EvalError, match="no entries"):
        ev.evaluate(model, PROMPTS, [])
    with pytest.raises(errors.EvalError, match="no prompts"):
        ev.evaluate(model, [], TINY_PROFILE)
    with pytest.raises(errors.EvalError, match="forces 3 experts"):
        ev.evaluate(model, PROMPTS, [Entry(1, x, Mode.FORCE) for x in range(3)])


def test_forced_is_skipped_when_nothing_is_switched_off(load):
    model = load("qwen3moe")
    r = ev.evaluate(
        model,
        PROMPTS[:1],
        [Entry(1, 3, Mode.BIAS, 1.5)],
        n_random=1,
        max_tokens=2,
        measure_cost=False,
        show_progress=False,
    )
    assert [c.name for c in r.conditions] == ["unsteered", "profile", "random"]
    assert any("forced: skipped" in n for n in r.settings["notes"])


def test_controls_that_cannot_be_drawn_are_skipped_with_a_note(load, monkeypatch):
    model = load("qwen3moe")
    r = ev.evaluate(
        model,
        PROMPTS[:1],
        [Entry(1, x, Mode.DROP) for x in range(5)],
        n_random=2,
        max_tokens=2,
        measure_cost=False,
        show_progress=False,
    )
    assert [c.name for c in r.conditions] == ["unsteered", "profile"]
    assert any(n.startswith("random: skipped, layer 1") for n in r.settings["notes"])
    assert any(n.startswith("forced: skipped") for n in r.settings["notes"])
    # super-experts that leave no room are not excluded, and the result says so
    monkeypatch.setattr(run, "cached_super_experts", lambda path: {(1, x) for x in range(1, 8)})
    r = ev.evaluate(
        model, PROMPTS[:1], [Entry(1, 0, Mode.DROP)], n_random=1, max_tokens=2, measure_cost=False, show_progress=False
    )
    assert r.condition("random").n == 1 and r.settings["random_excluded_super_experts"] == []
    assert any(n.startswith("random: super-experts not excluded") for n in r.settings["notes"])


# ---------------------------------------------------------------------------------------------- report


def test_report_files(tiny_result, tmp_path):
    r = ev.EvalResult.from_dict(tiny_result.to_dict())
    r.samples[0]["responses"]["profile"] = "<script>alert(1)</script> & | pipes"
    heatmap = tmp_path / "heat.png"
    heatmap.write_bytes(report.plot_png(r))  # any PNG will do
    out = report.write_report(
        tmp_path / "out", r, ftri_heatmap=heatmap, ftri_table="rank layer expert\n1 2 3 <b>", title="tiny <eval>"
    )
    assert out == tmp_path / "out" / "report.html"
    for name in ("report.json", "report.md", "report.html", "behaviour.png", "ftri_heatmap.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert not list((tmp_path / "out").glob(".*.tmp"))
    page = out.read_text(encoding="utf-8")
    assert '<table id="results">' in page and "random control (pooled)" in page and "seed 1" in page
    assert "Δ vs unsteered" in page and "KL (nats)" in page and "perplexity" in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;" in page
    assert "tiny &lt;eval&gt;" in page
    assert 'id="profile"' in page and "mask" in page
    back = ev.EvalResult.from_json((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert back.to_dict() == r.to_dict()
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "![behaviour rate per condition](behaviour.png)" in md and "&lt;script&gt;" in md
    assert "\\| pipes" in md and "![fTRI heatmap](ftri_heatmap.png)" in md
    assert "random (seed 0)" in md and "<th>random (seed 0)</th>" in page


def test_format_table(tiny_result):
    table = report.format_table(tiny_result)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["condition", "behaviour", "rate"]
    labels = ["unsteered", "profile", "random control (pooled)", "seed 0", "seed 1", "forced on"]
    assert [l.strip().startswith(x) for l, x in zip(lines[2:], labels)] == [True] * 6
    assert "0 (reference)" in lines[2] and "pp [" in lines[3]


# ---------------------------------------------------------------------------------------------- super-experts


def test_find_super_experts_and_cache(load, cache_dir):
    model = load("qwen3moe")
    assert super_experts.cached_super_experts(model.path) is None
    t = time.perf_counter()
    found = super_experts.find_super_experts(model, layers=[1, 2], max_tokens=48, show_progress=False)
    first = time.perf_counter() - t
    kl, flagged = found
    assert kl.shape == (model.layout.n_layer, model.layout.n_expert)
    assert np.all(np.isfinite(kl[[1, 2]])) and np.all(np.isnan(kl[[0, 3]])) and np.all(kl[[1, 2]] >= 0)
    assert found.median == pytest.approx(float(np.median(kl[[1, 2]])))
    assert all(kl[l, x] > max(10 * found.median, 0.1) for l, x in flagged)
    assert super_experts.super_experts_cache_path(model.path).parent == cache_dir / "super-experts"
    assert super_experts.cached_super_experts(model.path) == set(flagged)
    t = time.perf_counter()
    again = super_experts.find_super_experts(model, layers=[1, 2], max_tokens=48, show_progress=False)
    assert time.perf_counter() - t < first / 2
    assert np.array_equal(again.kl, kl, equal_nan=True)
    # a low bar flags something, and the cache follows the newest run
    low = super_experts.find_super_experts(
        model, layers=[1, 2], max_tokens=48, factor=1.0, floor=0.0, show_progress=False
    )
    assert low.flagged and super_experts.cached_super_experts(model.path) == set(low.flagged)


def test_super_expert_cache_is_per_model_file(tiny_path, tmp_path):
    src = tiny_path("qwen3moe")
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(src.read_bytes())
    super_experts.find_super_experts(copy, layers=[3], max_tokens=16, show_progress=False)
    assert super_experts.cached_super_experts(copy) is not None
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed: the cache no longer applies
    assert super_experts.cached_super_experts(copy) is None


# ---------------------------------------------------------------------------------------------- planted model


@pytest.fixture(scope="module")
def planted(model_dir):
    from mote_local.synthetic import planted as planted_mod

    path, truth = planted_mod.planted_model(model_dir)
    return path, truth, planted_mod


def test_planted_acceptance(planted):
    """The issue's acceptance test: switching the planted experts off removes the refusal, a random control of
    the same shape does not, forcing them on refuses everywhere, the profile costs ~nothing on neutral text,
    and the super-expert guard finds the planted super-expert."""
    from mote_local.prompts import load_prompt_set, select_classes

    path, truth, planted_mod = planted
    behaviour, baseline = select_classes(load_prompt_set(planted_mod.prompts_path()), "trigger", "neutral")
    # one trigger and one neutral prompt per topic: half of them refuse unsteered. Six of each: with the paired
    # interval (issue 12) four prompts that stop refusing are not significant, as an exact McNemar test agrees
    # (p = 0.125); six are (p = 0.03). The unpaired interval used to call four significant.
    prompts = [p for p in behaviour if p.text.endswith("yesterday?")][:6] + [
        p for p in baseline if p.text.endswith("yesterday?")
    ][:6]
    with Model(path) as model:
        supers = super_experts.find_super_experts(model, max_tokens=32, show_progress=False)
        r = ev.evaluate(
            model,
            prompts,
            truth.entries(Mode.DROP),
            n_random=2,
            max_tokens=4,
            max_neutral_tokens=64,
            show_progress=False,
        )
    rates = {c.name: c.rate for c in r.conditions}
    assert rates["unsteered"] == 0.5
    assert rates["profile"] <= 0.05
    assert abs(rates["random"] - rates["unsteered"]) <= 0.15
    assert rates["forced"] >= max(rates["unsteered"], 0.95)
    assert r.condition("profile").delta_ci[1] < 0  # the drop is significant
    # issue 12, reproduction 3: the random seeds answer each prompt alike (they keep off the planted experts), so
    # the pooled control holds one response's information per prompt, not one per seed and prompt
    rnd = r.condition("random")
    assert rnd.n == 2 * len(prompts)
    assert rnd.ci == pytest.approx(intervals.wilson_interval(rnd.hits / 2, rnd.n / 2))
    assert rnd.ci[1] - rnd.ci[0] > 1.2 * (
        intervals.wilson_interval(rnd.hits, rnd.n)[1] - intervals.wilson_interval(rnd.hits, rnd.n)[0]
    )
    assert r.condition("profile").kl < 0.01
    assert truth.super_expert in supers.flagged
    assert np.nanargmax(supers.kl) == np.ravel_multi_index(truth.super_expert, supers.kl.shape)
    assert not set(truth.planted) & set(supers.flagged)
