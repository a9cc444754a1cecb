"""`ratatouille run`: the stages in order, from one driver.

pretrain (when phi_pt is ours) -> auxiliary pool -> linear probes (w_lp) -> target arms -> reducer.
Reusable artefacts (phi_pt, pool entries) live outside the run folder, keyed by what made them,
so later experiments and other test domains reuse them instead of training them again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import yaml

from ratatouille.core.config import ExperimentConfig, parse_config
from ratatouille.core.errors import UserError
from ratatouille.core.names import PRETRAINED, MetricKey, Stage, WeightsFile
from ratatouille.core.paths import stable_path
from ratatouille.engine.models import create_featurizer
from ratatouille.orchestration.reporting import Outcome, reduce_and_log
from ratatouille.orchestration.search import (
    Excluded,
    StageRunner,
    SweepIncomplete,
    TrialOutcome,
    check_ray_address,
    check_storage_shared,
    connect_ray,
    new_run_dir,
    read_weights,
    storage_root,
)
from ratatouille.pool.files import child_location, is_uri, sibling_location
from ratatouille.pool.store import HeadStore, Pool, incompatibilities
from ratatouille.recipe.checks import check_experiment, check_source_leakage, experiment_cells
from ratatouille.recipe.growth import FREE_SECTIONS, GROWABLE, Growth, compare, grown_target_specs
from ratatouille.recipe.specs import (
    AuxProbeSpec,
    AuxSpec,
    Cell,
    PretrainSpec,
    ProbeSpec,
    TargetSpec,
    TrialSpec,
    spec_from_plain,
)
from ratatouille.recipe.stages import StateDict, context_for
from ratatouille.recipe.sweep import (
    COMPATIBILITY_KEYS,
    arm_sources,
    aux_probe_specs,
    aux_recipe,
    aux_specs,
    base_recipe,
    pretrain_spec,
    pretrained_identity,
    probe_specs,
    robust_name,
    target_specs,
)
from ratatouille.tracking.store import (
    RUN_DIR,
    Tracker,
    TrackingError,
    latest_parent,
    read_config_text,
)


class PipelineError(UserError):
    """A run that cannot start; the message says what to change."""


@dataclass
class SweepState:
    """What the stages produced, for the reducer: the runs' outcomes, and the weights they
    started from as object-store references (a reducer task fetches those it reads)."""

    cells: list[Cell]
    featurizers: Mapping[str, StateDict]
    heads: Mapping[str, StateDict]
    targets: list[TrialOutcome] = field(default_factory=list)
    excluded: list[Excluded] = field(default_factory=list)


def pool_path(config: ExperimentConfig) -> str:
    """The auxiliary pool: ``tracking.pool_path`` (a folder, or a URI such as s3://bucket/pool
    that outlives an ephemeral cluster), else ``<storage_path>/pool`` beside Tune's results."""
    configured = config.tracking.pool_path
    if configured and is_uri(configured):
        return configured.rstrip("/")
    if configured:
        return str(stable_path(configured, "pool"))  # never inside a folder Ray owns
    return child_location(storage_root(config), "pool")


def stores_workers_use(config: ExperimentConfig) -> dict[str, str]:
    """The local stores every node must see: Tune's storage, where trials write checkpoints.
    The pool (and phi_pt's and the heads' stores beside it) is read and written by the driver
    alone, which ships weights to trials through the object store: a pool on the head's own
    disk serves a cluster of any size."""
    return {"tracking.storage_path": storage_root(config)}


def _pretrained(config: ExperimentConfig, runner: StageRunner) -> dict[str, StateDict]:
    """phi_pt: timm's hub or a local file, read once here and shipped to every trial, or ours
    from the pretrain stage (kept in a pool beside the auxiliary pool)."""
    if config.model.init != "pretrain":
        featurizer = create_featurizer(
            config.model.arch, config.model.weights_file, pretrained_hub=config.model.init == "hub"
        )
        return {PRETRAINED: featurizer.state_dict()}
    store = Pool(sibling_location(pool_path(config), "pretrained"))
    name = pretrained_identity(config)
    spec = pretrain_spec(config)
    if name not in store and spec is not None:
        (outcome,) = runner.run(Stage.PRETRAIN, [spec], context_for(config))
        store.add(
            name,
            _weights(outcome, WeightsFile.FEATURIZER),
            source_task=spec.task,
            arch=config.model.arch,
            id_val_acc=outcome.metrics[MetricKey.FINAL_ID_VAL_ACC],
        )
    return {PRETRAINED: store.load(name, expected_arch=config.model.arch)}


