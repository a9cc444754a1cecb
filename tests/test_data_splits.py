"""Leave-one-domain-out and auxiliary splits, checked against DomainBed's recipe recomputed here."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from ratatouille.data import (
    DataError,
    MultiDomainDataset,
    TensorDomain,
    auxiliary_splits,
    labels_of,
    resolve_test_env,
    target_splits,
)

SIZES = (10, 23, 17, 6)
TRAIN_OFFSET = 0.5  # the toy "augmentation": adds 0.5, so train items are recognisable


class ToyDomains(MultiDomainDataset):
    """Item ``i`` of domain ``d`` is a 1x1x1 image holding ``1000 * d + i``; label ``i % 3``."""

    ENVIRONMENTS = ("alpha", "beta", "gamma", "delta")
    name = "Toy"
    classes = ("a", "b", "c")
    input_shape = (1, 1, 1)

    def domain_size(self, index: int) -> int:
        return SIZES[index]

    def _domain_items(self, index: int, train: bool) -> Dataset:
        n = SIZES[index]
        images = (1000.0 * index + torch.arange(n, dtype=torch.float32)).view(n, 1, 1, 1)
        return TensorDomain(
            images, torch.arange(n) % 3, (lambda x: x + TRAIN_OFFSET) if train else None
        )


def _values(dataset: Dataset) -> list[float]:
    return [float(dataset[i][0].flatten()[0]) for i in range(len(dataset))]


def _domainbed_split(n: int, trial_seed: int, env_i: int) -> tuple[list[int], list[int]]:
    """DomainBed's split recomputed independently: md5 seed, numpy permutation, first 20% out."""
    seed = int(hashlib.md5(str((trial_seed, env_i)).encode("utf-8")).hexdigest(), 16) % (2**31)
    perm = np.random.RandomState(seed).permutation(n).tolist()
    n_out = int(n * 0.2)
    return perm[:n_out], perm[n_out:]


def test_held_out_domain_is_kept_in_full_with_eval_transform() -> None:
    splits = target_splits(ToyDomains(), [2], split_seed=0)
    assert splits.test_domains == ["gamma"]
    assert splits.train_domains == ["alpha", "beta", "delta"]
    assert len(splits.ood_test) == 1
    assert _values(splits.ood_test[0]) == [2000.0 + i for i in range(17)]
    assert splits.num_classes == 3


@pytest.mark.parametrize("split_seed", [0, 7])
def test_training_domains_split_as_domainbed_with_env_index_seed(split_seed: int) -> None:
    splits = target_splits(ToyDomains(), [0], split_seed=split_seed)
    for position, env in enumerate([1, 2, 3]):
        out_keys, in_keys = _domainbed_split(SIZES[env], split_seed, env)
        assert _values(splits.id_val[position]) == [1000.0 * env + k for k in out_keys]
        assert _values(splits.train[position]) == [1000.0 * env + k + TRAIN_OFFSET for k in in_keys]


def test_split_is_disjoint_covers_domain_and_holds_out_twenty_percent() -> None:
    splits = target_splits(ToyDomains(), [3], split_seed=1)
    for position, env in enumerate([0, 1, 2]):
        val = {v - 1000.0 * env for v in _values(splits.id_val[position])}
        train = {v - 1000.0 * env - TRAIN_OFFSET for v in _values(splits.train[position])}
        assert not val & train
        assert val | train == set(map(float, range(SIZES[env])))
        assert len(val) == int(SIZES[env] * 0.2)


def test_split_differs_across_split_seeds_and_repeats_within_one() -> None:
    a = _values(target_splits(ToyDomains(), [0], split_seed=0).id_val[0])
    b = _values(target_splits(ToyDomains(), [0], split_seed=1).id_val[0])
    again = _values(target_splits(ToyDomains(), [0], split_seed=0).id_val[0])
    assert a == again
    assert a != b


def test_id_val_uses_eval_transform_and_train_uses_augmentation() -> None:
    splits = target_splits(ToyDomains(), [0], split_seed=0)
    assert all(v == int(v) for v in _values(splits.id_val[0]))
    assert all(v - int(v) == TRAIN_OFFSET for v in _values(splits.train[0]))


def test_auxiliary_split_trains_on_every_domain_and_has_no_ood_test() -> None:
    splits = auxiliary_splits(ToyDomains(), split_seed=4)
    assert splits.train_domains == ["alpha", "beta", "gamma", "delta"]
    assert splits.test_domains == [] and splits.ood_test == []
    for env, n in enumerate(SIZES):
        out_keys, in_keys = _domainbed_split(n, 4, env)
        assert _values(splits.id_val[env]) == [1000.0 * env + k for k in out_keys]
        assert len(splits.train[env]) == len(in_keys)


def test_resolve_test_env_accepts_names_and_indices() -> None:
    toy = ToyDomains()
    assert resolve_test_env(toy, "gamma") == 2
    assert resolve_test_env(toy, 3) == 3
    for bad in ["Gamma", 4, -1, True]:
        with pytest.raises(DataError, match="alpha"):
            resolve_test_env(toy, bad)


@pytest.mark.parametrize(
    ("test_envs", "message"),
    [([], "at least one test domain"), ([1, 1], "repeats"), ([0, 1, 2, 3], "no training domain")],
)
def test_target_splits_rejects_bad_test_envs(test_envs: list[int], message: str) -> None:
    with pytest.raises(DataError, match=message):
        target_splits(ToyDomains(), test_envs, split_seed=0)


def test_bad_holdout_fraction_and_too_small_domain_are_refused() -> None:
    with pytest.raises(DataError, match="holdout_fraction"):
        auxiliary_splits(ToyDomains(), split_seed=0, holdout_fraction=1.0)
    with pytest.raises(DataError, match="'delta'.*too few"):
        auxiliary_splits(ToyDomains(), split_seed=0, holdout_fraction=0.1)  # int(6 * 0.1) == 0


def test_labels_of_a_split_match_the_labels_of_its_items() -> None:
    splits = target_splits(ToyDomains(), [0], split_seed=3)
    for subset in splits.train + splits.id_val + splits.ood_test:
        assert labels_of(subset).tolist() == [subset[i][1] for i in range(len(subset))]
