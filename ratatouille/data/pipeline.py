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
    _SeededItems,
    check_batch_size,
    endless_loader,
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
        """uint8 images ``len(indices) x 3 x S x S`` (a copy out of the memory map), in the
        store's channels-last memory format."""
        rows = [self.start + int(i) for i in indices]
        return torch.from_numpy(self.store.images[rows]).permute(0, 3, 1, 2)

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


class TrainStream:
    """One training domain's batches for a whole run. :meth:`restart` begins the stream of a
    seed (the batches ``train_batches(dataset, batch_size, seed)`` yields) while the loader's
    worker processes stay up between restarts (``persistent_workers``).

    The trainer re-seeds every domain at each snapshot point, so that a resume draws exactly the
    batches an uninterrupted run draws. Re-creating the loaders instead started ``num_workers``
    processes per domain at every checkpoint: seconds each time, with the GPU idle. Items carry
    their own seeds, so reusing workers changes no batch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
    ) -> None:
        self.device = torch.device(device)
        view = stored_view(dataset)
        items: Dataset
        if view is None:
            n, items, collate = len(dataset), _SeededItems(dataset), None  # type: ignore[arg-type]
        else:
            domain, rows = view
            n, items, collate = len(rows), _Gather(domain, rows), _Collate(domain, domain.train)
        InfiniteLoader.check(n, batch_size, num_workers)
        self._stored = view is not None
        self._batches = _EndlessBatches(n, batch_size, 0, sampling_of(dataset))
        self._loader = endless_loader(
            items,
            self._batches,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            workers_seed=seed_hash("TrainStream.workers", n),
            collate_fn=collate,
            persistent_workers=num_workers > 0,
        )

    def restart(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The endless batches of ``seed`` from their first one; the previous stream ends."""
        self._batches.seed = int(seed)
        return self._stream(iter(self._loader))

    def _stream(self, batches: Iterator) -> Iterator[tuple[Tensor, Tensor]]:
        device = self.device
        if not self._stored:
            for x, y in batches:
                yield _on(device, x), _on(device, torch.as_tensor(y).long())
            return
        for images, labels, params in batches:
            images = _on(device, images)
            x = eval_batch(images) if params is None else augment_batch(images, params)
            yield x, _on(device, labels)


def train_batches(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    *,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless training batches of one domain (see the module docstring), drawn as the split
    asks (``sampling_of``: epochs or with replacement). A trainer that restarts streams keeps
    one :class:`TrainStream` per domain instead."""
    return TrainStream(dataset, batch_size, device=device, num_workers=num_workers).restart(seed)


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
