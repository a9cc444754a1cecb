"""Accuracy along weight interpolation paths and the LMC verdict (paper Eq. (1), App. D).

Pure: the evaluator is injected (``evaluate(state_dict) -> accuracy``), so this module
needs no data, no Ray and no MLflow.

- two weights (Fig. 4): ``theta(l) = (1 - l) * theta_a + l * theta_b``;
- three weights (Fig. 17, App. D.2):
  ``theta(l) = (1 - l)/2 * theta_a + (1 - l)/2 * theta_b + l * theta_c``, i.e. from the
  uniform average of a and b at ``l = 0`` to c at ``l = 1``.

The linear mode connectivity (LMC) holds (Eq. (1)) when for every ``l``
``acc(theta(l)) >= (1 - l) * acc(theta(0)) + l * acc(theta(1)) - tolerance``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from ratatouille.merging.soups import average, interpolate

StateDict = Mapping[str, Tensor]
Evaluate = Callable[[StateDict], float]


def lambda_grid(n: int) -> tuple[float, ...]:
    """``n`` evenly spaced points from 0 to 1; ``i / (n - 1)`` gives exactly 0.0, 0.1, ..., 1.0
    for n = 11 (the closest double to each)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"a lambda grid needs n >= 2 points (both endpoints), got {n!r}")
    return tuple(i / (n - 1) for i in range(n))


#: The reference's 11 points 0, 0.1, ..., 1.
DEFAULT_LAMBDAS: tuple[float, ...] = lambda_grid(11)


@dataclass(frozen=True)
class InterpolationCurve:
    """``accuracies[k] = acc(theta(lambdas[k]))``; ``lambdas`` run from 0 to 1."""

    lambdas: tuple[float, ...]
    accuracies: tuple[float, ...]

    def linear_baseline(self) -> tuple[float, ...]:
        """Right side of Eq. (1): ``(1 - l) * acc(theta(0)) + l * acc(theta(1))``."""
        start, end = self.accuracies[0], self.accuracies[-1]
        return tuple((1.0 - lam) * start + lam * end for lam in self.lambdas)

    def gaps(self) -> tuple[float, ...]:
        """``acc(theta(l))`` minus the linear baseline, per lambda (>= 0 where LMC holds)."""
        return tuple(acc - base for acc, base in zip(self.accuracies, self.linear_baseline()))


@dataclass(frozen=True)
class LMCVerdict:
    """``holds`` iff ``worst_gap >= -tolerance``; the min gap is at ``worst_lambda``."""

    holds: bool
    worst_gap: float
    worst_lambda: float
    tolerance: float


def lmc_verdict(curve: InterpolationCurve, tolerance: float = 0.0) -> LMCVerdict:
    """Eq. (1) with a tolerance (in accuracy units): LMC holds iff every gap is ``>= -tolerance``.

    The paper's "≳" is strict in spirit; ``tolerance`` absorbs evaluation noise. The
    endpoints have gap 0 by construction, so ``worst_gap <= 0`` always.
    """
    if not (math.isfinite(tolerance) and tolerance >= 0.0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    gaps = curve.gaps()
    worst = min(range(len(gaps)), key=lambda k: gaps[k])
    return LMCVerdict(
        holds=gaps[worst] >= -tolerance,
        worst_gap=gaps[worst],
        worst_lambda=curve.lambdas[worst],
        tolerance=tolerance,
    )


def _validated_lambdas(lambdas: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(x) for x in lambdas)
    increasing = all(x < y for x, y in itertools.pairwise(values))
    if len(values) < 2 or values[0] != 0.0 or values[-1] != 1.0 or not increasing:
        raise ValueError(
            f"lambdas must increase strictly from 0.0 to 1.0 (both included, the endpoints "
            f"of Eq. (1)), got {values}"
        )
    return values


def _curve(
    path: Callable[[float], StateDict],
    evaluate: Evaluate,
    lambdas: Sequence[float],
    known: Mapping[float, float] | None,
) -> InterpolationCurve:
    values = _validated_lambdas(lambdas)
    known = dict(known or {})
    accuracies = []
    for lam in values:
        accuracy = float(known[lam] if lam in known else evaluate(path(lam)))
        if not math.isfinite(accuracy):
            raise ValueError(f"evaluate returned {accuracy} at lambda={lam}; return a number")
        accuracies.append(accuracy)
    return InterpolationCurve(lambdas=values, accuracies=tuple(accuracies))


def interpolation_curve(
    theta_a: StateDict,
    theta_b: StateDict,
    evaluate: Evaluate,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    *,
    known: Mapping[float, float] | None = None,
) -> InterpolationCurve:
    """Accuracy of ``(1 - l) * theta_a + l * theta_b`` for each ``l`` (paper Fig. 4).

    ``evaluate`` is called once per lambda, except at the lambdas of ``known`` (accuracies
    already measured, e.g. the cached endpoints of two runs); non-floating buffers come from
    ``theta_a``.
    """
    return _curve(lambda lam: interpolate(theta_a, theta_b, lam), evaluate, lambdas, known)


def path_curve(
    path: Callable[[float], StateDict],
    evaluate: Evaluate,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    *,
    known: Mapping[float, float] | None = None,
) -> InterpolationCurve:
    """Accuracy of ``path(l)`` for each ``l``: any path, e.g. one built once and evaluated on
    several splits; ``evaluate`` is skipped at the lambdas of ``known``."""
    return _curve(path, evaluate, lambdas, known)


def three_weight_curve(
    theta_a: StateDict,
    theta_b: StateDict,
    theta_c: StateDict,
    evaluate: Evaluate,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    *,
    known: Mapping[float, float] | None = None,
) -> InterpolationCurve:
    """Accuracy of ``(1-l)/2 * theta_a + (1-l)/2 * theta_b + l * theta_c`` (paper Fig. 17).

    The ``l = 0`` endpoint is the uniform average of a and b, the ``l = 1`` endpoint is c.
    ``evaluate`` is called once per lambda except at the lambdas of ``known``; non-floating
    buffers come from ``theta_a``.
    """

    def path(lam: float) -> StateDict:
        half = (1.0 - lam) / 2.0
        return average([theta_a, theta_b, theta_c], weights=[half, half, lam])

    return _curve(path, evaluate, lambdas, known)
