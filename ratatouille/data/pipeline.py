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

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, TypeVar

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
    Reseeds,
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

    The trainer re-seeds every domain after each snapshot point, so that a resume draws
    exactly the batches an uninterrupted run draws. It does so with ``reseeds`` (the sampler
    starts over in place, and the workers keep preparing batches across the checkpoint), not
    with a restart: a restart drops the batches the workers prepared and waits for each worker
    to acknowledge, a third of a second with the GPU idle for three domains of 15 workers.
    Items carry their own seeds, so reusing workers changes no batch.
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
        self.num_workers = num_workers
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

    def restart(self, seed: int, reseeds: Reseeds | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """The endless batches of ``seed`` from their first one, starting over with
        ``reseeds(k)`` at the ``k``-th batch where it names a seed; the previous stream ends."""
        return (_finish(batch) for batch in self.restart_staged(seed, reseeds))

    def restart_staged(self, seed: int, reseeds: Reseeds | None = None) -> Iterator[Staged]:
        """As :meth:`restart`, each batch on the device but not yet augmented (see
        :class:`Staged`): :class:`StepStream` augments every domain's batch in one call."""
        self._batches.seed, self._batches.reseeds = int(seed), reseeds
        return self._staged(iter(self._loader))

    def _staged(self, batches: Iterator) -> Iterator[Staged]:
        device = self.device
        if not self._stored:
            for x, y in batches:
                yield Staged(_on(device, x), _on(device, torch.as_tensor(y).long()))
            return
        for images, labels, params in batches:
            images = _on(device, images)
            if params is None:
                yield Staged(eval_batch(images), _on(device, labels))
            else:
                yield Staged(images, _on(device, labels), params)


class Staged(NamedTuple):
    """One domain's batch on the device: ``x`` final (PIL path, evaluation), or the stored
    uint8 images still to augment with ``params`` (decoded training)."""

    x: Tensor
    y: Tensor
    params: AugmentParams | None = None


def _finish(batch: Staged) -> tuple[Tensor, Tensor]:
    if batch.params is None:
        return batch.x, batch.y
    return augment_batch(batch.x, batch.params), batch.y


def _joint(parts: Sequence[Staged]) -> tuple[Tensor, Tensor]:
    """The step's batch: every domain's batch concatenated in domain order. Decoded domains
    (they share one store, hence one image size) are augmented in one call: one set of kernels
    per step instead of one per domain, the same values (the ops act per image)."""
    y = torch.cat([part.y for part in parts])
    shapes = {part.x.shape[1:] for part in parts}
    if len(shapes) == 1 and all(part.params is not None for part in parts):
        params = AugmentParams.cat([part.params for part in parts if part.params is not None])
        return augment_batch(torch.cat([part.x for part in parts]), params), y
    return torch.cat([_finish(part)[0] for part in parts]), y


class StepStream:
    """The batches of a training step, one per domain concatenated, from the domains'
    :class:`TrainStream` (which keep their worker processes between restarts).

    On CUDA the next step's batch is prepared ahead on a side stream, so that its copies and
    augmentation overlap the current step's forward and backward on the default stream. When
    every domain loads in worker processes, a background thread prepares it (:class:`_Ahead`):
    launching the augmentation's kernels is host work, a third of a ResNet-50 step's, and the
    thread does it while the trainer's thread waits on the backward pass (which runs without
    the GIL). Loading items in the process (``num_workers=0``) seeds torch's global CPU
    generator per item, which a thread must not do beside the trainer, so then the trainer's
    thread prepares the batch one step ahead (:func:`prefetched`). The batches are the same
    either way: the items carry their seeds.
    """

    def __init__(self, streams: Sequence[TrainStream], device: str | torch.device) -> None:
        self.streams, self.device = list(streams), torch.device(device)
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ahead: _Ahead | None = None

    def restart(
        self, seeds: Sequence[int], reseeds: Sequence[Reseeds] | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Every domain's stream restarted at its seed; endless ``(x, y)`` on the device. With
        ``reseeds`` (one per domain), the streams start over in place where they say."""
        if len(seeds) != len(self.streams):
            raise ValueError(f"{len(seeds)} seeds for {len(self.streams)} training domains")
        schedules = [None] * len(seeds) if reseeds is None else list(reseeds)
        if len(schedules) != len(seeds):
            raise ValueError(f"{len(schedules)} reseeds for {len(seeds)} training domains")
        self.close()  # a thread still reading the previous streams must stop first
        staged = [
            stream.restart_staged(seed, schedule)
            for stream, seed, schedule in zip(self.streams, seeds, schedules)
        ]

        def produce() -> tuple[Tensor, Tensor]:
            return _joint([next(domain) for domain in staged])

        if self._side is None:
            return _each(produce)
        side, current = self._side, torch.cuda.current_stream(self.device)

        def produce_channels_last() -> tuple[Tensor, Tensor]:
            x, y = produce()  # the model's input format on CUDA (the trainer's)
            return x.contiguous(memory_format=torch.channels_last), y

        if all(stream.num_workers > 0 for stream in self.streams):
            self._ahead = _Ahead(produce_channels_last, side, current)
            return iter(self._ahead)

        def hand_over(batch: tuple[Tensor, Tensor]) -> None:
            current.wait_stream(side)  # the batch's copies and kernels precede its use
            for tensor in batch:  # made on the side stream, used and freed on the current one
                tensor.record_stream(current)

        return prefetched(produce_channels_last, lambda: torch.cuda.stream(side), hand_over)

    def close(self) -> None:
        """Stops the thread preparing batches, if any (the trainer calls it when done)."""
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None


_END = object()


class _Ahead:
    """``produce()``'s batches made in a background thread, up to two ahead, inside the side
    CUDA stream ``side``; each handed to the ``consumer`` stream with an event it waits on, its
    tensors recorded on that stream (made on one stream, used and freed on the other). An
    error in ``produce`` is raised to the consumer; StopIteration ends the stream."""

    def __init__(self, produce: Callable[[], tuple[Tensor, Tensor]], side: Any, consumer: Any):
        self._produce, self._side, self._consumer = produce, side, consumer
        self._ready: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ratatouille-batches", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with torch.cuda.stream(self._side):
                while not self._stop.is_set():
                    batch = self._produce()
                    made = torch.cuda.Event()
                    made.record(self._side)
                    for tensor in batch:
                        tensor.record_stream(self._consumer)
                    self._put((batch, made))
        except StopIteration:
            self._put(_END)
        except BaseException as error:  # re-raised in the trainer's thread
            self._put(error)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            item = self._ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            batch, made = item
            self._consumer.wait_event(made)  # the batch's copies and kernels precede its use
            yield batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


Batch = TypeVar("Batch")


def _each(produce: Callable[[], Batch]) -> Iterator[Batch]:
    try:
        while True:
            yield produce()
    except StopIteration:
        return


def prefetched(
    produce: Callable[[], Batch],
    on_side: Callable[[], AbstractContextManager],
    hand_over: Callable[[Batch], None],
) -> Iterator[Batch]:
    """``produce()``'s batches, each made one ahead: batch k + 1 is produced inside
    ``on_side()`` (a side CUDA stream) after batch k is handed over (the consumer's stream
    waits for the side stream's work so far, which is batch k's) and before batch k is
    returned, so its work overlaps the consumer's work on batch k. Ends when ``produce``
    raises StopIteration."""
    try:
        with on_side():
            ahead = produce()
    except StopIteration:
        return
    while True:
        hand_over(ahead)
        batch = ahead
        try:
            with on_side():
                ahead = produce()
        except StopIteration:
            yield batch  # the last one
            return
        yield batch


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


__all__ = [
    "AugmentParams",
    "StepStream",
    "StoredDomain",
    "TrainStream",
    "eval_batches",
    "prefetched",
    "stored_view",
    "train_batches",
]
