"""Fine-tuning engine: DomainBed's ERM loop with the paper's recipe (F.1, App. E).

One step takes ``batch_size`` examples from *every* training domain, concatenated, and takes an
Adam step on the cross-entropy. Every ``checkpoint_freq`` steps (and at the last step) the ID-val
accuracy, averaged over the training domains, is measured and the weights are kept when it is
strictly better than the best so far (the reference's model selection). After an auxiliary init
``(w_lp, phi_i_aux)``, the featurizer is frozen for the first ``lp_steps`` steps (the optimizer
holds only the head ``w``), then a fresh Adam takes over all parameters.

Evaluation and snapshots are two schedules. Every ``checkpoint_freq`` steps (and at the last
step) the run reports and can be snapshotted (preemption safety); ID-val is evaluated only at the
steps ``eval_freq`` asks for (by default at every checkpoint; an auxiliary run, which only keeps
its last featurizer, may evaluate at its end alone). Evaluation never touches the training RNG
or the batch streams, so the trained weights do not depend on ``eval_freq``.

No host sync per step: the loss sum and the first non-finite loss are kept on the device and
read every ``sync_freq`` steps and at every checkpoint. A NaN/inf loss therefore stops the run at
most ``sync_freq - 1`` steps after it happened, with ``TrainingDiverged`` naming the step where
it first happened; the steps taken in between (on NaN weights) are never reported or snapshotted.

On CUDA the model and its inputs use ``channels_last`` and, with ``compile=True``, the training
forward runs through ``torch.compile`` (compiling costs about a minute per process on a
ResNet-50 and pays off only over thousands of steps; off by default). Both are no-ops on CPU.

Resumability: each training domain's batches come from a ``TrainStream`` re-seeded at the
first step after every checkpoint (seed ``loader_seed(seed, domain, step)``); the re-seeding
happens in the loader's sampler, so the loader worker processes live for the whole run and
keep preparing batches across checkpoints. A snapshot taken at a checkpoint therefore needs no
loader position, and a resumed run draws exactly the batches an uninterrupted run draws. The
split's ``data.sampling`` says how indices are drawn: seeded permutations (restarted every
``checkpoint_freq`` steps, as uniform) or with replacement, as DomainBed. A ``StepStream``
joins the domains' batches (decoded ones augmented in one call) and, on CUDA, prepares the
next steps' batches on a side stream (in a background thread when the loaders have worker
processes) while the current step runs.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ratatouille.core.names import MetricKey
from ratatouille.core.seeding import seed_hash
from ratatouille.data import StepStream, TrainStream, eval_batches
from ratatouille.data.loaders import Reseeds
from ratatouille.engine.models import Classifier

#: model.precision: bf16 autocast of forward passes on CUDA, or fp32 (the reference's)
Precision = Literal["bf16", "fp32"]

SNAPSHOT_VERSION = 2  # 2: RNG states as tensors and numbers (state_files, no pickle)
# Fields that must match between a snapshot and the config that resumes it.
_RESUME_FIELDS = (
    "steps",
    "checkpoint_freq",
    "lr",
    "weight_decay",
    "batch_size",
    "lp_steps",
    "moving_average",
    "ma_start",
    "seed",
)


@dataclass
class FineTuneConfig:
    """One fine-tuning run. ``batch_size`` is per training domain (Table 3: 32).

    ``moving_average`` (robust inter-training, App. E) keeps the uniform average of the weights
    after every step ``>= ma_start`` (default 100, the start of Arpit et al.'s moving average);
    steps are counted from 0.

    Schedules (see the module doc): ``checkpoint_freq`` = report and snapshot points;
    ``eval_freq`` = ID-val evaluations: ``None`` at every checkpoint, an int (a multiple of
    ``checkpoint_freq``, so every evaluation is also a snapshot point) every that many steps,
    ``"end"`` at the last step only; the last step is always evaluated. ``sync_freq``: the host
    reads the device-side loss monitor every that many steps (divergence is caught within it).
    ``compile``: ``torch.compile`` the training forward on CUDA.
    """

    steps: int
    checkpoint_freq: int
    lr: float
    weight_decay: float
    batch_size: int
    lp_steps: int = 0
    moving_average: bool = False
    ma_start: int = 100
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 64
    num_workers: int = 0
    eval_freq: int | Literal["end"] | None = None
    sync_freq: int = 50
    compile: bool = False
    precision: Precision = "bf16"

    def __post_init__(self) -> None:
        positive = {
            "steps": self.steps,
            "checkpoint_freq": self.checkpoint_freq,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "sync_freq": self.sync_freq,
        }
        for name, value in positive.items():
            if int(value) != value or value < 1:
                raise ValueError(f"FineTuneConfig.{name} must be a positive integer, got {value!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(
                f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}"
            )
        if self.lp_steps < 0 or self.ma_start < 0 or self.num_workers < 0:
            raise ValueError("lp_steps, ma_start and num_workers must be >= 0")
        self._check_eval_freq()

    def _check_eval_freq(self) -> None:
        freq = self.eval_freq
        if freq is None or freq == "end":
            return
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise ValueError(f"eval_freq must be None, 'end' or a positive integer, got {freq!r}")
        if freq % self.checkpoint_freq:
            raise ValueError(
                f"eval_freq ({freq}) must be a multiple of checkpoint_freq "
                f"({self.checkpoint_freq}): every evaluation is also a snapshot point"
            )

    def is_snapshot_step(self, step: int) -> bool:
        return step % self.checkpoint_freq == 0 or step == self.steps - 1

    def is_eval_step(self, step: int) -> bool:
        if step == self.steps - 1:
            return True
        freq = self.checkpoint_freq if self.eval_freq is None else self.eval_freq
        return freq != "end" and step % freq == 0


@dataclass
class FineTuneResult:
    best_state: dict[str, Tensor]  # weights at the best ID-val checkpoint (strict >)
    best_id_val_acc: float
    best_step: int
    final_state: dict[str, Tensor]  # last weights (the pool recycles the LAST aux featurizer)
    average_state: dict[str, Tensor] | None  # moving average (robust inter-training), if enabled
    # per evaluation: step, loss (mean since the previous checkpoint), id_val_acc
    history: list[dict] = field(default_factory=list)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; ``.step`` is the step where it happened."""

    def __init__(self, step: int, loss: float, lr: float) -> None:
        self.step, self.loss, self.lr = step, loss, lr
        super().__init__(
            f"training diverged at step {step}: loss is {loss}. Lower the learning rate "
            f"(lr={lr:g}) or check the inputs for NaN/inf."
        )

    def __reduce__(self) -> tuple:  # Ray ships worker exceptions pickled
        return type(self), (self.step, self.loss, self.lr)


# Adam's fused kernel: one pass over each parameter instead of about ten ops per tensor (on a
# ResNet-18 on 2 CPU cores, 3.8 ms a step instead of 20; on CUDA, a few kernels instead of one
# per op and tensor group). The same update, rounded differently.
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def adam(
    params: Iterable[Tensor], device: torch.device, lr: float, weight_decay: float = 0.0
) -> torch.optim.Adam:
    """fine_tune's optimizer: Adam, as its fused kernel on the devices that have one. The
    throughput and benchmark steps that stand for a trial's step make theirs here too."""
    fused = torch.device(device).type in FUSED_ADAM_DEVICES
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)


