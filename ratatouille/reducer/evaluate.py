"""Evaluation for the reducer: one model instance, cached per-run logits, a sealed OOD split.

Every target run's logits on the ID-validation and OOD-test datasets are computed once and
kept (logits are small; weights are not): ensembles, diversity, ablations of size 1 and
interpolation endpoints all read them from the cache. States that are not runs (soups,
WiSE-FT, interpolations) are evaluated on demand and not cached.

The OOD split is *sealed* until :meth:`Evaluator.open_ood` is called: any read before that
raises :class:`OODSealedError`. The reducer opens it only once every selection decision
(ERM, inter-training, greedy members, the final model) has been taken on ID val, so the OOD
domain cannot leak into selection (paper F.1, "training-domain validation set protocol").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Literal

import numpy as np
from torch import Tensor, nn
from torch.utils.data import Dataset

Split = Literal["id_val", "ood_test"]
ID_VAL: Final[Split] = "id_val"
OOD_TEST: Final[Split] = "ood_test"
StateDict = Mapping[str, Tensor]
Predict = Callable[..., tuple[np.ndarray, np.ndarray]]


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


class Evaluator:
    """Scores states and runs on the ``id_val`` and ``ood_test`` splits.

    ``build_model`` is called once; every state is loaded into that one instance
    (``load_state_dict(strict=True)``), so evaluating M states costs no M model builds.
    ``predict(model, dataset, batch_size=..., device=...) -> (logits, labels)`` defaults to
    :func:`ratatouille.engine.train.predict_logits`.
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
    ) -> None:
        self._build_model = build_model
        self._model: nn.Module | None = None
        self._datasets: dict[str, list[Dataset]] = {ID_VAL: list(id_val), OOD_TEST: list(ood_test)}
        self._labels: dict[str, list[np.ndarray]] = {}
        self._run_logits: dict[tuple[str, str], list[np.ndarray]] = {}
        self._predict = predict
        self.batch_size = batch_size
        self.device = device
        self.ood_open = False
        #: number of forward passes over one split, per run id (each should be 1).
        self.run_predictions: Counter[tuple[str, str]] = Counter()

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

    def logits(self, state: StateDict, split: Split) -> list[np.ndarray]:
        """Logits of ``state`` on each dataset of ``split`` (not cached)."""
        self._check(split)
        model = self._model_with(state)
        predict = self._predict or _default_predict()
        outputs = []
        for index, dataset in enumerate(self._datasets[split]):
            logits, labels = predict(model, dataset, batch_size=self.batch_size, device=self.device)
            outputs.append(np.asarray(logits, dtype=np.float32))
            self._remember_labels(split, index, np.asarray(labels))
        return outputs

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
        return accuracy_of_logits(self.logits(state, split), self.labels(split))

    def run_logits(
        self, run_id: str, load: Callable[[], StateDict], split: Split
    ) -> list[np.ndarray]:
        """Cached logits of a run: ``load`` and the forward pass happen once per (run, split)."""
        self._check(split)
        key = (run_id, split)
        if key not in self._run_logits:
            self._run_logits[key] = self.logits(load(), split)
            self.run_predictions[key] += 1
        return self._run_logits[key]

    def cached_logits(self, run_id: str, split: Split) -> list[np.ndarray]:
        """Logits already computed by :meth:`run_logits` (KeyError if not)."""
        self._check(split)
        if (run_id, split) not in self._run_logits:
            raise KeyError(f"run {run_id!r} has no cached logits on {split}")
        return self._run_logits[(run_id, split)]

    def run_accuracy(self, run_id: str, split: Split) -> float:
        return accuracy_of_logits(self.cached_logits(run_id, split), self.labels(split))

    def ensemble_accuracy(self, run_ids: Sequence[str], split: Split) -> float:
        """Accuracy of the functional ensemble: the mean of the runs' logits (reference code)."""
        if not run_ids:
            raise ValueError("an ensemble needs at least one run")
        per_run = [self.cached_logits(run_id, split) for run_id in run_ids]
        mean = [np.mean(np.stack(domain), axis=0) for domain in zip(*per_run)]
        return accuracy_of_logits(mean, self.labels(split))

    def predictions(self, run_id: str, split: Split) -> np.ndarray:
        """Predicted labels of a run over the whole split (datasets concatenated)."""
        return np.concatenate([np.argmax(lg, axis=1) for lg in self.cached_logits(run_id, split)])

    def flat_labels(self, split: Split) -> np.ndarray:
        return np.concatenate(self.labels(split))
