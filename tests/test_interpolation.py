"""Interpolation curves and the LMC verdict with evaluators whose curves are known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ratatouille.merging.interpolation import (
    DEFAULT_LAMBDAS,
    InterpolationCurve,
    interpolation_curve,
    lmc_verdict,
    path_curve,
    three_weight_curve,
)

ELEVEN = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def model(*values: float, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=dtype), "bn.num_batches_tracked": torch.tensor(0)}


def recording(score_of):
    """An evaluator that applies ``score_of`` to the weight vector and records what it saw."""
    seen: list[list[float]] = []

    def evaluate(state_dict) -> float:
        seen.append(state_dict["w"].tolist())
        return score_of(state_dict["w"].tolist())

    return evaluate, seen


def test_default_lambdas_are_eleven_points_from_0_to_1():
    assert list(DEFAULT_LAMBDAS) == ELEVEN


def test_two_weight_curve_evaluates_each_interpolated_weight():
    evaluate, seen = recording(lambda w: 1.0 - (w[0] - 0.5) ** 2)  # concave in w
    curve = interpolation_curve(model(0.0), model(1.0), evaluate)
    assert [w[0] for w in seen] == pytest.approx(ELEVEN)  # w(l) = (1 - l) * 0 + l * 1
    assert list(curve.lambdas) == ELEVEN
    assert list(curve.accuracies) == pytest.approx([1.0 - (x - 0.5) ** 2 for x in ELEVEN])


def test_concave_curve_satisfies_lmc_with_zero_tolerance():
    evaluate, _ = recording(lambda w: 1.0 - (w[0] - 0.5) ** 2)
    curve = interpolation_curve(model(0.0), model(1.0), evaluate)
    # both endpoints score 0.75, so the linear baseline is flat at 0.75
    assert list(curve.linear_baseline()) == pytest.approx([0.75] * 11)
    assert list(curve.gaps()) == pytest.approx([0.25 - (x - 0.5) ** 2 for x in ELEVEN])
    verdict = lmc_verdict(curve, tolerance=0.0)
    assert verdict.holds
    assert verdict.worst_gap == pytest.approx(0.0, abs=1e-12)  # at the endpoints


def test_convex_curve_breaks_lmc_unless_the_tolerance_covers_the_dip():
    evaluate, _ = recording(lambda w: 0.5 + (w[0] - 0.5) ** 2)  # a barrier in the middle
    curve = interpolation_curve(model(0.0), model(1.0), evaluate)
    # baseline 0.75; gap(l) = (l - 0.5)^2 - 0.25, worst -0.25 at l = 0.5
    verdict = lmc_verdict(curve, tolerance=0.1)
    assert not verdict.holds
    assert verdict.worst_gap == pytest.approx(-0.25)
    assert verdict.worst_lambda == 0.5
    assert lmc_verdict(curve, tolerance=0.3).holds


def test_lmc_baseline_interpolates_unequal_endpoint_accuracies():
    # a linear accuracy 0.2 + 0.6 * l sits exactly on the baseline: gaps 0, LMC holds
    evaluate, _ = recording(lambda w: 0.2 + 0.6 * w[0])
    curve = interpolation_curve(model(0.0), model(1.0), evaluate)
    assert list(curve.linear_baseline()) == pytest.approx([0.2 + 0.6 * x for x in ELEVEN])
    assert max(abs(g) for g in curve.gaps()) < 1e-12
    assert lmc_verdict(curve, tolerance=1e-9).holds


def test_lmc_verdict_on_a_hand_written_curve():
    # endpoints 0.6 and 0.8: baseline at 0.5 is 0.7; accuracy there 0.65 -> gap -0.05
    curve = InterpolationCurve(lambdas=(0.0, 0.5, 1.0), accuracies=(0.6, 0.65, 0.8))
    verdict = lmc_verdict(curve, tolerance=0.04)
    assert not verdict.holds
    assert verdict.worst_gap == pytest.approx(-0.05)
    assert verdict.worst_lambda == 0.5
    assert lmc_verdict(curve, tolerance=0.06).holds


def test_three_weight_curve_goes_from_the_average_of_a_and_b_to_c():
    # a = (0, 0), b = (2, 0), c = (0, 4): theta(l) = ((1 - l), 4 l)
    evaluate, seen = recording(lambda w: 10.0 * w[0] + w[1])
    curve = three_weight_curve(model(0.0, 0.0), model(2.0, 0.0), model(0.0, 4.0), evaluate)
    for got, lam in zip(seen, ELEVEN):
        assert got == pytest.approx([1.0 - lam, 4.0 * lam])
    assert list(curve.accuracies) == pytest.approx([10.0 * (1 - x) + 4.0 * x for x in ELEVEN])
    # endpoints acc(avg(a, b)) = 10 and acc(c) = 4; the path is linear in theta and so is acc
    assert lmc_verdict(curve, tolerance=1e-9).holds


def test_three_weight_curve_verdict_uses_avg_ab_and_c_as_endpoints():
    # accuracy peaks at the middle of the path: -(w0 - 0.5)^2 with w0 = 1 - l
    evaluate, _ = recording(lambda w: 1.0 - (w[0] - 0.5) ** 2 - 0.01 * w[1])
    curve = three_weight_curve(model(0.0, 0.0), model(2.0, 0.0), model(0.0, 4.0), evaluate)
    start, end = 1.0 - 0.25, 1.0 - 0.25 - 0.04  # l = 0: w = (1, 0); l = 1: w = (0, 4)
    expected = [(1 - x) * start + x * end for x in ELEVEN]
    assert list(curve.linear_baseline()) == pytest.approx(expected)
    assert lmc_verdict(curve).holds


def test_curves_call_evaluate_once_per_lambda_and_keep_dtypes():
    dtypes = []

    def evaluate(state_dict) -> float:
        dtypes.append((state_dict["w"].dtype, state_dict["bn.num_batches_tracked"].dtype))
        return 0.5

    a, b = model(0.0, dtype=torch.bfloat16), model(1.0, dtype=torch.bfloat16)
    interpolation_curve(a, b, evaluate, lambdas=[0.0, 0.25, 1.0])
    three_weight_curve(a, b, a, evaluate, lambdas=[0.0, 1.0])
    assert dtypes == [(torch.bfloat16, torch.int64)] * 5


@pytest.mark.parametrize(
    "lambdas", [[0.0, 0.5], [0.1, 1.0], [0.0, 0.7, 0.3, 1.0], [0.0], [0.0, 0.5, 0.5, 1.0]]
)
def test_curves_reject_lambdas_without_both_endpoints_in_order(lambdas):
    with pytest.raises(ValueError, match="increase strictly from 0.0 to 1.0"):
        interpolation_curve(model(0.0), model(1.0), lambda sd: 0.5, lambdas=lambdas)


def test_curves_reject_a_non_finite_accuracy_and_a_negative_tolerance():
    with pytest.raises(ValueError, match="evaluate returned nan"):
        interpolation_curve(model(0.0), model(1.0), lambda sd: math.nan)
    curve = InterpolationCurve(lambdas=(0.0, 1.0), accuracies=(0.5, 0.5))
    with pytest.raises(ValueError, match="tolerance"):
        lmc_verdict(curve, tolerance=-0.01)


def test_path_curve_evaluates_any_path_and_skips_known_lambdas():
    seen = []

    def evaluate(state):
        seen.append(float(state["w"]))
        return 1.0 - float(state["w"]) ** 2

    curve = path_curve(
        lambda lam: {"w": torch.tensor(2.0 * lam)}, evaluate, (0.0, 0.5, 1.0), known={0.0: 0.9}
    )
    assert seen == [1.0, 2.0]  # lambda 0 came from `known`
    assert curve.accuracies == (0.9, 0.0, -3.0)
    with pytest.raises(ValueError, match="increase strictly"):
        path_curve(lambda lam: {}, evaluate, (0.0, 1.0, 0.5))
