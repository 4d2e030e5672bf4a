"""Canary gate for online shadow mode: promote a shadow model only on significant evidence (Seldonian style).

Rule: live and shadow are scored on the same held-out canary items (per task, scores in [0, 1]). The shadow is
promoted iff the one-sided lower confidence bound at level δ of mean(shadow − live) over all canary items is
> 0 and no guard task is significantly worse, i.e. no guard's one-sided upper bound at level δ of its mean
difference is < 0. A one-sided bound at level δ is the matching end of the two-sided BCa interval at confidence
1 − 2δ (bem.stats.paired_bca). After a promotion, `regression_test` rolls back when the current version is
significantly worse than the previous one by the same kind of bound.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from bem.stats import paired_bca


@dataclass(frozen=True)
class GuardResult:
    n: int
    difference: float  # mean(after − before) on this task's items
    upper: float  # one-sided upper confidence bound at level δ of that mean
    worse: bool  # upper < 0: significantly worse


@dataclass(frozen=True)
class CanaryResult:
    promote: bool
    improvement: float  # mean(shadow − live) over all canary items
    lower: float  # one-sided lower confidence bound at level 1 − δ of that mean
    delta: float
    guards: dict[str, GuardResult] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)  # empty when promoted

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RegressionResult:
    rollback: bool
    difference: float  # mean(current − previous) over all items
    upper: float  # one-sided upper confidence bound at level δ of that mean
    delta: float
    guards: dict[str, GuardResult] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)  # empty when no rollback

    def to_dict(self) -> dict:
        return asdict(self)


def planned_delta(delta_total: float, checks: int) -> float:
    """Per-check level δ_total / checks (Bonferroni).

    A shadow is canaried again and again along the feedback stream; each check at level δ can promote a
    no-better shadow with probability up to δ, so over `checks` planned checks the chance of any false promotion
    is at most the sum of the per-check levels. Splitting δ_total evenly keeps that total at δ_total.
    """
    if not 0 < delta_total < 0.5:
        raise ValueError(f"delta_total must be in (0, 0.5), got {delta_total}")
    if int(checks) != checks or checks < 1:
        raise ValueError(f"checks must be an integer ≥ 1, got {checks}")
    return delta_total / int(checks)


def _paired(before: Mapping[str, object], after: Mapping[str, object]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if set(before) != set(after):
        raise ValueError(f"the two score sets cover different tasks: {sorted(before)} vs {sorted(after)}")
    if not before:
        raise ValueError("no canary tasks given")
    out = {}
    for task in before:
        a, b = np.asarray(before[task], dtype=float), np.asarray(after[task], dtype=float)
        if a.ndim != 1 or b.ndim != 1 or len(a) != len(b):
            raise ValueError(f"task {task!r}: scores must be paired 1-d arrays of equal length, "
                             f"got lengths {a.shape} and {b.shape}")
        if len(a) < 2:
            raise ValueError(f"task {task!r} has {len(a)} item(s); a confidence bound needs at least 2")
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            raise ValueError(f"task {task!r} has non-finite scores")
        out[task] = (a, b)
    return out


def _compare(before, after, delta: float, guards, n_resamples: int, seed: int):
    """(overall BCa result at confidence 1 − 2δ, per-guard GuardResult) for after − before."""
    if not 0 < delta < 0.5:
        raise ValueError(f"delta must be in (0, 0.5), got {delta}")
    pairs = _paired(before, after)
    unknown = [g for g in guards if g not in pairs]
    if unknown:
        raise ValueError(f"guard tasks {unknown} are not among the canary tasks {sorted(pairs)}")
    a = np.concatenate([p[0] for p in pairs.values()])
    b = np.concatenate([p[1] for p in pairs.values()])
    confidence = 1 - 2 * delta
    overall = paired_bca(a, b, n_resamples, confidence, seed)
    out = {}
    for task in guards:
        r = paired_bca(*pairs[task], n_resamples, confidence, seed)
        out[task] = GuardResult(r.n, r.estimate, r.high, bool(r.high < 0))
    return overall, out


def _guard_reasons(guards: dict[str, GuardResult]) -> list[str]:
    return [f"guard {t} significantly worse: upper bound {g.upper:.4g} < 0 (mean difference {g.difference:.4g})"
            for t, g in guards.items() if g.worse]


def canary_test(live: Mapping[str, object], shadow: Mapping[str, object], delta: float,
                guards: Sequence[str] | None = None, n_resamples: int = 10_000, seed: int = 0) -> CanaryResult:
    """Gate a shadow → live promotion on paired per-task canary scores (see the module docstring).

    The improvement is the mean over the concatenation of all tasks' items, so each task weighs by its number
    of items (equal items per task weight tasks equally). `guards` (default: every task) are the tasks on
    which a significant drop vetoes promotion; each is tested at level δ (vetoes only make the gate stricter).
    When every paired difference is equal the bound is that value: identical scores give lower = 0, refused.
    """
    overall, checked = _compare(live, shadow, delta, list(live) if guards is None else list(guards), n_resamples, seed)
    reasons = []
    if not overall.low > 0:
        reasons.append(f"lower bound {overall.low:.4g} of the improvement {overall.estimate:.4g} "
                       f"is not above 0 (δ = {delta:.4g})")
    reasons += _guard_reasons(checked)
    return CanaryResult(not reasons, overall.estimate, overall.low, delta, checked, reasons)


def regression_test(previous: Mapping[str, object], current: Mapping[str, object], delta: float,
                    guards: Sequence[str] = (), n_resamples: int = 10_000, seed: int = 0) -> RegressionResult:
    """After a promotion: roll back iff the one-sided upper bound at level δ of mean(current − previous) over all
    items (scored by both versions) is < 0, or a listed guard task (default: none) is significantly worse."""
    overall, checked = _compare(previous, current, delta, list(guards), n_resamples, seed)
    reasons = []
    if overall.high < 0:
        reasons.append(f"significant drop: upper bound {overall.high:.4g} of the change {overall.estimate:.4g} "
                       f"is below 0 (δ = {delta:.4g})")
    reasons += _guard_reasons(checked)
    return RegressionResult(bool(reasons), overall.estimate, overall.high, delta, checked, reasons)
