"""The body of every trial, one function per stage, with no Ray and no MLflow.

A trial gets its typed spec (from :mod:`ratatouille.recipe.sweep`), a `TrialContext`
(experiment-wide settings and the weights it may start from) and a `Reporter` (the Ray layer's
bridge to Tune checkpoints). Keeping Ray out of here lets tests run a stage in-process.

The weights are any `Mapping` from a name to a state dict, read by key only: in tests a plain
dict, under Ray the orchestration's mapping of object-store references, which fetches an entry
when a trial reads it, so a trial deserializes the featurizers it starts from, not the pool.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from time import monotonic
from typing import Any, Protocol

import torch
from torch import Tensor

from ratatouille.core.config import DataConfig, ExperimentConfig
from ratatouille.core.names import FUSING, PRETRAINED, MetricKey, WeightsFile
from ratatouille.data import (
    MultiDomainDataset,
    TaskSplits,
    auxiliary_splits,
    get_dataset,
    target_splits,
)
from ratatouille.data.identity import input_record
from ratatouille.engine.models import (
    Classifier,
    build_classifier,
    featurizer_state,
    load_featurizer_params,
)
from ratatouille.engine.probe import ProbeSelect, linear_probe
from ratatouille.engine.train import (
    FineTuneConfig,
    FineTuneResult,
    Precision,
    evaluate_accuracy,
    fine_tune,
)
from ratatouille.merging.soups import average
from ratatouille.recipe.specs import (
    AuxProbeSpec,
    AuxSpec,
    Cell,
    PretrainSpec,
    ProbeSpec,
    TargetSpec,
    TrialSpec,
    ma_arms,
)

StateDict = dict[str, Tensor]


class Reporter(Protocol):
    """How a trial talks to its scheduler (Tune in production, a list in tests)."""

    def report(
        self,
        metrics: Mapping[str, Any],
        *,
        weights: Mapping[WeightsFile, StateDict] | None = None,
        train_state: Mapping[str, Any] | None = None,
    ) -> None: ...

    def restored_state(self) -> dict[str, Any] | None: ...


@dataclass
class TrialContext:
    """Experiment-wide settings every trial needs, and the weights it may start from."""

    data: DataConfig
    seed: int
    arch: str
    freeze_bn: bool = True
    # PRETRAINED + pool entries, and w_lp per cell key (or an aux task's probe): read by key only
    featurizers: Mapping[str, StateDict] = field(default_factory=dict)
    heads: Mapping[str, StateDict] = field(default_factory=dict)
    gpus_per_trial: float = 0.0
    ma_arms: tuple[str, ...] = ()  # target arms whose runs keep a moving average (MA baseline)
    ma_start: int = 100
    cpus_per_trial: float = 1.0
    compile: bool = False
    precision: Precision = "bf16"  # model.precision (bf16 autocast on CUDA, or fp32)
    probe_select: ProbeSelect = "last"  # which linear-probe head is kept (probe.select)
    probe_checkpoint_freq: int = 100
    snapshot_every_s: float | None = 300.0  # resources.snapshot_every_s

    def device(self) -> str:
        return "cuda" if self.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"

    def num_workers(self) -> int:
        """``data.num_workers``, or when unset one loader worker per CPU of the trial but one:
        that CPU runs the training loop (Python, kernel launches, the optimizer on CPU)."""
        if self.data.num_workers is not None:
            return self.data.num_workers
        return max(0, int(self.cpus_per_trial) - 1)

    def dataset(self, name: str, *, augment: bool | None = None) -> MultiDomainDataset:
        return get_dataset(
            name,
            self.data.root,
            image_size=self.data.image_size,
            augment=self.data.augment if augment is None else augment,
            seed=self.seed,
            pipeline=self.data.pipeline,
            cache_dir=self.data.cache_dir,
        )

    def splits_options(self) -> dict[str, Any]:
        """How training batches are drawn and ID val is transformed (data.sampling,
        data.id_val_transform), for target_splits/auxiliary_splits."""
        return {"sampling": self.data.sampling, "id_val_transform": self.data.id_val_transform}

    def cell_splits(self, dataset: MultiDomainDataset, cell: Cell) -> TaskSplits:
        """A cell's target splits of ``dataset``: the same for its probe, its target runs and
        the reducer (which re-reads ID val and the test domain as the runs drew them)."""
        return target_splits(
            dataset,
            [cell.test_env],
            cell.split_seed,
            self.data.holdout_fraction,
            **self.splits_options(),
        )


def context_for(config: ExperimentConfig, **weights: Any) -> TrialContext:
    """The TrialContext of an experiment; `weights` sets featurizers and heads."""
    return TrialContext(
        data=config.data.model_copy(),
        seed=config.seed,
        arch=config.model.arch,
        freeze_bn=config.model.freeze_bn,
        gpus_per_trial=config.resources.gpus_per_trial,
        ma_arms=ma_arms(config.target.moving_average),
        ma_start=config.target.ma_start,
        cpus_per_trial=config.resources.cpus_per_trial,
        compile=config.model.compile,
        precision=config.model.precision,
        probe_select=config.probe.select,
        probe_checkpoint_freq=config.probe.checkpoint_freq,
        snapshot_every_s=config.resources.snapshot_every_s,
        **weights,
    )


def _finetune_config(
    spec: PretrainSpec | AuxSpec | TargetSpec, ctx: TrialContext, **extra: Any
) -> FineTuneConfig:
    hp = spec.hparams
    return FineTuneConfig(
        steps=spec.steps,
        checkpoint_freq=spec.checkpoint_freq,
        lr=hp.lr,
        weight_decay=hp.weight_decay,
        batch_size=hp.batch_size,
        seed=spec.seed,
        device=ctx.device(),
        num_workers=ctx.num_workers(),
        compile=ctx.compile,
        precision=ctx.precision,
        **extra,
    )


@dataclass
class SnapshotClock:
    """When a checkpoint_freq step also takes a resumable snapshot: once ``every_s`` seconds
    of training have passed since the last one (or the trial's start); 0 = every time, None =
    never. The last step takes none: the closing report follows with the final weights."""

    every_s: float | None
    clock: Callable[[], float] = monotonic
    last: float = field(init=False)

    def __post_init__(self) -> None:
        self.last = self.clock()

    def due(self) -> bool:
        return self.every_s is not None and self.clock() - self.last >= self.every_s

    def taken(self) -> None:
        """Restart the budget once the snapshot is stored (its upload is not training time)."""
        self.last = self.clock()


def _train_with_reports(
    model: Classifier, splits: Any, reporter: Reporter, cfg: FineTuneConfig, ctx: TrialContext
) -> FineTuneResult:
    """fine_tune, reporting its metrics at every checkpoint_freq step and, on the time budget
    ``ctx.snapshot_every_s``, a resumable snapshot (a train state with the best weights so far
    and the moving average: all a restored trial needs to end as an uninterrupted one). No
    weights file is written here: each stage body reports the files the reducer and the pool
    read once, in its closing report, so a trial writes them once."""
    clock = SnapshotClock(ctx.snapshot_every_s, monotonic)  # looked up here: tests set it

    def on_checkpoint(step: int, metrics: Mapping[str, Any], snapshot: Any) -> None:
        row = {**metrics, MetricKey.STEP: step}
        if step == cfg.steps - 1 or not clock.due():
            reporter.report(row)
            return
        reporter.report(row, train_state=snapshot())
        clock.taken()

    return fine_tune(
        model,
        splits.train,
        splits.id_val,
        cfg,
        resume=reporter.restored_state(),
        on_checkpoint=on_checkpoint,
    )


def _final_metrics(result: FineTuneResult, data_input: dict[str, str]) -> dict[str, Any]:
    """The closing report: no step, so the per-checkpoint curves get no duplicate point."""
    return {
        MetricKey.FINAL_ID_VAL_ACC: result.history[-1][MetricKey.ID_VAL_ACC],
        MetricKey.BEST_ID_VAL_ACC: result.best_id_val_acc,
        MetricKey.BEST_STEP: result.best_step,
        MetricKey.DONE: True,
        **data_input,
    }


def _data_input(
    dataset: MultiDomainDataset, ctx: TrialContext, split_seed: int, test_env: int | None = None
) -> dict[str, str]:
    """What the trial trained on (every domain but ``test_env``), for its MLflow run's inputs:
    computed here, where the data is, since the driver may not see the data folder."""
    envs = [index for index in range(len(dataset)) if index != test_env]
    record = input_record(dataset, envs, split_seed, ctx.data.holdout_fraction)
    return {MetricKey.DATA_INPUT: json.dumps(record)}


def run_pretrain(spec: PretrainSpec, ctx: TrialContext, reporter: Reporter) -> None:
    """phi_pt from scratch on T0 (the offline benchmark has no hub weights)."""
    dataset = ctx.dataset(spec.task)
    splits = auxiliary_splits(
        dataset, split_seed=0, holdout_fraction=ctx.data.holdout_fraction, **ctx.splits_options()
    )
    model = build_classifier(
        ctx.arch, dataset.num_classes, dropout=spec.hparams.dropout, freeze_bn=False, seed=spec.seed
    )
    result = _train_with_reports(model, splits, reporter, _finetune_config(spec, ctx), ctx)
    reporter.report(
        _final_metrics(result, _data_input(dataset, ctx, split_seed=0)),
        weights={WeightsFile.FEATURIZER: featurizer_state(result.final_state)},
    )


def _pretrained_classifier(
    ctx: TrialContext,
    num_classes: int,
    dropout: float,
    seed: int,
    phi_pt: StateDict | None = None,
) -> Classifier:
    return build_classifier(
        ctx.arch,
        num_classes,
        dropout=dropout,
        featurizer_weights=ctx.featurizers[PRETRAINED] if phi_pt is None else phi_pt,
        freeze_bn=ctx.freeze_bn,
        seed=seed,
    )


def run_aux(spec: AuxSpec, ctx: TrialContext, reporter: Reporter) -> None:
    """(w_aux, phi_aux): phi_pt fine-tuned on every domain of an auxiliary task."""
    dataset = ctx.dataset(spec.task)
    splits = auxiliary_splits(
        dataset, split_seed=0, holdout_fraction=ctx.data.holdout_fraction, **ctx.splits_options()
    )
    model = _pretrained_classifier(ctx, dataset.num_classes, spec.hparams.dropout, spec.seed)
    if spec.head is not None:  # the task's linear probe, against feature distortion
        model.head.load_state_dict(ctx.heads[spec.head])
    # The moving average starts after 100 steps (Arpit et al.), earlier in very short runs.
    cfg = _finetune_config(
        spec,
        ctx,
        moving_average=spec.robust,
        ma_start=min(100, spec.steps // 2),
        # only the last featurizer is kept: ID-val as rarely as asked, snapshots as before
        eval_freq="end" if spec.eval_freq is None else spec.eval_freq,
    )
    result = _train_with_reports(model, splits, reporter, cfg, ctx)
    weights = {WeightsFile.FEATURIZER: featurizer_state(result.final_state)}
    metrics = _final_metrics(result, _data_input(dataset, ctx, split_seed=0))
    if spec.robust and result.average_state is not None:
        weights[WeightsFile.FEATURIZER_MA] = featurizer_state(result.average_state)
        model.load_state_dict(result.average_state)
        metrics[MetricKey.MA_ID_VAL_ACC] = evaluate_accuracy(
            model, splits.id_val, device=ctx.device(), precision=ctx.precision
        )
    reporter.report(metrics, weights=weights)


def run_aux_probe(spec: AuxProbeSpec, ctx: TrialContext, reporter: Reporter) -> None:
    """The head an auxiliary task's runs start from: a linear probe of phi_pt on every domain
    of the task, fitted on cached features as the target's w_lp is."""
    dataset = ctx.dataset(spec.task, augment=False)
    splits = auxiliary_splits(
        dataset, split_seed=0, holdout_fraction=ctx.data.holdout_fraction, **ctx.splits_options()
    )
    _probe_and_report(spec, ctx, reporter, dataset, splits, _data_input(dataset, ctx, 0))


def _probe_and_report(
    spec: AuxProbeSpec | ProbeSpec,
    ctx: TrialContext,
    reporter: Reporter,
    dataset: MultiDomainDataset,
    splits: Any,
    data_input: dict[str, str],
) -> None:
    model = _pretrained_classifier(ctx, dataset.num_classes, 0.0, spec.seed)
    hp = spec.hparams
    probe = linear_probe(
        model.featurizer,
        splits.train,
        splits.id_val,
        dataset.num_classes,
        steps=spec.steps,
        lr=hp.lr,
        weight_decay=hp.weight_decay,
        batch_size=hp.batch_size,
        seed=spec.seed,
        device=ctx.device(),
        precision=ctx.precision,
        select=ctx.probe_select,
        checkpoint_freq=ctx.probe_checkpoint_freq,
    )
    reporter.report(
        {MetricKey.FINAL_ID_VAL_ACC: probe.id_val_acc, MetricKey.DONE: True, **data_input},
        weights={WeightsFile.HEAD: dict(probe.head_state)},
    )


def run_probe(spec: ProbeSpec, ctx: TrialContext, reporter: Reporter) -> None:
    """w_lp: the linear probe of phi_pt on the target task, on features extracted once."""
    cell = spec.cell
    # The probe reads ID-train through the eval transform: features are extracted once.
    dataset = ctx.dataset(ctx.data.dataset, augment=False)
    splits = ctx.cell_splits(dataset, cell)
    data_input = _data_input(dataset, ctx, cell.split_seed, test_env=cell.test_env)
    _probe_and_report(spec, ctx, reporter, dataset, splits, data_input)


def init_featurizer(
    spec: TargetSpec, ctx: TrialContext, phi_pt: StateDict | None = None
) -> StateDict | None:
    """phi_aux of the run: a pool entry, the softmax-kappa mixture (fusing), or None for phi_pt.
    Reads only the entries the run starts from (a fusing run: those its mixture weighs), each
    once: ``phi_pt``, when the caller already holds it, is not read again."""
    if spec.init_source == PRETRAINED:
        return None
    if spec.init_source == FUSING:
        assert spec.fusing is not None, "a fusing run carries its mixture weights"
        names = list(spec.fusing)

        def read(name: str) -> StateDict:
            return phi_pt if name == PRETRAINED and phi_pt is not None else ctx.featurizers[name]

        return average((read(name) for name in names), weights=[spec.fusing[n] for n in names])
    return ctx.featurizers[spec.init_source]


def run_target(spec: TargetSpec, ctx: TrialContext, reporter: Reporter) -> None:
    """theta_i: (w_lp, phi_i) fine-tuned on the target task; its best ID-val weights (and moving
    average) written once, in its closing checkpoint."""
    cell = spec.cell
    dataset = ctx.dataset(ctx.data.dataset)
    splits = ctx.cell_splits(dataset, cell)
    phi_pt = ctx.featurizers[PRETRAINED]  # read once: a fusing mixture may weigh it too
    model = _pretrained_classifier(
        ctx, dataset.num_classes, spec.hparams.dropout, spec.seed, phi_pt=phi_pt
    )
    phi_init = init_featurizer(spec, ctx, phi_pt)
    del phi_pt
    if phi_init is not None:
        load_featurizer_params(model, phi_init)
    model.head.load_state_dict(ctx.heads[cell.key])
    moving_average = spec.arm in ctx.ma_arms
    cfg = _finetune_config(
        spec,
        ctx,
        lp_steps=spec.lp_steps,
        moving_average=moving_average,
        ma_start=min(ctx.ma_start, spec.steps // 2),
    )
    result = _train_with_reports(model, splits, reporter, cfg, ctx)
    metrics = _final_metrics(result, _data_input(dataset, ctx, cell.split_seed, cell.test_env))
    # The trial's only weights files, written once: the closing checkpoint is its latest, the
    # one the reducer reads (the snapshots before it hold train states only).
    weights = {WeightsFile.MODEL: result.best_state}
    if moving_average and result.average_state is not None:
        # MA (Arpit et al.): the trajectory's uniform average, beside the best-ID-val weights
        weights[WeightsFile.MODEL_MA] = result.average_state
        model.load_state_dict(result.average_state)
        metrics[MetricKey.MA_ID_VAL_ACC] = evaluate_accuracy(
            model, splits.id_val, device=ctx.device(), precision=ctx.precision
        )
    reporter.report(metrics, weights=weights)


def run_trial(spec: TrialSpec, ctx: TrialContext, reporter: Reporter) -> None:
    """Dispatch a typed spec to its stage body."""
    if isinstance(spec, PretrainSpec):
        run_pretrain(spec, ctx, reporter)
    elif isinstance(spec, AuxProbeSpec):
        run_aux_probe(spec, ctx, reporter)
    elif isinstance(spec, AuxSpec):
        run_aux(spec, ctx, reporter)
    elif isinstance(spec, ProbeSpec):
        run_probe(spec, ctx, reporter)
    elif isinstance(spec, TargetSpec):
        run_target(spec, ctx, reporter)
    else:
        raise TypeError(f"no stage body for {type(spec).__name__}")
