"""MLflow, and only here: experiment, parent run, one child run per trial, the reducer run.

Everything is written from the driver through one `MlflowClient` (one writer): SQLite stays
safe locally and workers on a cluster need no route to the tracking server.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run

from ratatouille.core.errors import UserError
from ratatouille.core.names import CURVE_METRICS, FINAL_METRICS, PLACEMENT_METRICS, MetricKey

ROLE = "ratatouille.role"
TRIAL_KEY = "ratatouille.trial_key"
RUN_DIR = "ratatouille.run_dir"
ERROR = "ratatouille.error"
EXCLUDED = "ratatouille.excluded"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config, then MLFLOW_TRACKING_URI, then MLflow's own default made absolute."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if "://" not in uri:  # a bare path: a database file
        return f"sqlite:///{Path(uri).expanduser().resolve()}"
    return uri


class TrackingError(UserError):
    """The MLflow store lacks what a command needs; the message says what to run first."""


def trial_params(plain_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The params a trial's child run carries: its flat spec, fusing weights one per source."""
    params = {key: value for key, value in plain_spec.items() if key != "fusing"}
    for name, weight in (plain_spec.get("fusing") or {}).items():
        params[f"fusing_lambda/{name}"] = round(weight, 4)
    return params


class Tracker:
    """Writes one `ratatouille run` into an MLflow experiment named after the config."""

    def __init__(self, experiment_name: str, tracking_uri: str | None = None):
        self.uri = resolve_tracking_uri(tracking_uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(experiment_name)
        self.experiment_id = (
            found.experiment_id if found else self.client.create_experiment(experiment_name)
        )
        self.experiment_name = experiment_name
        self.parent_id: str | None = None
        self._trial_runs: dict[str, str] = {}
        # The last step logged per trial run: a trial restarted from a checkpoint (or by a
        # --resume) may report a step again; its curves keep each step once.
        self._last_step: dict[str, int] = {}

    # -- parent -------------------------------------------------------------------------
    def start_parent(
        self, run_dir: str, config: Mapping[str, Any], resume_run_id: str | None = None
    ) -> str:
        if resume_run_id:
            self.parent_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            self._trial_runs = self._existing_trial_runs()
            return resume_run_id
        run = self.client.create_run(
            self.experiment_id, run_name=Path(run_dir).name, tags={ROLE: "parent", RUN_DIR: run_dir}
        )
        self.parent_id = run.info.run_id
        self.client.log_text(
            self.parent_id, yaml.safe_dump(dict(config), sort_keys=False), "config.yaml"
        )
        for key, value in _parent_params(config).items():
            self.client.log_param(self.parent_id, key, value)
        return self.parent_id

    def finish_run(self, run_id: str) -> None:
        self.client.set_terminated(run_id)

    def finish_parent(self, status: str = "FINISHED") -> None:
        """End the parent run; child runs still RUNNING (trials cut short by a stop) end with
        the parent's status, so the store never shows a run as live after its driver left."""
        if not self.parent_id:
            return
        live = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_id}' and attributes.status = 'RUNNING'",
            max_results=5000,
        )
        for run in live:
            self.client.set_terminated(run.info.run_id, status=status)
        self.client.set_terminated(self.parent_id, status=status)

    # -- trials -------------------------------------------------------------------------
    def _existing_trial_runs(self) -> dict[str, str]:
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent_id}'", max_results=5000
        )
        return {
            run.data.tags[TRIAL_KEY]: run.info.run_id for run in runs if TRIAL_KEY in run.data.tags
        }

    def trial_started(
        self, trial_key: str, name: str, stage: str, plain_spec: Mapping[str, Any]
    ) -> str:
        """The child run of a trial; a restarted or resumed trial keeps its run."""
        if trial_key in self._trial_runs:
            run_id = self._trial_runs[trial_key]
            self.client.update_run(run_id, status="RUNNING")
            if trial_key not in self._last_step:  # a run of an earlier driver (--resume)
                history = self.client.get_metric_history(run_id, str(MetricKey.ID_VAL_ACC))
                self._last_step[trial_key] = max((m.step for m in history), default=-1)
            return run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={
                "mlflow.parentRunId": self.parent_id,
                ROLE: "trial",
                TRIAL_KEY: trial_key,
                "stage": str(stage),
            },
        )
        run_id = run.info.run_id
        params = [Param(key, str(value)) for key, value in trial_params(plain_spec).items()]
        self.client.log_batch(run_id, params=params)
        self._trial_runs[trial_key] = run_id
        return run_id

    def trial_result(self, trial_key: str, metrics: Mapping[str, Any]) -> None:
        run_id = self._trial_runs.get(trial_key)
        if run_id is None or MetricKey.STEP not in metrics:
            return
        step = int(metrics[MetricKey.STEP])
        if step <= self._last_step.get(trial_key, -1):
            return  # trained again after a restart: the curve already has this step
        self._last_step[trial_key] = step
        # One request per checkpoint: on a cluster every call is a round trip to the server.
        now = int(time.time() * 1000)
        batch = [
            Metric(str(key), float(metrics[key]), now, step)
            for key in CURVE_METRICS
            if isinstance(metrics.get(key), (int, float))
        ]
        self.client.log_batch(run_id, metrics=batch)

    def trial_error(self, trial_key: str, error: str) -> None:
        """The last line of a failed trial's error, so the MLflow UI says why it failed."""
        run_id = self._trial_runs.get(trial_key)
        if run_id is not None:
            self.client.set_tag(run_id, ERROR, error[-4000:])

    def trial_excluded(self, trial_key: str, reason: str) -> None:
        """Tag a trial left out of every strategy with the reason (a diverged loss)."""
        run_id = self._trial_runs.get(trial_key)
        if run_id is not None:
            self.client.set_tag(run_id, EXCLUDED, reason[-4000:])

    def trial_restarted(self, trial_key: str) -> None:
        """Count restarts from checkpoints (FailureConfig) on the trial's run."""
        run_id = self._trial_runs.get(trial_key)
        if run_id is not None:
            tags = self.client.get_run(run_id).data.tags
            self.client.set_tag(run_id, "ray.restarts", int(tags.get("ray.restarts", 0)) + 1)

    def trial_finished(
        self, trial_key: str, failed: bool = False, metrics: Mapping[str, Any] | None = None
    ) -> None:
        run_id = self._trial_runs.get(trial_key)
        if run_id is not None:
            metrics = metrics or {}
            for key in FINAL_METRICS:
                if isinstance(metrics.get(key), (int, float)):
                    self.client.log_metric(run_id, str(key), float(metrics[key]))
            for key in PLACEMENT_METRICS:
                if key in metrics:
                    self.client.set_tag(run_id, f"ray.{key}", str(metrics[key]))
            self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    # -- reducer ------------------------------------------------------------------------
    def reducer_run(self) -> str:
        """The one reducer child run of this parent, created on first use, reused after."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.`{ROLE}` = 'reducer'",
        )
        if runs:
            self.client.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name="reducer",
            tags={"mlflow.parentRunId": self.parent_id, ROLE: "reducer"},
        )
        return run.info.run_id

    def log_reduction(
        self,
        metrics: Mapping[str, float],
        table: pd.DataFrame,
        figures: Mapping[str, Any],
        texts: Mapping[str, str],
    ) -> str:
        run_id = self.reducer_run()
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, float(value))
        self.client.log_table(run_id, data=table, artifact_file="comparison.json")
        self.client.log_text(run_id, table.to_csv(index=False), "comparison.csv")
        for name, text in texts.items():
            self.client.log_text(run_id, text, name)
        for name, figure in figures.items():
            self.client.log_figure(run_id, figure, f"figures/{name}.png")
        return run_id

    def log_final_model(
        self,
        run_id: str,
        model: Any,
        registered_name: str,
        artifact_name: str,
        tags: Mapping[str, str],
    ) -> None:
        """The final model as an MLflow model of the reducer run, registered under a name.

        The package source travels with it (code_paths) so the model loads where ratatouille is
        not installed; explicit requirements spare MLflow's slow inference by re-importing.
        """
        with mlflow.start_run(run_id=run_id):
            # pickle, not pt2: torch.export cannot trace every timm architecture.
            info = mlflow.pytorch.log_model(
                model,
                name=artifact_name,
                tags=dict(tags),
                serialization_format="pickle",
                code_paths=[str(Path(__file__).parents[1])],
                pip_requirements=_model_requirements(),
            )
        version = mlflow.register_model(info.model_uri, registered_name, tags=dict(tags))
        self.client.set_tag(
            run_id, f"registered_model/{artifact_name}", f"{registered_name}/{version.version}"
        )


def _model_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "torchvision", "timm", "safetensors")]


def _parent_params(config: Mapping[str, Any]) -> dict[str, Any]:
    data, model, target = config["data"], config["model"], config["target"]
    return {
        "dataset": data["dataset"],
        "arch": model["arch"],
        "init": model["init"],
        "arms": ",".join(target["arms"]),
        "n_runs": target["n_runs"],
        "aux_tasks": ",".join(config["aux"]["tasks"]) or "-",
        "hparams": target["hparams"],
        "seed": config["seed"],
    }


def latest_parent(
    experiment_name: str | None, tracking_uri: str | None = None
) -> tuple[Tracker, Run]:
    """The newest `ratatouille run` of an experiment (default: the newest experiment)."""
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    if experiment_name is None:
        experiments = [
            exp
            for exp in client.search_experiments(order_by=["creation_time DESC"])
            if exp.name != "Default"
        ]
        if not experiments:
            raise TrackingError(f"no experiment in {uri}: run `ratatouille run CONFIG` first")
        experiment_name = experiments[0].name
    elif client.get_experiment_by_name(experiment_name) is None:
        raise TrackingError(
            f"no experiment named {experiment_name!r} in {uri}: check the name "
            "(`mlflow experiments search`) or the tracking URI"
        )
    tracker = Tracker(experiment_name, uri)
    runs = client.search_runs(
        [tracker.experiment_id],
        f"tags.`{ROLE}` = 'parent'",
        order_by=["start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise TrackingError(f"experiment {experiment_name!r} has no ratatouille run yet")
    tracker.parent_id = runs[0].info.run_id
    return tracker, runs[0]


def read_config_text(tracker: Tracker) -> str:
    """The config YAML logged with the tracker's parent run."""
    assert tracker.parent_id is not None, "latest_parent() sets the parent run"
    run = tracker.client.get_run(tracker.parent_id)
    return mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")


def read_comparison(tracker: Tracker) -> pd.DataFrame:
    """The reducer's comparison table (CSV artifact) of the tracker's parent run."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.mlflow.parentRunId = '{tracker.parent_id}' and tags.`{ROLE}` = 'reducer'",
    )
    if not runs:
        raise TrackingError(
            f"experiment {tracker.experiment_name!r} has no reducer run yet: "
            "run `ratatouille reduce` first"
        )
    text = mlflow.artifacts.load_text(f"{runs[0].info.artifact_uri}/comparison.csv")
    return pd.read_csv(io.StringIO(text))
