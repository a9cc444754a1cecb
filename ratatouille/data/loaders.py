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

from collections.abc import Callable, Iterator
from typing import Literal, get_args

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ratatouille.core.seeding import seed_hash
from ratatouille.data.base import DataError

_SEED_HIGH = 2**62

#: How a training domain's indices are drawn: ``epochs`` concatenates seeded permutations (each
#: item once per epoch); ``with_replacement`` draws every index uniformly (DomainBed's
#: InfiniteDataLoader, a RandomSampler with replacement).
Sampling = Literal["epochs", "with_replacement"]
SAMPLINGS: tuple[str, ...] = get_args(Sampling)


def check_sampling(sampling: str) -> None:
    if sampling not in SAMPLINGS:
        raise DataError(f"sampling must be one of {list(SAMPLINGS)}, got {sampling!r}")


def sampling_of(dataset: Dataset) -> Sampling:
    """The sampling a training split asks for (``TrainSplit``); plain datasets: ``epochs``."""
    return getattr(dataset, "sampling", "epochs")


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


#: ``reseeds(k)``: the seed a stream starts over with at its ``k``-th batch (``k >= 1``; the
#: first batch is the stream's own seed's), or None where the stream goes on.
Reseeds = Callable[[int], int | None]


class _EndlessBatches(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, item_seed)`` cut from successive seeded permutations.

    Epochs are concatenated, so every batch is full and no item is ever dropped, even when
    the domain is smaller than a batch (a batch then spans an epoch boundary). With
    ``sampling="with_replacement"`` each batch's indices are drawn uniformly instead.
    With ``reseeds``, the stream starts over at the batches it names, as a new stream of that
    seed would: the trainer's re-seeding at checkpoints without restarting the loader (a
    restart drops the batches its workers prepared and waits for every worker).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        sampling: Sampling = "epochs",
        reseeds: Reseeds | None = None,
    ) -> None:
        check_sampling(sampling)
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.sampling = sampling
        self.reseeds = reseeds

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        reseeds, batches, position = self.reseeds, self._stream(self.seed), 0
        while True:
            yield next(batches)
            position += 1
            seed = None if reseeds is None else reseeds(position)
            if seed is not None:
                batches = self._stream(seed)

    def _stream(self, seed: int) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(seed_hash("InfiniteLoader", seed))
        if self.sampling == "with_replacement":
            return self._with_replacement(gen)
        return self._epochs(gen)

    def _epochs(self, gen: torch.Generator) -> Iterator[list[tuple[int, int]]]:
        pending: list[tuple[int, int]] = []
        while True:
            order = torch.randperm(self.n, generator=gen).tolist()
            seeds = torch.randint(0, _SEED_HIGH, (self.n,), generator=gen).tolist()
            pending.extend(zip(order, seeds))
            while len(pending) >= self.batch_size:
                yield pending[: self.batch_size]
                pending = pending[self.batch_size :]

    def _with_replacement(self, gen: torch.Generator) -> Iterator[list[tuple[int, int]]]:
        while True:
            picks = torch.randint(0, self.n, (self.batch_size,), generator=gen).tolist()
            seeds = torch.randint(0, _SEED_HIGH, (self.batch_size,), generator=gen).tolist()
            yield list(zip(picks, seeds))

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2**62


class InfiniteLoader:
    """Endless batches ``(images, labels)`` of one domain's training split, reshuffled each epoch.

    Every ``iter()`` restarts the same stream from its first batch. Batches are always full:
    epochs are concatenated rather than truncated. ``sampling`` (default: the dataset's own,
    see :func:`sampling_of`) ``"with_replacement"`` draws indices as DomainBed does.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        sampling: Sampling | None = None,
    ) -> None:
        self.check(len(dataset), batch_size, num_workers)  # type: ignore[arg-type]
        self.sampling: Sampling = sampling_of(dataset) if sampling is None else sampling
        check_sampling(self.sampling)
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
        n = len(self.dataset)  # type: ignore[arg-type]
        batches = _EndlessBatches(n, self.batch_size, self.seed, self.sampling)
        loader = endless_loader(
            _SeededItems(self.dataset),
            batches,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            workers_seed=seed_hash("InfiniteLoader.workers", self.seed),
        )
        return iter(loader)


def endless_loader(
    items: Dataset,
    batches: _EndlessBatches,
    *,
    num_workers: int,
    pin_memory: bool,
    workers_seed: int,
    collate_fn: Callable | None = None,
    persistent_workers: bool = False,
) -> DataLoader:
    """The DataLoader of an endless seeded stream: ``items`` are indexed by ``batches``'
    ``(index, item_seed)`` keys, so the batches do not depend on the workers."""
    return DataLoader(
        items,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers,
        # DataLoader draws its workers' base seed from this generator; without one it would
        # draw from (and advance) the global RNG. Items never read it: they carry their seeds.
        generator=torch.Generator().manual_seed(workers_seed),
    )


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