def _fill_pool(
    config: ExperimentConfig,
    runner: StageRunner,
    pool: Pool,
    featurizers: Mapping[str, StateDict],
) -> None:
    """Train the auxiliary fine-tunings the pool lacks; skip those it has (target-agnostic)."""
    missing = [
        spec
        for spec in aux_specs(config)
        if spec.name not in pool or (spec.robust and robust_name(spec.name) not in pool)
    ]
    heads = _aux_heads(config, runner, pool, featurizers, {s.head for s in missing if s.head})
    context = context_for(config, featurizers=featurizers, heads=runner.share(heads))
    outcomes = runner.run(Stage.AUX, list(missing), context)
    for outcome in outcomes:
        spec, metrics = outcome.spec, outcome.metrics
        assert isinstance(spec, AuxSpec)
        recipe = aux_recipe(config, spec.task, spec.run)
        pool.add(
            spec.name,
            _weights(outcome, WeightsFile.FEATURIZER),
            source_task=spec.task,
            arch=config.model.arch,
            id_val_acc=metrics[MetricKey.FINAL_ID_VAL_ACC],
            overwrite=True,
            recipe=recipe,
        )
        if spec.robust:
            pool.add(
                robust_name(spec.name),
                _weights(outcome, WeightsFile.FEATURIZER_MA),
                source_task=spec.task,
                arch=config.model.arch,
                robust=True,
                id_val_acc=metrics.get(MetricKey.MA_ID_VAL_ACC),
                overwrite=True,
                recipe={**recipe, "moving_average": True},
            )


def _aux_heads(
    config: ExperimentConfig,
    runner: StageRunner,
    pool: Pool,
    featurizers: Mapping[str, StateDict],
    needed: set[str],
) -> dict[str, StateDict]:
    """The probed heads the missing auxiliary runs start from: probes the head store lacks run
    as the aux_probe stage, once per task; the store keeps them, so a resume reuses them."""
    store = HeadStore(sibling_location(pool.root, "aux_heads"))
    todo: list[TrialSpec] = [
        s for s in aux_probe_specs(config) if s.name in needed and s.name not in store
    ]
    # phi_pt only so far (the pool is read after this stage)
    for outcome in runner.run(Stage.AUX_PROBE, todo, context_for(config, featurizers=featurizers)):
        assert isinstance(outcome.spec, AuxProbeSpec)
        store.add(
            outcome.spec.name,
            _weights(outcome, WeightsFile.HEAD),
            source_task=outcome.spec.task,
        )
    return {name: store.load(name) for name in sorted(needed)}


def _weights(outcome: TrialOutcome, name: WeightsFile) -> StateDict:
    assert outcome.checkpoint is not None, f"trial {outcome.spec.trial_name} kept no checkpoint"
    return read_weights(outcome.checkpoint, name)


def _sources(config: ExperimentConfig, pool: Pool) -> list[str]:
    """The pool entries the target arms start from, checked (present, no leakage, made for
    this experiment's network and phi_pt), in sorted order."""
    names = {
        name
        for arm in config.target.arms
        for group in arm_sources(config, arm)
        for name in group
        if name != PRETRAINED
    }
    missing = sorted(name for name in names if name not in pool)
    if missing:
        raise PipelineError(
            f"pool {pool.root} lacks {missing}: import them with "
            "`ratatouille pool import` or remove them from aux.extra_sources"
        )
    entries = [pool.get(name) for name in sorted(names)]
    check_source_leakage(config, {entry.name: entry.source_task for entry in entries})
    problems = incompatibilities(entries, base_recipe(config), COMPATIBILITY_KEYS)
    if problems:
        raise PipelineError(
            "pool entries made for another network, phi_pt, image size or BN setting than this "
            "experiment's cannot be mixed into its runs: " + "; ".join(problems) + ". Remove "
            "them from aux.extra_sources, or run with the config that made them"
        )
    return sorted(names)


