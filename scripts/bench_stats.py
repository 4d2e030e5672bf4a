"""Speed of the statistics (issue target: 10,000-resample BCa on n = 10,000 paired items < 0.5 s on 2 cores;
20 such comparisons + BH < 5 s). Prints our time and SciPy's for the same work in the same run.

Usage: python scripts/bench_stats.py [--n 10000] [--resamples 10000] [--comparisons 20]
"""
import argparse
import time

import numpy as np
from scipy import stats as sps

from bem.stats import benjamini_hochberg, paired_bca, paired_bca_family, permutation_pvalue, permutation_pvalues


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--comparisons", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, args.n).astype(float)
    b = np.clip(a + rng.normal(0.02, 0.5, args.n), 0, 1)
    ours = best_of(lambda: paired_bca(a, b, n_resamples=args.resamples))
    scipy_time = best_of(lambda: sps.bootstrap((a, b), lambda x, y, axis=-1: np.mean(y - x, axis=axis), paired=True,
                                               n_resamples=args.resamples, method="BCa", random_state=0), repeats=1)
    print(f"BCa, n={args.n}, {args.resamples} resamples: ours {ours:.3f} s, SciPy {scipy_time:.3f} s, "
          f"SciPy/ours = {scipy_time / ours:.1f}x  (target < 0.5 s)")

    def family():
        pvalues = []
        for k in range(args.comparisons):
            paired_bca(a, b + 0.001 * k, n_resamples=args.resamples, seed=k)
            pvalues.append(permutation_pvalue(a, b + 0.001 * k, n_resamples=args.resamples, seed=k))
        benjamini_hochberg(pvalues)

    def shared():  # what `bem analyze` does: comparisons on the same items share their resamples
        shifts = 0.001 * np.arange(args.comparisons)[:, None]
        A, B = np.tile(a, (args.comparisons, 1)), b + shifts
        paired_bca_family(A, B, n_resamples=args.resamples)
        benjamini_hochberg(permutation_pvalues(A, B, n_resamples=args.resamples))

    one_by_one = best_of(family, repeats=1)
    together = best_of(shared, repeats=3)
    print(f"{args.comparisons} comparisons (BCa + permutation p) + BH: one by one {one_by_one:.2f} s, "
          f"as one family with shared resamples {together:.2f} s  (target < 5 s); SciPy's BCa alone for the same "
          f"family ≈ {args.comparisons * scipy_time:.1f} s ({args.comparisons} × its single time)")


if __name__ == "__main__":
    main()
