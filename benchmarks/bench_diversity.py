"""Benchmark: vectorised ``pairwise_diversity`` vs a naive per-pair loop, measured side by side.

Run: ``python benchmarks/bench_diversity.py [--models 40] [--samples 100000] [--repeats 3]``.
BLAS runs on one thread unless ``--blas-threads`` says otherwise: the reducer computes diversity
inside Ray tasks, where Ray sets OMP_NUM_THREADS=1, and on a busy machine OpenBLAS's spinning
worker threads can make the matmul several times slower than single-threaded (seen: 2.5 s
instead of 20 ms while other jobs shared the 2 cores).
Both routes compute the full (M, M) q-diversity matrix on the same predictions; the script
prints each route's best wall time over ``--repeats`` runs, the speed-up, and the largest
difference between the two matrices (they must agree), then the P8 line of `make bench`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ratatouille.merging.diversity import pairwise_diversity, q_statistic

FIGURES = {"P8": "cpu"}  # benchmarks/run.py: the figures this script prints
GOAL_S = 1.0


def naive_q_diversity(y_true: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """The DESlib-style route: one numpy counting pass per pair i < j, M(M-1)/2 of them."""
    m = len(preds)
    out = np.zeros((m, m))
    for i in range(m):
        for j in range(i + 1, m):
            out[i, j] = out[j, i] = 1.0 - q_statistic(y_true, preds[i], preds[j])
    return out


def best_time(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def make_predictions(models: int, samples: int, classes: int, seed: int) -> tuple[np.ndarray, ...]:
    """Labels and predictions of ``models`` classifiers with accuracies spread over 50-90 %."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=samples)
    error_rate = rng.uniform(0.1, 0.5, size=(models, 1))
    wrong = rng.random((models, samples)) < error_rate
    preds = np.where(wrong, (y + rng.integers(1, classes, size=(models, samples))) % classes, y)
    return y, preds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=40)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blas-threads", type=int, default=1, help="0: BLAS's own default")
    parser.add_argument("--quick", action="store_true", help="(the default sizes already are)")
    args = parser.parse_args()
    if args.blas_threads:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn

        threadpool_limits(limits=args.blas_threads, user_api="blas")

    y, preds = make_predictions(args.models, args.samples, args.classes, seed=0)
    pairs = args.models * (args.models - 1) // 2
    print(
        f"q-diversity matrix: {args.models} models x {args.samples} predictions ({pairs} pairs), "
        f"BLAS threads: {args.blas_threads or 'default'}"
    )
    fast, fast_matrix = best_time(lambda: pairwise_diversity(y, preds, "q_diversity"), args.repeats)
    slow, slow_matrix = best_time(lambda: naive_q_diversity(y, preds), args.repeats)
    diagonal_free = ~np.eye(args.models, dtype=bool)
    gap = np.abs(fast_matrix - slow_matrix)[diagonal_free].max()
    print(f"vectorised pairwise_diversity : {fast * 1e3:9.1f} ms (best of {args.repeats})")
    print(f"naive per-pair loop           : {slow * 1e3:9.1f} ms (best of {args.repeats})")
    print(f"speed-up                      : {slow / fast:9.1f} x")
    print(f"max |difference| off-diagonal : {gap:.3e}")
    verdict = "meets" if fast < GOAL_S and gap < 1e-9 else "MISSES"
    print(
        f"P8 q-diversity {args.models} models x {args.samples:,} predictions: {fast:.3f} s "
        f"vs naive loop {slow:.3f} s ({slow / fast:.1f}x faster, max diff {gap:.1e}, BLAS threads: "
        f"{args.blas_threads or 'default'}; "
        f"goal < {GOAL_S:g} s: {verdict})"
    )


if __name__ == "__main__":
    main()