def _probe_cell(outcome: TrialOutcome) -> Cell:
    assert isinstance(outcome.spec, ProbeSpec)
    return outcome.spec.cell


def run_stages(config: ExperimentConfig, runner: StageRunner) -> SweepState:
    """Every training stage; returns what the reducer needs."""
    featurizers = runner.share(_pretrained(config, runner))
    pool = Pool(pool_path(config))
    if config.aux.tasks:
        _fill_pool(config, runner, pool, featurizers)
    for name in _sources(config, pool):  # one at a time: the driver never holds the whole pool
        featurizers = featurizers.put({name: pool.load(name, expected_arch=config.model.arch)})
    cells = experiment_cells(config)
    base = featurizers.only([PRETRAINED])
    probes = runner.run(
        Stage.PROBE, list(probe_specs(config, cells)), context_for(config, featurizers=base)
    )
    heads = runner.share({_probe_cell(o).key: _weights(o, WeightsFile.HEAD) for o in probes})
    context = context_for(config, featurizers=featurizers, heads=heads)
    specs = target_trials(
        config, cells, runner.tracker, resumed=runner.resume or runner.restore_only
    )
    if not runner.restore_only:
        runner.tracker.log_planned_trials(str(Stage.TARGET), [s.to_plain() for s in specs])
    targets = runner.run(Stage.TARGET, list(specs), context)
    return SweepState(cells, featurizers, heads, targets, list(runner.excluded))


def target_trials(
    config: ExperimentConfig, cells: list[Cell], tracker: Tracker, *, resumed: bool
) -> list[TargetSpec]:
    """The target trials of a new run; of a resumed one, those it has (as logged, or as its
    logged config planned them before trials were logged) and those a grown config adds."""
    if not resumed:
        return target_specs(config, cells)
    logged = tracker.planned_trials(str(Stage.TARGET))
    previous = parse_config(yaml.safe_load(read_config_text(tracker)), "the logged config")
    if logged is None:
        existing = target_specs(previous, experiment_cells(previous))
    else:
        existing = [cast(TargetSpec, spec_from_plain(plain)) for plain in logged]
    return grown_target_specs(config, cells, existing, previous)


def _run_to_resume(name: str, tracking_uri: str | None) -> tuple[Tracker, Any]:
    """The latest parent run of experiment ``name``; a PipelineError when there is none."""
    try:
        return latest_parent(name, tracking_uri)
    except TrackingError as error:
        raise PipelineError(
            f"nothing to resume for experiment {name!r} ({error}); run without --resume first"
        ) from None


def open_run(
    config: ExperimentConfig, continue_last: bool, command: str = "ratatouille run"
) -> tuple[Tracker, str]:
    """The MLflow parent run and run folder: a new pair, or the latest one to continue.
    ``command`` is recorded as the entry point of the runs it creates."""
    tracker = Tracker(config.name, config.tracking.mlflow_uri, entry_point=command)
    if not continue_last:
        run_dir = new_run_dir(config)
        tracker.start_parent(run_dir, config.model_dump(mode="json"))
        return tracker, run_dir
    _, parent = _run_to_resume(config.name, tracker.uri)
    run_dir = parent.data.tags[RUN_DIR]
    tracker.start_parent(run_dir, config.model_dump(mode="json"), resume_run_id=parent.info.run_id)
    return tracker, run_dir


