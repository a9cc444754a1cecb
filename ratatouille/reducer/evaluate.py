"""Evaluation for the reducer: one model instance, cached per-run predictions, a sealed OOD split.

Every target run's logits on the ID-validation and OOD-test datasets are computed once. What
stays in memory is each run's *predicted labels* (2 bytes per image); the float32 logits go to
a file on local disk, read back a chunk of rows at a time only by the ensembles (which average
logits, as the reference code does). Forward passes run over chunks of at most
:data:`CHUNK_IMAGES` images, so the reducer's memory does not grow with the dataset beyond
those predictions (on DomainNet's 172k OOD images, 100 runs and views: 34 MB, where keeping
every run's logits took 24 GB). Ensembles, diversity, ablations of size 1 and interpolation
endpoints read the cache. States that are not runs (soups, WiSE-FT, interpolations) are
evaluated on demand and not cached.

The OOD split is *sealed* until :meth:`Evaluator.open_ood` is called: any read before that
raises :class:`OODSealedError`. The reducer opens it only once every selection decision
(ERM, inter-training, greedy members, the final model) has been taken on ID val, so the OOD
domain cannot leak into selection (paper F.1, "training-domain validation set protocol").
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

Split = Literal["id_val", "ood_test"]
ID_VAL: Final[Split] = "id_val"
OOD_TEST: Final[Split] = "ood_test"
StateDict = Mapping[str, Tensor]
Predict = Callable[..., tuple[np.ndarray, np.ndarray]]
#: Images per forward pass (rounded down to whole batches): one chunk's logits are in memory.
CHUNK_IMAGES: Final = 4096


class OODSealedError(RuntimeError):
    """The OOD test split was read before the selection decisions were final."""


def _default_predict() -> Predict:
    from ratatouille.engine.train import predict_logits

    return predict_logits


def accuracy_of_logits(logits: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
    """Mean over datasets (domains) of each dataset's accuracy of ``argmax(logits)``.

    Averaging per domain, not per sample, matches the ID-val score of the reference code
    (the mean of the training domains' validation accuracies).
    """
    if len(logits) != len(labels) or not logits:
        raise ValueError(f"got {len(logits)} logit arrays for {len(labels)} label arrays")
    per_domain = [
        float(np.mean(np.argmax(lg, axis=1) == lb)) for lg, lb in zip(logits, labels) if len(lb)
    ]
    if not per_domain:
        raise ValueError("every dataset of the split is empty; nothing to score")
    return float(np.mean(per_domain))


def accuracy_of_predictions(preds: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
    """:func:`accuracy_of_logits` from predicted labels."""
    if len(preds) != len(labels) or not preds:
        raise ValueError(f"got {len(preds)} prediction arrays for {len(labels)} label arrays")
    per_domain = [float(np.mean(p == lb)) for p, lb in zip(preds, labels) if len(lb)]
    if not per_domain:
        raise ValueError("every dataset of the split is empty; nothing to score")
    return float(np.mean(per_domain))


def _chunks(dataset: Dataset, batch_size: int) -> Iterator[Dataset]:
    """``dataset`` in consecutive pieces of whole batches (itself when it fits in one), so a
    chunked pass sees the very batches an unchunked one would."""
    size = len(dataset)  # type: ignore[arg-type]
    step = max(batch_size, CHUNK_IMAGES // batch_size * batch_size)
    if size <= step:
        yield dataset
        return
    for start in range(0, size, step):
        yield Subset(dataset, range(start, min(start + step, size)))


@dataclass
class _RunCache:
    """One run's pass over a split: predictions per dataset, and the file of its logits."""

    preds: list[np.ndarray]
    files: list[tuple[str, int, int]]  # (path, rows, classes) per dataset


def _read_rows(path: str, classes: int, start: int, stop: int) -> np.ndarray:
    count = (stop - start) * classes
    data = np.fromfile(path, dtype=np.float32, count=count, offset=start * classes * 4)
    return data.reshape(stop - start, classes)


class Evaluator:
    """Scores states and runs on the ``id_val`` and ``ood_test`` splits.

    ``build_model`` is called once; every state is loaded into that one instance
    (``load_state_dict(strict=True)``), so evaluating M states costs no M model builds.
    ``predict(model, dataset, batch_size=..., device=...) -> (logits, labels)`` defaults to
    :func:`ratatouille.engine.train.predict_logits`; it is called on chunks of at most
    :data:`CHUNK_IMAGES` images. Runs' logits are written under ``folder`` (default: a
    temporary folder on local disk, removed by :meth:`close` or when the evaluator is freed).
    """

    def __init__(
        self,
        build_model: Callable[[], nn.Module],
        id_val: Sequence[Dataset],
        ood_test: Sequence[Dataset],
        *,
        batch_size: int = 64,
        device: str = "cpu",
        predict: Predict | None = None,
        folder: str | None = None,
    ) -> None:
        self._build_model = build_model
        self._model: nn.Module | None = None
        self._datasets: dict[str, list[Dataset]] = {ID_VAL: list(id_val), OOD_TEST: list(ood_test)}
        self._labels: dict[str, list[np.ndarray]] = {}
        self._runs: dict[tuple[str, str], _RunCache] = {}
        self._predict = predict
        self._folder = folder or tempfile.mkdtemp(prefix="ratatouille-logits-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        self.batch_size = batch_size
        self.device = device
        self.ood_open = False
        #: number of forward passes over one split, per run id (each should be 1).
        self.run_predictions: Counter[tuple[str, str]] = Counter()
        #: images forward-passed per split, every state counted (what `plan` prices).
        self.images_evaluated: Counter[str] = Counter()
        #: forward passes over a whole split, per split (runs and other states).
        self.passes: Counter[str] = Counter()

    def close(self) -> None:
        """Remove the logits files; cached predictions stay readable."""
        self._cleanup()

    def open_ood(self) -> None:
        """Unseal the OOD split: call only once every selection decision is final."""
        self.ood_open = True

    def _check(self, split: str) -> None:
        if split not in self._datasets:
            raise ValueError(f"unknown split {split!r}; use {ID_VAL!r} or {OOD_TEST!r}")
        if split == OOD_TEST and not self.ood_open:
            raise OODSealedError(
                "the OOD test split was read before selection finished; selection (ERM, "
                "greedy, final model) must use ID validation only"
            )

    def _model_with(self, state: StateDict) -> nn.Module:
        if self._model is None:
            self._model = self._build_model().to(self.device)
        self._model.load_state_dict(dict(state), strict=True)
        self._model.eval()
        return self._model

    def _forward(
        self, state: StateDict, split: Split, sink: Callable[[int, np.ndarray], None]
    ) -> list[np.ndarray]:
        """Predicted labels of ``state`` per dataset of ``split``; each chunk's logits go to
        ``sink(dataset index, logits)`` and are dropped."""
        self._check(split)
        model = self._model_with(state)
        predict = self._predict or _default_predict()
        self.passes[split] += 1
        outputs = []
        for index, dataset in enumerate(self._datasets[split]):
            preds, labels = [], []
            for chunk in _chunks(dataset, self.batch_size):
                logits, y = predict(model, chunk, batch_size=self.batch_size, device=self.device)
                logits = np.asarray(logits, dtype=np.float32)
                sink(index, logits)
                dtype = np.int16 if logits.shape[1] < 2**15 else np.int32
                preds.append(np.argmax(logits, axis=1).astype(dtype))
                labels.append(np.asarray(y))
                self.images_evaluated[split] += len(logits)
            outputs.append(np.concatenate(preds) if preds else np.zeros(0, np.int16))
            self._remember_labels(split, index, np.concatenate(labels) if labels else np.zeros(0))
        return outputs

    def logits(self, state: StateDict, split: Split) -> list[np.ndarray]:
        """Logits of ``state`` on each dataset of ``split`` (not cached; held in memory whole:
        :meth:`accuracy` needs only predictions)."""
        chunks: dict[int, list[np.ndarray]] = {}
        self._forward(state, split, lambda index, lg: chunks.setdefault(index, []).append(lg))
        return [np.concatenate(chunks[i]) for i in range(len(self._datasets[split]))]

    def _remember_labels(self, split: str, index: int, labels: np.ndarray) -> None:
        known = self._labels.setdefault(split, [])
        if index == len(known):
            known.append(labels)
        elif not np.array_equal(known[index], labels):
            raise RuntimeError(
                f"dataset {index} of {split} returned its labels in a different order between two "
                "passes; evaluation datasets must be deterministic (no shuffling)"
            )

    def labels(self, split: Split) -> list[np.ndarray]:
        """Labels per dataset of ``split`` (known after the first forward pass on it)."""
        self._check(split)
        if split not in self._labels:
            raise RuntimeError(
                f"no forward pass on {split} yet; labels are read from the first one"
            )
        return self._labels[split]

    def accuracy(self, state: StateDict, split: Split) -> float:
        """Accuracy of ``state`` on ``split`` (mean over its datasets)."""
        preds = self._forward(state, split, lambda index, logits: None)
        return accuracy_of_predictions(preds, self.labels(split))

    def run_logits(
        self, run_id: str, load: Callable[[], StateDict], split: Split
    ) -> list[np.ndarray]:
        """A run's logits (read-only, mapped from disk): ``load`` and the forward pass happen
        once per (run, split)."""
        self._check(split)
        key = (run_id, split)
        if key not in self._runs:
            self._runs[key] = self._cache_run(run_id, load(), split)
            self.run_predictions[key] += 1
        return self.cached_logits(run_id, split)

    def _cache_run(self, run_id: str, state: StateDict, split: Split) -> _RunCache:
        stem = os.path.join(self._folder, f"{len(self._runs)}-{split}")
        shapes: dict[int, list[int]] = {}

        def write(index: int, logits: np.ndarray) -> None:
            with open(f"{stem}-{index}.f32", "ab") as out:
                np.ascontiguousarray(logits).tofile(out)  # no third copy, as tobytes made
            rows_classes = shapes.setdefault(index, [0, logits.shape[1]])
            rows_classes[0] += len(logits)

        preds = self._forward(state, split, write)
        files = [
            (f"{stem}-{i}.f32", *shapes.get(i, [0, 0])) for i in range(len(self._datasets[split]))
        ]
        return _RunCache(preds, files)  # type: ignore[arg-type]

    def _cached(self, run_id: str, split: Split) -> _RunCache:
        self._check(split)
        if (run_id, split) not in self._runs:
            raise KeyError(f"run {run_id!r} has no cached logits on {split}")
        return self._runs[(run_id, split)]

    def cached_logits(self, run_id: str, split: Split) -> list[np.ndarray]:
        """Logits already computed by :meth:`run_logits` (KeyError if not), mapped from disk."""
        return [
            np.memmap(path, dtype=np.float32, mode="r", shape=(rows, classes))
            if rows
            else np.zeros((0, classes), np.float32)
            for path, rows, classes in self._cached(run_id, split).files
        ]

    def run_accuracy(self, run_id: str, split: Split) -> float:
        return accuracy_of_predictions(self._cached(run_id, split).preds, self.labels(split))

    def ensemble_accuracy(self, run_ids: Sequence[str], split: Split) -> float:
        """Accuracy of the functional ensemble: the mean of the runs' logits (reference code),
        summed from disk :data:`CHUNK_IMAGES` rows at a time."""
        if not run_ids:
            raise ValueError("an ensemble needs at least one run")
        members = [self._cached(run_id, split).files for run_id in run_ids]
        preds = []
        for files in zip(*members):
            _, rows, classes = files[0]
            out = []
            for start in range(0, rows, CHUNK_IMAGES):
                stop = min(start + CHUNK_IMAGES, rows)
                total = _read_rows(files[0][0], classes, start, stop)
                for path, _, _ in files[1:]:
                    total = total + _read_rows(path, classes, start, stop)
                out.append(np.argmax(total / len(files), axis=1))
            preds.append(np.concatenate(out) if out else np.zeros(0, np.int64))
        return accuracy_of_predictions(preds, self.labels(split))

    def predictions(self, run_id: str, split: Split) -> np.ndarray:
        """Predicted labels of a run over the whole split (datasets concatenated)."""
        return np.concatenate(self._cached(run_id, split).preds)

    def flat_labels(self, split: Split) -> np.ndarray:
        return np.concatenate(self.labels(split))


#: What a reducer task needs beyond the terms of :func:`reducer_memory_bytes`: the
#: interpreter with torch, the cell's data pipeline and an evaluation batch in flight.
REDUCER_BASE_BYTES: Final = 1 << 30


def reducer_memory_bytes(
    weights_bytes: int, n_states: int, eval_images: int, num_classes: int
) -> int:
    """The RAM a reducer task reserves (Ray's ``memory=``), bytes:

    ``REDUCER_BASE_BYTES + 8 * weights_bytes + 2 * CHUNK_IMAGES * num_classes * 4
    + eval_images * (5 * n_states + 8)``

    8 networks alive at once at most (the evaluator's model, a streaming soup's float32
    accumulator and its current input, three interpolation endpoints, the parked final model,
    one spare); one chunk's float32 logits and an ensemble's running sum; per image of ID val
    and OOD test, each run's and moving-average view's predicted label (int16, ``n_states``),
    the q-diversity's stacked copy of them (int16) and their correctness (bool), and the label
    (int64). The runs' logits are on local disk, not in this sum.
    """
    chunk = 2 * CHUNK_IMAGES * num_classes * 4
    return REDUCER_BASE_BYTES + 8 * weights_bytes + chunk + eval_images * (5 * n_states + 8)
