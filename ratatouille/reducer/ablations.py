"""The reducer's analysis phase: diversity, diversity-vs-gain, subsampling ablations.

Runs after the final evaluation (the OOD split is open, nothing is selected any more):

- per-arm mean pairwise q-diversity and ratio-error of OOD predictions (Sec. 4.2, App. C.1);
- same-source vs different-source pairs in the recycling arms (Fig. 3a);
- diversity vs gain per pair: ``acc(avg(theta_i, theta_j)) - (acc_i + acc_j) / 2`` (Fig. 3c);
- OOD accuracy of the uniform average of random subsets of M runs (Fig. 8, App. B.3), and of
  the recycling runs whose source is in a random subset of sources (Fig. 6, App. B.1) -- from
  the finished sweep, no new training.

Every random choice is seeded with ``seed_hash(settings.seed, what, ...)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas

from ratatouille.core.arms import arms_where
from ratatouille.core.names import PRETRAINED
from ratatouille.core.seeding import seed_hash
from ratatouille.merging.diversity import Measure, mean_pairwise, pair_mask, pairwise_diversity
from ratatouille.merging.soups import uniform_soup
from ratatouille.reducer.curves import compute_curves
from ratatouille.reducer.evaluate import OOD_TEST, Evaluator
from ratatouille.reducer.inputs import ReduceInputs, TargetRun

MEASURES: tuple[Measure, ...] = ("q_diversity", "ratio_error")


class SoupAccuracy:
    """OOD accuracy of the uniform soup of a set of runs, memoised by the set.

    A single run's accuracy comes from the evaluator's cache; soups already evaluated by the
    reducer (the full-arm uniform soups) can be seeded with :meth:`remember`.
    """

    def __init__(self, runs: Sequence[TargetRun], ev: Evaluator) -> None:
        self._runs = {r.run_id: r for r in runs}
        self._ev = ev
        self._memo: dict[frozenset[str], float] = {}

    def remember(self, run_ids: Sequence[str], accuracy: float) -> None:
        self._memo[frozenset(run_ids)] = accuracy

    def __call__(self, run_ids: Sequence[str]) -> float:
        key = frozenset(run_ids)
        if key not in self._memo:
            if len(key) == 1:
                self._memo[key] = self._ev.run_accuracy(next(iter(key)), OOD_TEST)
            else:
                ordered = [self._runs[i] for i in sorted(key)]
                soup = uniform_soup(run.load_state() for run in ordered)
                self._memo[key] = self._ev.accuracy(soup, OOD_TEST)
        return self._memo[key]


def _matrices(runs: Sequence[TargetRun], ev: Evaluator) -> dict[str, np.ndarray]:
    preds = np.stack([ev.predictions(r.run_id, OOD_TEST) for r in runs])
    y = ev.flat_labels(OOD_TEST)
    return {m: pairwise_diversity(y, preds, measure=m) for m in MEASURES}


def diversity_frames(
    arms: Mapping[str, Sequence[TargetRun]], matrices: Mapping[str, Mapping[str, np.ndarray]]
) -> tuple[pandas.DataFrame, pandas.DataFrame]:
    """Mean over pairs i < j per arm; and same- vs different-source pairs per recycling arm."""
    rows: list[dict[str, Any]] = []
    source_rows: list[dict[str, Any]] = []
    for arm, mats in matrices.items():
        rows.append(
            {
                "arm": arm,
                **{m: mean_pairwise(mats[m]) for m in MEASURES},
                "n_models": len(arms[arm]),
            }
        )
        if arm not in arms_where(lambda a: a.recycles):
            continue
        sources = np.array([r.init_source for r in arms[arm]])
        for pairs, same in (("same_source", True), ("different_source", False)):
            mask = pair_mask(sources, same)
            n_pairs = int(np.triu(mask, k=1).sum())
            if n_pairs:
                source_rows.append(
                    {
                        "arm": arm,
                        "pairs": pairs,
                        **{m: mean_pairwise(mats[m], mask) for m in MEASURES},
                        "n_pairs": n_pairs,
                    }
                )
    columns = ["arm", *MEASURES]
    return (
        pandas.DataFrame(rows, columns=[*columns, "n_models"]),
        pandas.DataFrame(source_rows, columns=["arm", "pairs", *MEASURES, "n_pairs"]),
    )


def _pick_pairs(
    arms: Mapping[str, Sequence[TargetRun]], max_pairs: int, seed: int
) -> list[tuple[str, int, int]]:
    """At most ``max_pairs`` within-arm pairs, shuffled per arm, taken round-robin over arms."""
    queues = []
    for arm in sorted(arms):
        pairs = list(itertools.combinations(range(len(arms[arm])), 2))
        order = np.random.default_rng(seed_hash(seed, "gain_pairs", arm)).permutation(len(pairs))
        queues.append([(arm, *pairs[k]) for k in order])
    picked: list[tuple[str, int, int]] = []
    for round_ in itertools.zip_longest(*queues):
        picked.extend(p for p in round_ if p is not None)
    return sorted(picked[:max_pairs])


def gain_points(
    arms: Mapping[str, Sequence[TargetRun]],
    matrices: Mapping[str, Mapping[str, np.ndarray]],
    soup_acc: SoupAccuracy,
    max_pairs: int,
    seed: int,
) -> pandas.DataFrame:
    """Fig. 3c: per pair, its diversity and the OOD gain of averaging the two weights."""
    rows: list[dict[str, Any]] = []
    for arm, i, j in _pick_pairs({a: arms[a] for a in matrices}, max_pairs, seed):
        a, b = arms[arm][i], arms[arm][j]
        acc_i, acc_j = soup_acc([a.run_id]), soup_acc([b.run_id])
        acc_avg = soup_acc([a.run_id, b.run_id])
        rows.append(
            {
                "arm": arm,
                "run_i": a.run_id,
                "run_j": b.run_id,
                "source_i": a.init_source,
                "source_j": b.init_source,
                "same_source": a.init_source == b.init_source,
                **{m: float(matrices[arm][m][i, j]) for m in MEASURES},
                "acc_i": acc_i,
                "acc_j": acc_j,
                "acc_average": acc_avg,
                "gain": acc_avg - (acc_i + acc_j) / 2.0,
            }
        )
    columns = [
        "arm",
        "run_i",
        "run_j",
        "source_i",
        "source_j",
        "same_source",
        *MEASURES,
        "acc_i",
        "acc_j",
        "acc_average",
        "gain",
    ]
    return pandas.DataFrame(rows, columns=columns)


def distinct_subsets(
    pool: Sequence[Any], size: int, draws: int, rng: np.random.Generator
) -> list[tuple]:
    """``draws`` distinct random subsets of ``size`` elements (all of them when fewer exist)."""
    if math.comb(len(pool), size) <= draws:
        return list(itertools.combinations(pool, size))
    seen: dict[tuple, None] = {}
    while len(seen) < draws:
        chosen = rng.choice(len(pool), size=size, replace=False)
        seen.setdefault(tuple(pool[k] for k in sorted(chosen)), None)
    return list(seen)


def ablation_sizes(n_runs: int, points: int) -> list[int]:
    """At most ``points`` sizes from 1 to ``n_runs`` (both included), roughly evenly spaced."""
    return sorted({round(x) for x in np.linspace(1, n_runs, min(points, n_runs))})


def _summary(accs: Sequence[float]) -> dict[str, float]:
    # std over draws with ddof=0: a size with a single possible subset has spread 0, not nan
    return {
        "ood_acc_mean": float(np.mean(accs)),
        "ood_acc_std": float(np.std(accs)),
        "n_draws": len(accs),
    }


def ablation_runs(
    arms: Mapping[str, Sequence[TargetRun]],
    soup_acc: SoupAccuracy,
    draws: int,
    points: int,
    seed: int,
) -> pandas.DataFrame:
    """Fig. 8: uniform average of random subsets of M runs of each averaging arm."""
    rows = []
    # arms whose runs are meant to be averaged (fusing selects one run: no Fig. 8 curve)
    for arm in (a for a in arms_where(lambda a: a.averaged) if arms.get(a)):
        ids = [r.run_id for r in arms[arm]]
        for size in ablation_sizes(len(ids), points):
            rng = np.random.default_rng(seed_hash(seed, "ablation_runs", arm, size))
            accs = [soup_acc(subset) for subset in distinct_subsets(ids, size, draws, rng)]
            rows.append({"arm": arm, "n_runs": size, **_summary(accs)})
    columns = ["arm", "n_runs", "ood_acc_mean", "ood_acc_std", "n_draws"]
    return pandas.DataFrame(rows, columns=columns)


def ablation_sources(
    arms: Mapping[str, Sequence[TargetRun]], soup_acc: SoupAccuracy, draws: int, seed: int
) -> pandas.DataFrame:
    """Fig. 6: uniform average of the recycling runs whose source is in a random source subset.

    The pre-trained source (T0) is in every subset when the arm has runs from it, as in the
    paper where ImageNet is auxiliary task "number zero"; ``n_sources`` counts it.
    """
    rows = []
    for arm in (a for a in arms_where(lambda a: a.recycles) if arms.get(a)):
        sources = sorted({r.init_source for r in arms[arm]})
        base = [PRETRAINED] if PRETRAINED in sources else []
        others = [s for s in sources if s != PRETRAINED]
        for n_sources in range(1, len(sources) + 1):
            rng = np.random.default_rng(seed_hash(seed, "ablation_sources", arm, n_sources))
            accs, sizes = [], []
            for subset in distinct_subsets(others, n_sources - len(base), draws, rng):
                chosen = set(base) | set(subset)
                ids = [r.run_id for r in arms[arm] if r.init_source in chosen]
                accs.append(soup_acc(ids))
                sizes.append(len(ids))
            rows.append(
                {
                    "arm": arm,
                    "n_sources": n_sources,
                    **_summary(accs),
                    "n_models_mean": float(np.mean(sizes)),
                }
            )
    return pandas.DataFrame(
        rows,
        columns=["arm", "n_sources", "ood_acc_mean", "ood_acc_std", "n_draws", "n_models_mean"],
    )


def analyse(
    inputs: ReduceInputs,
    arms: Mapping[str, Sequence[TargetRun]],
    ev: Evaluator,
    table: pandas.DataFrame,
) -> dict[str, Any]:
    """Everything after the final evaluation, as :class:`ReduceResult` fields."""
    s = inputs.settings
    soup_acc = SoupAccuracy(inputs.runs, ev)
    for row in table.itertuples():
        if row.selection == "uniform":
            soup_acc.remember(row.members, row.ood_acc)
    matrices = {arm: _matrices(runs, ev) for arm, runs in arms.items() if len(runs) >= 2}
    diversity, source_diversity = diversity_frames(arms, matrices)
    curves, skipped = compute_curves(inputs, arms, ev)
    if s.max_pairs == 0:
        skipped["gain_points"] = "disabled by ReduceSettings.max_pairs = 0"
    return {
        "diversity": diversity,
        "source_diversity": source_diversity,
        "gain_points": gain_points(arms, matrices, soup_acc, s.max_pairs, s.seed),
        "curves": curves,
        "ablation_runs": ablation_runs(arms, soup_acc, s.ablation_draws, s.ablation_points, s.seed),
        "ablation_sources": ablation_sources(arms, soup_acc, s.ablation_draws, s.seed),
        "skipped": skipped,
    }
