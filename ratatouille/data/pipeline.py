"""The batches a trainer consumes, for both data paths: ``train_batches`` and ``eval_batches``.

Both yield ``(x, y)`` with ``x`` float32, normalised, already on ``device`` (pinned host memory
and non-blocking copies on CUDA). Training labels are on ``device``; evaluation labels stay on
the CPU (callers collect them there).

- PIL path (the reference; any dataset: DomainBed files, the embedded tensors): items are
  transformed one at a time by the loader (``InfiniteLoader``/``eval_loader``), then copied.
- Decoded path (a :class:`StoredDomain`, or a ``Subset`` of one): the loader only gathers uint8
  rows of the memory-mapped store and each item's augmentation parameters (drawn on the CPU
  from the item's seed); the augmentation runs on the whole batch on ``device``.

Both keep ``InfiniteLoader``'s guarantee: batches are a pure function of
``(dataset, batch_size, seed)`` whatever ``num_workers``, and for the decoded path whatever the
device up to floating-point rounding (the parameters are drawn on the CPU).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ratatouille.core.seeding import seed_hash
from ratatouille.data.augment import (
    AugmentParams,
    augment_batch,
    draw_one,
    draw_params,
    eval_batch,
    stack_params,
)
from ratatouille.data.base import DataError, FileDomain
from ratatouille.data.loaders import (
    InfiniteLoader,
    _EndlessBatches,
    check_batch_size,
    eval_loader,
    sampling_of,
)
from ratatouille.data.store import DecodedStore


class StoredDomain(FileDomain):
    """A DomainBed domain read from the decoded store instead of its files.

    ``samples`` are the files' (path, label) as in :class:`FileDomain` (identity digests are the
    same on both paths). Indexing one item returns what the PIL path returns (the augmentation
    drawn from torch's global RNG, or the eval transform); loaders use :meth:`rows` and the
    batched ops instead.
    """

    def __init__(
        self, samples: Sequence[tuple[str, int]], store: DecodedStore, domain: int, train: bool
    ) -> None:
        super().__init__(samples, loader=_unused_loader, transform=_unused_loader)
        self.store, self.domain, self.train = store, domain, train
        self.start, end = store.domain_rows(domain)
        if end - self.start != len(self.samples):
            raise DataError(f"decoded store {store.path} does not match domain {domain}")

    def rows(self, indices: Sequence[int]) -> Tensor:
        """uint8 images ``len(indices) x 3 x S x S`` (a copy out of the memory map)."""
        rows = [self.start + int(i) for i in indices]
        return torch.from_numpy(self.store.images[rows])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        images = self.rows([index])
        if self.train:
            # torch's global RNG, which InfiniteLoader seeds with the item's seed: the same
            # draws as train_batches makes from a generator seeded with it.
            params = stack_params([draw_one(self.store.size, torch.default_generator)])
            image = augment_batch(images, params)[0]
        else:
            image = eval_batch(images)[0]
        return image, self.samples[index][1]


def _unused_loader(_: Any) -> Any:
    raise AssertionError("StoredDomain reads the decoded store, never the files")


def stored_view(dataset: Dataset) -> tuple[StoredDomain, list[int]] | None:
    """``(domain, row indices)`` when ``dataset`` is a StoredDomain or (nested) Subset of one."""
    if isinstance(dataset, StoredDomain):
        return dataset, list(range(len(dataset)))
    if isinstance(dataset, Subset):
        inner = stored_view(dataset.dataset)
        if inner is not None:
            domain, rows = inner
            return domain, [rows[i] for i in dataset.indices]
    return None


class _Gather(Dataset):
    """Item ``(i, seed)``: row ``i``'s uint8 image, label and seed (collated per batch)."""

    def __init__(self, domain: StoredDomain, rows: list[int]) -> None:
        self.domain, self.rows = domain, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, int]:
        index, seed = key
        return self.rows[index], self.domain.samples[self.rows[index]][1], seed


class _Collate:
    def __init__(self, domain: StoredDomain, augment: bool) -> None:
        self.domain, self.augment = domain, augment

    def __call__(self, items: list[tuple[int, int, int]]) -> tuple[Tensor, Tensor, Any]:
        rows, labels, seeds = zip(*items)
        params = draw_params(list(seeds), self.domain.store.size) if self.augment else None
        return self.domain.rows(rows), torch.tensor(labels, dtype=torch.long), params


def _on(device: torch.device, tensor: Tensor) -> Tensor:
    return tensor.to(device, non_blocking=True)


def train_batches(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    *,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless training batches of one domain (see the module docstring), re-started per call,
    drawn as the split asks (``sampling_of``: epochs or with replacement)."""
    device = torch.device(device)
    sampling = sampling_of(dataset)
    view = stored_view(dataset)
    pin = device.type == "cuda"
    if view is None:
        loader = InfiniteLoader(dataset, batch_size, seed, num_workers, pin_memory=pin)
        for x, y in loader:
            yield _on(device, x), _on(device, torch.as_tensor(y).long())
        return
    domain, rows = view
    InfiniteLoader.check(len(rows), batch_size, num_workers)
    batches = DataLoader(
        _Gather(domain, rows),
        batch_sampler=_EndlessBatches(len(rows), batch_size, seed, sampling),
        num_workers=num_workers,
        collate_fn=_Collate(domain, domain.train),
        pin_memory=pin,
        generator=torch.Generator().manual_seed(seed_hash("train_batches.workers", seed)),
    )
    for images, labels, params in batches:
        images = _on(device, images)
        x = eval_batch(images) if params is None else augment_batch(images, params)
        yield x, _on(device, labels)


def eval_batches(
    dataset: Dataset,
    batch_size: int = 64,
    *,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Every item once, in order: ``(x on device, y on the CPU)``."""
    device = torch.device(device)
    check_batch_size(batch_size)
    view = stored_view(dataset)
    pin = device.type == "cuda"
    if view is None:
        for x, y in eval_loader(dataset, batch_size, num_workers, pin_memory=pin):
            yield _on(device, x), torch.as_tensor(y).long()
        return
    domain, rows = view
    keys = [(i, 0) for i in range(len(rows))]
    loader = DataLoader(
        _Gather(domain, rows),
        batch_sampler=[keys[k : k + batch_size] for k in range(0, len(keys), batch_size)],
        num_workers=num_workers,
        collate_fn=_Collate(domain, augment=False),
        pin_memory=pin,
    )
    for images, labels, _ in loader:
        yield eval_batch(_on(device, images)), labels


__all__ = ["AugmentParams", "StoredDomain", "eval_batches", "stored_view", "train_batches"]
