"""Linear probe ``w_lp`` of the pre-trained featurizer ``phi_pt`` on the target task (paper F.1).

The reference trains only the head for N steps through the frozen featurizer. Here the features
of the ID-train split are extracted ONCE, with the evaluation transform (paper F.1: "features
extracted from the pre-trained featurizer"), and the head is fitted on the cached features with
Adam and Table 3's default hyperparameters (lr 5e-5, weight decay 0, dropout 0, 32 examples per
training domain per step). The batches are exactly those a frozen-featurizer loop would draw:
domain ``i``'s indices come from ``InfiniteLoader(domain_i, batch_size, loader_seed(seed, i, 0))``
(the stream ``fine_tune`` opens at step 0), so both routes see the same examples in the same order.

Callers pass the ID-train splits with the *evaluation* transform: ``eval_train_views`` rebuilds
them from a ``TaskSplits`` whose ``train`` lists use the training transform. Each domain's
indices are drawn as its split asks (``sampling_of``: epochs, or with replacement as DomainBed).

Which head is kept (``select``): ``last``, the head after the last step; ``best_id_val``, as the
reference's probe run: the head is scored on the cached ID-val features after step ``s`` when
``s % checkpoint_freq == 0`` or ``s`` is the last (``fine_tune``'s schedule), and kept when its
score is strictly above the best so far. Both cost one feature extraction of ID val.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ratatouille.data import InfiniteLoader, MultiDomainDataset, TaskSplits, eval_batches
from ratatouille.data.loaders import sampling_of
from ratatouille.data.splits import TrainSplit
from ratatouille.engine.models import feature_dim
from ratatouille.engine.train import Precision, TrainingDiverged, autocast_for, loader_seed


@dataclass
class LinearProbeResult:
    head_state: dict[str, Tensor]  # ``w_lp``: {"weight": C x D, "bias": C}, on the CPU
    id_val_acc: float  # of (w_lp, phi_pt), mean over the training domains' ID-val splits
    step: int  # the step after which the kept head was taken (the last one with select=last)


ProbeSelect = Literal["last", "best_id_val"]


class _Indices(Dataset):
    """Item ``i`` is ``(i, 0)``: an InfiniteLoader over it yields the index stream it would use."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, 0


def eval_train_views(dataset: MultiDomainDataset, splits: TaskSplits) -> list[Dataset]:
    """The ID-train splits of ``splits`` with the evaluation transform (same indices)."""
    views: list[Dataset] = []
    for name, train in zip(splits.train_domains, splits.train):
        if not isinstance(train, Subset):
            raise ValueError(
                f"training split of domain {name!r} is a {type(train).__name__}, not a Subset of "
                "a domain: build the splits with ratatouille.data.target_splits/auxiliary_splits"
            )
        env = dataset.domains.index(name)
        evaluated = dataset.domain(env, train=False)
        views.append(TrainSplit(evaluated, list(train.indices), sampling_of(train)))
    return views


@torch.no_grad()
def extract_features(
    featurizer: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    precision: Precision = "bf16",
) -> tuple[Tensor, Tensor]:
    """``phi(x)`` (float32, N x D) and labels (N) of every item, featurizer in eval mode."""
    device = torch.device(device)
    was_training = featurizer.training
    featurizer.eval()
    feats, labels = [], []
    try:
        for x, y in eval_batches(dataset, batch_size, device=device, num_workers=num_workers):
            with autocast_for(device, precision):
                feats.append(featurizer(x).float())
            labels.append(y.to(device, non_blocking=True))
    finally:
        featurizer.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def _new_head(dim: int, num_classes: int, seed: int, device: torch.device) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(dim, num_classes)
    return head.to(device)


def _accuracy(head: nn.Linear, feats: Sequence[Tensor], labels: Sequence[Tensor]) -> float:
    with torch.no_grad():
        accs = [(head(f).argmax(1) == y).float().mean().item() for f, y in zip(feats, labels)]
    return sum(accs) / len(accs)


def linear_probe(
    featurizer: nn.Module,
    train: Sequence[Dataset],
    id_val: Sequence[Dataset],
    num_classes: int,
    *,
    steps: int,
    lr: float = 5e-5,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
    eval_batch_size: int = 64,
    num_workers: int = 0,
    head_init: dict[str, Tensor] | None = None,
    select: ProbeSelect = "last",
    precision: Precision = "bf16",
    checkpoint_freq: int = 100,
) -> LinearProbeResult:
    """Fit ``w_lp`` on features of ``phi_pt`` cached once (see the module docstring).

    ``train``: ID-train split of each training domain, with the EVALUATION transform
    (``eval_train_views``). ``head_init`` (``weight``/``bias``) replaces the seeded random init.
    ``select`` and ``checkpoint_freq``: which head is kept (module docstring).
    """
    if steps < 1 or batch_size < 1 or not lr > 0 or checkpoint_freq < 1:
        raise ValueError(
            "need steps >= 1, batch_size >= 1, lr > 0, checkpoint_freq >= 1; got "
            f"{steps}, {batch_size}, {lr}, {checkpoint_freq}"
        )
    if select not in ("last", "best_id_val"):
        raise ValueError(f"select must be 'last' or 'best_id_val', got {select!r}")
    if len(train) == 0 or len(id_val) == 0:
        raise ValueError("linear_probe needs at least one training domain and its ID-val split")
    dev = torch.device(device)
    featurizer.to(dev)
    cached = [
        extract_features(featurizer, d, eval_batch_size, dev, num_workers, precision) for d in train
    ]
    held = [
        extract_features(featurizer, d, eval_batch_size, dev, num_workers, precision)
        for d in id_val
    ]
    head = _new_head(feature_dim(featurizer), num_classes, seed, dev)
    if head_init is not None:
        head.load_state_dict(head_init)
    streams = [
        iter(
            InfiniteLoader(
                _Indices(len(f)), batch_size, loader_seed(seed, i, 0), sampling=sampling_of(d)
            )
        )
        for i, ((f, _), d) in enumerate(zip(cached, train))
    ]
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    val_feats, val_labels = [f for f, _ in held], [y for _, y in held]
    best: tuple[float, int, dict[str, Tensor]] | None = None
    for step in range(steps):
        picks = [next(stream)[0].to(dev) for stream in streams]
        x = torch.cat([f[idx] for (f, _), idx in zip(cached, picks)])
        y = torch.cat([lab[idx] for (_, lab), idx in zip(cached, picks)])
        loss = F.cross_entropy(head(x), y)
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(step, loss.item(), lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if select == "best_id_val" and (step % checkpoint_freq == 0 or step == steps - 1):
            acc = _accuracy(head, val_feats, val_labels)
            if best is None or acc > best[0]:  # strict: ties keep the earlier head
                best = (acc, step, _cpu_head(head))
    if best is None:  # select == "last"
        best = (_accuracy(head, val_feats, val_labels), steps - 1, _cpu_head(head))
    acc, best_step, state = best
    return LinearProbeResult(head_state=state, id_val_acc=acc, step=best_step)


def _cpu_head(head: nn.Linear) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in head.state_dict().items()}
