"""Ray Tune, and only here: one `Tuner.fit()` per stage, driven from one process.

Trials run `ratatouille.stages` bodies; the driver ships them their initial weights through the
object store (`tune.with_parameters`), so workers need no shared filesystem for the pool, only
Tune's storage for checkpoints. MLflow is written by the driver through a Tune callback.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import ray
import torch
from ray import tune
from safetensors.torch import load_file, save_file

from ratatouille.config import ExperimentConfig
from ratatouille.stages import StateDict, TrialContext, run_trial
from ratatouille.sweep import digest

if TYPE_CHECKING:  # workers unpickle this module: keep mlflow out of their imports
    from ratatouille.tracking import Tracker

TUNE_QUIET = {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
              "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_USAGE_STATS_ENABLED": "0"}


class SweepIncomplete(RuntimeError):
    """Some trials of a stage failed or never ran; finished ones are kept for --resume."""


def connect_ray() -> str:
    """Attach to a running cluster (e.g. under `ray submit`), else start a local Ray."""
    for key, value in TUNE_QUIET.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return "attached (already initialized)"
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
        return "attached to a running cluster"
    except ConnectionError:
        ray.init(include_dashboard=False, log_to_driver=False)
        return "started a local Ray"


def storage_root(config: ExperimentConfig) -> str:
    """Absolute local path or a URI: Tune's storage for every stage's trials and checkpoints."""
    configured = config.tracking.storage_path
    if configured and "://" in configured:
        return configured.rstrip("/")
    return str(Path(configured or "ray_results").expanduser().resolve())


# -- inside a trial ---------------------------------------------------------------------------
class TuneReporter:
    """Bridges `stages.Reporter` to `tune.report` and Tune checkpoints; every report also says
    where the trial runs (node, GPU ids), so users can see the placement in MLflow."""

    def __init__(self) -> None:
        self.placement = {"node_id": ray.get_runtime_context().get_node_id(),
                          "gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids())}

    def report(self, metrics: Mapping[str, Any], *, weights: Mapping[str, StateDict] | None = None,
               train_state: Mapping[str, Any] | None = None) -> None:
        metrics = {**metrics, **self.placement}
        if not weights and train_state is None:
            tune.report(dict(metrics))
            return
        with tempfile.TemporaryDirectory() as folder:
            for name, state in (weights or {}).items():
                tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
                save_file(tensors, os.path.join(folder, f"{name}.safetensors"))
            if train_state is not None:
                torch.save(dict(train_state), os.path.join(folder, "train_state.pt"))
            tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(folder))

    def restored_state(self) -> dict[str, Any] | None:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            path = os.path.join(folder, "train_state.pt")
            # Our own checkpoint, written by this trial: optimizer and RNG states need pickle.
            return torch.load(path, weights_only=False) if os.path.exists(path) else None


def _trainable(config: dict[str, Any], context: TrialContext) -> None:
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    # Ray's launcher exports OMP_NUM_THREADS=1; use every CPU the trial was given.
    torch.set_num_threads(max(1, int(cpus)))
    run_trial(config["spec"], context, TuneReporter())


# -- the driver -------------------------------------------------------------------------------
@dataclass
class TrialOutcome:
    spec: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint: tune.Checkpoint | None


def read_weights(checkpoint: tune.Checkpoint, name: str) -> StateDict:
    """A safetensors file of a trial's checkpoint (local or remote storage)."""
    with checkpoint.as_directory() as folder:
        return load_file(os.path.join(folder, f"{name}.safetensors"))


def trial_key(spec: Mapping[str, Any]) -> str:
    return digest(spec, length=16)


def trial_name(spec: Mapping[str, Any]) -> str:
    parts = [spec["stage"], spec.get("arm"), spec.get("task"),
             (spec.get("cell") or {}).get("test_domain"), spec.get("run")]
    return "_".join(str(p).replace(" ", "-") for p in parts if p is not None)


_LIVE_TRACKERS: dict[str, Tracker] = {}


