"""The pure merging math: soups, merges on task vectors, diversity, interpolation (no Ray, no
MLflow, no data).

The public contract, importable from here or from each module:
``average``, ``uniform_soup``, ``greedy_soup``, ``interpolate``, ``fusing_weights``;
``q_statistic``, ``ratio_errors``, ``pairwise_diversity``;
``interpolation_curve``, ``three_weight_curve``, ``lmc_verdict``. The merge methods on task
vectors (task arithmetic, TIES, DARE, Model Stock, Fisher averaging) are in
:mod:`ratatouille.merging.merges`.
"""

from ratatouille.merging.diversity import pairwise_diversity, q_statistic, ratio_errors
from ratatouille.merging.interpolation import interpolation_curve, lmc_verdict, three_weight_curve
from ratatouille.merging.soups import (
    average,
    fusing_weights,
    greedy_soup,
    interpolate,
    uniform_soup,
)

__all__ = [
    "average",
    "fusing_weights",
    "greedy_soup",
    "interpolate",
    "interpolation_curve",
    "lmc_verdict",
    "pairwise_diversity",
    "q_statistic",
    "ratio_errors",
    "three_weight_curve",
    "uniform_soup",
]
