"""Paired statistics over evaluation items: BCa bootstrap with its own p-value, sign-flip permutation test,
Benjamini–Hochberg."""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

_BLOCK = 1_000  # resamples generated at a time (memory: block × n indices)


@dataclass(frozen=True)
class BootstrapResult:
    estimate: float
    low: float
    high: float
    bias_correction: float
    acceleration: float
    n: int
    confidence: float
    note: str = ""  # why the interval is degenerate, if it is
    p: float = 1.0  # two-sided bootstrap p of "no difference", from the same resamples: p < 1 − confidence iff 0 ∉ [low, high]


def _blocks(n_resamples: int, seed: int, fn) -> np.ndarray:
    """fn(rng, size) -> (size,) for fixed blocks of resamples, each with its own child seed, on a thread pool.

    NumPy releases the GIL while drawing and gathering, so blocks run in parallel; the block → seed map is
    fixed, so the result does not depend on the number of threads.
    """
    sizes = [min(_BLOCK, n_resamples - start) for start in range(0, n_resamples, _BLOCK)]
    children = np.random.SeedSequence(seed).spawn(len(sizes))
    with ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, len(sizes)))) as pool:
        parts = pool.map(lambda i: fn(np.random.default_rng(children[i]), sizes[i]), range(len(sizes)))
        return np.concatenate(list(parts))


def paired_bca(a, b, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0,
               statistic: Callable[[np.ndarray], float] | None = None) -> BootstrapResult:
    """BCa bootstrap CI of the paired difference b − a over items.

    Default statistic: the mean of d = b − a. With `statistic=f`, f(indices) must return the
    difference of a corpus-level metric (e.g. BLEU of system b minus system a) on those items; it is
    recomputed on every resample of item indices and on every jackknife sample.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bca needs two 1-d arrays of equal length, got {a.shape} and {b.shape}")
    n = len(a)
    d = b - a
    everything = np.arange(n)
    estimate = float(d.mean()) if statistic is None else float(statistic(everything))
    if n < 2:
        return _point(estimate, n, confidence, n_resamples, "fewer than 2 items: no interval")
    if statistic is None and np.all(d == d[0]):
        return _point(estimate, n, confidence, n_resamples,
                      "every paired difference is equal: the bootstrap distribution is a point")
    if statistic is None:
        boot = _blocks(n_resamples, seed, lambda rng, size: np.take(d, rng.integers(0, n, (size, n))).mean(axis=1))
        jack = (d.sum() - d) / (n - 1)
    else:
        rng = np.random.default_rng(seed)
        boot = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_resamples)])
        jack = np.array([statistic(np.delete(everything, i)) for i in range(n)])
    return _bca_interval(estimate, boot, jack, n, confidence)


def _point(estimate: float, n: int, confidence: float, n_resamples: int, note: str) -> BootstrapResult:
    """A degenerate (point) bootstrap distribution at `estimate`: p = 1 at 0, else the smallest p resolvable
    with this many resamples, so that the p still agrees with the point interval."""
    p = 1.0 if estimate == 0 or n < 2 else 1.0 / (1 + n_resamples)
    return BootstrapResult(estimate, estimate, estimate, 0.0, 0.0, n, confidence, note, p)


def _bca_level_of(share: float, z0: float, accel: float) -> float:
    """The nominal tail level α whose BCa-adjusted level Φ(z0 + (z0 + z_α)/(1 − a(z0 + z_α))) equals `share`.

    Inverting the BCa map: w = Φ⁻¹(share) − z0, z_α = w/(1 + a·w) − z0. The map is increasing only where
    1 + a·w > 0; a share beyond what any α reaches (or 0 or 1 with a ≠ 0) gives the limit 0 or 1.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        w = float(ndtri(share)) - z0
        if np.isinf(w):
            if accel * w > 0:  # the map's asymptote: z0 + z_α → 1/a
                return float(ndtr(1.0 / accel - z0))
            return 0.0 if w < 0 else 1.0
        denom = 1.0 + accel * w
        if denom <= 0:
            return 0.0 if w < 0 else 1.0
        return float(ndtr(w / denom - z0))


