"""The reducer's interpolation curves (paper Sec. 4.3, Fig. 4; App. D.2, Fig. 17), on OOD test.

- ``hypothesis_1``: ``acc((w_lp, (1 - l) * phi_a_aux + l * phi_b_aux))`` for two pool
  featurizers (the shared linear probe ``w_lp`` on top);
- ``hypothesis_2``: ``acc((1 - l) * theta_a + l * theta_b)`` for two target runs of the
  ratatouille arm started from two different sources;
- ``three_weights``: ``acc((1 - l)/2 * theta_a + (1 - l)/2 * theta_b + l * theta_c)`` for
  three runs from three different sources.

Endpoints are chosen deterministically: auxiliary sources in sorted order (the pre-trained
source 0 only when fewer auxiliary sources exist), and per source its best-ID-val run. A run's
accuracy at an endpoint comes from the reducer's cache, so no run is predicted twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from ratatouille.core.arms import arms_where
from ratatouille.core.names import PRETRAINED
from ratatouille.engine.models import join_state
from ratatouille.merging.interpolation import (
    InterpolationCurve,
    interpolation_curve,
    lambda_grid,
    lmc_verdict,
    three_weight_curve,
)
from ratatouille.reducer.evaluate import OOD_TEST, Evaluator
from ratatouille.reducer.inputs import ReduceInputs, TargetRun

StateDict = Mapping[str, Tensor]


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


def compute_curves(
    inputs: ReduceInputs, arms: Mapping[str, Sequence[TargetRun]], ev: Evaluator
) -> tuple[dict[str, CurveResult], dict[str, str]]:
    """The three curves that the sweep supports, and why any other one is skipped.

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
    return curves, skipped
