"""fTRI statistics: known answers, planted signal, bootstrap coverage, edge cases, validation."""

import dataclasses
import json
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mote_local.ftri.stats import (
    ALL_METHODS,
    METHODS,
    Activations,
    FtriResult,
    RankedExpert,
    analyse,
    score,
)


def hand_case() -> Activations:
    """2 behaviour + 2 baseline prompts; layer 1 is non-MoE (no tokens); expert 2 never fires."""
    counts = np.zeros((4, 2, 3), dtype=int)
    counts[:, 0, :2] = [[2, 4], [2, 0], [1, 2], [0, 2]]
    tokens = np.array([[4, 0], [2, 0], [4, 0], [4, 0]])
    weights = np.zeros((4, 2, 3))
    weights[:, 0, :2] = [[1.0, 2.0], [0.5, 0.0], [0.2, 1.0], [0.0, 0.6]]
    norms = np.zeros((4, 2, 3))  # gate weight x output norm, summed over the routed tokens
    norms[:, 0, :2] = [[2.0, 6.0], [1.0, 0.0], [0.4, 2.0], [0.0, 3.0]]
    return Activations(counts, tokens, weights, np.array([True, True, False, False]), output_norm_sums=norms)


# layer 0, experts 0 and 1, worked by hand from hand_case()
HAND = {
    # per-prompt frequencies: b [.5, 1], [1, 0] -> [.75, .5]; n [.25, .5], [0, .5] -> [.125, .5]
    "mean_diff": [0.625, 0.0],
    # pooled: b [4, 4] / 6, n [1, 4] / 8
    "risk_diff": [4 / 6 - 1 / 8, 4 / 6 - 4 / 8],
    # rates b [4, 4] / 6, n [1, 4] / 8, both on the mean token basis m = 7, plus 0.5:
    # b (14/3 + .5) / (7/3 + .5) = 31/17 both experts; n (7/8 + .5) / (49/8 + .5) = 11/53 and (3.5 + .5) / (3.5 + .5)
    # (before issue 12 the pseudo-count sat on each class's own token total: log(1.8 / 0.2), log(1.8))
    "log_odds": [math.log((31 / 17) / (11 / 53)), math.log(31 / 17)],
    # per-prompt weight per token: b [.25, .5], [.25, 0]; n [.05, .25], [0, .15]
    "weight_mass": [0.25 - 0.025, 0.25 - 0.2],
    # per routed token, pooled: b (2 + 1) / (2 + 2), 6 / 4; n 0.4 / 1, (2 + 3) / (2 + 2)
    "reap": [0.75 - 0.4, 1.5 - 1.25],
}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_hand_computed_scores(method):
    s = score(hand_case(), method)
    expected = np.zeros((2, 3))
    expected[0, :2] = HAND[method]
    np.testing.assert_allclose(s, expected, rtol=0, atol=1e-12)


def test_log_odds_alpha():
    s = score(hand_case(), "log_odds", alpha=1.0)
    # m = 7: b (14/3 + 1) / (7/3 + 1) = 1.7; n (7/8 + 1) / (49/8 + 1) = 15/57 and 1
    np.testing.assert_allclose(s[0, :2], [math.log(1.7 / (15 / 57)), math.log(1.7)], rtol=1e-12)


