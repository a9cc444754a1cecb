"""The embedded offline benchmark: sklearn's digits in style domains, T0 and auxiliary tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from ratatouille.data import (
    DATASET_NAMES,
    EMBEDDED_AUX_TASKS,
    EMBEDDED_PRETRAIN_TASK,
    EMBEDDED_TARGET,
    DataError,
    get_dataset,
    target_splits,
)
from ratatouille.data.digits import base_images, build_style_domains

DIGITS = load_digits()


def _pixels01(image: torch.Tensor) -> torch.Tensor:
    return image * 0.5 + 0.5


def _sources(task_name: str, seed: int = 0) -> set[int]:
    task = get_dataset(task_name, seed=seed)
    return {int(i) for d in range(len(task)) for i in task.style_domain(d).source_index}


def test_target_has_four_sorted_style_domains_of_300_images() -> None:
    target = get_dataset(EMBEDDED_TARGET)
    assert target.domains == ["inverted", "noisy", "rot30", "thick"]
    assert [target.domain_size(d) for d in range(4)] == [300] * 4
    assert target.classes == [str(d) for d in range(10)]
    assert target.input_shape == (3, 16, 16)
    image, label = target.domain(0, train=False)[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert isinstance(label, int)


def test_pretraining_and_auxiliary_tasks_differ_from_the_target() -> None:
    target = get_dataset(EMBEDDED_TARGET)
    t0 = get_dataset(EMBEDDED_PRETRAIN_TASK)
    assert len(EMBEDDED_AUX_TASKS) >= 3
    assert {EMBEDDED_PRETRAIN_TASK, EMBEDDED_TARGET, *EMBEDDED_AUX_TASKS} <= set(DATASET_NAMES)
    assert t0.classes == ["0 or 5", "1 or 6", "2 or 7", "3 or 8", "4 or 9"]
    styles = [set(get_dataset(name).domains) for name in EMBEDDED_AUX_TASKS]
    for aux_styles in styles:
        assert not aux_styles & set(target.domains)
    assert len(set.union(*styles)) == sum(len(s) for s in styles)  # each aux task its own style


def test_labels_are_sklearn_digits_and_t0_labels_are_digit_mod_5() -> None:
    target = get_dataset(EMBEDDED_TARGET)
    for d in range(4):
        items = target.domain(d, train=False)
        source = target.style_domain(d).source_index.numpy()
        labels = np.array([items[i][1] for i in range(len(items))])
        assert np.array_equal(labels, DIGITS.target[source])
    t0 = get_dataset(EMBEDDED_PRETRAIN_TASK)
    items = t0.domain(0, train=False)
    source = t0.style_domain(0).source_index.numpy()
    labels = np.array([items[i][1] for i in range(len(items))])
    assert np.array_equal(labels, DIGITS.target[source] % 5)


def test_no_target_image_is_seen_by_pretraining_or_auxiliary_tasks() -> None:
    target_domains = [_sources(EMBEDDED_TARGET, seed) for seed in (0, 1)]
    others = set().union(
        *(
            _sources(n, seed)
            for n in (EMBEDDED_PRETRAIN_TASK, *EMBEDDED_AUX_TASKS)
            for seed in (0, 1)
        )
    )
    for sources in target_domains:
        assert len(sources) == 1200 and not sources & others
    assert len(others) == 1797 - 1200

    # Content check, independent of the recorded provenance: un-inverting the "inverted"
    # domain gives images that match no clean T0 image (sklearn's digits have no duplicates).
    target, t0 = get_dataset(EMBEDDED_TARGET), get_dataset(EMBEDDED_PRETRAIN_TASK)
    uninverted = 1.0 - _pixels01(target.style_domain(0).images[:, 0]).flatten(1)
    clean = _pixels01(t0.style_domain(0).images[:, 0]).flatten(1)
    assert torch.cdist(uninverted, clean).min() > 0.1
    # Control: the same measure finds the un-inverted images at distance 0 from a clean
    # rendering of their own source digits, so it would see a target image among T0's.
    own = base_images(target.style_domain(0).source_index.numpy())[:, 0].flatten(1)
    assert torch.cdist(uninverted, own).diagonal().max() < 0.01  # normalisation rounding only


def test_target_domains_are_disjoint_and_dealt_by_seed() -> None:
    per_domain = []
    for seed in (0, 1):
        target = get_dataset(EMBEDDED_TARGET, seed=seed)
        per_domain.append([set(target.style_domain(d).source_index.tolist()) for d in range(4)])
    for domains in per_domain:
        assert sum(len(d) for d in domains) == len(set().union(*domains)) == 1200
    assert per_domain[0] != per_domain[1]


def test_rebuild_with_same_seed_is_identical_and_other_seed_differs_where_random() -> None:
    first = build_style_domains.__wrapped__(3)
    again = build_style_domains.__wrapped__(3)
    other = build_style_domains.__wrapped__(4)
    for style in first:
        assert torch.equal(first[style].images, again[style].images)
        assert torch.equal(first[style].source_index, again[style].source_index)
    for style in ("inverted", "noisy", "rot30", "thick", "shrunk"):  # dealt or randomised by seed
        assert not torch.equal(first[style].images, other[style].images)
    for style in ("clean", "flipped", "sheared"):  # fixed source pool, deterministic style
        assert torch.equal(first[style].images, other[style].images)


def test_styles_do_what_their_names_say() -> None:
    t0 = get_dataset(EMBEDDED_PRETRAIN_TASK)
    clean = _pixels01(t0.style_domain(0).images)
    flipped = _pixels01(get_dataset("digits_aux_flipped").style_domain(0).images)
    assert torch.allclose(flipped, clean.flip(-1), atol=1e-5)
    assert torch.allclose(clean[:, 0], clean[:, 1]) and clean.min() >= 0 and clean.max() <= 1
    target = get_dataset(EMBEDDED_TARGET)
    noisy = _pixels01(target.style_domain(1).images)
    # the noisy background is coloured and bright; the other domains are grey.
    assert (noisy[:, 0] - noisy[:, 1]).abs().mean() > 0.05
    assert (
        _pixels01(target.style_domain(0).images)[:, :, 0, 0].mean() > 0.9
    )  # inverted: white corners


def test_repeated_get_dataset_is_cached_and_cheap() -> None:
    get_dataset(EMBEDDED_TARGET, seed=11)
    builds = build_style_domains.cache_info().misses
    again = get_dataset(EMBEDDED_TARGET, seed=11)
    assert build_style_domains.cache_info().misses == builds  # served from the cache, not rebuilt
    assert (
        again.style_domain(0).images is get_dataset(EMBEDDED_TARGET, seed=11).style_domain(0).images
    )


def test_items_are_copies_so_in_place_edits_do_not_corrupt_the_cache() -> None:
    items = get_dataset(EMBEDDED_TARGET).domain(0, train=False)
    before = items[0][0].clone()
    items[0][0].zero_()
    assert torch.equal(items[0][0], before)


def test_eval_is_deterministic_and_training_augmentation_shifts() -> None:
    target = get_dataset(EMBEDDED_TARGET)
    eval_items = target.domain(2, train=False)
    assert torch.equal(eval_items[5][0], eval_items[5][0])
    train_items = target.domain(2, train=True)
    draws = []
    for seed in range(6):
        torch.manual_seed(seed)
        draws.append(train_items[5][0])
    assert any(not torch.equal(d, eval_items[5][0]) for d in draws)
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 1
    plain = get_dataset(EMBEDDED_TARGET, augment=False)
    assert torch.equal(plain.domain(2, train=True)[5][0], eval_items[5][0])


def test_t0_strong_augmentation_changes_more_than_a_shift() -> None:
    t0 = get_dataset(EMBEDDED_PRETRAIN_TASK)
    torch.manual_seed(0)
    augmented = t0.domain(0, train=True)[0][0]
    clean = t0.domain(0, train=False)[0][0]
    padded = torch.nn.functional.pad(clean[None], (2, 2, 2, 2), mode="replicate")[0]
    shifts = [padded[:, dy : dy + 16, dx : dx + 16] for dy in range(5) for dx in range(5)]
    assert all(not torch.allclose(augmented, s, atol=1e-3) for s in shifts)


def test_image_size_option_and_its_limit() -> None:
    big = get_dataset(EMBEDDED_TARGET, image_size=32)
    assert big.input_shape == (3, 32, 32)
    assert big.domain(0, train=True)[0][0].shape == (3, 32, 32)
    with pytest.raises(DataError, match="at least 8"):
        get_dataset(EMBEDDED_TARGET, image_size=4)


def test_target_leave_one_domain_out_sizes() -> None:
    splits = target_splits(get_dataset(EMBEDDED_TARGET), [2], split_seed=0)
    assert splits.test_domains == ["rot30"]
    assert [len(d) for d in splits.train] == [240] * 3
    assert [len(d) for d in splits.id_val] == [60] * 3
    assert [len(d) for d in splits.ood_test] == [300]
