"""The hyperparameter registry against Table 3 of the paper and DomainBed's seeding rule."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ratatouille.engine.hparams import (
    HPARAMS,
    dataset_schedule,
    default_hparams,
    random_hparams,
)

SEEDS = range(1, 201)


def _md5_seed(*args: object) -> int:
    # DomainBed's misc.seed_hash, written out so the test does not trust ratatouille.core.seeding
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def test_defaults_are_table_3_defaults() -> None:
    assert default_hparams() == {"lr": 5e-5, "batch_size": 32, "dropout": 0.0, "weight_decay": 0.0}
    assert set(HPARAMS) == {"lr", "batch_size", "dropout", "weight_decay"}


def test_mild_samples_only_take_table_3_grid_values() -> None:
    draws = [random_hparams("mild", seed) for seed in SEEDS]
    assert {d["lr"] for d in draws} == {1e-5, 3e-5, 5e-5}
    assert {d["batch_size"] for d in draws} == {32}
    assert {d["dropout"] for d in draws} == {0.0, 0.1, 0.5}
    assert {d["weight_decay"] for d in draws} == {1e-6, 1e-4}


def test_domainbed_samples_stay_within_table_3_ranges() -> None:
    draws = [random_hparams("domainbed", seed) for seed in SEEDS]
    lrs = np.array([d["lr"] for d in draws])
    wds = np.array([d["weight_decay"] for d in draws])
    batches = np.array([d["batch_size"] for d in draws])
    assert np.all((lrs >= 1e-5) & (lrs <= 10**-3.5))
    assert np.all((wds >= 1e-6) & (wds <= 1e-2))
    assert np.all((batches >= 8) & (batches <= int(2**5.5)))  # int(2^U(3, 5.5)) in 8..45
    assert all(isinstance(b, int) for b in batches.tolist())
    assert {d["dropout"] for d in draws} == {0.0, 0.1, 0.5}
    # log-uniform: both halves of the exponent range are visited
    assert (np.log10(lrs) < -4.25).any() and (np.log10(lrs) > -4.25).any()


def test_same_seed_gives_same_values_and_other_seeds_differ() -> None:
    assert random_hparams("domainbed", 7) == random_hparams("domainbed", 7)
    assert random_hparams("domainbed", 7) != random_hparams("domainbed", 8)


def test_each_hparam_is_drawn_from_its_own_seeded_random_state() -> None:
    seed = 12345
    expected = {
        "lr": 10 ** np.random.RandomState(_md5_seed(seed, "lr")).uniform(-5, -3.5),
        "batch_size": int(
            2 ** np.random.RandomState(_md5_seed(seed, "batch_size")).uniform(3, 5.5)
        ),
        "dropout": np.random.RandomState(_md5_seed(seed, "dropout")).choice([0.0, 0.1, 0.5]),
        "weight_decay": 10
        ** np.random.RandomState(_md5_seed(seed, "weight_decay")).uniform(-6, -2),
    }
    assert random_hparams("domainbed", seed) == pytest.approx(expected, rel=1e-12)
    mild = {
        "lr": np.random.RandomState(_md5_seed(seed, "lr")).choice([1e-5, 3e-5, 5e-5]),
        "batch_size": 32,
        "dropout": np.random.RandomState(_md5_seed(seed, "dropout")).choice([0.0, 0.1, 0.5]),
        "weight_decay": np.random.RandomState(_md5_seed(seed, "weight_decay")).choice([1e-6, 1e-4]),
    }
    assert random_hparams("mild", seed) == mild


def test_override_replaces_the_grid_and_leaves_other_hparams_alone() -> None:
    grid = [1e-4, 3e-4, 5e-4]
    draws = [random_hparams("mild", s, overrides={"lr": grid}) for s in SEEDS]
    assert {d["lr"] for d in draws} == set(grid)
    for seed, draw in zip(SEEDS, draws):
        plain = random_hparams("mild", seed)
        assert {k: v for k, v in draw.items() if k != "lr"} == {
            k: v for k, v in plain.items() if k != "lr"
        }
    expected_lr = grid[np.random.RandomState(_md5_seed(4, "lr")).choice(3)]
    assert random_hparams("domainbed", 4, overrides={"lr": grid})["lr"] == expected_lr


def test_sampled_values_are_python_scalars() -> None:
    for value in random_hparams("mild", 1).values():
        assert type(value) in (int, float)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: random_hparams("wild", 1), "unknown hyperparameter distribution"),
        (
            lambda: random_hparams("mild", 1, overrides={"momentum": [0.9]}),
            "unknown hyperparameter 'momentum'",
        ),
        (lambda: random_hparams("mild", 1, overrides={"lr": []}), "non-empty list"),
    ],
)
def test_bad_input_raises_one_clear_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    ("dataset", "schedule"),
    [
        ("PACS", (5001, 100)),
        ("VLCS", (5001, 50)),
        ("OfficeHome", (5001, 100)),
        ("TerraIncognita", (5001, 100)),
        ("DomainNet", (15001, 500)),
        ("domain_net", (15001, 500)),
    ],
)
def test_dataset_schedule_follows_paper_f1(dataset: str, schedule: tuple[int, int]) -> None:
    assert dataset_schedule(dataset) == schedule