def unequal_lengths(n_each: int = 6, long: int = 40, short: int = 10) -> Activations:
    """Issue 12, reproduction 2: behaviour prompts of 40 tokens, baseline prompts of 10. Expert 0 is selected on
    every token, expert 1 on a fifth of the tokens of both classes, expert 2 on half the behaviour tokens and a
    tenth of the baseline tokens, expert 3 never."""
    is_behavior = np.arange(2 * n_each) < n_each
    tok = np.where(is_behavior, long, short)
    counts = np.zeros((2 * n_each, 1, 4), dtype=int)
    counts[:, 0, 0] = tok
    counts[:, 0, 1] = tok // 5
    counts[:, 0, 2] = np.where(is_behavior, tok // 2, tok // 10)
    return Activations(counts, tok[:, None], counts * 0.4, is_behavior, output_norm_sums=counts * 0.8)


def test_log_odds_does_not_rank_an_always_selected_expert_first_when_prompt_lengths_differ():
    act = unequal_lengths()
    r = analyse(act, "log_odds", n_boot=100, top_n=1)
    # before: log((240 + .5) / .5) - log((60 + .5) / .5) = 1.38, interval [1.38, 1.38], stability 1, ranked first
    assert (r.scores[0, 0], r.ci_low[0, 0], r.ci_high[0, 0], r.stability[0, 0]) == (0.0, 0.0, 0.0, 0.0)
    assert r.scores[0, 1] == 0.0  # equal rates: 0, whatever the token totals
    # m = (240 + 60) / 2 = 150: behaviour rate 1/2 -> (75 + .5) / (75 + .5); baseline 1/10 -> (15 + .5) / (135 + .5)
    assert r.scores[0, 2] == pytest.approx(-math.log(15.5 / 135.5), rel=1e-12)
    assert [(e.layer, e.expert) for e in r.ranked(1)] == [(0, 2)]
    assert r.scores[0, 3] == 0.0


@pytest.mark.parametrize("method", ALL_METHODS)
def test_equal_rates_score_zero_at_unequal_prompt_lengths(method):
    s = score(unequal_lengths(), method)
    assert s[0, 0] == 0.0 and s[0, 1] == pytest.approx(0.0, abs=1e-12) and s[0, 3] == 0.0
    if method == "reap":  # the same gate weight x output norm per routed token in both classes: no difference
        assert s[0, 2] == pytest.approx(0.0, abs=1e-12)
    else:
        assert s[0, 2] > 0


def test_log_odds_depends_on_the_rates_not_on_the_token_totals():
    """The same per-token rates on prompts of 40 and 10 tokens, or of 10 and 40, score alike (the pseudo-count
    weighs on the common basis), and the score tends to the plain log odds ratio as the basis grows."""
    a = score(unequal_lengths(long=40, short=10), "log_odds")
    b = score(unequal_lengths(long=10, short=40), "log_odds")
    np.testing.assert_allclose(a, b, rtol=1e-12)
    big = score(unequal_lengths(long=40000, short=10000), "log_odds")
    assert big[0, 2] == pytest.approx(math.log(1.0) - math.log(0.1 / 0.9), rel=1e-4)


def test_never_firing_expert_scores_zero_under_log_odds_despite_unequal_token_totals():
    act = hand_case()
    assert act.tokens[act.is_behavior, 0].sum() != act.tokens[~act.is_behavior, 0].sum()
    assert score(act, "log_odds")[0, 2] == 0.0


def test_prompt_without_tokens_in_a_layer_is_left_out_of_the_class_mean():
    act = hand_case()
    extra = Activations(
        np.concatenate([act.counts, np.zeros((1, 2, 3), int)]),
        np.concatenate([act.tokens, np.zeros((1, 2), int)]),
        np.concatenate([act.weight_sums, np.zeros((1, 2, 3))]),
        np.array([True, True, False, False, True]),
    )
    for method in METHODS:
        np.testing.assert_allclose(score(extra, method), score(act, method), atol=1e-12)


def test_a_class_without_tokens_in_a_layer_gives_zero_there():
    counts = np.array([[[1, 0]], [[0, 0]]])
    act = Activations(counts, np.array([[2], [0]]), counts * 0.5, np.array([True, False]))
    for method in METHODS:
        assert np.all(score(act, method) == 0)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_zero_layers_and_never_firing_experts_have_zero_intervals_and_no_stability(method):
    r = analyse(hand_case(), method, n_boot=50, top_n=3)
    for a in (r.scores, r.ci_low, r.ci_high, r.stability):
        assert np.all(np.isfinite(a))
        assert np.all(a[1] == 0) and a[0, 2] == 0


@pytest.mark.parametrize("method", ALL_METHODS)
def test_single_prompt_per_class_collapses_the_interval_to_the_point(method):
    act = hand_case()
    one = Activations(
        act.counts[1:3],
        act.tokens[1:3],
        act.weight_sums[1:3],
        np.array([True, False]),
        output_norm_sums=act.output_norm_sums[1:3],
    )
    r = analyse(one, method, n_boot=30)
    assert np.all(np.isfinite(r.scores))
    np.testing.assert_array_equal(r.ci_low, r.scores)
    np.testing.assert_array_equal(r.ci_high, r.scores)
    assert set(np.unique(r.stability)) <= {0.0, 1.0}


def planted_case(seed: int = 1):
    """Binomial routing with three planted behaviour experts and two experts busy on both classes."""
    rng = np.random.default_rng(seed)
    n_prompts, n_layer, n_expert = 60, 6, 16
    is_behavior = np.arange(n_prompts) < 30
    tokens = rng.integers(30, 70, size=(n_prompts, n_layer))
    rate = np.full((n_prompts, n_layer, n_expert), 0.1)
    planted = [(1, 3), (4, 7), (5, 0)]
    distractors = [(2, 5), (3, 9)]
    for layer, expert in planted:
        rate[is_behavior, layer, expert] = 0.35
    for layer, expert in distractors:
        rate[:, layer, expert] = 0.9
    counts = rng.binomial(tokens[:, :, None], rate)
    # each selection carries a gate weight ~ U(0.2, 0.4): the sum over c selections, approximately normal
    weights = np.maximum(0.0, counts * 0.3 + rng.normal(size=counts.shape) * np.sqrt(counts) * 0.2 / math.sqrt(12))
    # and an output norm ~ 2: a planted expert's output is larger on behaviour prompts (3)
    norm = np.full(counts.shape, 2.0)
    for layer, expert in planted:
        norm[is_behavior, layer, expert] = 3.0
    norms = weights * norm
    return Activations(counts, tokens, weights, is_behavior, output_norm_sums=norms), planted, distractors


@pytest.mark.parametrize("method", ALL_METHODS)
def test_planted_experts_rank_on_top_and_distractors_do_not(method):
    act, planted, distractors = planted_case()
    r = analyse(act, method, top_n=3)
    assert sorted((e.layer, e.expert) for e in r.ranked(3)) == sorted(planted)
    weakest = min(r.scores[p] for p in planted)
    for p in planted:
        assert r.ci_low[p] > 0 and r.stability[p] >= 0.9
    for d in distractors:  # busy on both classes: no signal, however often they fire
        assert r.scores[d] < weakest / 2 and r.stability[d] == 0


@pytest.mark.parametrize(
    "method, truth",
    [
        ("mean_diff", 0.1),
        ("risk_diff", 0.1),
        ("weight_mass", 0.05),
        ("log_odds", math.log(0.3 / 0.7) - math.log(0.2 / 0.8)),
    ],
)
def test_bootstrap_interval_covers_the_true_difference(method, truth):
    rng = np.random.default_rng(7)
    n_tok, n_each = 20, 25
    is_behavior = np.arange(2 * n_each) < n_each
    rate = np.where(is_behavior, 0.3, 0.2).reshape(-1, 1, 1)
    tokens = np.full((2 * n_each, 1), n_tok)
    covered = 0
    for sim in range(100):
        counts = rng.binomial(n_tok, rate)
        r = analyse(Activations(counts, tokens, counts * 0.5, is_behavior), method, n_boot=200, seed=sim)
        covered += r.ci_low[0, 0] <= truth <= r.ci_high[0, 0]
    assert covered >= 85  # nominal 95; 90-97 seen across data seeds


def test_analyse_is_seeded_and_fast_at_model_scale():
    rng = np.random.default_rng(0)
    n_prompts, n_layer, n_expert = 200, 48, 128
    tokens = rng.integers(20, 60, size=(n_prompts, n_layer))
    counts = rng.binomial(tokens[:, :, None], rng.random((n_layer, n_expert)) * 0.1)
    act = Activations(counts, tokens, counts * 0.3, np.arange(n_prompts) < 100)
    start = time.perf_counter()
    r = analyse(act, "mean_diff", n_boot=200, seed=3)
    assert time.perf_counter() - start < 2.0  # about 0.2 s on 2 cores
    again = analyse(act, "mean_diff", n_boot=200, seed=3)
    np.testing.assert_array_equal(r.ci_low, again.ci_low)
    np.testing.assert_array_equal(r.stability, again.stability)


def tied_result(sign: str = "positive") -> FtriResult:
    """Four experts tied at 0.5 in layer 0, one at -0.5 in layer 1; single prompts, so exact."""
    counts = np.array([[[1, 1, 1, 1], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 1, 0, 0]]])
    act = Activations(counts, np.array([[2, 2], [2, 2]]), counts * 1.0, np.array([True, False]))
    return analyse(act, "mean_diff", n_boot=10, top_n=2, sign=sign)