def loader_seed(seed: int, domain: int, start_step: int) -> int:
    """Seed of domain ``domain``'s batch stream from ``start_step`` on (see module docstring)."""
    return seed_hash("train_loader", seed, domain, start_step)


def autocast_for(
    device: torch.device | str, precision: Precision = "bf16"
) -> AbstractContextManager:
    """bf16 autocast on CUDA (``model.precision: bf16``), full precision elsewhere or with
    ``fp32`` (the reference's)."""
    if torch.device(device).type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _fork_rng(device: torch.device) -> AbstractContextManager:
    # Evaluation must not consume the training RNG: trajectories then do not depend on how
    # often one evaluates, and snapshots taken after an evaluation stay exact.
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    precision: Precision = "bf16",
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits N x C float32, labels N int64)`` of ``model`` in eval mode, in dataset order."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        with _fork_rng(device):
            batches = eval_batches(dataset, batch_size, device=device, num_workers=num_workers)
            for x, y in batches:
                with autocast_for(device, precision):
                    out = model(x)
                logits.append(out.float().cpu())
                labels.append(y)
    finally:
        model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).long().numpy()


def evaluate_accuracy(
    model: nn.Module,
    datasets: Sequence[Dataset],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    precision: Precision = "bf16",
) -> float:
    """Accuracy averaged over ``datasets`` (DomainBed's ID-val score: mean over domains)."""
    if len(datasets) == 0:
        raise ValueError("evaluate_accuracy needs at least one dataset")
    accs = []
    for dataset in datasets:
        logits, labels = predict_logits(model, dataset, batch_size, device, num_workers, precision)
        accs.append(float((logits.argmax(1) == labels).mean()))
    return float(np.mean(accs))


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    # contiguous: a channels_last model's weights must not leak their strides into files
    return {
        k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        for k, v in model.state_dict().items()
    }