def check_resumable(config: ExperimentConfig) -> Growth:
    """--resume continues the trials that the logged config planned, and may grow the
    experiment (recipe.growth: more auxiliary tasks or extra sources, runs, test domains, split
    seeds, arms); a change that would alter an existing trial (steps, hyperparameters, model,
    data, seed, ...) is refused, naming each field. Reads the store only, before Ray starts or
    any run is touched."""
    tracker, parent = _run_to_resume(config.name, config.tracking.mlflow_uri)
    logged = parse_config(yaml.safe_load(read_config_text(tracker)), "the logged config")
    growth = compare(logged, config)
    if growth.refused:
        raise PipelineError(
            f"--resume: {', '.join(growth.refused)} differ from the config logged with run "
            f"{parent.info.run_id} (its config.yaml artifact); changing them would alter trials "
            "that exist. Restore those fields, or start a new run without --resume (a resume "
            f"may add to {', '.join(GROWABLE)} and change {', '.join(FREE_SECTIONS)} freely)"
        )
    return growth


def resume_plan(config: ExperimentConfig) -> tuple[list[TargetSpec], Callable[[Any], bool]]:
    """For `ratatouille plan CONFIG --resume`: the target trials of the resumed (maybe grown)
    experiment, and which trials a resume keeps: those whose MLflow run finished, and auxiliary
    or pretrain trials whose weights the pool already holds. Reads the stores only."""
    check_resumable(config)  # a refused change stops the plan as it stops the run
    tracker, _ = _run_to_resume(config.name, config.tracking.mlflow_uri)
    finished = tracker.finished_trial_keys()
    targets = target_trials(config, experiment_cells(config), tracker, resumed=True)
    pool = Pool(pool_path(config))
    pretrained = Pool(sibling_location(pool_path(config), "pretrained"))
    heads = HeadStore(sibling_location(pool.root, "aux_heads"))

    def done(spec: Any) -> bool:
        if spec.key in finished:
            return True
        if isinstance(spec, AuxSpec):
            return spec.name in pool and (not spec.robust or robust_name(spec.name) in pool)
        if isinstance(spec, AuxProbeSpec):
            return spec.name in heads
        return isinstance(spec, PretrainSpec) and spec.name in pretrained

    return targets, done


def run_pipeline(
    config: ExperimentConfig, *, resume: bool = False, reduce_only: bool = False
) -> Outcome:
    """`ratatouille run` (and `reduce`, which restores every stage and only reduces).

    Every check of the user's input runs first: a bad config or an unreachable RAY_ADDRESS stops
    before Ray or MLflow start.
    """
    check_ray_address()
    check_experiment(config)
    growth = check_resumable(config) if resume else None
    command = "ratatouille run --resume" if resume else "ratatouille run"
    if reduce_only:
        command = "ratatouille reduce"
    print(f"ray: {connect_ray()}", file=sys.stderr)
    check_storage_shared(stores_workers_use(config))
    tracker, run_dir = open_run(config, continue_last=resume or reduce_only, command=command)
    print(f"mlflow: {tracker.parent_location()}", file=sys.stderr, flush=True)
    runner = StageRunner(config, run_dir, tracker, resume=resume, restore_only=reduce_only)
    try:
        with _sigterm_as_interrupt():
            state = run_stages(config, runner)
            if growth is not None and growth.grows:
                number = tracker.log_growth(
                    config.model_dump(mode="json"), growth.added, runner.grown
                )
                print(f"growth {number}: {growth.summary()}", file=sys.stderr, flush=True)
            outcome = reduce_and_log(config, state, tracker)
    except (SweepIncomplete, KeyboardInterrupt):
        tracker.finish_parent("KILLED")
        raise
    except Exception:
        tracker.finish_parent("FAILED")
        raise
    tracker.finish_parent()
    return outcome


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (what `ray job stop`, Kubernetes and most schedulers send) stops the run like
    Ctrl-C: inside a stage Tune saves its state and returns, elsewhere KeyboardInterrupt.
    Signals reach the main thread only: a pipeline driven from another thread leaves them be."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def reduce_latest(experiment: str | None, tracking_uri: str | None) -> Outcome:
    """`ratatouille reduce`: the latest run of an experiment, every stage restored, reduced
    again."""
    tracker, parent = latest_parent(experiment, tracking_uri)
    config = parse_config(
        yaml.safe_load(read_config_text(tracker)),
        f"the config logged with run {parent.info.run_id}",
    )
    config.tracking.mlflow_uri = tracker.uri
    return run_pipeline(config, reduce_only=True)
