"""The seeded endless training stream and the ordered evaluation loader."""

from __future__ import annotations

import itertools

import pytest
import torch

from ratatouille.data import DataError, InfiniteLoader, TensorDomain, eval_loader


def _noisy_items(n: int) -> TensorDomain:
    """Item ``i`` holds ``i`` in its first pixel; the "augmentation" adds torch-RNG noise
    elsewhere."""
    images = torch.zeros(n, 1, 2, 2)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)

    def augment(x: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(x.shape)
        noise[0, 0, 0] = 0.0
        return x + noise

    return TensorDomain(images, torch.arange(n), augment)


def _take(loader: InfiniteLoader, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(iter(loader), k))


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_same_seed_gives_same_batches_including_augmentation() -> None:
    data = _noisy_items(10)
    torch.manual_seed(1)
    first = _take(InfiniteLoader(data, 4, seed=5), 6)
    torch.manual_seed(2)  # the trainer's RNG state must not matter
    second = _take(InfiniteLoader(data, 4, seed=5), 6)
    assert _same(first, second)
    other = _take(InfiniteLoader(data, 4, seed=6), 6)
    assert not _same(first, other)


def test_loader_neither_reads_nor_advances_the_global_rng() -> None:
    torch.manual_seed(0)
    expected = torch.rand(5)
    torch.manual_seed(0)
    _take(InfiniteLoader(_noisy_items(10), 4, seed=0), 3)
    assert torch.equal(torch.rand(5), expected)


def test_every_item_appears_once_per_epoch_and_batches_are_full() -> None:
    batches = _take(InfiniteLoader(_noisy_items(10), 4, seed=3), 5)  # 20 items = 2 epochs
    assert all(len(y) == 4 for _, y in batches)
    stream = torch.cat([y for _, y in batches]).tolist()
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # reshuffled each epoch
    first_pixels = torch.cat([x[:, 0, 0, 0] for x, _ in batches]).long().tolist()
    assert first_pixels == stream  # images stay paired with their labels


def test_domain_smaller_than_a_batch_still_yields_full_batches() -> None:
    batches = _take(InfiniteLoader(_noisy_items(3), 4, seed=0), 3)
    stream = torch.cat([y for _, y in batches]).tolist()
    assert [len(y) for _, y in batches] == [4, 4, 4]
    assert all(sorted(stream[e * 3 : e * 3 + 3]) == [0, 1, 2] for e in range(4))


def test_worker_processes_give_the_same_stream() -> None:
    data = _noisy_items(9)
    in_process = _take(InfiniteLoader(data, 4, seed=2), 4)
    with_worker = _take(InfiniteLoader(data, 4, seed=2, num_workers=1), 4)
    assert _same(in_process, with_worker)


def test_eval_loader_keeps_order_and_the_last_partial_batch() -> None:
    batches = list(eval_loader(_noisy_items(10), batch_size=4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))


@pytest.mark.parametrize("batch_size", [0, 2.5, True])
def test_bad_batch_size_is_refused(batch_size: object) -> None:
    with pytest.raises(DataError, match="batch_size"):
        InfiniteLoader(_noisy_items(3), batch_size, seed=0)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="batch_size"):
        eval_loader(_noisy_items(3), batch_size)  # type: ignore[arg-type]


def test_empty_domain_is_refused() -> None:
    with pytest.raises(DataError, match="empty"):
        InfiniteLoader(_noisy_items(0), 4, seed=0)


@pytest.mark.parametrize("sampling", ["epochs", "with_replacement"])
def test_a_reseeded_sampler_is_fresh_streams_cut_where_it_reseeds(sampling) -> None:
    """The trainer re-seeds at checkpoints inside the sampler: batches 0-2 of seed 4, then,
    from the 3rd batch, seed 9's first ones, then from the 5th, seed 4's again."""
    from ratatouille.data.loaders import _EndlessBatches

    def fresh(seed: int, k: int) -> list:
        return list(itertools.islice(_EndlessBatches(10, 3, seed, sampling), k))

    reseeds = {3: 9, 5: 4}
    stream = _EndlessBatches(10, 3, 4, sampling, reseeds=reseeds.get)
    assert list(itertools.islice(stream, 8)) == fresh(4, 3) + fresh(9, 2) + fresh(4, 3)
    assert fresh(4, 3) != fresh(9, 3)  # the cut is visible
