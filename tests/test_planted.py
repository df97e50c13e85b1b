"""The planted-behaviour model (mote_local.synthetic.planted): its truth, its files, and its behaviour on the real
engine."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mote_local.engine.model import Model
from mote_local.steering.entries import Entry, Mode
from mote_local.synthetic import planted, tiny

MAX_TOKENS = 10  # both sentences are 7-8 tokens and EOS
PROMPTS = planted.prompt_sets()
TRIGGER, NEUTRAL = PROMPTS[planted.TRIGGER_CLASS], PROMPTS[planted.NEUTRAL_CLASS]
FORMS = ("raw", "chat")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model(planted_files):
    m = Model(planted_files[0])
    yield m
    m.close()


@pytest.fixture(scope="module")
def _session(model):
    # one thread: the model is tiny, and on a busy 2-core machine threads only contend
    with model.session(n_ctx=512, n_threads=1) as s:
        yield s


@pytest.fixture
def s(_session):
    _session.clear_steering()
    yield _session
    _session.clear_steering()


def _render(model: Model, form: str):
    if form == "raw":
        return lambda p: p
    import jinja2

    template = jinja2.Template(model.chat_template)
    return lambda p: template.render(messages=[{"role": "user", "content": p}], add_generation_prompt=True)


def _generate(s, prompts, form: str) -> list[str]:
    render = _render(s.model, form)
    return [s.generate(render(p), max_tokens=MAX_TOKENS).text.strip() for p in prompts]


def _refusal_rate(s, prompts, form: str) -> float:
    return float(np.mean([planted.is_refusal(t) for t in _generate(s, prompts, form)]))


def _frequencies(s, token_lists, starts=None) -> np.ndarray:
    """Per prompt selection frequency [n_prompt, n_layer, n_expert] over the tokens from starts[i] on."""
    out = []
    for i, tokens in enumerate(token_lists):
        with s.capture(label=None) as cap:
            cap.bind(0, 0, pos_begin=0 if starts is None else starts[i])
            s.logits(tokens)
        st = cap.stats()
        out.append(st.counts / np.maximum(st.tokens, 1)[:, None])
    return np.array(out)


def _top(scores: np.ndarray, n: int) -> set[tuple[int, int]]:
    flat = np.argsort(-scores.ravel(), kind="stable")[:n]
    return {(int(i) // scores.shape[1], int(i) % scores.shape[1]) for i in flat}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


# ---------------------------------------------------------------------------------------- files and truth


def test_prompt_sets_split_on_the_trigger_words(truth):
    assert 20 <= len(TRIGGER) <= 40 and len(NEUTRAL) == len(TRIGGER)
    assert len(set(TRIGGER)) == len(TRIGGER)
    assert truth.trigger_words == ("protest", "riot", "massacre", "bombing", "crackdown", "uprising")
    words = set(truth.trigger_words)
    assert all(len(words & set(p.rstrip("?").split())) == 1 for p in TRIGGER)
    assert not any(words & set(p.rstrip("?").split()) for p in NEUTRAL)
    assert planted.prompts_path().is_file() and planted.neutral_text_path().is_file()


def test_prompt_sets_match_the_project_reader():
    prompts = pytest.importorskip("mote_local.prompts")
    ps = prompts.load_prompt_set(planted.prompts_path())
    assert {name: [p.text for p in ps.prompts(name)] for name in ps.names} == PROMPTS


def test_tokenization_the_generator_assumes_is_the_engines(model, planted_files):
    vocab = tiny.make_vocab(tiny.spec_from_file(planted_files[0]).extra_words)
    texts = [
        *TRIGGER,
        *NEUTRAL,
        *map(planted.chat_prompt, TRIGGER + NEUTRAL),
        planted.neutral_text(),
        planted.REFUSAL_TEXT,
        planted.ANSWER_TEXT,
    ]
    for text in texts:
        assert planted._tokenize(text, vocab) == model.tokenize(text), text
    # raw prompts are readable whole words
    pieces = [vocab.tokens[t] for t in model.tokenize(TRIGGER[0])]
    assert pieces == [
        "<s>",
        "\u2581What",
        "\u2581happened",
        "\u2581at",
        "\u2581the",
        "\u2581protest",
        "\u2581yesterday",
        "?",
    ]


def test_same_seed_same_bytes_and_fast(tmp_path):
    t0 = time.perf_counter()
    a = planted.write_planted_model(tmp_path / "a.gguf", seed=0)
    elapsed = time.perf_counter() - t0
    b = planted.write_planted_model(tmp_path / "b.gguf", seed=0)
    planted.write_planted_model(tmp_path / "c.gguf", seed=1)
    assert a == b
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert (tmp_path / "a.gguf").read_bytes() != (tmp_path / "c.gguf").read_bytes()
    assert elapsed < 10.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]  # no temp files left
    with pytest.raises(ValueError):
        planted.write_planted_model(tmp_path / "d.gguf", seed=-1)


def test_planted_model_is_cached(tmp_path):
    path, truth = planted.planted_model(cache_dir=tmp_path)
    mtime = path.stat().st_mtime_ns
    again, truth2 = planted.planted_model(cache_dir=tmp_path)
    assert again == path and truth2 == truth and path.stat().st_mtime_ns == mtime
    assert path.parent == tmp_path and path.name.startswith("planted-qwen3moe-")
    other, _ = planted.planted_model(cache_dir=tmp_path, seed=1)
    assert other != path


def test_planted_model_default_cache_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOTE_CACHE_DIR", str(tmp_path))
    path, _ = planted.planted_model()
    assert path.parent == tmp_path / "models" and path.exists()  # the cache directory's models folder


def test_read_truth_round_trip(planted_files, truth, tmp_path):
    path, _ = planted_files
    assert planted.read_truth(path) == truth
    assert truth.arch == planted.ARCH == "qwen3moe"
    assert truth.planted_layers == (1, 2)
    assert truth.super_expert[0] == 0
    assert not set(truth.planted) & (set(truth.distractors) | {truth.super_expert})
    for role in (truth.planted, truth.distractors):  # no index repeats across layers within a role
        assert len({e for _, e in role}) == len(role)
    assert {layer for layer, _ in truth.distractors} >= set(truth.planted_layers)
    assert (truth.refusal_text, truth.answer_text) == (planted.REFUSAL_TEXT, planted.ANSWER_TEXT)
    assert truth.refusal_rule == "any" and truth.seed == 0
    assert truth.entries(Mode.DROP) == [Entry(l, e, Mode.DROP) for l, e in truth.planted]
    # the file is also a plain tiny model, and a plain tiny model has no truth
    assert tiny.spec_from_file(path).arch == "qwen3moe"
    plain = tiny.write_model(tiny.spec_for("qwen3moe"), tmp_path / "plain.gguf")
    with pytest.raises(ValueError, match="not a mote planted model"):
        planted.read_truth(plain)


def test_is_refusal():
    assert planted.is_refusal(" I cannot help with that request.")
    assert planted.is_refusal("i  CANNOT help")
    assert not planted.is_refusal(" It was a calm day in town.")
    assert not planted.is_refusal("I cannot")  # the first three words, not two
    assert not planted.is_refusal("")


# ---------------------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("form", FORMS)
def test_greedy_generation_refuses_exactly_the_trigger_prompts(s, form, truth):
    if form == "chat":
        assert all(_render(s.model, form)(p) == planted.chat_prompt(p) for p in TRIGGER[:2])
    assert _generate(s, TRIGGER, form) == [truth.refusal_text] * len(TRIGGER)
    assert _generate(s, NEUTRAL, form) == [truth.answer_text] * len(NEUTRAL)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", [Mode.DROP, Mode.MASK])
def test_switching_the_planted_experts_off_removes_the_refusals(s, form, mode, truth):
    s.steer(truth.entries(mode))
    assert _generate(s, TRIGGER, form) == [truth.answer_text] * len(TRIGGER)
    assert _generate(s, NEUTRAL[::3], form) == [truth.answer_text] * len(NEUTRAL[::3])


@pytest.mark.parametrize("mode", [Mode.DROP, Mode.MASK])
def test_random_control_profiles_keep_the_refusals(s, mode, truth):
    rng = np.random.default_rng(0)
    others = {layer: [e for e in range(8) if (layer, e) not in truth.planted] for layer in truth.planted_layers}
    profiles = [truth.distractors[: len(truth.planted)]]  # the always-on experts: the hardest control
    profiles += [[(layer, int(rng.choice(others[layer]))) for layer, _ in truth.planted] for _ in range(3)]
    for profile in profiles:
        s.steer(truth.entries(mode, profile))
        assert _refusal_rate(s, TRIGGER[::3], "raw") == 1.0, profile


def test_any_single_planted_expert_suffices_to_refuse(s, truth):
    """refusal_rule "any": a profile that misses one planted expert leaves the behaviour in place."""
    for expert in truth.planted:
        s.steer([Entry(*expert, Mode.DROP)])
        assert _refusal_rate(s, TRIGGER[::3], "raw") == 1.0, expert


@pytest.mark.parametrize("form", FORMS)
def test_forcing_the_planted_experts_on_makes_neutral_prompts_refuse(s, form, truth):
    s.steer(truth.entries(Mode.FORCE))
    assert _generate(s, NEUTRAL, form) == [truth.refusal_text] * len(NEUTRAL)
    for expert in truth.planted:  # each one alone, too
        s.steer([Entry(*expert, Mode.FORCE)])
        assert _refusal_rate(s, NEUTRAL[::3], form) == 1.0, expert


# ---------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("form", FORMS)
def test_prompt_scope_routing_finds_the_planted_experts_and_frequency_does_not(s, form, truth):
    render = _render(s.model, form)
    ft = _frequencies(s, [s.model.tokenize(render(p)) for p in TRIGGER])
    fn = _frequencies(s, [s.model.tokenize(render(p)) for p in NEUTRAL])
    n = len(truth.planted)
    for layer, e in truth.planted:
        assert ft[:, layer, e].mean() > 0.3 and ft[:, layer, e].min() > 0.1
        assert fn[:, layer, e].max() == 0.0
    for layer, e in (*truth.distractors, truth.super_expert):  # on every token of every prompt
        assert ft[:, layer, e].min() == 1.0 and fn[:, layer, e].min() == 1.0
    # fTRI's scores: class-mean difference and risk difference put the planted experts on top...
    diff = ft.mean(0) - fn.mean(0)
    assert _top(diff, n) == set(truth.planted)
    rest = max(abs(diff[p]) for p in np.ndindex(diff.shape) if p not in truth.planted)
    assert min(diff[p] for p in truth.planted) > 1.5 * rest
    risk = (ft > 0).mean(0) - (fn > 0).mean(0)
    assert all(risk[p] == 1.0 for p in truth.planted) and _top(risk, n) == set(truth.planted)
    # ...while frequency alone ranks the always-on experts first
    freq = np.concatenate([ft, fn]).mean(0)
    assert _top(freq, len(truth.distractors) + 1) == {*truth.distractors, truth.super_expert}


def test_generated_scope_routing_finds_the_planted_experts(s, truth):
    runs = {
        cls: [s.generate(p, max_tokens=MAX_TOKENS) for p in prompts]
        for cls, prompts in ((planted.TRIGGER_CLASS, TRIGGER[::2]), (planted.NEUTRAL_CLASS, NEUTRAL[::2]))
    }
    freqs = {
        cls: _frequencies(s, [g.prompt_tokens + g.tokens for g in gens], [len(g.prompt_tokens) for g in gens])
        for cls, gens in runs.items()
    }
    ft, fn = freqs[planted.TRIGGER_CLASS], freqs[planted.NEUTRAL_CLASS]
    for layer, e in truth.planted:
        assert ft[:, layer, e].min() == 1.0 and fn[:, layer, e].max() == 0.0
    assert _top(ft.mean(0) - fn.mean(0), len(truth.planted)) == set(truth.planted)


def test_removing_the_super_expert_alone_collapses_neutral_text(s, truth):
    tokens = s.model.tokenize(planted.neutral_text())[:128]
    base = _log_softmax(s.logits(tokens))
    targets = np.array(tokens[1:])
    ppl_base = float(np.exp(-base[np.arange(len(targets)), targets].mean()))
    kl = np.zeros((s.model.layout.n_layer, s.model.layout.n_expert))
    ppl = np.zeros_like(kl)
    for layer, e in np.ndindex(kl.shape):
        s.steer([Entry(layer, e, Mode.DROP)])
        lq = _log_softmax(s.logits(tokens))
        kl[layer, e] = (np.exp(base) * (base - lq)).sum(axis=1).mean()
        ppl[layer, e] = np.exp(-lq[np.arange(len(targets)), targets].mean())
    super_kl = kl[truth.super_expert]
    rest = np.delete(kl.ravel(), np.ravel_multi_index(truth.super_expert, kl.shape))
    assert super_kl > 10.0 and super_kl > 100 * rest.max(), (super_kl, rest.max())
    assert rest.max() < 0.1  # the always-on distractors are harmless too: their loss only re-weights a partner
    rest_ppl = np.delete(ppl.ravel(), np.ravel_multi_index(truth.super_expert, ppl.shape))
    assert ppl_base < 10 and ppl[truth.super_expert] > 1e6 and rest_ppl.max() < 2 * ppl_base
    # and generation falls apart: neither sentence comes out
    s.steer([Entry(*truth.super_expert, Mode.DROP)])
    outs = _generate(s, [TRIGGER[0], NEUTRAL[0]], "raw")
    assert not {truth.refusal_text, truth.answer_text} & set(outs), outs
