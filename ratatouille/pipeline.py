"""`ratatouille run`: the stages in order, from one driver.

pretrain (when phi_pt is ours) -> auxiliary pool -> linear probes (w_lp) -> target arms -> reducer.
Reusable artefacts (phi_pt, pool entries) live outside the run folder, keyed by what made them,
so later experiments and other test domains reuse them instead of training them again.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratatouille.config import ExperimentConfig
from ratatouille.data import DOMAINBED_DATASETS, get_dataset, resolve_test_env
from ratatouille.models import create_featurizer
from ratatouille.pool import Pool
from ratatouille.reporting import Outcome, reduce_and_log
from ratatouille.search import (
    StageRunner,
    SweepIncomplete,
    TrialOutcome,
    connect_ray,
    new_run_dir,
    read_weights,
    storage_root,
)
from ratatouille.stages import StateDict, context_for
from ratatouille.sweep import (
    PRETRAINED,
    Cell,
    arm_sources,
    aux_specs,
    pretrain_spec,
    pretrained_identity,
    probe_specs,
    robust_name,
    target_specs,
)
from ratatouille.tracking import RUN_DIR, Tracker, TrackingError, latest_parent


class PipelineError(RuntimeError):
    """A run that cannot start; the message says what to change."""


@dataclass
class SweepState:
    """What the stages produced, in memory, for the reducer."""

    cells: list[Cell]
    featurizers: dict[str, StateDict]
    heads: dict[str, StateDict]
    targets: list[TrialOutcome] = field(default_factory=list)


def pool_path(config: ExperimentConfig) -> Path:
    if config.tracking.pool_path:
        return Path(config.tracking.pool_path).expanduser().resolve()
    storage = storage_root(config)
    if "://" in storage:
        raise PipelineError(f"storage_path {storage} is remote: set tracking.pool_path to a "
                            "folder on the head node or on shared storage (NFS/EFS)")
    return Path(storage) / "pool"


def domain_names(dataset: str, seed: int) -> list[str]:
    if dataset in DOMAINBED_DATASETS:  # no disk access: the data may live on the workers only
        return list(DOMAINBED_DATASETS[dataset].ENVIRONMENTS)
    return get_dataset(dataset, seed=seed).domains


def experiment_cells(config: ExperimentConfig) -> list[Cell]:
    """(held-out domain x split seed) cells of the target dataset."""
    domains = domain_names(config.data.dataset, config.seed)
    probe = _NamesOnly(config.data.dataset, domains)
    chosen = config.data.test_envs if config.data.test_envs is not None else range(len(domains))
    indices = [resolve_test_env(probe, env) for env in chosen]
    return [Cell(index, domains[index], split) for index in indices
            for split in config.data.split_seeds]


class _NamesOnly:
    """Just enough of a MultiDomainDataset for resolve_test_env."""

    def __init__(self, name: str, domains: list[str]):
        self.name, self.domains = name, domains

    def __len__(self) -> int:
        return len(self.domains)


def _pretrained(config: ExperimentConfig, runner: StageRunner) -> dict[str, StateDict]:
    """phi_pt: timm's hub or a local file, read once here and shipped to every trial, or ours
    from the pretrain stage (kept in a pool beside the auxiliary pool)."""
    if config.model.init != "pretrain":
        featurizer = create_featurizer(config.model.arch, config.model.weights_file,
                                       pretrained_hub=config.model.init == "hub")
        return {PRETRAINED: featurizer.state_dict()}
    store = Pool(pool_path(config).parent / "pretrained")
    name = pretrained_identity(config)
    if name not in store:
        spec = pretrain_spec(config)
        (outcome,) = runner.run("pretrain", [spec], context_for(config))
        store.add(name, read_weights(outcome.checkpoint, "featurizer"),
                  source_task=spec["task"], arch=config.model.arch,
                  id_val_acc=outcome.metrics["final_id_val_acc"])
    return {PRETRAINED: store.load(name, expected_arch=config.model.arch)}


def _fill_pool(config: ExperimentConfig, runner: StageRunner, pool: Pool,
               featurizers: dict[str, StateDict]) -> None:
    """Train the auxiliary fine-tunings the pool lacks; skip those it has (target-agnostic)."""
    missing = [spec for spec in aux_specs(config)
               if spec["name"] not in pool or (spec["robust"] and robust_name(spec["name"]) not in pool)]
    outcomes = runner.run("aux", missing, context_for(config, featurizers=featurizers))
    for outcome in outcomes:
        spec, metrics = outcome.spec, outcome.metrics
        pool.add(spec["name"], read_weights(outcome.checkpoint, "featurizer"), source_task=spec["task"],
                 arch=config.model.arch, id_val_acc=metrics["final_id_val_acc"], overwrite=True)
        if spec["robust"]:
            pool.add(robust_name(spec["name"]), read_weights(outcome.checkpoint, "featurizer_ma"),
                     source_task=spec["task"], arch=config.model.arch, robust=True,
                     id_val_acc=metrics.get("ma_id_val_acc"), overwrite=True)


def _sources(config: ExperimentConfig, pool: Pool) -> dict[str, StateDict]:
    names = {name for arm in config.target.arms for group in arm_sources(config, arm)
             for name in group if name != PRETRAINED}
    missing = sorted(name for name in names if name not in pool)
    if missing:
        raise PipelineError(f"pool {pool.root} lacks {missing}: import them with "
                            "`ratatouille pool import` or remove them from aux.extra_sources")
    return {name: pool.load(name, expected_arch=config.model.arch) for name in sorted(names)}


def run_stages(config: ExperimentConfig, runner: StageRunner) -> SweepState:
    """Every training stage; returns what the reducer needs."""
    featurizers = _pretrained(config, runner)
    pool = Pool(pool_path(config))
    if config.aux.tasks:
        _fill_pool(config, runner, pool, featurizers)
    featurizers.update(_sources(config, pool))
    cells = experiment_cells(config)
    base = {PRETRAINED: featurizers[PRETRAINED]}
    probes = runner.run("probe", probe_specs(config, cells), context_for(config, featurizers=base))
    heads = {Cell(**o.spec["cell"]).key: read_weights(o.checkpoint, "head") for o in probes}
    context = context_for(config, featurizers=featurizers, heads=heads, fault=runner.fault)
    targets = runner.run("target", target_specs(config, cells), context)
    return SweepState(cells, featurizers, heads, targets)


def open_run(config: ExperimentConfig, continue_last: bool) -> tuple[Tracker, str]:
    """The MLflow parent run and run folder: a new pair, or the latest one to continue."""
    tracker = Tracker(config.name, config.tracking.mlflow_uri)
    if not continue_last:
        run_dir = new_run_dir(config)
        tracker.start_parent(run_dir, config.model_dump(mode="json"))
        return tracker, run_dir
    try:
        _, parent = latest_parent(config.name, tracker.uri)
    except TrackingError as error:
        raise PipelineError(f"nothing to resume for experiment {config.name!r} ({error}); "
                            "run without --resume first") from None
    run_dir = parent.data.tags[RUN_DIR]
    tracker.start_parent(run_dir, config.model_dump(mode="json"), resume_run_id=parent.info.run_id)
    return tracker, run_dir


def check_local_data(config: ExperimentConfig) -> None:
    """Fail before anything starts when a dataset is not where the config says.

    Only for a local run: on a cluster the data may live on the workers alone (cluster.yaml
    syncs it there), and the trials report a missing folder themselves.
    """
    if os.environ.get("RAY_ADDRESS"):
        return
    for name in {config.data.dataset, *config.aux.tasks}:
        if name in DOMAINBED_DATASETS:
            get_dataset(name, config.data.root)  # raises DatasetNotFoundError naming the path


def run_pipeline(config: ExperimentConfig, *, resume: bool = False, reduce_only: bool = False,
                 fault: dict[str, Any] | None = None) -> Outcome:
    """`ratatouille run` (and `reduce`, which restores every stage and only reduces)."""
    check_local_data(config)
    tracker, run_dir = open_run(config, continue_last=resume or reduce_only)
    print(f"ray: {connect_ray()}", file=sys.stderr)
    runner = StageRunner(config, run_dir, tracker, resume=resume, restore_only=reduce_only,
                         fault=fault)
    try:
        state = run_stages(config, runner)
        outcome = reduce_and_log(config, state, tracker)
    except (SweepIncomplete, KeyboardInterrupt):
        tracker.finish_parent("KILLED")
        raise
    except Exception:
        tracker.finish_parent("FAILED")
        raise
    tracker.finish_parent()
    return outcome
