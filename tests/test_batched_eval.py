"""Evaluation decoded in batches (issue 25): the same results as generating one prompt at a time through
``Session.generate``, on the planted and the trained model; shared prefills; seeded sampling that batching does
not change; batched judges; a batch whose memory is known before it starts."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mote_local.cli.commands import main
from mote_local.engine import batch
from mote_local.engine.batch import Request, generate_many, kv_cache_bytes, prefill_key
from mote_local.engine.model import Model
from mote_local.errors import EvalError
from mote_local.evaluation import detectors
from mote_local.evaluation import evaluate as ev
from mote_local.evaluation.run import batch_shape
from mote_local.prompts import load_prompt_set, select_classes
from mote_local.steering.entries import Entry, Mode, Scope
from mote_local.steering.profile import Profile
from mote_local.synthetic import planted

TRAINED = Path(str(files("mote_local").joinpath("data", "trained")))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOTE_CACHE_DIR", str(tmp_path / "cache"))


def sequential(model: Model, result: ev.EvalResult, texts, detector, max_tokens: int, chat: bool) -> dict:
    """The old path, written out here: each condition steered on one session, each prompt generated alone by
    Session.generate (greedy), then judged."""
    out = {}
    longest = max(len(model.prompt_tokens(t, chat=chat)) for t in texts) + max_tokens + 8
    conditions = [s for c in result.conditions for s in (c.per_seed or [c])]
    with model.session(n_ctx=longest, n_batch=longest) as s:
        for c in conditions:
            entries = [Entry(e["layer"], e["expert"], Mode(e["mode"])) for e in c.entries]  # drop, force
            if entries:
                s.steer(entries, c.strength)
            else:
                s.clear_steering()
            out[c.name] = []
            for i, text in enumerate(texts):
                g = s.generate(model.prompt_tokens(text, chat=chat), max_tokens=max_tokens, add_bos=False)
                out[c.name].append(
                    {"prompt": i, "text": g.text, "detected": detector.detect(g.text, text), "n_tokens": len(g.tokens)}
                )
    return out


def test_greedy_evaluation_equals_the_sequential_path_on_the_planted_model(planted_files):
    path, truth = planted_files
    behaviour, baseline = select_classes(load_prompt_set(planted.prompts_path()), "trigger", "neutral")
    texts = [p.text for p in list(behaviour)[:6] + list(baseline)[:6]]
    with Model(path) as model:
        r = ev.evaluate(
            model,
            texts,
            truth.entries(Mode.DROP),
            n_random=2,
            max_tokens=8,
            measure_cost=False,
            n_parallel=5,
            show_progress=False,
        )  # 5 slots for 60 pairs: slots are refilled
        old = sequential(model, r, texts, detectors.Detector(), 8, chat=True)
    assert r.generations == old
    assert sum(g["detected"] for g in old["unsteered"]) == 6 and not any(g["detected"] for g in old["profile"])
    assert r.settings["batch"]["n_parallel"] == 5


def test_greedy_evaluation_equals_the_sequential_path_on_the_trained_model():
    behaviour, _ = select_classes(load_prompt_set(TRAINED / "prompts.toml"), "de", "en")
    texts = [p.text for p in list(behaviour)[:6]]
    german = detectors.Detector.from_file(TRAINED / "german.txt")
    with Model(TRAINED / "trained-q8_0.gguf", n_threads=2) as model:
        profile = [Entry(3, 23, Mode.DROP), Entry(3, 13, Mode.DROP)]
        r = ev.evaluate(
            model,
            texts,
            profile,
            detector=german,
            n_random=1,
            max_tokens=16,
            chat=False,
            measure_cost=False,
            n_parallel=8,
            show_progress=False,
        )
        old = sequential(model, r, texts, german, 16, chat=False)
    assert r.generations == old
    assert any(g["detected"] for g in old["unsteered"])


def test_decode_scoped_steering_shares_the_prefill_and_keeps_its_results(planted_files, monkeypatch):
    """Unsteered and decode-scoped conditions of a prompt decode its prompt once (the others copy its cache
    cells); a condition steered in the prefill decodes its own. Results stay those of Session.generate."""
    path, truth = planted_files
    decode_only = [Entry(l, e, Mode.DROP, scope=Scope.DECODE) for l, e in truth.planted]
    everywhere = truth.entries(Mode.DROP)
    assert prefill_key(Profile(tuple(decode_only))) == prefill_key(None) == ()
    assert prefill_key(Profile(tuple(everywhere))) != ()
    copies = []
    real = batch.llama.llama_memory_seq_cp
    monkeypatch.setattr(batch.llama, "llama_memory_seq_cp", lambda *a: (copies.append(a[1:3]), real(*a))[1])
    texts = ["what happened at the protest yesterday ?", "what happened at the market yesterday ?"]
    with Model(path) as model:
        prompts = [model.prompt_tokens(t) for t in texts]
        plans = [None, Profile(tuple(decode_only)), Profile(tuple(everywhere)), Profile(tuple(decode_only), 2.0)]
        requests = [Request(tuple(p), 6, plan) for p in prompts for plan in plans]
        got = {}
        with model.session(n_ctx=4 * 256, n_seq_max=4) as s:
            for done in generate_many(s, requests):
                got.update(done)
        with model.session(n_ctx=128) as s:
            for j, r in enumerate(requests):
                if r.steering is not None:
                    s.steer(r.steering)
                else:
                    s.clear_steering()
                assert got[j].text == s.generate(list(r.prompt), max_tokens=6, add_bos=False).text, j
    assert len(copies) == 2 * len(prompts)  # per prompt: two decode-scoped conditions copy the unsteered prefill
    assert planted.is_refusal(got[0].text) and not planted.is_refusal(got[2].text)  # the refusal is set in the prefill


def test_sampling_is_seeded_per_request_whatever_the_batch(tiny_path):
    with Model(tiny_path("qwen3moe")) as model:  # random weights: far from greedy-confident
        prompt = tuple(model.tokenize("what happened in the city yesterday"))
        requests = [Request(prompt, 10, None, temperature=1.5, seed=seed) for seed in range(6)]
        texts = {}
        for n_seq in (1, 3, 6):
            with model.session(n_ctx=n_seq * 256, n_seq_max=n_seq) as s:
                texts[n_seq] = {j: g.text for done in generate_many(s, requests) for j, g in done}
        with model.session(n_ctx=128) as s:
            alone = {
                j: s.generate(list(prompt), max_tokens=10, temperature=1.5, seed=j, add_bos=False).text
                for j in range(6)
            }
    assert texts[1] == texts[3] == texts[6] == alone
    assert len(set(alone.values())) > 1  # the seeds draw differently


def test_sampled_evaluation_is_the_same_at_any_batch_size(tiny_path):
    kw = dict(n_random=1, max_tokens=6, temperature=1.2, measure_cost=False, show_progress=False)
    prompts = ["what happened in the city yesterday", "tell me a story about the king"]
    with Model(tiny_path("qwen3moe")) as model:
        one = ev.evaluate(model, prompts, [Entry(1, 3, Mode.DROP)], n_parallel=1, **kw)
        many = ev.evaluate(model, prompts, [Entry(1, 3, Mode.DROP)], n_parallel=7, **kw)
    assert one.generations == many.generations
    assert "seeded per condition and prompt" in one.settings["decoding"]


def test_a_judge_scores_many_responses_per_call_as_it_scores_each(load):
    model = load("qwen3moe")
    responses = ["we went home early", "", "the king left the city", "the the the", "a story"]
    prompts = ["tell me", "x", None, "tell me a story", "why"]
    with detectors.JudgeDetector(model, n_ctx=256, batch_size=4) as judge:
        many = judge.detect_many(responses, prompts)
        scores = judge.scores_many(responses[2:], prompts[2:])
    with detectors.JudgeDetector(model, n_ctx=256, batch_size=1) as judge:
        each = [judge.detect(r, p) for r, p in zip(responses, prompts)]
        single = [judge.scores(r, p) for r, p in zip(responses[2:], prompts[2:])]
    assert many == each and many[1] is False
    # prompts batched together change the float order of the prompt's matmuls: logits agree to ~1e-3, not bits
    np.testing.assert_allclose(np.array(scores), np.array(single), rtol=0, atol=1e-2)
    with pytest.raises(detectors.DetectorError, match="batch_size"):
        detectors.JudgeDetector(model, batch_size=0)


def test_the_batch_is_sized_and_bounded_before_it_starts(planted_files, tmp_path):
    path, truth = planted_files
    with Model(path) as model:
        per_cell = kv_cache_bytes(model, 1)
        assert per_cell > 0 and kv_cache_bytes(model, 10) == 10 * per_cell
        assert batch_shape(model, 20, 100, None, None) == (32, 32 * 256)  # a stream of 256 cells each
        assert batch_shape(model, 20, 5, None, None) == (5, 5 * 256)  # no more sequences than pairs
        assert batch_shape(model, 20, 100, None, 1024) == (4, 1024)  # -c bounds them all
        assert batch_shape(model, 20, 100, 3, None, min_ctx=300) == (3, 3 * 512)
        with pytest.raises(EvalError, match="-np 8 sequences of 20 positions need a context of 2048"):
            batch_shape(model, 20, 100, 8, 100)
        with pytest.raises(EvalError, match="need 20 positions but the context holds 10"):
            batch_shape(model, 20, 100, None, 10)
    prompts = tmp_path / "two.txt"
    prompts.write_text("what happened at the protest yesterday ?\nwhat happened at the market yesterday ?\n")
    r = CliRunner().invoke(
        main,
        [
            "eval",
            str(path),
            "--prompts",
            str(prompts),
            "--off",
            "1:6",
            "-n",
            "3",
            "--n-random",
            "1",
            "-np",
            "3",
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert r.exit_code == 0, r.output
    line = next(l for l in r.stderr.splitlines() if "sequences per batch" in l)
    assert line.startswith("8 generations (4 conditions x 2 prompts), 3 sequences per batch; KV cache ")
    r = CliRunner().invoke(
        main,
        [
            "eval",
            str(path),
            "--prompts",
            str(prompts),
            "--off",
            "1:6",
            "-n",
            "3",
            "--n-random",
            "1",
            "-np",
            "64",
            "-c",
            "64",
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert r.exit_code == 1 and "raise -c or lower -np" in r.output


def test_the_cli_resumes_a_run_kept_in_its_folder_and_says_so(planted_files, tmp_path):
    path, _ = planted_files
    prompts = tmp_path / "two.txt"
    prompts.write_text("what happened at the protest yesterday ?\nwhat happened at the market yesterday ?\n")
    args = [
        "eval",
        str(path),
        "--prompts",
        str(prompts),
        "--off",
        "1:6",
        "-n",
        "3",
        "--n-random",
        "1",
        "--out",
        str(tmp_path / "e"),
    ]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert list((tmp_path / "e" / "checkpoint").glob("records-*.json"))
    before = ev.EvalResult.from_json((tmp_path / "e" / "report.json").read_text())
    again = CliRunner().invoke(main, args + ["--resume"])
    assert again.exit_code == 0, again.output
    assert "resumed: 8 of 8 generations and 4 capability cost(s) from the earlier run in this folder" in again.stdout
    after = ev.EvalResult.from_json((tmp_path / "e" / "report.json").read_text())
    assert [c.to_dict() for c in after.conditions] == [c.to_dict() for c in before.conditions]
    assert after.settings["resumed"] == {"pairs": 8, "generations": 8, "costs": 4}


def test_progress_counts_generations_over_all_conditions_with_tokens_per_second(tiny_path, capsys):
    with Model(tiny_path("qwen3moe")) as model:
        ev.evaluate(
            model,
            ["the king left", "the dog ran"],
            [Entry(1, 3, Mode.DROP)],
            n_random=1,
            max_tokens=4,
            measure_cost=False,
            show_progress=True,
        )
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "8/8" in bar and "tok/s" in bar and "generation" in bar