def test_ties_go_to_the_lowest_layer_and_expert_in_ranking_and_stability():
    r = tied_result()
    assert [(e.layer, e.expert) for e in r.ranked(3)] == [(0, 0), (0, 1), (0, 2)]
    np.testing.assert_array_equal(r.stability, [[1, 1, 0, 0], [0, 0, 0, 0]])


def test_ranked_by_sign_cap_and_layers():
    r = tied_result()
    assert [(e.layer, e.expert) for e in r.ranked(1, sign="negative")] == [(1, 1)]
    assert [(e.layer, e.expert, e.score) for e in r.ranked(2, sign="abs")] == [(0, 0, 0.5), (0, 1, 0.5)]
    capped = r.ranked(3, sign="abs", per_layer_cap=1)
    assert [(e.layer, e.expert) for e in capped] == [(0, 0), (1, 1)]
    only1 = r.ranked(layers=[1])
    assert {e.layer for e in only1} == {1} and len(only1) == 4
    assert len(r.ranked()) == 8
    assert r.ranked(1)[0] == RankedExpert(0, 0, 0.5, 0.5, 0.5, 1.0)
    with pytest.raises(ValueError, match=r"layers \[5\] out of range.*0\.\.1"):
        r.ranked(layers=[5])
    with pytest.raises(ValueError, match="unknown sign 'up'"):
        r.ranked(sign="up")


