"""Loaders: an endless seeded training stream per domain, and a plain evaluation loader.

Determinism guarantee of :class:`InfiniteLoader`: the sequence of batches, training
augmentation included, is a pure function of ``(dataset, batch_size, seed)``, whatever
``num_workers`` is. The order comes from a private ``torch.Generator``; each item carries its
own seed drawn from that generator and is loaded with torch's global RNG seeded with it and
restored afterwards, so the loader neither reads nor advances the trainer's RNG (dropout draws
do not shift the augmentation, nor the reverse). Transforms must draw from torch's RNG only
(all of ours do; torchvision's v1 transforms do).
Bitwise-identical weights across two runs additionally need deterministic kernels (true on
CPU; on GPU see ``torch.use_deterministic_algorithms``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ratatouille.core.seeding import seed_hash
from ratatouille.data.base import DataError

_SEED_HIGH = 2**62


class _SeededItems(Dataset):
    """Loads item ``index`` under torch's global RNG seeded with ``item_seed``, then restores it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, item_seed = key
        # Only the CPU generator: torch.manual_seed would also reseed every CUDA device
        # (and costs ~100x more); transforms run on the CPU.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(item_seed)
            return self.dataset[index]


class _EndlessBatches(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, item_seed)`` cut from successive seeded permutations.

    Epochs are concatenated, so every batch is full and no item is ever dropped, even when
    the domain is smaller than a batch (a batch then spans an epoch boundary).
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n = n
        self.batch_size = batch_size
        self.seed = seed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(seed_hash("InfiniteLoader", self.seed))
        pending: list[tuple[int, int]] = []
        while True:
            order = torch.randperm(self.n, generator=gen).tolist()
            seeds = torch.randint(0, _SEED_HIGH, (self.n,), generator=gen).tolist()
            pending.extend(zip(order, seeds))
            while len(pending) >= self.batch_size:
                yield pending[: self.batch_size]
                pending = pending[self.batch_size :]

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2**62


class InfiniteLoader:
    """Endless batches ``(images, labels)`` of one domain's training split, reshuffled each epoch.

    Every ``iter()`` restarts the same stream from its first batch. Batches are always full:
    epochs are concatenated rather than truncated (DomainBed samples with replacement instead).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.check(len(dataset), batch_size, num_workers)  # type: ignore[arg-type]
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    @staticmethod
    def check(size: int, batch_size: int, num_workers: int) -> None:
        """One clear error for an empty domain, a bad batch size or a negative worker count."""
        if size == 0:
            raise DataError("InfiniteLoader got an empty dataset: a training domain has no images")
        check_batch_size(batch_size)
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers!r}")

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches = _EndlessBatches(len(self.dataset), self.batch_size, self.seed)  # type: ignore[arg-type]
        loader = DataLoader(
            _SeededItems(self.dataset),
            batch_sampler=batches,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # DataLoader draws its workers' base seed from this generator; without one it
            # would draw from (and advance) the global RNG.
            generator=torch.Generator().manual_seed(seed_hash("InfiniteLoader.workers", self.seed)),
        )
        return iter(loader)


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")


def eval_loader(
    dataset: Dataset, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """Every item once, in order (no shuffle, no drop_last): for ID-val and OOD-test accuracy."""
    check_batch_size(batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
