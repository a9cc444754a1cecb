"""DomainBed's splits: leave-one-domain-out for the target task, all domains for auxiliary tasks.

Each training domain ``i`` is split by a permutation of its indices seeded with
``seed_hash(split_seed, i)`` (DomainBed's ``split_dataset`` with ``trial_seed``): the first
``int(n * holdout_fraction)`` indices are the "out" split (ID validation), the rest the "in"
split (training). By default (``id_val_transform="eval"``), unlike DomainBed, the ID-validation
split uses the evaluation transform; ``"train"`` gives it the training transform, as DomainBed
does when augmentation is on, with one augmentation per image drawn from the split seed (every
evaluation sees the same images, and evaluating does not touch the trainer's RNG). The training
splits carry how their batches are drawn (``sampling``, see ``ratatouille.data.loaders``). The
held-out (OOD test) domain is used in full, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ratatouille.core.seeding import seed_hash
from ratatouille.data.base import DataError, MultiDomainDataset
from ratatouille.data.loaders import Sampling, check_sampling

IdValTransform = Literal["eval", "train"]
ID_VAL_TRANSFORMS: tuple[str, ...] = get_args(IdValTransform)


class TrainSplit(Subset):
    """A domain's ID-train split; ``sampling`` tells the loaders how to draw its batches."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], sampling: Sampling) -> None:
        super().__init__(dataset, indices)
        self.sampling = sampling


class FixedAugmentation(Dataset):
    """Items ``indices`` of a training-transform view, each loaded under torch's CPU RNG seeded
    with ``seed_hash(seed, position)``: one fixed augmentation per item, the caller's RNG
    restored. Not a ``Subset``, so the decoded path's batched loaders, which would apply the
    evaluation transform, leave it to the per-item route."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], seed: int) -> None:
        self.dataset, self.indices, self.seed = dataset, list(indices), seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed_hash(self.seed, int(index)))
            return self.dataset[self.indices[index]]


@dataclass
class TaskSplits:
    """Everything one fine-tuning needs (paper F.1: 80% training, 20% ID validation)."""

    train: list[Dataset]  # ID-train split of each training domain, training transform
    id_val: list[Dataset]  # ID-val split of each training domain (eval transform by default)
    ood_test: list[
        Dataset
    ]  # held-out domain(s) in full, evaluation transform (empty for aux tasks)
    train_domains: list[str]
    test_domains: list[str]
    num_classes: int


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(out, in) index lists of a domain of ``n`` items: DomainBed's ``split_dataset``."""
    keys = list(range(n))
    np.random.RandomState(seed).shuffle(keys)
    n_out = int(n * holdout_fraction)
    return keys[:n_out], keys[n_out:]


def resolve_test_env(dataset: MultiDomainDataset, test_env: str | int) -> int:
    """The index of a domain given by name (``"sketch"``) or index (``3``)."""
    if isinstance(test_env, str) and test_env in dataset.domains:
        return dataset.domains.index(test_env)
    if (
        isinstance(test_env, int)
        and not isinstance(test_env, bool)
        and 0 <= test_env < len(dataset)
    ):
        return test_env
    raise DataError(
        f"test_env {test_env!r} is not a domain of {dataset.name}: use a name in {dataset.domains} "
        f"or an index 0..{len(dataset) - 1}"
    )


def _check_fraction(holdout_fraction: float) -> None:
    if not 0.0 < holdout_fraction < 1.0:
        raise DataError(
            f"holdout_fraction must be strictly between 0 and 1, got {holdout_fraction!r}"
        )


def _check_options(sampling: str, id_val_transform: str) -> None:
    check_sampling(sampling)
    if id_val_transform not in ID_VAL_TRANSFORMS:
        raise DataError(
            f"id_val_transform must be one of {list(ID_VAL_TRANSFORMS)}, got {id_val_transform!r}"
        )


def _id_val_split(
    dataset: MultiDomainDataset, env: int, keys: list[int], seed: int, transform: IdValTransform
) -> Dataset:
    if transform == "train":
        return FixedAugmentation(dataset.domain(env, train=True), keys, seed)
    return Subset(dataset.domain(env, train=False), keys)


def _split_domains(
    dataset: MultiDomainDataset,
    train_envs: Sequence[int],
    split_seed: int,
    holdout_fraction: float,
    sampling: Sampling = "epochs",
    id_val_transform: IdValTransform = "eval",
) -> tuple[list[Dataset], list[Dataset]]:
    train: list[Dataset] = []
    id_val: list[Dataset] = []
    for env in train_envs:
        env_seed = seed_hash(split_seed, env)
        out_keys, in_keys = split_indices(dataset.domain_size(env), holdout_fraction, env_seed)
        if not in_keys or not out_keys:
            raise DataError(
                f"domain {dataset.domains[env]!r} of {dataset.name} has {dataset.domain_size(env)} "
                f"images: too few for a {holdout_fraction:.0%} ID-validation split"
            )
        train.append(TrainSplit(dataset.domain(env, train=True), in_keys, sampling))
        aug_seed = seed_hash("id_val_augmentation", env_seed)
        id_val.append(_id_val_split(dataset, env, out_keys, aug_seed, id_val_transform))
    return train, id_val


def target_splits(
    dataset: MultiDomainDataset,
    test_envs: Sequence[int],
    split_seed: int,
    holdout_fraction: float = 0.2,
    *,
    sampling: Sampling = "epochs",
    id_val_transform: IdValTransform = "eval",
) -> TaskSplits:
    """Leave-``test_envs``-out splits of the target task T.

    Training domains are split 80/20 (ID train / ID val) with ``seed_hash(split_seed, env)``,
    ``env`` being the domain's index in the dataset; the test domains are kept in full.
    ``sampling`` and ``id_val_transform``: see the module docstring.
    """
    _check_fraction(holdout_fraction)
    _check_options(sampling, id_val_transform)
    tests = [resolve_test_env(dataset, t) for t in test_envs]
    if not tests:
        raise DataError(
            "target_splits needs at least one test domain; use auxiliary_splits to train on all"
        )
    if len(set(tests)) != len(tests):
        raise DataError(f"test_envs {list(test_envs)!r} repeats a domain")
    train_envs = [i for i in range(len(dataset)) if i not in tests]
    if not train_envs:
        raise DataError(
            f"test_envs {list(test_envs)!r} leave no training domain in {dataset.domains}"
        )
    train, id_val = _split_domains(
        dataset, train_envs, split_seed, holdout_fraction, sampling, id_val_transform
    )
    return TaskSplits(
        train=train,
        id_val=id_val,
        ood_test=[dataset.domain(t, train=False) for t in tests],
        train_domains=[dataset.domains[i] for i in train_envs],
        test_domains=[dataset.domains[t] for t in tests],
        num_classes=dataset.num_classes,
    )


def auxiliary_splits(
    dataset: MultiDomainDataset,
    split_seed: int,
    holdout_fraction: float = 0.2,
    *,
    sampling: Sampling = "epochs",
    id_val_transform: IdValTransform = "eval",
) -> TaskSplits:
    """Splits of an auxiliary task T_i (or of T0): train on ALL domains (DomainBed's
    ``test_env = -1``)."""
    _check_fraction(holdout_fraction)
    _check_options(sampling, id_val_transform)
    train_envs = list(range(len(dataset)))
    train, id_val = _split_domains(
        dataset, train_envs, split_seed, holdout_fraction, sampling, id_val_transform
    )
    return TaskSplits(
        train=train,
        id_val=id_val,
        ood_test=[],
        train_domains=list(dataset.domains),
        test_domains=[],
        num_classes=dataset.num_classes,
    )