def test_negative_sign_stability():
    r = tied_result("negative")
    np.testing.assert_array_equal(r.stability, [[0, 0, 0, 0], [0, 1, 0, 0]])


def test_json_round_trip():
    act, _, _ = planted_case()
    r = analyse(act, "log_odds", n_boot=20, alpha=1.0)
    back = FtriResult.from_dict(json.loads(json.dumps(r.to_dict())))
    for name in ("scores", "ci_low", "ci_high", "stability"):
        np.testing.assert_array_equal(getattr(back, name), getattr(r, name))
    assert (
        back.method,
        back.top_n,
        back.sign,
        back.n_behavior,
        back.n_baseline,
        back.level,
        back.n_boot,
        back.options,
    ) == ("log_odds", 10, "positive", 30, 30, 0.95, 20, {"alpha": 1.0})
    assert back.ranked(5) == r.ranked(5)


def test_from_dict_errors():
    d = tied_result().to_dict()
    with pytest.raises(ValueError, match="missing ci_low"):
        FtriResult.from_dict({k: v for k, v in d.items() if k != "ci_low"})
    with pytest.raises(ValueError, match="share one"):
        FtriResult.from_dict({**d, "stability": [[0.0]]})
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        FtriResult.from_dict({**d, "method": "magic"})


def test_activations_are_frozen_read_only_copies():
    counts = np.array([[[1, 0]], [[0, 1]]])
    act = Activations(counts, [[1], [1]], counts * 1.0, [True, False])
    counts[0, 0, 0] = 0
    assert act.counts[0, 0, 0] == 1
    with pytest.raises(ValueError):
        act.counts[0, 0, 0] = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        act.counts = counts
    assert (act.n_prompts, act.n_layer, act.n_expert, act.n_behavior, act.n_baseline) == (2, 1, 2, 1, 1)


