"""The reducer's evaluations, counted by running the reducer itself (what `ratatouille plan`
prices).

:func:`count_sweep` runs :func:`ratatouille.reducer.reduce.reduce_cell` (and the uniform-dagger
reduction) on shadow runs: a model of four numbers, datasets of one item per domain, a forward
pass that returns zero logits. Every strategy, curve, diversity matrix and ablation takes the
same code path as in `ratatouille reduce`, so the count follows the reducer when it changes.
Every forward pass covers a whole split, so the images are the passes times the split's size.
Zero logits make every accuracy 1.0: every greedy candidate ties and is kept, so a greedy soup
always costs its OOD pass here (a real sweep whose greedy soup keeps one run scores it from
that run's cached logits instead): the count is an upper bound, by at most one OOD pass per
greedy strategy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ratatouille.core.arms import arms_where
from ratatouille.reducer.inputs import (
    ReduceInputs,
    ReduceSettings,
    TargetRun,
    recycled_sources,
)
from ratatouille.reducer.reduce import reduce_cell, reduce_domain_dagger


@dataclass(frozen=True)
class ShadowRun:
    """What the reducer's count depends on of a target run."""

    run_id: str
    arm: str
    init_source: str
    keeps_ma: bool = False  # the run kept a moving average (target.moving_average, soups arm)


@dataclass(frozen=True)
class CellShape:
    """One cell as the reducer sees it: its runs, its ID-val and OOD images per domain."""

    test_domain: str
    split_seed: int
    runs: tuple[ShadowRun, ...]
    id_val_sizes: tuple[int, ...]
    ood_sizes: tuple[int, ...]


@dataclass
class EvalCount:
    """Images (and whole-split passes) the reducer forward-passes."""

    id_val_images: int = 0
    ood_test_images: int = 0
    id_val_passes: int = 0
    ood_test_passes: int = 0

    def __iadd__(self, other: EvalCount) -> EvalCount:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)
        return self

    @property
    def images(self) -> int:
        return self.id_val_images + self.ood_test_images


class _Shadow(nn.Module):
    """A classifier of four numbers with the real one's two parts (featurizer, head)."""

    def __init__(self) -> None:
        super().__init__()
        self.featurizer = nn.Linear(1, 1)
        self.head = nn.Linear(1, 1)


def _part() -> dict[str, torch.Tensor]:
    return {"weight": torch.zeros(1, 1), "bias": torch.zeros(1)}


def _state() -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for prefix in ("featurizer", "head") for k, v in _part().items()}


class _Sized(Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        raise RuntimeError("a shadow dataset has no items; its predict never reads them")


def _zeros(model: nn.Module, dataset: Dataset, **_: object) -> tuple[np.ndarray, np.ndarray]:
    size = len(dataset)  # type: ignore[arg-type]
    return np.zeros((size, 2), np.float32), np.zeros(size, np.int64)


def _target_runs(runs: Sequence[ShadowRun]) -> list[TargetRun]:
    return [
        TargetRun(r.run_id, r.arm, r.init_source, 1.0, _state, {}, _state if r.keeps_ma else None)
        for r in runs
    ]


def _without_fisher(settings: ReduceSettings) -> tuple[ReduceSettings, bool]:
    """The settings with Fisher averaging left out, and whether it was in: its estimate takes
    gradients on ID-train images, which a shadow run has none of."""
    merges = settings.merges
    if merges is None or "fisher" not in merges.methods:
        return settings, False
    rest = [method for method in merges.methods if method != "fisher"]
    kept = merges.model_copy(update={"methods": rest}) if rest else None
    return dataclasses.replace(settings, merges=kept), True


def count_cell(shape: CellShape, settings: ReduceSettings) -> EvalCount:
    """What :func:`~ratatouille.reducer.reduce.reduce_cell` forward-passes for one cell.

    Fisher averaging, when ``reduce.merges`` lists it, is counted as what it evaluates (one
    ID-val pass for its choice and one OOD pass per averaging arm, as every merge row); its
    diagonal Fisher's ID-train passes (``fisher_batches`` batches per domain and run) are not
    counted here."""
    settings, fisher = _without_fisher(settings)
    runs = _target_runs(shape.runs)
    sources = recycled_sources([r.arm for r in runs], [r.init_source for r in runs])
    inputs = ReduceInputs(
        test_domain=shape.test_domain,
        split_seed=shape.split_seed,
        runs=runs,
        build_model=_Shadow,  # type: ignore[arg-type]
        id_val=[_Sized(1) for _ in shape.id_val_sizes],
        ood_test=[_Sized(1) for _ in shape.ood_sizes],
        init_state=_state(),
        w_lp=_part(),
        pool_featurizers={name: _part for name in sources},
        settings=settings,
        predict=_zeros,
    )
    passes = dict(reduce_cell(inputs).evaluated)
    if fisher:
        averaged = set(arms_where(lambda arm: arm.averaged))
        arms = len({run.arm for run in shape.runs} & averaged)
        passes["id_val_passes"] += arms
        passes["ood_test_passes"] += arms
    return EvalCount(
        id_val_images=passes["id_val_passes"] * sum(shape.id_val_sizes),
        ood_test_images=passes["ood_test_passes"] * sum(shape.ood_sizes),
        id_val_passes=passes["id_val_passes"],
        ood_test_passes=passes["ood_test_passes"],
    )


def count_dagger(shapes: Sequence[CellShape]) -> EvalCount:
    """What :func:`~ratatouille.reducer.reduce.reduce_domain_dagger` forward-passes for the
    cells (split seeds) of one test domain."""
    runs = {shape.split_seed: _target_runs(shape.runs) for shape in shapes}
    ood = list(shapes[0].ood_sizes)
    frame = reduce_domain_dagger(
        shapes[0].test_domain,
        runs,
        _Shadow,
        [_Sized(1) for _ in ood],
        predict=_zeros,
    )
    return EvalCount(ood_test_images=len(frame) * sum(ood), ood_test_passes=len(frame))


def count_sweep(
    shapes: Sequence[CellShape], settings: ReduceSettings, uniform_dagger: bool
) -> EvalCount:
    """Every reducer task of a sweep: one per cell, and with ``uniform_dagger`` one per test
    domain swept over several split seeds (as `orchestration.reporting` launches them)."""
    total = EvalCount()
    by_domain: dict[str, list[CellShape]] = {}
    for shape in shapes:
        total += count_cell(shape, settings)
        by_domain.setdefault(shape.test_domain, []).append(shape)
    if uniform_dagger:
        for domain_shapes in by_domain.values():
            if len(domain_shapes) > 1:
                total += count_dagger(domain_shapes)
    return total
