"""The body of every trial, one function per stage, with no Ray and no MLflow.

A trial gets its spec (from `ratatouille.sweep`), a `TrialContext` (experiment-wide settings and
the weights it may start from, shipped by the driver) and a `Reporter` (the Ray layer's bridge to
Tune checkpoints). Keeping Ray out of here lets tests run a stage in-process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import torch
from torch import Tensor

from ratatouille.config import ExperimentConfig
from ratatouille.data import auxiliary_splits, get_dataset, target_splits
from ratatouille.models import (
    build_classifier,
    featurizer_state,
    load_featurizer_params,
)
from ratatouille.probe import linear_probe
from ratatouille.soups import average
from ratatouille.sweep import FUSING, PRETRAINED, cell_key
from ratatouille.train import FineTuneConfig, evaluate_accuracy, fine_tune

StateDict = dict[str, Tensor]


class Reporter(Protocol):
    """How a trial talks to its scheduler (Tune in production, a list in tests)."""

    def report(self, metrics: Mapping[str, Any], *, weights: Mapping[str, StateDict] | None = None,
               train_state: Mapping[str, Any] | None = None) -> None: ...

    def restored_state(self) -> dict[str, Any] | None: ...


class InjectedFault(RuntimeError):
    """Raised on purpose by a fault-injection test, to prove restarts resume from checkpoints."""


@dataclass
class TrialContext:
    """Experiment-wide settings every trial needs, and the weights it may start from."""

    data: dict[str, Any]                 # DataConfig as a dict
    seed: int
    arch: str
    freeze_bn: bool = True
    featurizers: dict[str, StateDict] = field(default_factory=dict)  # "pretrained" + pool entries
    heads: dict[str, StateDict] = field(default_factory=dict)        # w_lp per cell key
    gpus_per_trial: float = 0.0
    fault: dict[str, Any] | None = None  # {"stage", "run", "arm", "step"}: fail once there (tests)

    def device(self) -> str:
        return "cuda" if self.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"

    def dataset(self, name: str, *, augment: bool | None = None):
        data = self.data
        return get_dataset(name, data.get("root"), image_size=data.get("image_size"),
                           augment=data.get("augment", True) if augment is None else augment,
                           seed=self.seed)


def context_for(config: ExperimentConfig, **weights: Any) -> TrialContext:
    """The TrialContext of an experiment; `weights` sets featurizers, heads (and fault)."""
    return TrialContext(data=config.data.model_dump(), seed=config.seed, arch=config.model.arch,
                        freeze_bn=config.model.freeze_bn,
                        gpus_per_trial=config.resources.gpus_per_trial, **weights)


def _finetune_config(spec: Mapping[str, Any], ctx: TrialContext, **extra: Any) -> FineTuneConfig:
    hp = spec["hparams"]
    return FineTuneConfig(steps=spec["steps"], checkpoint_freq=spec["checkpoint_freq"],
                          lr=hp["lr"], weight_decay=hp["weight_decay"],
                          batch_size=hp["batch_size"], seed=spec["seed"], device=ctx.device(),
                          num_workers=ctx.data.get("num_workers", 0), **extra)


def _fault_hook(spec: Mapping[str, Any], ctx: TrialContext, restored: bool):
    fault = ctx.fault
    if restored or not fault or any(spec.get(k) != v for k, v in fault.items() if k != "step"):
        return lambda step: None

    def maybe_fail(step: int) -> None:
        if step >= fault["step"]:
            raise InjectedFault(f"injected fault at step {step} of {spec['stage']} run {spec.get('run')}")
    return maybe_fail


def _train_with_reports(model, splits, spec, ctx, reporter: Reporter, cfg: FineTuneConfig,
                        keep_best: bool):
    """fine_tune, reporting id_val_acc at each checkpoint step. With `keep_best` (target runs),
    a Tune checkpoint (resumable state + the weights as safetensors) only when ID val strictly
    improves, so the kept checkpoint holds the best weights; otherwise the resumable state at
    every checkpoint step (the stage reports its final weights itself)."""
    resume = reporter.restored_state()
    fail = _fault_hook(spec, ctx, restored=resume is not None)

    def on_checkpoint(step: int, metrics: Mapping[str, Any], snapshot) -> None:
        row = {**metrics, "step": step}
        if not keep_best:
            reporter.report(row, train_state=snapshot())
        elif metrics["best_step"] == step:
            state = snapshot()
            reporter.report(row, weights={"model": state["model"]}, train_state=state)
        else:
            reporter.report(row)
        fail(step)

    return fine_tune(model, splits.train, splits.id_val, cfg, resume=resume,
                     on_checkpoint=on_checkpoint)


def _final_metrics(result) -> dict[str, Any]:
    """The closing report: no "step", so the per-checkpoint curves get no duplicate point."""
    return {"final_id_val_acc": result.history[-1]["id_val_acc"],
            "best_id_val_acc": result.best_id_val_acc, "best_step": result.best_step, "done": True}


def run_pretrain(spec: Mapping[str, Any], ctx: TrialContext, reporter: Reporter) -> None:
    """phi_pt from scratch on T0 (the offline benchmark has no hub weights)."""
    dataset = ctx.dataset(spec["task"])
    splits = auxiliary_splits(dataset, split_seed=0, holdout_fraction=ctx.data["holdout_fraction"])
    model = build_classifier(ctx.arch, dataset.num_classes, dropout=spec["hparams"]["dropout"],
                             freeze_bn=False, seed=spec["seed"])
    result = _train_with_reports(model, splits, spec, ctx, reporter,
                                 _finetune_config(spec, ctx), keep_best=False)
    reporter.report(_final_metrics(result), weights={"featurizer": featurizer_state(result.final_state)})


def _pretrained_classifier(ctx: TrialContext, num_classes: int, dropout: float, seed: int):
    return build_classifier(ctx.arch, num_classes, dropout=dropout,
                            featurizer_weights=ctx.featurizers[PRETRAINED],
                            freeze_bn=ctx.freeze_bn, seed=seed)


def run_aux(spec: Mapping[str, Any], ctx: TrialContext, reporter: Reporter) -> None:
    """(w_aux, phi_aux): phi_pt fine-tuned on every domain of an auxiliary task."""
    dataset = ctx.dataset(spec["task"])
    splits = auxiliary_splits(dataset, split_seed=0, holdout_fraction=ctx.data["holdout_fraction"])
    model = _pretrained_classifier(ctx, dataset.num_classes, spec["hparams"]["dropout"], spec["seed"])
    # The moving average starts after 100 steps (Arpit et al.), earlier in very short runs.
    cfg = _finetune_config(spec, ctx, moving_average=spec["robust"],
                           ma_start=min(100, spec["steps"] // 2))
    result = _train_with_reports(model, splits, spec, ctx, reporter, cfg, keep_best=False)
    weights = {"featurizer": featurizer_state(result.final_state)}
    metrics = _final_metrics(result)
    if spec["robust"] and result.average_state is not None:
        weights["featurizer_ma"] = featurizer_state(result.average_state)
        model.load_state_dict(result.average_state)
        metrics["ma_id_val_acc"] = evaluate_accuracy(model, splits.id_val, device=ctx.device())
    reporter.report(metrics, weights=weights)


def run_probe(spec: Mapping[str, Any], ctx: TrialContext, reporter: Reporter) -> None:
    """w_lp: the linear probe of phi_pt on the target task, on features extracted once."""
    cell = spec["cell"]
    # The probe reads ID-train through the eval transform: features are extracted once.
    dataset = ctx.dataset(ctx.data["dataset"], augment=False)
    splits = target_splits(dataset, [cell["test_env"]], cell["split_seed"],
                           ctx.data["holdout_fraction"])
    model = _pretrained_classifier(ctx, dataset.num_classes, 0.0, spec["seed"])
    hp = spec["hparams"]
    probe = linear_probe(model.featurizer, splits.train, splits.id_val, dataset.num_classes,
                         steps=spec["steps"], lr=hp["lr"], weight_decay=hp["weight_decay"],
                         batch_size=hp["batch_size"], seed=spec["seed"], device=ctx.device())
    reporter.report({"final_id_val_acc": probe.id_val_acc, "done": True},
                    weights={"head": dict(probe.head_state)})


def init_featurizer(spec: Mapping[str, Any], ctx: TrialContext) -> StateDict | None:
    """phi_aux of the run: a pool entry, the softmax-kappa mixture (fusing), or None for phi_pt."""
    if spec["init_source"] == PRETRAINED:
        return None
    if spec["init_source"] == FUSING:
        names = list(spec["fusing"])
        return average((ctx.featurizers[name] for name in names),
                       weights=[spec["fusing"][name] for name in names])
    return ctx.featurizers[spec["init_source"]]


def run_target(spec: Mapping[str, Any], ctx: TrialContext, reporter: Reporter) -> None:
    """theta_i: (w_lp, phi_i) fine-tuned on the target task; best ID-val weights checkpointed."""
    cell = spec["cell"]
    dataset = ctx.dataset(ctx.data["dataset"])
    splits = target_splits(dataset, [cell["test_env"]], cell["split_seed"],
                           ctx.data["holdout_fraction"])
    model = _pretrained_classifier(ctx, dataset.num_classes, spec["hparams"]["dropout"], spec["seed"])
    phi_init = init_featurizer(spec, ctx)
    if phi_init is not None:
        load_featurizer_params(model, phi_init)
    model.head.load_state_dict(ctx.heads[cell_key(cell)])
    cfg = _finetune_config(spec, ctx, lp_steps=spec["lp_steps"])
    result = _train_with_reports(model, splits, spec, ctx, reporter, cfg, keep_best=True)
    reporter.report(_final_metrics(result))


STAGES = {"pretrain": run_pretrain, "aux": run_aux, "probe": run_probe, "target": run_target}


def run_trial(spec: Mapping[str, Any], ctx: TrialContext, reporter: Reporter) -> None:
    STAGES[spec["stage"]](spec, ctx, reporter)

