"""Canary gate of online shadow mode (bem.online.canary): decisions, bounds, calibration under the null."""
import json

import numpy as np
import pytest
from scipy import stats as sps

from bem.online.canary import canary_test, planned_delta, regression_test
from bem.stats import paired_bca

TASKS = ["qa", "json_format", "summarise", "classify"]
B = 2000  # resamples in tests


def scenario(seed, n=24, shift=None, noise=0.05):
    """Live scores per task (item difficulty + noise, in [0, 1]) and a shadow = live + shift[task] + paired noise."""
    rng = np.random.default_rng(seed)
    shift = shift or {}
    live, shadow = {}, {}
    for t in TASKS:
        base = rng.uniform(0.2, 0.6, n)
        live[t] = np.clip(base + rng.normal(0, noise, n), 0, 1)
        shadow[t] = np.clip(base + shift.get(t, 0.0) + rng.normal(0, noise, n), 0, 1)
    return live, shadow


def test_clearly_better_shadow_is_promoted():
    live, shadow = scenario(1, shift={"qa": 0.3})  # 96 items, +0.3 on one task
    r = canary_test(live, shadow, delta=0.01, n_resamples=B)
    assert r.promote and r.reasons == []
    assert r.improvement == pytest.approx(np.mean(np.concatenate([shadow[t] - live[t] for t in TASKS])))
    assert 0 < r.lower < r.improvement
    assert set(r.guards) == set(TASKS) and not any(g.worse for g in r.guards.values())
    assert r.guards["qa"].n == 24 and r.guards["qa"].difference > 0.25
    assert json.loads(json.dumps(r.to_dict()))["guards"]["qa"]["n"] == 24


def test_worse_and_equal_shadows_are_refused():
    live, shadow = scenario(2, shift={t: -0.1 for t in TASKS})
    r = canary_test(live, shadow, delta=0.01, n_resamples=B)
    assert not r.promote and r.improvement < -0.05 and r.lower < 0
    assert any("lower bound" in s and "not above 0" in s for s in r.reasons)

    same = canary_test(live, {t: live[t].copy() for t in TASKS}, delta=0.01, n_resamples=B)
    assert not same.promote and same.improvement == 0 and same.lower == 0
    assert not any(g.worse for g in same.guards.values())  # degenerate guards at 0 are not "worse"
    assert len(same.reasons) == 1 and "not above 0" in same.reasons[0]


def test_constant_positive_difference_is_a_point_bound():
    live = {t: np.linspace(0.1, 0.5, 10) for t in TASKS[:2]}
    r = canary_test(live, {t: v + 0.1 for t, v in live.items()}, delta=0.05, n_resamples=B)
    assert r.lower == pytest.approx(0.1) and r.promote


def test_guard_task_significantly_worse_vetoes():
    live, shadow = scenario(3, shift={"qa": 0.35, "summarise": 0.3, "json_format": -0.15})
    r = canary_test(live, shadow, delta=0.01, n_resamples=B)
    assert r.lower > 0  # better on aggregate ...
    assert r.guards["json_format"].worse and r.guards["json_format"].upper < 0  # ... but worse on one guard
    assert not r.promote and len(r.reasons) == 1 and "json_format" in r.reasons[0]
    # the same shadow passes when json_format is not a guard task
    assert canary_test(live, shadow, delta=0.01, guards=["qa", "classify"], n_resamples=B).promote
    with pytest.raises(ValueError, match="nope"):
        canary_test(live, shadow, delta=0.01, guards=["nope"], n_resamples=B)


def test_bounds_are_the_ends_of_the_bca_interval_at_confidence_1_minus_2delta():
    live, shadow = scenario(4, shift={"classify": 0.05}, noise=0.1)
    a, b = np.concatenate([live[t] for t in TASKS]), np.concatenate([shadow[t] for t in TASKS])
    lowers = []
    for delta in (0.2, 0.05, 0.005):
        r = canary_test(live, shadow, delta=delta, n_resamples=B, seed=7)
        ref = paired_bca(a, b, n_resamples=B, confidence=1 - 2 * delta, seed=7)
        assert r.delta == delta and r.lower == ref.low and r.improvement == pytest.approx(ref.estimate)
        g = paired_bca(live["qa"], shadow["qa"], n_resamples=B, confidence=1 - 2 * delta, seed=7)
        assert r.guards["qa"].upper == g.high and r.guards["qa"].difference == pytest.approx(g.estimate)
        lowers.append(r.lower)
    assert lowers[0] > lowers[1] > lowers[2]  # smaller δ, more conservative bound


def test_false_promotion_rate_under_the_null_is_at_most_delta():
    """400 seeded null scenarios (shadow and live exchangeable per item): promotions ≤ δ plus Monte Carlo slack.

    Tolerance: the 99.9% quantile of Binomial(400, δ), the count a calibrated gate exceeds with probability
    < 0.001 (δ = 0.1: 60/400 = 0.15). The guards only veto, so the gate is at most as permissive as its
    aggregate bound, which is checked against the same limit: a bound at level 2δ (~0.18 here) fails it.
    """
    delta, runs = 0.1, 400
    limit = sps.binom.ppf(0.999, runs, delta) / runs
    promoted = lower_positive = 0
    for k in range(runs):
        live, shadow = scenario(1000 + k, n=24, noise=0.1)
        r = canary_test(live, shadow, delta=delta, n_resamples=500, seed=k)
        promoted += r.promote
        lower_positive += r.lower > 0
    assert promoted <= lower_positive
    assert lower_positive / runs <= limit, (lower_positive, promoted)
    assert promoted / runs <= limit


def test_planned_delta():
    assert planned_delta(0.05, 1) == 0.05
    assert planned_delta(0.05, 10) == pytest.approx(0.005)
    assert planned_delta(0.1, 4) * 4 == pytest.approx(0.1)
    for bad in [(0.05, 0), (0.05, -3), (0.0, 5), (0.5, 5), (1.2, 5)]:
        with pytest.raises(ValueError):
            planned_delta(*bad)


def test_mismatched_inputs_raise():
    live, shadow = scenario(5)
    short = dict(shadow, summarise=shadow["summarise"][:-1])
    with pytest.raises(ValueError, match=r"summarise.*\(24,\).*\(23,\)"):
        canary_test(live, short, delta=0.05, n_resamples=B)
    with pytest.raises(ValueError, match="different tasks"):
        canary_test(live, {t: shadow[t] for t in TASKS[:3]}, delta=0.05, n_resamples=B)
    with pytest.raises(ValueError, match="delta"):
        canary_test(live, shadow, delta=0.5, n_resamples=B)


def test_regression_rolls_back_a_clearly_worse_version_only():
    previous, current = scenario(6, shift={t: -0.1 for t in TASKS})
    r = regression_test(previous, current, delta=0.01, n_resamples=B)
    assert r.rollback and r.upper < 0 and r.difference < -0.05 and "significant drop" in r.reasons[0]

    previous, equal = scenario(7, noise=0.1)  # same distribution
    r = regression_test(previous, equal, delta=0.01, n_resamples=B)
    assert not r.rollback and r.upper > 0 and r.reasons == []
    same = regression_test(previous, previous, delta=0.01, n_resamples=B)
    assert not same.rollback and same.upper == 0

    # a drop confined to one task: caught by a guard on it
    previous, current = scenario(8, shift={"json_format": -0.2})
    r = regression_test(previous, current, delta=0.01, guards=["json_format"], n_resamples=B)
    assert r.rollback and any("json_format" in s for s in r.reasons)
