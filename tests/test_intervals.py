"""Intervals that respect the evaluation's design: known values, issue 12's reproduction 3, and coverage
simulations (each a few hundred simulated evaluations, well under a second)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mote_local.evaluation import intervals
from mote_local.evaluation.intervals import (
    clustered_rate_interval,
    newcombe_interval,
    paired_difference_interval,
    wilson_interval,
)


def test_wilson_and_newcombe_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(2.5, 5.0)  # fractional counts (an effective sample size) are fine
    assert lo == pytest.approx(1 - hi) and lo < wilson_interval(5, 10)[0]  # 5 responses' worth: wider
    # Newcombe (1998), Table II example: 56/70 vs 48/80 -> 0.0524 to 0.3339 (method 10)
    lo, hi = newcombe_interval(56, 70, 48, 80)
    assert (lo, hi) == (pytest.approx(0.0524, abs=1e-4), pytest.approx(0.3339, abs=1e-4))


# ---------------------------------------------------------------------------------------------- clustered rate


def test_one_response_per_prompt_is_wilson():
    hits = [1, 0, 1, 1, 0, 0, 0, 1, 1, 1]
    rate, ci, deff = clustered_rate_interval(hits, [1] * 10)
    assert (rate, ci, deff) == (0.6, wilson_interval(6, 10), 1.0)


def test_pooled_random_control_is_as_wide_as_its_prompts_allow():
    """Issue 12, reproduction 3: 72 prompts, 3 random-control seeds, greedy answers that agree across seeds
    (36 prompts refuse under every seed). The old pooled interval put 108/216 into one Wilson interval,
    [43.4%, 56.6%]; the prompts carry the information of 72 responses, not 216."""
    hits = [3] * 36 + [0] * 36
    rate, ci, deff = clustered_rate_interval(hits, [3] * 72)
    assert rate == 0.5 and deff == 3.0
    assert ci == pytest.approx(wilson_interval(36, 72))  # [38.7%, 61.3%], as the unsteered row
    assert ci[0] < 0.40 and ci[1] > 0.60
    # seeds that disagree independently within each prompt carry all 216 responses' information
    alternating = [2, 1] * 36
    rate, ci, deff = clustered_rate_interval(alternating, [3] * 72)
    assert deff == 1.0 and ci == pytest.approx(wilson_interval(108, 216))


def test_clustered_interval_edges():
    assert clustered_rate_interval([0, 0, 0], [3, 3, 3]) == (0.0, wilson_interval(0, 9), 1.0)
    assert clustered_rate_interval([3, 3], [3, 3])[1][1] == 1.0
    rate, ci, deff = clustered_rate_interval([2, 0, 1], [2, 0, 3])  # a prompt without responses is left out
    assert rate == 0.6 and 1.0 <= deff <= 3.0
    assert clustered_rate_interval([], [])[1] == (0.0, 1.0)
    with pytest.raises(ValueError, match="same length"):
        clustered_rate_interval([1, 2], [3])


@pytest.mark.parametrize(
    "a, b, n_prompts, n_seeds",
    [
        (0.5, 0.5, 72, 3),  # strong clustering: most prompts answer alike under every seed
        (1.0, 1.0, 20, 5),
        (0.05, 0.45, 72, 3),  # a rare behaviour
        (5.0, 5.0, 40, 3),  # weak clustering
    ],
)
def test_clustered_interval_coverage(a, b, n_prompts, n_seeds):
    """Prompts drawn with a behaviour propensity ~ Beta(a, b); each seed's response ~ Bernoulli(propensity).
    The clustered interval covers the population rate a / (a + b) near 95%; the pooled Wilson interval that
    treats the responses as independent does not when responses cluster."""
    rng = np.random.default_rng(1)
    truth = a / (a + b)
    covered = naive = 0
    for _ in range(400):
        y = rng.random((n_prompts, n_seeds)) < rng.beta(a, b, size=n_prompts)[:, None]
        _, (lo, hi), _ = clustered_rate_interval(y.sum(axis=1), [n_seeds] * n_prompts)
        covered += lo <= truth <= hi
        lo, hi = wilson_interval(int(y.sum()), y.size)
        naive += lo <= truth <= hi
    assert covered >= 0.91 * 400  # nominal 95; 92-96% seen
    if a + b <= 2:
        assert naive <= 0.88 * 400  # 79-84% seen


# ---------------------------------------------------------------------------------------------- paired


def test_paired_interval_known_values():
    # 10 prompts: 3 lose the behaviour under the profile, 1 gains it, 6 agree. Bonett & Price:
    # p12 = (1 + 1) / 12, p21 = (3 + 1) / 12, se = sqrt((p12 + p21 - (p12 - p21)^2) / 12)
    steered = [0, 0, 0, 1] + [1, 1, 0, 0, 0, 0]
    reference = [1, 1, 1, 0] + [1, 1, 0, 0, 0, 0]
    delta, (lo, hi) = paired_difference_interval(steered, reference)
    p12, p21 = 2 / 12, 4 / 12
    se = math.sqrt((p12 + p21 - (p12 - p21) ** 2) / 12)
    assert delta == pytest.approx(-0.2)
    assert (lo, hi) == (pytest.approx(p12 - p21 - intervals.Z95 * se), pytest.approx(p12 - p21 + intervals.Z95 * se))


def test_paired_interval_never_collapses_to_a_point():
    delta, (lo, hi) = paired_difference_interval([1] * 36 + [0] * 36, [1] * 36 + [0] * 36)
    assert delta == 0.0 and lo < -0.03 and hi > 0.03  # every pair agrees: still an interval, not [0, 0]
    delta, (lo, hi) = paired_difference_interval([0] * 72, [1] * 36 + [0] * 36)
    assert delta == -0.5 and lo <= -0.5 <= hi and hi < -0.35
    delta, (lo, hi) = paired_difference_interval([0, 0, 0], [1, 1, 1])
    assert delta == -1.0 and lo == -1.0 and hi < 0.2
    assert paired_difference_interval([], []) == (pytest.approx(math.nan, nan_ok=True), (-1.0, 1.0))


def test_paired_interval_is_narrower_than_the_unpaired_one_on_shared_prompts():
    """Issue 12, reproduction 3: the Δ column used Newcombe's unpaired interval on the same prompts. A profile
    that removes the behaviour on 6 of the 36 prompts that showed it, and changes nothing else: the pairs show a
    significant drop that the unpaired interval, blind to the pairing, calls noise."""
    steered, reference = [1] * 30 + [0] * 42, [1] * 36 + [0] * 36
    delta, (lo, hi) = paired_difference_interval(steered, reference)
    nlo, nhi = newcombe_interval(30, 72, 36, 72)
    assert delta == pytest.approx(-6 / 72)
    assert hi < 0 < nhi
    assert hi - lo < (nhi - nlo) / 2


def _correlated_pairs(rng, n, base, effect, keep, n_seeds=1):
    """Per prompt a latent u: the reference answer is u < base; each steered answer keeps u with probability
    ``keep`` (the same prompt, the same answer) or draws afresh, and is the behaviour when below base + effect."""
    u = rng.random(n)
    reference = (u < base).astype(float)
    fresh = rng.random((n, n_seeds))
    u2 = np.where(rng.random((n, n_seeds)) < keep, u[:, None], fresh)
    steered = (u2 < base + effect).mean(axis=1)
    return steered, reference


@pytest.mark.parametrize(
    "n, base, effect, keep, n_seeds",
    [
        (72, 0.5, -0.5, 0.9, 1),  # the profile removes the behaviour
        (20, 0.2, 0.3, 0.5, 1),
        (40, 0.1, 0.05, 0.7, 1),
        (72, 0.5, 0.0, 0.8, 3),  # a pooled random control of 3 seeds: per-prompt shares
        (30, 0.3, 0.1, 0.6, 3),
    ],
)
def test_paired_interval_coverage(n, base, effect, keep, n_seeds):
    rng = np.random.default_rng(2)
    covered = 0
    for _ in range(400):
        steered, reference = _correlated_pairs(rng, n, base, effect, keep, n_seeds)
        _, (lo, hi) = paired_difference_interval(steered, reference)
        covered += lo <= effect <= hi
    assert covered >= 0.92 * 400  # nominal 95; 94-100% seen