def _bca_interval(estimate: float, boot: np.ndarray, jack: np.ndarray, n: int, confidence: float) -> BootstrapResult:
    """The BCa interval and its p-value from bootstrap replicates and jackknife values.

    Endpoints are order statistics of the replicates (no interpolation): low is the ⌈α₁B⌉-th smallest
    replicate and high the ⌈(1 − α₂)B⌉-th largest, for the BCa-adjusted levels α₁, α₂. The p-value inverts the
    same map at 0: with F≤ = share of replicates ≤ 0 and F< = share < 0, α_L and α_U are the nominal levels whose
    adjusted levels are F≤ and F<, and p = 2·min(α_L, 1 − α_U). Then low > 0 ⟺ F≤ < α₁ ⟺ α_L < (1 − confidence)/2
    and high < 0 ⟺ F< > α₂ ⟺ 1 − α_U < (1 − confidence)/2: p < 1 − confidence exactly when the interval
    excludes 0 (floating-point ties aside). p is floored at 1/(1 + B), the resolution of B resamples.
    """
    n_resamples = len(boot)
    if np.all(boot == boot[0]):
        return _point(estimate, n, confidence, n_resamples,
                      "every resample gives the same value: the bootstrap distribution is a point")
    share_below = (np.sum(boot < estimate) + 0.5 * np.sum(boot == estimate)) / n_resamples
    z0 = float(ndtri(np.clip(share_below, 1 / (2 * n_resamples), 1 - 1 / (2 * n_resamples))))
    dev = jack.mean() - jack
    denom = 6.0 * (np.sum(dev**2) ** 1.5)
    accel = float(np.sum(dev**3) / denom) if denom > 0 else 0.0
    z = ndtri(np.array([(1 - confidence) / 2, (1 + confidence) / 2]))
    levels = ndtr(z0 + (z0 + z) / (1 - accel * (z0 + z)))
    ordered = np.sort(boot)
    low = ordered[int(np.clip(np.ceil(levels[0] * n_resamples) - 1, 0, n_resamples - 1))]
    high = ordered[int(np.clip(n_resamples - np.ceil((1 - levels[1]) * n_resamples), 0, n_resamples - 1))]
    at_or_below, below = np.searchsorted(ordered, 0.0, side="right"), np.searchsorted(ordered, 0.0, side="left")
    alpha_low = _bca_level_of(at_or_below / n_resamples, z0, accel)
    alpha_high = _bca_level_of(below / n_resamples, z0, accel)
    p = float(np.clip(2 * min(alpha_low, 1 - alpha_high), 1 / (1 + n_resamples), 1.0))
    return BootstrapResult(estimate, float(low), float(high), z0, accel, n, confidence, p=p)


