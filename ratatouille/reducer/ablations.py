"""The reducer's analysis phase: diversity, diversity-vs-gain, subsampling ablations.

Runs after the final evaluation (the OOD split is open, nothing is selected any more):

- per-arm mean pairwise q-diversity and ratio-error of the predictions on OOD test and on ID
  val (Sec. 4.2, App. C.1, Fig. 5d);
- same-source vs different-source pairs in the recycling arms, on both splits (Fig. 3a, 5d);
- diversity vs gain per pair: ``acc(avg(theta_i, theta_j)) - (acc_i + acc_j) / 2`` (Fig. 3c);
- OOD accuracy of the uniform average of random subsets of M runs (Fig. 8, App. B.3);
- the number of auxiliary sources at a FIXED number of averaged runs M (Fig. 6, App. B.1): the
  paper averages M = 20 runs whatever the number of sources; subsampling "every run whose source
  is in the subset" instead would grow M with the number of sources and confound the two;
- the mixing ratio mu at fixed M (Fig. 3d, 5b-c): the uniform average of mu * M ratatouille runs
  and (1 - mu) * M model-soups runs, its OOD and ID-val accuracy --
all from the finished sweep, no new training.

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
from ratatouille.reducer.curves import compute_curves, source_task
from ratatouille.reducer.evaluate import ID_VAL, OOD_TEST, Evaluator, Split
from ratatouille.reducer.inputs import ReduceInputs, TargetRun

MEASURES: tuple[Measure, ...] = ("q_diversity", "ratio_error")
SPLITS: tuple[Split, ...] = (OOD_TEST, ID_VAL)
#: the arms mixed in Fig. 3d / 5b-c: mu of the first, 1 - mu of the second
MIX_ARMS: tuple[str, str] = ("ratatouille", "soups")


class SoupAccuracy:
    """Accuracy of the uniform soup of a set of runs on a split (OOD by default), memoised.

    A single run's accuracy comes from the evaluator's cache; soups already evaluated by the
    reducer (the full-arm uniform soups) can be seeded with :meth:`remember`.
    """

    def __init__(self, runs: Sequence[TargetRun], ev: Evaluator) -> None:
        self._runs = {r.run_id: r for r in runs}
        self._ev = ev
        self._memo: dict[tuple[str, frozenset[str]], float] = {}

    def remember(self, run_ids: Sequence[str], accuracy: float, split: Split = OOD_TEST) -> None:
        self._memo[(split, frozenset(run_ids))] = accuracy

    def __call__(self, run_ids: Sequence[str], split: Split = OOD_TEST) -> float:
        key = (split, frozenset(run_ids))
        if key not in self._memo:
            if len(key[1]) == 1:
                self._memo[key] = self._ev.run_accuracy(next(iter(key[1])), split)
            else:
                ordered = [self._runs[i] for i in sorted(key[1])]
                soup = uniform_soup(run.load_state() for run in ordered)
                self._memo[key] = self._ev.accuracy(soup, split)
        return self._memo[key]


def _matrices(runs: Sequence[TargetRun], ev: Evaluator, split: Split) -> dict[str, np.ndarray]:
    preds = np.stack([ev.predictions(r.run_id, split) for r in runs])
    y = ev.flat_labels(split)
    return {m: pairwise_diversity(y, preds, measure=m) for m in MEASURES}


def diversity_frames(
    arms: Mapping[str, Sequence[TargetRun]],
    matrices: Mapping[str, Mapping[str, np.ndarray]],
    split: Split = OOD_TEST,
) -> tuple[pandas.DataFrame, pandas.DataFrame]:
    """Mean over pairs i < j per arm; and same- vs different-source pairs per recycling arm,
    from the predictions on ``split`` (a ``split`` column says which)."""
    rows: list[dict[str, Any]] = []
    source_rows: list[dict[str, Any]] = []
    for arm, mats in matrices.items():
        rows.append(
            {
                "arm": arm,
                **{m: mean_pairwise(mats[m]) for m in MEASURES},
                "n_models": len(arms[arm]),
                "split": split,
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
                        "split": split,
                    }
                )
    columns = ["arm", *MEASURES]
    return (
        pandas.DataFrame(rows, columns=[*columns, "n_models", "split"]),
        pandas.DataFrame(source_rows, columns=["arm", "pairs", *MEASURES, "n_pairs", "split"]),
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
    # std over draws with ddof=0: a size with a single possible subset has spread 0, not nan;
    # se = std(ddof=1) / sqrt(n), 0 for a single draw (nothing varies)
    n = len(accs)
    se = float(np.std(accs, ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return {
        "ood_acc_mean": float(np.mean(accs)),
        "ood_acc_std": float(np.std(accs)),
        "ood_acc_se": se,
        "n_draws": n,
    }


def ablation_runs(
    arms: Mapping[str, Sequence[TargetRun]],
    soup_acc: Any,
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
    columns = ["arm", "n_runs", "ood_acc_mean", "ood_acc_std", "ood_acc_se", "n_draws"]
    return pandas.DataFrame(rows, columns=columns)


def fixed_m_for_sources(counts: Mapping[str, int], base: str | None) -> int:
    """Fig. 6's M: the largest number of runs that EVERY number of sources can average.

    The one-source point averages M runs of a single source: the base source when it is in
    every subset (the pre-trained source, as the paper's task "number zero"), else any source,
    so M is the base's run count, or the smallest run count of a source.
    """
    return counts[base] if base is not None else min(counts.values())


def balanced_quota(capacity: Sequence[int], total: int) -> list[int]:
    """``total`` runs spread over sources as evenly as their run counts allow (water filling):
    each source gets ``total // k`` or one more, a source short of that gives its share to the
    others. Raises ValueError when the sources hold fewer than ``total`` runs in all."""
    if sum(capacity) < total:
        raise ValueError(f"{total} runs asked from sources holding {sum(capacity)}")
    quota = [0] * len(capacity)
    left = total
    while left:
        open_ = [k for k in range(len(capacity)) if quota[k] < capacity[k]]
        share, extra = divmod(left, len(open_))
        for rank, k in enumerate(open_):
            give = min(share + (rank < extra), capacity[k] - quota[k])
            quota[k] += give
            left -= give
    return quota


def _balanced_draw(
    by_source: Mapping[str, Sequence[str]], chosen: Sequence[str], m: int, rng: np.random.Generator
) -> tuple[str, ...]:
    """M run ids from the ``chosen`` sources, balanced over them, random within each."""
    order = [chosen[k] for k in rng.permutation(len(chosen))]  # who gets the extra runs
    quota = balanced_quota([len(by_source[s]) for s in order], m)
    picked: list[str] = []
    for source, n in zip(order, quota):
        ids = by_source[source]
        picked.extend(ids[k] for k in rng.choice(len(ids), size=n, replace=False))
    return tuple(sorted(picked))


def ablation_sources(
    arms: Mapping[str, Sequence[TargetRun]],
    soup_acc: Any,
    draws: int,
    seed: int,
    skipped: dict[str, str] | None = None,
) -> pandas.DataFrame:
    """Fig. 6: uniform average of M runs from k auxiliary sources, M fixed, k = 1, 2, ...

    A source is an auxiliary task (its pool entries together) or the pre-trained model; the
    pre-trained source is in every subset when the arm has runs from it, as in the paper where
    ImageNet is auxiliary task "number zero", and ``n_sources`` counts it. M is
    :func:`fixed_m_for_sources`; each draw takes a random subset of k sources and M runs
    balanced over them (:func:`balanced_quota`). k stops at M (M runs cannot come from more
    than M sources) and at the number of sources; ``skipped`` gets a line per arm cut at M.
    """
    rows = []
    for arm in (a for a in arms_where(lambda a: a.recycles) if arms.get(a)):
        by_source: dict[str, list[str]] = {}
        for run in arms[arm]:
            by_source.setdefault(source_task(run.init_source), []).append(run.run_id)
        base = PRETRAINED if PRETRAINED in by_source else None
        m = fixed_m_for_sources({s: len(ids) for s, ids in by_source.items()}, base)
        others = sorted(s for s in by_source if s != base)
        if m < len(by_source) and skipped is not None:
            why = "the pre-trained source's runs" if base else "the smallest run count of a source"
            skipped[f"ablation_sources/{arm}"] = (
                f"{len(by_source)} sources but M = {m} ({why}, so one source can fill it): "
                f"source counts above {m} cannot be averaged at fixed M"
            )
        for n_sources in range(1, min(len(by_source), m) + 1):
            rng = np.random.default_rng(seed_hash(seed, "ablation_sources", arm, n_sources))
            subsets = distinct_subsets(others, n_sources - (base is not None), draws, rng)
            accs = []
            for subset in subsets:
                chosen = [base, *subset] if base is not None else list(subset)
                accs.append(soup_acc(_balanced_draw(by_source, chosen, m, rng)))
            rows.append({"arm": arm, "n_sources": n_sources, **_summary(accs), "n_models": m})
    return pandas.DataFrame(
        rows,
        columns=[
            "arm",
            "n_sources",
            "ood_acc_mean",
            "ood_acc_std",
            "ood_acc_se",
            "n_draws",
            "n_models",
        ],
    )


def _distinct_mixes(
    ids_a: Sequence[str],
    ids_b: Sequence[str],
    n_a: int,
    n_b: int,
    draws: int,
    rng: np.random.Generator,
) -> list[tuple[str, ...]]:
    """``draws`` distinct mixes of ``n_a`` of ``ids_a`` and ``n_b`` of ``ids_b`` (every mix
    when there are no more than ``draws``), each a sorted tuple of run ids."""
    if math.comb(len(ids_a), n_a) * math.comb(len(ids_b), n_b) <= draws:
        return [
            tuple(sorted(a + b))
            for a in itertools.combinations(ids_a, n_a)
            for b in itertools.combinations(ids_b, n_b)
        ]
    seen: dict[tuple[str, ...], None] = {}
    while len(seen) < draws:
        picked = [ids_a[k] for k in rng.choice(len(ids_a), size=n_a, replace=False)]
        picked += [ids_b[k] for k in rng.choice(len(ids_b), size=n_b, replace=False)]
        seen.setdefault(tuple(sorted(picked)), None)
    return list(seen)


def mixing_ratio(
    arms: Mapping[str, Sequence[TargetRun]],
    soup_acc: Any,
    draws: int,
    points: int,
    seed: int,
) -> pandas.DataFrame:
    """Fig. 3d, 5b-c: per draw, the uniform average of ``mu * M`` runs of the first of
    :data:`MIX_ARMS` and ``(1 - mu) * M`` of the second, its OOD and ID-val accuracy.

    M is fixed at the smaller arm's size (the largest M every mu can reach); mu takes at most
    ``points`` values from 0 to 1 (both included). One row per draw, so the spread over draws
    and the ID-vs-OOD scatter both come from this frame.
    """
    columns = ["mu", "n_first", "n_second", "draw", "ood_acc", "id_val_acc", "n_models"]
    first, second = (arms.get(a, []) for a in MIX_ARMS)
    m = min(len(first), len(second))
    if m == 0:
        return pandas.DataFrame(columns=columns)
    rows = []
    ids_a, ids_b = [r.run_id for r in first], [r.run_id for r in second]
    for n_first in sorted({round(x) for x in np.linspace(0, m, min(points, m + 1))}):
        rng = np.random.default_rng(seed_hash(seed, "mixing", n_first))
        for draw, ids in enumerate(_distinct_mixes(ids_a, ids_b, n_first, m - n_first, draws, rng)):
            rows.append(
                {
                    "mu": n_first / m,
                    "n_first": n_first,
                    "n_second": m - n_first,
                    "draw": draw,
                    "ood_acc": soup_acc(ids, OOD_TEST),
                    "id_val_acc": soup_acc(ids, ID_VAL),
                    "n_models": m,
                }
            )
    return pandas.DataFrame(rows, columns=columns)


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
            soup_acc.remember(row.members, row.id_val_acc, ID_VAL)
    pairs = {arm: runs for arm, runs in arms.items() if len(runs) >= 2}
    matrices = {
        split: {arm: _matrices(runs, ev, split) for arm, runs in pairs.items()} for split in SPLITS
    }
    frames = [diversity_frames(arms, matrices[split], split) for split in SPLITS]
    curves, lmc, skipped = compute_curves(inputs, arms, ev)
    if s.max_pairs == 0:
        skipped["gain_points"] = "disabled by ReduceSettings.max_pairs = 0"
    return {
        "diversity": pandas.concat([f[0] for f in frames], ignore_index=True),
        "source_diversity": pandas.concat([f[1] for f in frames], ignore_index=True),
        "gain_points": gain_points(arms, matrices[OOD_TEST], soup_acc, s.max_pairs, s.seed),
        "curves": curves,
        "lmc": lmc,
        "ablation_runs": ablation_runs(arms, soup_acc, s.ablation_draws, s.ablation_points, s.seed),
        "ablation_sources": ablation_sources(arms, soup_acc, s.ablation_draws, s.seed, skipped),
        "mixing": mixing_ratio(arms, soup_acc, s.ablation_draws, s.ablation_points, s.seed),
        "skipped": skipped,
    }