class _LossMonitor:
    """The loss sum since the last checkpoint and the first non-finite loss, kept on the device,
    so that a training step never waits for the GPU; ``read`` is the one host sync."""

    def __init__(self, device: torch.device, loss_sum: float = 0.0, count: int = 0) -> None:
        # torch.full fills on the device (torch.tensor would copy from the host and wait)
        self.sum = torch.full((), loss_sum, dtype=torch.float64, device=device)
        self.count = count  # host-side: counting needs no sync
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.full((), 0.0, dtype=torch.float64, device=device)

    def add(self, loss: Tensor, step: int) -> None:
        value = loss.detach().double()  # float64, as the Python float the loss was summed in
        first = (self.bad_step < 0) & ~torch.isfinite(value)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_loss = torch.where(first, value, self.bad_loss)
        self.sum += value
        self.count += 1

    def read(self) -> tuple[float, int, float]:
        """``(loss sum, first non-finite step or -1, its loss)`` in one device-to-host copy."""
        stats = torch.stack([self.sum, self.bad_step.double(), self.bad_loss]).tolist()
        return stats[0], int(stats[1]), stats[2]


class _MovingAverage:
    """Uniform running mean of the floating entries of the state dict (App. E)."""

    def __init__(self, state: Mapping[str, Tensor] | None = None, count: int = 0) -> None:
        self.state = None if state is None else {k: v.clone() for k, v in state.items()}
        self.count = count

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        self.count += 1
        if self.state is None:
            self.state = {
                k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                for k, v in current.items()
            }
            return
        for key, value in current.items():
            if value.is_floating_point():
                self.state[key].add_(value.float() - self.state[key], alpha=1.0 / self.count)
            else:
                self.state[key].copy_(value)

    def result(self, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        assert self.state is not None
        return {
            k: v.to("cpu", dtype=like[k].dtype, memory_format=torch.contiguous_format, copy=True)
            for k, v in self.state.items()
        }


def _rng_state(device: torch.device) -> dict:
    """Every RNG's state as tensors and numbers (state_files stores it without pickle)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": python_gauss,
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"])
    )
    py_state = state["python"]
    internal = tuple(int(v) for v in py_state["state"].tolist())
    random.setstate((py_state["version"], internal, py_state["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _check_snapshot(resume: Mapping, cfg: FineTuneConfig) -> None:
    if resume.get("version") != SNAPSHOT_VERSION:
        raise ValueError(
            f"snapshot version {resume.get('version')!r} is not {SNAPSHOT_VERSION}: "
            "it was written by another version of ratatouille; restart the run"
        )
    saved = resume["config"]
    diff = [
        f"{k}: {saved[k]!r} != {getattr(cfg, k)!r}"
        for k in _RESUME_FIELDS
        if saved[k] != getattr(cfg, k)
    ]
    if diff:
        raise ValueError(
            "cannot resume: the snapshot was taken with another config ("
            + "; ".join(diff)
            + "); resume with the original config"
        )


def _to_cpu(obj: object) -> object:
    """Deep copy with every tensor on the CPU (snapshots must not alias live training state)."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


class _FineTuning:
    """The mutable state of one run; ``snapshot``/``restore`` make it resumable."""

    def __init__(
        self,
        model: Classifier,
        train: Sequence[Dataset],
        id_val: Sequence[Dataset],
        cfg: FineTuneConfig,
    ) -> None:
        self.model, self.train, self.id_val, self.cfg = model, list(train), list(id_val), cfg
        self.device = torch.device(cfg.device)
        self.step = -1  # last completed step
        self.best_state: dict[str, Tensor] | None = None
        self.best_acc, self.best_step = -math.inf, -1
        self.history: list[dict] = []
        self.losses = _LossMonitor(self.device)
        self.forward: Callable[[Tensor], Tensor] = _training_forward(model, cfg, self.device)
        self.ma = _MovingAverage() if cfg.moving_average else None
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_phase: str | None = None
        self.batches: Iterator[tuple[Tensor, Tensor]] | None = None
        self.streams: StepStream | None = None  # opened at the first step
        self.trainable = {n: p.requires_grad for n, p in model.featurizer.named_parameters()}

    def phase(self, step: int) -> str:
        return "head" if step < self.cfg.lp_steps else "all"

    def enter_phase(self, phase: str, optimizer_state: Mapping | None = None) -> None:
        """'head': featurizer frozen, Adam over ``w`` only; 'all': a fresh Adam over everything."""
        self.restore_trainable(frozen=phase == "head")
        params = self.model.head.parameters() if phase == "head" else self.model.parameters()
        self.optimizer = adam(
            [p for p in params if p.requires_grad], self.device, self.cfg.lr, self.cfg.weight_decay
        )
        if optimizer_state is not None:
            self.optimizer.load_state_dict(dict(optimizer_state))
        self.optimizer_phase = phase

    def restore_trainable(self, frozen: bool = False) -> None:
        for name, param in self.model.featurizer.named_parameters():
            param.requires_grad_(self.trainable[name] and not frozen)

    def open_loaders(self, step: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Every domain's stream seeded for ``step`` and re-seeded in place after each later
        snapshot point, as a run resumed there would be; loader workers live for the run."""
        if self.streams is None:
            domains = [
                TrainStream(
                    d, self.cfg.batch_size, device=self.device, num_workers=self.cfg.num_workers
                )
                for d in self.train
            ]
            self.streams = StepStream(domains, self.device)

        reseeds = [self.reseeds(i, step) for i in range(len(self.train))]
        return self.streams.restart(self.seeds(step), reseeds)

    def reseeds(self, domain: int, start: int) -> Reseeds:
        """Where ``domain``'s stream opened at ``start`` starts over: after each snapshot point,
        with the seed a run resumed there opens it with."""
        cfg = self.cfg

        def seed_at(position: int) -> int | None:  # the batch of step `start + position`
            step = start + position
            return loader_seed(cfg.seed, domain, step) if cfg.is_snapshot_step(step - 1) else None

        return seed_at

    def seeds(self, step: int) -> list[int]:
        """Every domain's loader seed for a stream (re)starting at ``step``."""
        return [loader_seed(self.cfg.seed, i, step) for i in range(len(self.train))]

    def close_loaders(self) -> None:
        """Ends the batch-preparing thread and the loaders' worker processes."""
        if self.streams is not None:
            self.streams.close()
        self.batches, self.streams = None, None

    def train_step(self, step: int) -> None:
        if self.batches is None:  # first step of the run (or of its resumed part)
            self.batches = self.open_loaders(step)
        if self.optimizer_phase != self.phase(step):
            self.enter_phase(self.phase(step))
        x, y = next(self.batches)  # every domain's batch, on the device (channels last on CUDA)
        with autocast_for(self.device, self.cfg.precision):
            loss = F.cross_entropy(self.forward(x), y)
        assert self.optimizer is not None, "enter_phase() opens the optimizer before any step"
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ma is not None and step >= self.cfg.ma_start:
            self.ma.update(self.model)
        self.losses.add(loss, step)
        self.step = step

    def check_finite(self) -> float:
        """The loss sum since the last checkpoint; raises ``TrainingDiverged`` (naming the step
        of the first NaN/inf) before anything trained on it is evaluated or snapshotted."""
        loss_sum, bad_step, bad_loss = self.losses.read()
        if bad_step >= 0:
            raise TrainingDiverged(bad_step, bad_loss, self.cfg.lr)
        return loss_sum

    def checkpoint(self, on_checkpoint: Callable | None, evaluate: bool) -> None:
        """A report and snapshot point; ID-val is measured only when ``evaluate``."""
        loss = self.check_finite() / max(self.losses.count, 1)
        self.losses = _LossMonitor(self.device)
        record = {MetricKey.STEP: self.step, MetricKey.LOSS: loss}
        if evaluate:
            record[MetricKey.ID_VAL_ACC] = self.evaluate()
            self.history.append(record)
        if on_checkpoint is None:
            return
        metrics = dict(record)
        if self.best_step >= 0:  # nothing to report before the first evaluation
            metrics[MetricKey.BEST_ID_VAL_ACC] = self.best_acc
            metrics[MetricKey.BEST_STEP] = self.best_step
        on_checkpoint(self.step, metrics, self.snapshot)

    def evaluate(self) -> float:
        cfg = self.cfg
        acc = evaluate_accuracy(
            self.model,
            self.id_val,
            cfg.eval_batch_size,
            self.device,
            cfg.num_workers,
            cfg.precision,
        )
        if acc > self.best_acc:  # strict: ties keep the earlier weights, as the reference
            self.best_acc, self.best_step = acc, self.step
            self.best_state = _cpu_state(self.model)
        return acc

    def snapshot(self) -> dict:
        """Everything needed to continue bit-identically (loader seeds derive from the step)."""
        return {
            "version": SNAPSHOT_VERSION,
            "config": asdict(self.cfg),
            "step": self.step,
            "model": _cpu_state(self.model),
            "optimizer": _to_cpu(self.optimizer.state_dict() if self.optimizer else None),
            "optimizer_phase": self.optimizer_phase,
            "best_state": self.best_state,
            "best_id_val_acc": self.best_acc,
            "best_step": self.best_step,
            "history": copy.deepcopy(self.history),
            # taken right after a checkpoint: the monitor was just read and reset
            "loss_sum": 0.0,
            "loss_count": 0,
            "ma_state": None if self.ma is None else _to_cpu(self.ma.state),
            "ma_count": 0 if self.ma is None else self.ma.count,
            "rng": _rng_state(self.device),
            "loader_seeds": self.seeds(self.step + 1),
        }

    def restore(self, snap: Mapping) -> None:
        _check_snapshot(snap, self.cfg)
        self.model.load_state_dict(snap["model"])
        self.step = int(snap["step"])
        self.best_state = snap["best_state"]
        self.best_acc, self.best_step = snap["best_id_val_acc"], snap["best_step"]
        self.history = copy.deepcopy(list(snap["history"]))
        self.losses = _LossMonitor(self.device, float(snap["loss_sum"]), int(snap["loss_count"]))
        if self.ma is not None:
            state = snap["ma_state"]
            self.ma = _MovingAverage(
                None if state is None else {k: v.to(self.device) for k, v in state.items()},
                snap["ma_count"],
            )
        following = self.phase(self.step + 1)
        same = snap["optimizer_phase"] == following
        self.enter_phase(following, snap["optimizer"] if same else None)
        _set_rng_state(snap["rng"], self.device)

    def result(self) -> FineTuneResult:
        final = _cpu_state(self.model)
        average = None if self.ma is None else self.ma.result(final)
        assert self.best_state is not None, "the last step is always evaluated"
        return FineTuneResult(
            best_state=self.best_state,
            best_id_val_acc=self.best_acc,
            best_step=self.best_step,
            final_state=final,
            average_state=average,
            history=self.history,
        )


def _training_forward(
    model: nn.Module, cfg: FineTuneConfig, device: torch.device
) -> Callable[[Tensor], Tensor]:
    """The model's forward for training steps: channels_last (and compiled when asked) on CUDA.
    Evaluation keeps the plain module: compiling its eval-mode graph would cost a second
    compilation for a few passes over ID-val."""
    if device.type != "cuda":
        return model
    model.to(memory_format=torch.channels_last)
    return cast(Callable[[Tensor], Tensor], torch.compile(model)) if cfg.compile else model


def _check_inputs(
    model: nn.Module, train: Sequence[Dataset], id_val: Sequence[Dataset], cfg: FineTuneConfig
) -> None:
    if not (hasattr(model, "featurizer") and hasattr(model, "head")):
        raise ValueError("fine_tune needs a models.Classifier (with .featurizer and .head)")
    if len(train) == 0 or len(id_val) == 0:
        raise ValueError("fine_tune needs at least one training domain and its ID-val split")
    if cfg.moving_average and cfg.ma_start >= cfg.steps:
        raise ValueError(
            f"moving_average starts at step {cfg.ma_start} but the run has only "
            f"{cfg.steps} steps: lower ma_start"
        )


def fine_tune(
    model: nn.Module,
    train: Sequence[Dataset],
    id_val: Sequence[Dataset],
    cfg: FineTuneConfig,
    *,
    resume: Mapping | None = None,
    on_checkpoint: Callable[[int, dict, Callable[[], dict]], None] | None = None,
) -> FineTuneResult:
    """Fine-tune ``model`` in place (Adam, per-domain batches, ID-val selection; see module doc).

    ``on_checkpoint(step, metrics, snapshot)`` runs at every checkpoint (``checkpoint_freq``);
    ``metrics`` holds the step and the mean loss since the previous checkpoint, ``id_val_acc``
    when this checkpoint evaluated, and the best ID-val accuracy and its step once one has been
    measured. ``snapshot()`` returns a dict that ``fine_tune(..., resume=that_dict)`` continues
    from, ending with the same weights as an uninterrupted run (bit-identical on CPU). The model
    passed with ``resume`` must have the same architecture; its weights are replaced by the
    snapshot's.
    Raises ``TrainingDiverged`` on a NaN/inf loss, within ``cfg.sync_freq`` steps of it.
    """
    _check_inputs(model, train, id_val, cfg)
    model.to(cfg.device)
    run = _FineTuning(cast(Classifier, model), train, id_val, cfg)  # checked: featurizer + head
    if resume is not None:
        run.restore(resume)
    else:
        _seed_everything(cfg.seed)
    model.train()
    try:
        for step in range(run.step + 1, cfg.steps):
            run.train_step(step)
            if cfg.is_snapshot_step(step):
                run.checkpoint(on_checkpoint, evaluate=cfg.is_eval_step(step))
            elif (step + 1) % cfg.sync_freq == 0:
                run.check_finite()
    finally:
        run.restore_trainable()
        run.close_loaders()
    return run.result()
