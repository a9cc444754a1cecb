"""The reducer's interpolation curves (paper Sec. 4.3, Fig. 4; App. D.2, Fig. 17; App. D.5,
Fig. 5a, 20, 21).

- ``hypothesis_1``: ``acc((w_lp, (1 - l) * phi_a_aux + l * phi_b_aux))`` for two pool
  featurizers (the shared linear probe ``w_lp`` on top);
- ``hypothesis_2``: ``acc((1 - l) * theta_a + l * theta_b)`` for two target runs of the
  ratatouille arm started from two different sources;
- ``three_weights``: ``acc((1 - l)/2 * theta_a + (1 - l)/2 * theta_b + l * theta_c)`` for
  three runs from three different sources.

``curves`` holds one curve per hypothesis on OOD test (Fig. 4): endpoints chosen
deterministically, auxiliary sources in sorted order (the pre-trained source 0 only when fewer
auxiliary sources exist), per source its best-ID-val run. A run's accuracy at an endpoint comes
from the reducer's cache, so no run is predicted twice.

One pair says little about a hypothesis, so :func:`lmc_pairs` also evaluates up to
``LMC_PAIRS`` pairs per hypothesis, each on OOD test AND on ID val (Fig. 20, 21), one row per
(hypothesis, split, pair) with its verdict: Hypothesis 1 pairs two pool featurizers of
different auxiliary tasks where there are such, Hypothesis 2 two target runs of different
init sources; pairs are drawn with a seeded generator.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas
from torch import Tensor

from ratatouille.core.arms import arms_where
from ratatouille.core.names import PRETRAINED
from ratatouille.core.seeding import seed_hash
from ratatouille.engine.models import join_state
from ratatouille.merging.interpolation import (
    InterpolationCurve,
    interpolation_curve,
    lambda_grid,
    lmc_verdict,
    path_curve,
    three_weight_curve,
)
from ratatouille.merging.soups import interpolate
from ratatouille.reducer.evaluate import ID_VAL, OOD_TEST, Evaluator, Split
from ratatouille.reducer.inputs import ReduceInputs, TargetRun

StateDict = Mapping[str, Tensor]

#: pairs evaluated per hypothesis (each costs n_lambdas forward passes per split)
LMC_PAIRS = 3
LMC_SPLITS: tuple[Split, ...] = (OOD_TEST, ID_VAL)
LMC_COLUMNS = [
    "hypothesis",
    "split",
    "pair",
    "endpoint_a",
    "endpoint_b",
    "lmc_holds",
    "worst_gap",
    "worst_lambda",
    "tolerance",
    "lambdas",
    "gaps",
]
_ENTRY_TASK = re.compile(r"^(?P<task>[^-]+)-.+-r\d+-[0-9a-f]{8}(-ma)?$")


@dataclass(frozen=True)
class CurveResult:
    """One curve: accuracies along ``lambdas`` and the LMC verdict of Eq. (1).

    ``linear`` is Eq. (1)'s right side (the straight line between the endpoint accuracies);
    ``lmc_holds`` iff every ``accuracies[k] - linear[k] >= -tolerance``; ``worst_gap`` is the
    most negative of those differences (0 when the curve never dips below the line).
    ``endpoints`` names what was interpolated (role -> run id or pool entry).
    """

    name: str
    lambdas: tuple[float, ...]
    accuracies: tuple[float, ...]
    linear: tuple[float, ...]
    lmc_holds: bool
    worst_gap: float
    worst_lambda: float
    tolerance: float
    label: str
    endpoints: dict[str, str] = field(default_factory=dict)


def _result(
    name: str, label: str, curve: InterpolationCurve, tolerance: float, endpoints: dict[str, str]
) -> CurveResult:
    verdict = lmc_verdict(curve, tolerance)
    return CurveResult(
        name=name,
        lambdas=curve.lambdas,
        accuracies=curve.accuracies,
        linear=curve.linear_baseline(),
        lmc_holds=verdict.holds,
        worst_gap=verdict.worst_gap,
        worst_lambda=verdict.worst_lambda,
        tolerance=tolerance,
        label=label,
        endpoints=endpoints,
    )


def _ordered_sources(sources: Sequence[str], needed: int) -> list[str]:
    """Auxiliary sources sorted; the pre-trained source fills in when too few exist."""
    aux = sorted(s for s in set(sources) if s != PRETRAINED)
    if len(aux) < needed and PRETRAINED in sources:
        aux.append(PRETRAINED)
    return aux[:needed]


def _endpoint_runs(runs: Sequence[TargetRun], needed: int) -> list[TargetRun] | None:
    chosen = _ordered_sources([r.init_source for r in runs], needed)
    if len(chosen) < needed:
        return None
    # max keeps the earliest of equal scores, as the reducer's ERM choice does
    return [
        max((r for r in runs if r.init_source == s), key=lambda r: r.id_val_acc) for s in chosen
    ]


def _hypothesis_1(
    inputs: ReduceInputs, ev: Evaluator, lambdas: Sequence[float]
) -> CurveResult | str:
    names = _ordered_sources(list(inputs.pool_featurizers), 2)
    names = [n for n in names if n != PRETRAINED]
    if len(names) < 2:
        pool = sorted(inputs.pool_featurizers)
        return f"needs two auxiliary pool featurizers, the pool has {pool}"
    # Both endpoints carry w_lp, and phi_pt's BN statistics where a pool entry has none:
    # interpolating equal tensors gives them back, so only phi moves along the path.
    theta_a, theta_b = (
        {**inputs.init_state, **join_state(inputs.pool_featurizers[n](), inputs.w_lp)}
        for n in names
    )
    curve = interpolation_curve(
        theta_a, theta_b, lambda state: ev.accuracy(state, OOD_TEST), lambdas
    )
    return _result(
        "hypothesis_1",
        f"(w_lp, {names[0]} to {names[1]})",
        curve,
        inputs.settings.lmc_tolerance,
        {"phi_a": names[0], "phi_b": names[1]},
    )


def _hypothesis_2(
    runs: Sequence[TargetRun], ev: Evaluator, lambdas: Sequence[float], tolerance: float
) -> CurveResult | str:
    chosen = _endpoint_runs(runs, 2)
    if chosen is None:
        return "needs target runs from two different sources in a recycling arm"
    a, b = chosen
    known = {
        lambdas[0]: ev.run_accuracy(a.run_id, OOD_TEST),
        lambdas[-1]: ev.run_accuracy(b.run_id, OOD_TEST),
    }
    curve = interpolation_curve(
        a.load_state(), b.load_state(), lambda s: ev.accuracy(s, OOD_TEST), lambdas, known=known
    )
    return _result(
        "hypothesis_2",
        f"{a.init_source} to {b.init_source}",
        curve,
        tolerance,
        {"theta_a": a.run_id, "theta_b": b.run_id},
    )


def _three_weights(
    runs: Sequence[TargetRun], ev: Evaluator, lambdas: Sequence[float], tolerance: float
) -> CurveResult | str:
    chosen = _endpoint_runs(runs, 3)
    if chosen is None:
        return "needs target runs from three different sources in a recycling arm"
    a, b, c = chosen
    curve = three_weight_curve(
        a.load_state(),
        b.load_state(),
        c.load_state(),
        lambda s: ev.accuracy(s, OOD_TEST),
        lambdas,
        known={lambdas[-1]: ev.run_accuracy(c.run_id, OOD_TEST)},
    )
    return _result(
        "three_weights",
        f"{a.init_source}+{b.init_source} to {c.init_source}",
        curve,
        tolerance,
        {"theta_a": a.run_id, "theta_b": b.run_id, "theta_c": c.run_id},
    )


def source_task(name: str) -> str:
    """The auxiliary task of a pool entry "<task>-<arch>-r<run>-<digest>"
    (recipe.sweep.aux_entry_name; "-ma" for its moving average); any other name is its own."""
    match = _ENTRY_TASK.match(name)
    return match.group("task") if match else name


def _sample_pairs(
    items: Sequence[str], key: Callable[[str], str], limit: int, seed: int, what: str
) -> list[tuple[str, str]]:
    """Up to ``limit`` pairs of ``items``, those with different ``key`` first, seeded order."""
    pairs = list(itertools.combinations(sorted(items), 2))
    different = [p for p in pairs if key(p[0]) != key(p[1])]
    pool = different or pairs
    order = np.random.default_rng(seed_hash(seed, "lmc_pairs", what)).permutation(len(pool))
    return [pool[k] for k in order[:limit]]


def _score(ev: Evaluator, split: Split, state: StateDict) -> float:
    return ev.accuracy(state, split)


def _rows(
    hypothesis: str,
    pair: int,
    ends: tuple[str, str],
    path: Callable[[float], StateDict],
    ev: Evaluator,
    lambdas: Sequence[float],
    tolerance: float,
    known: Mapping[Split, Mapping[float, float]],
) -> list[dict]:
    rows = []
    for split in LMC_SPLITS:
        score = functools.partial(_score, ev, split)
        curve = path_curve(path, score, lambdas, known=known.get(split))
        verdict = lmc_verdict(curve, tolerance)
        rows.append(
            {
                "hypothesis": hypothesis,
                "split": split,
                "pair": pair,
                "endpoint_a": ends[0],
                "endpoint_b": ends[1],
                "lmc_holds": verdict.holds,
                "worst_gap": verdict.worst_gap,
                "worst_lambda": verdict.worst_lambda,
                "tolerance": tolerance,
                "lambdas": tuple(curve.lambdas),
                "gaps": tuple(curve.gaps()),
            }
        )
    return rows


def lmc_pairs(
    inputs: ReduceInputs,
    runs: Sequence[TargetRun],
    ev: Evaluator,
    max_pairs: int = LMC_PAIRS,
) -> pandas.DataFrame:
    """Several pairs per hypothesis, each on both splits: the rows of :data:`LMC_COLUMNS`."""
    lambdas = lambda_grid(inputs.settings.n_lambdas)
    tol, seed = inputs.settings.lmc_tolerance, inputs.settings.seed
    rows: list[dict] = []
    names = [n for n in inputs.pool_featurizers if n != PRETRAINED]
    for k, (a, b) in enumerate(_sample_pairs(names, source_task, max_pairs, seed, "hypothesis_1")):
        theta_a, theta_b = (
            {**inputs.init_state, **join_state(inputs.pool_featurizers[n](), inputs.w_lp)}
            for n in (a, b)
        )
        path = _interpolator(theta_a, theta_b)
        rows += _rows("hypothesis_1", k, (a, b), path, ev, lambdas, tol, {})
    by_id = {r.run_id: r for r in runs}
    source = {r.run_id: r.init_source for r in runs}
    task = {run_id: source_task(s) for run_id, s in source.items()}
    # runs of different auxiliary tasks first (the paper's pairs), else of different entries
    pairs = _sample_pairs(list(by_id), task.__getitem__, max_pairs, seed, "hypothesis_2")
    if not any(task[a] != task[b] for a, b in pairs):
        pairs = _sample_pairs(list(by_id), source.__getitem__, max_pairs, seed, "hypothesis_2")
    for k, (a, b) in enumerate(p for p in pairs if source[p[0]] != source[p[1]]):
        # one pair's two states at a time: they are freed when _run_pair_rows returns
        rows += _run_pair_rows(k, by_id[a], by_id[b], ev, lambdas, tol)
    return pandas.DataFrame(rows, columns=LMC_COLUMNS)


def _run_pair_rows(
    k: int, a: TargetRun, b: TargetRun, ev: Evaluator, lambdas: Sequence[float], tol: float
) -> list[dict]:
    known = {
        split: {
            lambdas[0]: ev.run_accuracy(a.run_id, split),
            lambdas[-1]: ev.run_accuracy(b.run_id, split),
        }
        for split in LMC_SPLITS
    }
    path = _interpolator(a.load_state(), b.load_state())
    return _rows("hypothesis_2", k, (a.run_id, b.run_id), path, ev, lambdas, tol, known)


def _interpolator(theta_a: StateDict, theta_b: StateDict) -> Callable[[float], StateDict]:
    return lambda lam: interpolate(theta_a, theta_b, lam)


def compute_curves(
    inputs: ReduceInputs, arms: Mapping[str, Sequence[TargetRun]], ev: Evaluator
) -> tuple[dict[str, CurveResult], pandas.DataFrame, dict[str, str]]:
    """The three curves that the sweep supports, the per-pair LMC frame of :func:`lmc_pairs`,
    and why any curve is skipped.

    Runs come from the ``ratatouille`` arm (``robust_ratatouille`` when it is the only one).
    """
    lambdas = lambda_grid(inputs.settings.n_lambdas)
    tolerance = inputs.settings.lmc_tolerance
    arm = next((a for a in arms_where(lambda a: a.recycles) if arms.get(a)), None)
    runs = arms[arm] if arm else []
    outcomes: dict[str, CurveResult | str] = {
        "hypothesis_1": _hypothesis_1(inputs, ev, lambdas),
        "hypothesis_2": _hypothesis_2(runs, ev, lambdas, tolerance),
        "three_weights": _three_weights(runs, ev, lambdas, tolerance),
    }
    curves = {k: v for k, v in outcomes.items() if isinstance(v, CurveResult)}
    skipped = {k: v for k, v in outcomes.items() if isinstance(v, str)}
    return curves, lmc_pairs(inputs, runs, ev), skipped
