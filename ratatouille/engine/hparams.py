"""Hyperparameter registry: per hyperparameter its default and both random distributions of Table 3.

As in DomainBed, every hyperparameter is drawn from its *own* ``np.random.RandomState`` seeded by
``seed_hash(seed, name)``, so adding a hyperparameter never changes the values of the others, and
``hparams_seed == 0`` means "the defaults" (DomainBed's convention, also used for the linear probe
``w_lp``, fitted with the default hyperparameters, paper F.1).

Table 3 (paper, App. F.1):

=============  =======  ======================  ============================
hyperparameter default  DomainBed               mild (paper, DiWA, SWAD)
=============  =======  ======================  ============================
lr             5e-5     10^U(-5, -3.5)          {1, 3, 5} e-5
batch_size     32       int(2^U(3, 5.5))        32
dropout        0        {0, 0.1, 0.5}           {0, 0.1, 0.5}
weight_decay   0        10^U(-6, -2)            {1e-6, 1e-4}
=============  =======  ======================  ============================

``batch_size`` is per training domain; a step concatenates one batch of every training domain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ratatouille.core.seeding import seed_hash

Distribution = Literal["mild", "domainbed"]
DISTRIBUTIONS: tuple[str, ...] = ("mild", "domainbed")
Sampler = Callable[[np.random.RandomState], Any]


@dataclass(frozen=True)
class HParamSpec:
    """One row of Table 3: a default and one sampler per random distribution."""

    default: Any
    domainbed: Sampler
    mild: Sampler
    kind: type  # float or int: sampled values are cast to it (numpy scalars never leak out)

    def sampler(self, distribution: Distribution) -> Sampler:
        return self.domainbed if distribution == "domainbed" else self.mild


def _choice(values: Sequence[float]) -> Sampler:
    grid = list(values)
    return lambda r: grid[r.choice(len(grid))]


HPARAMS: dict[str, HParamSpec] = {
    "lr": HParamSpec(
        default=5e-5,
        domainbed=lambda r: 10 ** r.uniform(-5.0, -3.5),
        mild=_choice([1e-5, 3e-5, 5e-5]),
        kind=float,
    ),
    "batch_size": HParamSpec(
        default=32,
        domainbed=lambda r: int(2 ** r.uniform(3.0, 5.5)),
        mild=lambda r: 32,
        kind=int,
    ),
    "dropout": HParamSpec(
        default=0.0,
        domainbed=_choice([0.0, 0.1, 0.5]),
        mild=_choice([0.0, 0.1, 0.5]),
        kind=float,
    ),
    "weight_decay": HParamSpec(
        default=0.0,
        domainbed=lambda r: 10 ** r.uniform(-6.0, -2.0),
        mild=_choice([1e-6, 1e-4]),
        kind=float,
    ),
}


def default_hparams() -> dict[str, Any]:
    """Table 3's default column (the linear probe and ``hparams_seed == 0`` use it)."""
    return {name: spec.default for name, spec in HPARAMS.items()}


def _check_distribution(distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown hyperparameter distribution {distribution!r}: use one of {DISTRIBUTIONS}"
        )


def _check_overrides(overrides: Mapping[str, Sequence[float]] | None) -> dict[str, list[float]]:
    overrides = dict(overrides or {})
    for name, grid in overrides.items():
        if name not in HPARAMS:
            raise ValueError(
                f"hparams override for unknown hyperparameter {name!r}: known are {sorted(HPARAMS)}"
            )
        if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) == 0:
            raise ValueError(
                f"hparams override {name!r} must be a non-empty list of values, got {grid!r}"
            )
    return {name: list(grid) for name, grid in overrides.items()}


def random_hparams(
    distribution: Distribution,
    seed: int,
    *,
    overrides: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Any]:
    """One random draw: hyperparameter ``name`` from ``RandomState(seed_hash(seed, name))``.

    ``overrides`` replaces a hyperparameter's random distribution by a uniform choice over the
    given grid (e.g. ``{"lr": [1e-4, 3e-4, 5e-4]}`` for the embedded benchmark).
    """
    _check_distribution(distribution)
    grids = _check_overrides(overrides)
    hparams: dict[str, Any] = {}
    for name, spec in HPARAMS.items():
        sampler = _choice(grids[name]) if name in grids else spec.sampler(distribution)
        value = sampler(np.random.RandomState(seed_hash(seed, name)))
        hparams[name] = spec.kind(value)
    return hparams


def _dataset_key(dataset: str) -> str:
    return dataset.lower().replace("_", "").replace("-", "")


def dataset_schedule(dataset: str) -> tuple[int, int]:
    """``(steps, checkpoint_freq)`` of paper F.1: 5001 steps (15001 on DomainNet); ID-val every
    50 steps on VLCS, 500 on DomainNet, 100 otherwise."""
    key = _dataset_key(dataset)
    if key == "domainnet":
        return 15001, 500
    if key == "vlcs":
        return 5001, 50
    return 5001, 100