class MlflowTrialCallback(tune.Callback):
    """One MLflow child run per trial, written from the driver (one writer).

    `Tuner.restore` brings back the callbacks pickled with the first run; this one therefore keeps
    only the parent run id and writes through the tracker of the current process.
    """

    def __init__(self, tracker: Tracker):
        self.parent_id = tracker.parent_id
        _LIVE_TRACKERS[self.parent_id] = tracker

    @property
    def tracker(self) -> Tracker:
        return _LIVE_TRACKERS[self.parent_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        spec = trial.config["spec"]
        self.tracker.trial_started(trial_key(spec), trial_name(spec), spec)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.tracker.trial_result(trial_key(trial.config["spec"]), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.tracker.trial_finished(trial_key(trial.config["spec"]), metrics=trial.last_result)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.tracker.trial_restarted(trial_key(trial.config["spec"]))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.tracker.trial_finished(trial_key(trial.config["spec"]), failed=True)


@dataclass
class StageRunner:
    """Runs the stages of one `ratatouille run` under `<storage>/<name>/<run>/<stage>`."""

    config: ExperimentConfig
    run_dir: str
    tracker: Tracker
    resume: bool = False
    restore_only: bool = False
    fault: dict[str, Any] | None = None  # fault injection for the resilience tests

    def __post_init__(self) -> None:
        _LIVE_TRACKERS[self.tracker.parent_id] = self.tracker

    def _resources(self) -> dict[str, float]:
        res = self.config.resources
        return {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial}

    def _trainable(self, context: TrialContext):
        return tune.with_resources(tune.with_parameters(_trainable, context=context),
                                   self._resources())

    def _new_tuner(self, stage: str, specs: list[dict], trainable) -> tune.Tuner:
        keep_best = stage == "target"
        checkpoints = tune.CheckpointConfig(
            num_to_keep=1,
            checkpoint_score_attribute="best_id_val_acc" if keep_best else None,
            checkpoint_score_order="max")
        return tune.Tuner(
            trainable,
            param_space={"spec": tune.grid_search(specs)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=self.config.resources.max_concurrent_trials,
                reuse_actors=True,  # a new actor per trial re-imports torch and timm
                trial_name_creator=lambda t: trial_name(t.config["spec"]),
                trial_dirname_creator=lambda t: f"{trial_name(t.config['spec'])}_{t.trial_id}"),
            run_config=tune.RunConfig(
                name=stage, storage_path=self.run_dir, verbose=0,
                checkpoint_config=checkpoints,
                failure_config=tune.FailureConfig(max_failures=self.config.resources.max_failures),
                callbacks=[MlflowTrialCallback(self.tracker)]))

    def run(self, stage: str, specs: list[dict], context: TrialContext) -> list[TrialOutcome]:
        """Fit (or restore and finish) one stage; every trial must end without error."""
        if not specs:
            return []
        path = f"{self.run_dir}/{stage}"
        trainable = self._trainable(context)
        if (self.resume or self.restore_only) and tune.Tuner.can_restore(path):
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        elif self.restore_only:
            raise SweepIncomplete(f"stage {stage!r} has no results under {path}: "
                                  "run `ratatouille run CONFIG --resume` to finish the sweep")
        else:
            tuner = self._new_tuner(stage, specs, trainable)
        grid = tuner.get_results() if self.restore_only else tuner.fit()
        outcomes = self._outcomes(stage, grid, expected=len(specs))
        # Tune's result order differs between fit and restore; the reducer breaks ties by order.
        order = {trial_key(spec): index for index, spec in enumerate(specs)}
        return sorted(outcomes, key=lambda o: order.get(trial_key(o.spec), len(order)))

    def _outcomes(self, stage: str, grid, expected: int) -> list[TrialOutcome]:
        failed = [r for r in grid if r.error is not None or not (r.metrics or {}).get("done")]
        if failed or len(grid) != expected:
            first = next((r.error for r in failed if r.error is not None), "did not finish")
            raise SweepIncomplete(
                f"stage {stage!r}: {len(failed)} of {expected} trials failed or did not finish "
                f"(first: {str(first).strip().splitlines()[-1] if str(first) else first}). "
                "Finished trials are kept: fix the cause, then `ratatouille run CONFIG --resume`.")
        return [TrialOutcome(r.config["spec"], dict(r.metrics), r.checkpoint) for r in grid]


def run_remote(fn, resources, *args: Any):
    """Run ``fn(*args)`` as a Ray task with a trial's resources; call the result to wait."""
    task = ray.remote(fn).options(num_cpus=resources.cpus_per_trial,
                                  num_gpus=resources.gpus_per_trial)
    ref = task.remote(*args)
    return lambda: ray.get(ref)


def new_run_dir(config: ExperimentConfig) -> str:
    return f"{storage_root(config)}/{config.name}/run-{time.strftime('%Y%m%d-%H%M%S')}"