def valid_parts():
    counts = np.array([[[1, 0]], [[0, 1]]])
    return dict(
        counts=counts, tokens=np.array([[1], [1]]), weight_sums=counts * 1.0, is_behavior=np.array([True, False])
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(counts=np.zeros((2, 2))), "counts must have 3 dimensions"),
        (
            dict(
                counts=np.zeros((0, 1, 2), int),
                tokens=np.zeros((0, 1), int),
                weight_sums=np.zeros((0, 1, 2)),
                is_behavior=np.zeros(0, bool),
            ),
            "empty dimension",
        ),
        (dict(tokens=np.array([[1, 1], [1, 1]])), r"tokens has shape \(2, 2\), expected .* \(2, 1\)"),
        (dict(weight_sums=np.zeros((2, 1, 3))), "weight_sums has shape"),
        (dict(weight_sums=np.array([[[np.nan, 0]], [[0, 1]]])), "weight_sums must be finite and >= 0"),
        (dict(weight_sums=np.array([[[-1.0, 0]], [[0, 1]]])), "weight_sums must be finite and >= 0"),
        (dict(counts=np.array([[[-1, 0]], [[0, 1]]])), "counts must be >= 0"),
        (dict(counts=np.array([[[0.5, 0]], [[0, 1]]])), "counts must be whole numbers"),
        (dict(counts=np.array([[["a", "b"]], [["c", "d"]]])), "counts must hold finite numbers"),
        (dict(counts=np.array([[[2, 0]], [[0, 1]]])), r"counts\[0, 0, 0\] = 2 exceeds tokens\[0, 0\] = 1"),
        (dict(is_behavior=np.array([1, 0])), "is_behavior must be booleans"),
        (dict(is_behavior=np.array([True, False, True])), r"is_behavior has shape \(3,\)"),
        (dict(is_behavior=np.array([True, True])), "no baseline prompt"),
        (dict(is_behavior=np.array([False, False])), "no behaviour prompt"),
    ],
)
def test_activation_validation(change, message):
    with pytest.raises(ValueError, match=message):
        Activations(**{**valid_parts(), **change})


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda a: score(a, "magic"), "unknown fTRI method 'magic'; choose one of mean_diff"),
        (lambda a: score(a, "mean_diff", alpha=1.0), "mean_diff takes no options; got alpha"),
        (lambda a: score(a, "log_odds", beta=1.0), "log_odds takes alpha; got beta"),
        (lambda a: score(a, "log_odds", alpha=0), "alpha .* must be a finite number > 0"),
        (lambda a: analyse(a, "mean_diff", sign="up"), "unknown sign 'up'"),
        (lambda a: analyse(a, "mean_diff", n_boot=0), "n_boot must be an integer >= 1"),
        (lambda a: analyse(a, "mean_diff", level=1.0), "level must lie strictly between 0 and 1"),
        (lambda a: analyse(a, "mean_diff", top_n=0), "top_n must be an integer >= 1"),
    ],
)
def test_option_validation(call, message):
    with pytest.raises(ValueError, match=message):
        call(Activations(**valid_parts()))


@st.composite
def activations(draw):
    n_prompts = draw(st.integers(2, 6))
    n_layer, n_expert = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    tokens = draw(hnp.arrays(np.int64, (n_prompts, n_layer), elements=st.integers(0, 10)))
    raw = draw(hnp.arrays(np.int64, (n_prompts, n_layer, n_expert), elements=st.integers(0, 10)))
    counts = np.minimum(raw, tokens[:, :, None])
    per = draw(hnp.arrays(np.float64, counts.shape, elements=st.floats(0, 3)))
    rest = draw(hnp.arrays(np.bool_, n_prompts - 2))
    return Activations(counts, tokens, counts * per, np.concatenate([[True, False], rest]))