def paired_bca_family(a, b, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> list[BootstrapResult]:
    """BCa intervals of the mean paired difference for m comparisons on the same n items.

    `a` and `b` are (m, n): row k compares system b[k] with a[k] on the same items in the same order.
    All rows share the resampled item sets (common random numbers): each resample's item counts
    (a (block × n) matrix) are drawn once, and every row's resample mean is one matrix product.
    Each row's interval is an ordinary BCa bootstrap; only the Monte Carlo noise is shared. This is
    what makes a family of comparisons cheap (scripts/bench_stats.py).
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired_bca_family needs two (m, n) arrays of equal shape, got {a.shape} and {b.shape}")
    m, n = a.shape
    d = b - a
    if n < 2:
        return [paired_bca(a[k], b[k], n_resamples, confidence, seed) for k in range(m)]

    def means(rng, size):
        return (_counts(rng, size, n) @ d.T) / n  # (size, m)

    boot = _blocks(n_resamples, seed, means)
    out = []
    for k in range(m):
        estimate = float(d[k].mean())
        if np.all(d[k] == d[k, 0]):
            out.append(_point(estimate, n, confidence, n_resamples,
                              "every paired difference is equal: the bootstrap distribution is a point"))
            continue
        out.append(_bca_interval(estimate, boot[:, k], (d[k].sum() - d[k]) / (n - 1), n, confidence))
    return out


def permutation_pvalues(a, b, n_resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """Two-sided sign-flip p-values for m comparisons on the same n items ((m, n) arrays), sharing the signs."""
    d = np.atleast_2d(np.asarray(b, dtype=float) - np.asarray(a, dtype=float))
    m, n = d.shape
    if n == 0:
        return np.ones(m)
    observed, total = np.abs(d.mean(1)), d.sum(1)
    dt = d.T.astype(np.float32)

    def extreme(rng, size):
        bits = np.unpackbits(rng.integers(0, 256, (size, (n + 7) // 8), dtype=np.uint8), axis=1)[:, :n]
        means = np.abs(2.0 * (bits.astype(np.float32) @ dt).astype(np.float64) - total) / n  # (size, m)
        return (means >= observed * (1 - 1e-6) - 1e-12).astype(float)

    hits = _blocks(n_resamples, seed, extreme).sum(0)
    p = (1 + hits) / (1 + n_resamples)
    return np.where(np.all(d == 0, axis=1), 1.0, p)


def _counts(rng, size: int, n: int) -> np.ndarray:
    """Multiplicities (size, n) of n items drawn with replacement, `size` times."""
    idx = rng.integers(0, n, (size, n)) + (np.arange(size) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=size * n).reshape(size, n).astype(float)


def paired_bca_corpus(stats_a, stats_b, score: Callable[[np.ndarray], float], n_resamples: int = 10_000,
                      confidence: float = 0.95, seed: int = 0) -> BootstrapResult:
    """BCa interval of score(Σ stats_b) − score(Σ stats_a) for a corpus metric over paired items.

    `stats_a`, `stats_b` are per-item sufficient statistics (n, k) (see metrics.corpus_statistics); the
    corpus statistic is recomputed on every resample of item indices (the resample's statistics are one
    matrix product of item counts) and on every jackknife sample (SPEC §7).
    """
    sa, sb = np.asarray(stats_a, dtype=float), np.asarray(stats_b, dtype=float)
    if sa.shape != sb.shape or sa.ndim != 2:
        raise ValueError(f"paired_bca_corpus needs two (n, k) statistic arrays of equal shape, got {sa.shape} and {sb.shape}")
    n = len(sa)
    estimate = score(sb.sum(0)) - score(sa.sum(0)) if n else float("nan")
    if n < 2:
        return _point(estimate, n, confidence, n_resamples, "fewer than 2 items: no interval")
    both = np.concatenate([sa, sb], axis=1)
    k = sa.shape[1]

    def replicate(rng, size):
        summed = _counts(rng, size, n) @ both
        return np.array([score(row[k:]) - score(row[:k]) for row in summed])

    boot = _blocks(n_resamples, seed, replicate)
    total = both.sum(0)
    jack = np.array([score(row[k:]) - score(row[:k]) for row in total - both])
    return _bca_interval(estimate, boot, jack, n, confidence)


def permutation_pvalue_corpus(stats_a, stats_b, score: Callable[[np.ndarray], float], n_resamples: int = 10_000,
                              seed: int = 0) -> float:
    """Two-sided paired approximate-randomisation test of a corpus metric: each resample swaps the two
    systems' outputs on a random half of the items (the sign flip of a corpus statistic)."""
    sa, sb = np.asarray(stats_a, dtype=float), np.asarray(stats_b, dtype=float)
    n = len(sa)
    if n == 0 or np.array_equal(sa, sb):
        return 1.0
    observed = abs(score(sb.sum(0)) - score(sa.sum(0)))
    diff, total_a, total_b = sb - sa, sa.sum(0), sb.sum(0)

    def extreme(rng, size):
        swap = np.unpackbits(rng.integers(0, 256, (size, (n + 7) // 8), dtype=np.uint8), axis=1)[:, :n].astype(float)
        moved = swap @ diff  # what the swapped items move from b to a
        deltas = np.array([score(total_b - m) - score(total_a + m) for m in moved])
        return (np.abs(deltas) >= observed * (1 - 1e-9) - 1e-12).astype(float)

    return (1 + int(_blocks(n_resamples, seed, extreme).sum())) / (1 + n_resamples)


def permutation_pvalue(a, b, n_resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired sign-flip test of mean(b − a) = 0; p = (1 + #extreme) / (1 + resamples)."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if len(d) == 0 or np.all(d == 0):
        return 1.0
    observed, total, n = abs(d.mean()), d.sum(), len(d)
    d32 = d.astype(np.float32)

    def extreme(rng, size):
        # random signs from random bits: sum(s·d) = 2·sum(d where bit) − sum(d), one matrix product
        bits = np.unpackbits(rng.integers(0, 256, (size, (n + 7) // 8), dtype=np.uint8), axis=1)[:, :n]
        means = np.abs(2.0 * (bits.astype(np.float32) @ d32).astype(np.float64) - total) / n
        return (means >= observed * (1 - 1e-6) - 1e-12).astype(float)

    return (1 + int(_blocks(n_resamples, seed, extreme).sum())) / (1 + n_resamples)


def benjamini_hochberg(pvalues, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Monotone step-up adjusted p-values and the rejections at level alpha."""
    p = np.asarray(pvalues, dtype=float)
    if p.size == 0:
        return p, p.astype(bool)
    order = np.argsort(p)
    ranked = p[order] * p.size / np.arange(1, p.size + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out, out < alpha


def cohens_dz(a, b) -> float:
    """Effect size of paired differences: mean(d) / sd(d)."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    return float(d.mean() / sd) if sd > 0 else 0.0


def _hierarchical_draws(a: np.ndarray, b: np.ndarray, n_resamples: int, seed: int, paired_seeds: bool) -> np.ndarray:
    """Resampled mean(b) − mean(a): items drawn with replacement (paired across systems) and seeds drawn with
    replacement, the same draw for both systems when `paired_seeds`, else independently per system. The mean
    of a resample is seed counts · X · item counts / (S·n): a block of resamples is two matrix products."""
    n = a.shape[1]

    def block(rng, size):
        items = _counts(rng, size, n)
        seeds_a = _counts(rng, size, a.shape[0])
        seeds_b = seeds_a if paired_seeds else _counts(rng, size, b.shape[0])
        mean_a = ((items @ a.T) * seeds_a).sum(1) / (a.shape[0] * n)
        mean_b = ((items @ b.T) * seeds_b).sum(1) / (b.shape[0] * n)
        return mean_b - mean_a

    return _blocks(n_resamples, seed, block)


def _as_seeds_by_items(a, b, name: str, paired_seeds: bool) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{name} needs (seeds, items) arrays over the same items, got {a.shape} and {b.shape}")
    if paired_seeds and a.shape != b.shape:
        raise ValueError(f"{name}(paired_seeds=True) needs the same seeds for both systems, got {a.shape} and {b.shape}")
    return a, b


def hierarchical_test(a, b, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0,
                      paired_seeds: bool = False) -> tuple[BootstrapResult, float]:
    """Seed × item bootstrap of mean(b) − mean(a) for scores shaped (seeds, items): the percentile interval
    and the two-sided p of "no difference", both from the same resamples.

    Each resample draws items with replacement (paired across systems) and seeds with replacement, so the
    interval carries both item and seed-to-seed variance. By default each system's seeds are drawn
    independently (seed k of one system says nothing about seed k of the other). With `paired_seeds` the
    rows of a and b are the same seeds (in BEM a seed fixes the training-data order and the random
    initialisation for every system, and seed effects are largely shared: see docs/statistics.md), and one draw
    of seeds serves both. Percentile interval (BCa's jackknife is not defined for this two-level design);
    p = 2·min(share ≤ 0, share ≥ 0), so p < 1 − confidence exactly when the interval excludes 0 (up to the
    quantile's interpolation).
    """
    a, b = _as_seeds_by_items(a, b, "hierarchical_bootstrap", paired_seeds)
    n = a.shape[1]
    estimate = float(b.mean() - a.mean())
    if n < 2:
        return BootstrapResult(estimate, estimate, estimate, 0.0, 0.0, n, confidence,
                               "fewer than 2 items: no interval"), 1.0
    boot = _hierarchical_draws(a, b, n_resamples, seed, paired_seeds)
    low, high = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    tail = min((1 + np.sum(boot <= 0)) / (1 + len(boot)), (1 + np.sum(boot >= 0)) / (1 + len(boot)))
    p = float(min(1.0, 2 * tail))
    return BootstrapResult(estimate, float(low), float(high), 0.0, 0.0, n, confidence, "percentile (seed × item)", p), p


def hierarchical_bootstrap(a, b, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0,
                           paired_seeds: bool = False) -> BootstrapResult:
    """The interval of `hierarchical_test`."""
    return hierarchical_test(a, b, n_resamples, confidence, seed, paired_seeds)[0]


def hierarchical_pvalue(a, b, n_resamples: int = 10_000, seed: int = 0, paired_seeds: bool = False) -> float:
    """The p-value of `hierarchical_test` (same seed, same resamples as `hierarchical_bootstrap`)."""
    return hierarchical_test(a, b, n_resamples, seed=seed, paired_seeds=paired_seeds)[1]