@settings(max_examples=150, deadline=None)
@given(
    act=activations(),
    method=st.sampled_from(METHODS),
    sign=st.sampled_from(["positive", "negative", "abs"]),
    top_n=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_finite_and_bounded(act, method, sign, top_n, seed):
    r = analyse(act, method, n_boot=20, top_n=top_n, sign=sign, seed=seed)
    for a in (r.scores, r.ci_low, r.ci_high, r.stability):
        assert np.all(np.isfinite(a))
    assert np.all(r.ci_low <= r.ci_high)
    assert np.all((r.stability >= 0) & (r.stability <= 1))
    if method in ("mean_diff", "risk_diff"):
        for a in (r.scores, r.ci_low, r.ci_high):
            assert np.all(np.abs(a) <= 1 + 1e-12)


# ---------------------------------------------------------------------------------------------- reap


def test_reap_reads_output_magnitude_where_routing_is_alike():
    """Expert 0: routed alike in both classes with the same gate weights, but its output is twice as large on
    behaviour prompts: reap sees it, the routing methods do not. Expert 1: routed only on behaviour prompts."""
    is_behavior = np.array([True, True, False, False])
    tokens = np.full((4, 1), 10)
    counts = np.array([[[4, 3]], [[6, 2]], [[5, 0]], [[5, 0]]])
    weights = counts * 0.5
    per_token = np.array([2.0, 2.0, 1.0, 1.0])[:, None, None] * np.array([1.0, 1.5])  # gate weight x norm
    act = Activations(counts, tokens, weights, is_behavior, output_norm_sums=counts * per_token)
    s = score(act, "reap")
    # expert 0: 2.0 per routed token against 1.0; expert 1: 3.0 against 0 (never routed on baseline prompts)
    np.testing.assert_allclose(s[0], [1.0, 3.0], rtol=1e-12)
    for method in METHODS:
        assert score(act, method)[0, 0] == pytest.approx(0.0, abs=1e-12)


def test_reap_averages_over_routed_tokens_pooled_in_each_class():
    counts = np.array([[[1]], [[3]], [[2]]])
    norms = np.array([[[4.0]], [[3.0]], [[1.0]]])  # behaviour: (4 + 3) / (1 + 3) = 1.75, baseline 0.5
    act = Activations(counts, np.full((3, 1), 5), counts * 0.5, np.array([True, True, False]), output_norm_sums=norms)
    assert score(act, "reap")[0, 0] == pytest.approx(1.25, rel=1e-12)


def test_reap_needs_output_norms_and_validates_them():
    parts = valid_parts()
    with pytest.raises(ValueError, match="reap needs the experts' output norms"):
        score(Activations(**parts), "reap")
    with pytest.raises(ValueError, match="output_norm_sums has shape"):
        Activations(**parts, output_norm_sums=np.zeros((2, 1, 3)))
    with pytest.raises(ValueError, match="output_norm_sums must be finite and >= 0"):
        Activations(**parts, output_norm_sums=-parts["counts"] * 1.0)
    with pytest.raises(ValueError, match=r"output_norm_sums\[0, 0, 1\] is 2.0 but the expert was never selected"):
        Activations(**parts, output_norm_sums=np.array([[[1.0, 2.0]], [[0.0, 1.0]]]))


def test_reap_bootstrap_interval_covers_the_true_difference():
    rng = np.random.default_rng(11)
    n_tok, n_each = 20, 25
    is_behavior = np.arange(2 * n_each) < n_each
    tokens = np.full((2 * n_each, 1), n_tok)
    covered = 0
    for sim in range(100):
        counts = rng.binomial(n_tok, 0.3, size=(2 * n_each, 1, 1))
        # each routed token: gate weight x norm ~ Gamma(4, 0.3) on behaviour (mean 1.2), Gamma(4, 0.25) (1.0)
        scale = np.where(is_behavior, 0.3, 0.25)[:, None, None]
        norms = rng.gamma(4.0 * counts, 1.0) * scale  # a sum of `count` Gamma(4) draws is Gamma(4 * count)
        r = analyse(
            Activations(counts, tokens, counts * 0.5, is_behavior, output_norm_sums=norms), "reap", n_boot=200, seed=sim
        )
        covered += r.ci_low[0, 0] <= 0.2 <= r.ci_high[0, 0]
    assert covered >= 85


# ---------------------------------------------------------------------------------------------- evidence


def test_evidence_stops_where_the_signal_stops():
    """Three planted experts among 96, N = 10: only the planted ones qualify, and the count says so."""
    act, planted, _ = planted_case()
    for method in ALL_METHODS:
        r = analyse(act, method)
        chosen, n_qualified = r.evidence(10)
        assert sorted((e.layer, e.expert) for e in chosen) == sorted(planted), method
        assert n_qualified == 3
        assert r.evidence(2)[1] == 3 and len(r.evidence(2)[0]) == 2
        assert r.evidence(10, sign="negative") == ([], 0)
        # a threshold above the planted effect leaves nothing
        assert r.evidence(10, threshold=float(r.scores.max()) * 2)[1] == 0


def test_evidence_sign_threshold_and_interval_kind():
    r = FtriResult(
        "mean_diff",
        scores=np.array([[0.5, 0.2, -0.3, 0.1, 0.0]]),
        ci_low=np.array([[0.4, 0.05, -0.4, -0.1, 0.0]]),
        ci_high=np.array([[0.6, 0.35, -0.2, 0.3, 0.0]]),
        stability=np.zeros((1, 5)),
        top_n=3,
        sign="positive",
        n_behavior=10,
        n_baseline=10,
        se=np.array([[0.05, 0.1, 0.05, 0.1, 0.0]]),
        band_crit=3.0,
    )
    # band: [0.35, 0.65], [-0.1, 0.5], [-0.45, -0.15], [-0.2, 0.4], [0, 0]
    assert r.qualified().tolist() == [[True, False, False, False, False]]
    assert r.qualified(evidence="per-expert").tolist() == [[True, True, False, False, False]]
    assert r.qualified("negative").tolist() == [[False, False, True, False, False]]
    assert r.qualified("abs").tolist() == [[True, False, True, False, False]]
    assert r.qualified("abs", threshold=0.2).tolist() == [[True, False, False, False, False]]
    assert r.qualified("abs", threshold=0.1, evidence="per-expert").tolist() == [[True, False, True, False, False]]
    chosen, n = r.evidence(sign="abs")
    assert [(e.expert, e.score) for e in chosen] == [(0, 0.5), (2, -0.3)] and n == 2
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        r.qualified(threshold=-1)
    with pytest.raises(ValueError, match="unknown evidence 'loose'"):
        r.qualified(evidence="loose")
    assert not dataclasses.replace(r, n_boot=10).qualified(evidence="per-expert").any()  # too few replicates
    old = dataclasses.replace(r, se=None, band_crit=None)  # a result written before the band existed
    with pytest.raises(ValueError, match="no simultaneous band"):
        old.qualified()
    assert old.qualified(evidence="per-expert").sum() == 2


@pytest.mark.parametrize("n_prompts", [20, 60])
def test_simultaneous_band_holds_the_family_wise_error_where_per_expert_intervals_do_not(n_prompts):
    """No expert carries signal (64 experts, rates 0.02-0.3, prompts of 10-60 tokens): the band lets some expert
    through in at most ~5% of data sets, per-expert intervals in nearly all of them."""
    rng = np.random.default_rng(5)
    band = per_expert = 0
    for sim in range(100):
        tokens = rng.integers(10, 60, size=(n_prompts, 4))
        counts = rng.binomial(tokens[:, :, None], rng.uniform(0.02, 0.3, size=(1, 4, 16)))
        r = analyse(
            Activations(counts, tokens, counts * 0.3, np.arange(n_prompts) < n_prompts // 2), "mean_diff", seed=sim
        )
        band += r.qualified("abs").any()
        per_expert += r.qualified("abs", evidence="per-expert").any()
    assert band <= 10  # nominal 5; 1-5 seen
    assert per_expert >= 80


def test_t_equivalent_critical_value():
    from mote_local.ftri.stats import _t_equivalent

    # Student's t quantiles with the normal's two-sided tails: z = 1.96 -> t(9) 0.975 quantile = 2.2622
    assert _t_equivalent(1.959963984540054, 9) == pytest.approx(2.262157, abs=1e-5)
    assert _t_equivalent(1.959963984540054, 1) == pytest.approx(12.7062, abs=1e-3)
    assert _t_equivalent(3.0, 0) == 3.0 and _t_equivalent(3.0, 10**6) == 3.0
