"""MLflow, and only here: experiment, parent run, one child run per trial, the reducer run.

Everything is written from the driver through one `MlflowClient` (one writer): SQLite stays
safe locally and workers on a cluster need no route to the tracking server.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    Metric,
    Param,
    Run,
    RunTag,
)
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_BRANCH,
    MLFLOW_GIT_COMMIT,
    MLFLOW_GIT_REPO_URL,
    MLFLOW_LOGGED_ARTIFACTS,
    MLFLOW_PROJECT_ENTRY_POINT,
)

from ratatouille.core.errors import UserError
from ratatouille.core.names import CURVE_METRICS, FINAL_METRICS, PLACEMENT_METRICS, MetricKey
from ratatouille.core.paths import stable_path
from ratatouille.tracking.writer import Failure, MlflowWriter

log = logging.getLogger(__name__)

ROLE = "ratatouille.role"
TRIAL_KEY = "ratatouille.trial_key"
RUN_DIR = "ratatouille.run_dir"
ERROR = "ratatouille.error"
#: On a parent run whose records are incomplete: how many MLflow writes failed, and the first.
TRACKING_ERRORS = "ratatouille.tracking_errors"
EXCLUDED = "ratatouille.excluded"
VERSION = "ratatouille.version"
CONFIG_SHA256 = "ratatouille.config_sha256"
GIT_DIRTY = "ratatouille.git_dirty"
#: The reducer run's record of what it holds: a digest of its results, and how many distinct
#: results it has held (the step of its metrics' latest points).
REDUCTION_SHA256 = "ratatouille.reduction_sha256"
REDUCTIONS = "ratatouille.reductions"
GROWTHS = "ratatouille.growths"  # on the parent: how many times --resume grew the experiment
REDUCER_DEVICE = "ratatouille.reducer_device"  # cpu or cuda: where the reducer's tasks evaluated
#: Model version tag: a digest of the final model's weights, so equal weights are never
#: registered twice.
WEIGHTS_SHA256 = "weights_sha256"
#: Model version tags: how the model is serialized ("pt2": torch.export, loads without
#: unpickling; "pickle": the fallback for an architecture torch.export cannot trace) and why.
MODEL_FORMAT = "ratatouille.model_format"
MODEL_FORMAT_REASON = "ratatouille.model_format_reason"
#: Alias of the latest final model of an experiment; each cell's also gets `champion-<cell>`.
CHAMPION = "champion"
#: MLflow 3's experiment kind; "custom_model_development" is its "Machine learning" kind.
EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
#: The query that opens an experiment on its training runs in MLflow 3's UI (the browser's
#: GenAI/Model training switch, which defaults to GenAI, wins over the experiment's kind there).
RUNS_PAGE_QUERY = "workflowType=machine_learning"
COMPARISON_TABLE = "comparison.json"
#: How long the driver waits for queued writes before it ends a stage or the parent run.
FLUSH_TIMEOUT_S = 600.0
#: The writer's pause between passes: the MLflow UI lags at most this much (plus the writes),
#: and a trial's reports meanwhile make one request. A flush writes at once.
WRITE_INTERVAL_S = 2.0


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config, then MLFLOW_TRACKING_URI, then MLflow's own default (`mlflow.db`), made
    absolute: a bare path is a SQLite file resolved by core.paths (never inside a folder Ray
    owns, such as a Ray Jobs working directory)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or "://" not in uri:  # none, or a bare path: a database file
        return f"sqlite:///{stable_path(uri, 'mlflow.db')}"
    return uri


def artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """Artifacts of a SQLite store's experiment: beside the database, one folder per
    experiment. MLflow's default is `./mlruns` of whatever directory the driver runs in: two
    stores would share (and overwrite) one `mlruns/<experiment id>`, and under Ray Jobs that
    directory is an ephemeral runtime-env folder. A server store keeps its own default."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    # sqlite:////abs/path.db is absolute, sqlite:///rel.db relative to the working directory
    database = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
    return (database.parent / "mlruns" / experiment_name).as_uri()


class TrackingError(UserError):
    """The MLflow store lacks what a command needs; the message says what to run first."""


def trial_params(plain_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The params a trial's child run carries: its flat spec, fusing weights one per source."""
    params = {key: value for key, value in plain_spec.items() if key != "fusing"}
    for name, weight in (plain_spec.get("fusing") or {}).items():
        params[f"fusing_lambda/{name}"] = round(weight, 4)
    return params


def config_sha256(config: Mapping[str, Any]) -> str:
    """The recipe's identity: the config without its `tracking` section (where the results are
    stored changes nothing they are computed from), as canonical JSON."""
    recipe = {key: value for key, value in config.items() if key != "tracking"}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ratatouille")
    except PackageNotFoundError:  # run from a checkout that was never pip-installed
        return "unknown"


def _package_git_tags() -> dict[str, str]:
    """Git facts of the checkout this package's code runs from. MLflow's fluent API asks the
    main script (argv[0]), which may be a venv's console script or pytest, not this code."""
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    here = str(Path(__file__).resolve().parents[1])
    commit = get_git_commit(here)
    if commit is None:  # not a checkout, or no GitPython
        return {}
    import git

    facts = {
        MLFLOW_GIT_COMMIT: commit,
        MLFLOW_GIT_BRANCH: get_git_branch(here),
        MLFLOW_GIT_REPO_URL: get_git_repo_url(here),
        GIT_DIRTY: str(git.Repo(here, search_parent_directories=True).is_dirty()).lower(),
    }
    return {key: value for key, value in facts.items() if value}


def provenance_tags(config: Mapping[str, Any], entry_point: str | None) -> dict[str, str]:
    """The context tags MLflow's fluent `start_run` sets (user, source name and type, git of the
    main script), git of this package's checkout, the command, the version and the config's
    hash. `MlflowClient.create_run` sets none of them itself."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = {**resolve_tags(), **_package_git_tags()}
    if entry_point:
        tags[MLFLOW_PROJECT_ENTRY_POINT] = entry_point
    tags[VERSION] = _package_version()
    tags[CONFIG_SHA256] = config_sha256(config)
    return tags


def dataset_input(record: Mapping[str, Any], context: str) -> DatasetInput:
    """An MLflow dataset input from a `data.identity` record: what `mlflow.log_input` logs,
    built by hand because our records are not MLflow dataset objects."""
    source = (
        {"uri": record["source"]}
        if record["source_type"] == "local"
        else {"tags": {"generator": record["source"]}}
    )
    profile = {key: record[key] for key in ("items", "domains", "split_seed", "holdout_fraction")}
    dataset = Dataset(
        name=f"{record['name']} ({', '.join(record['domains'])})",
        digest=record["sha256"][:16],  # MLflow keeps at most 36 characters; 64 bits suffice
        source_type=record["source_type"],
        source=json.dumps(source),
        profile=json.dumps({**profile, "sha256": record["sha256"]}),
    )
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    if record.get("split_seed") is not None:
        tags.append(InputTag("split_seed", str(record["split_seed"])))
    return DatasetInput(dataset, tags)


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """A digest of a state dict's names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}\t{tensor.dtype}\t{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def reduction_sha256(
    metrics: Mapping[str, float], table: pd.DataFrame, inputs: Sequence[tuple[str, Mapping]]
) -> str:
    """A digest of a reducer's results and the data they were computed on."""
    payload = {
        "metrics": {key: round(float(value), 9) for key, value in sorted(metrics.items())},
        "table": json.loads(table.round(9).to_json(orient="split", index=False)),
        "inputs": [[context, record["sha256"]] for context, record in inputs],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class Tracker:
    """Writes one `ratatouille run` into an MLflow experiment named after the config."""

    def __init__(
        self, experiment_name: str, tracking_uri: str | None = None, entry_point: str | None = None
    ):
        self.uri = resolve_tracking_uri(tracking_uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(experiment_name)
        self.experiment_id = (
            found.experiment_id
            if found
            else self.client.create_experiment(
                experiment_name, artifact_location=artifact_location(self.uri, experiment_name)
            )
        )
        self.experiment_name = experiment_name
        self.entry_point = entry_point
        self.parent_id: str | None = None
        self.provenance: dict[str, str] = {}
        self._trial_runs: dict[str, str] = {}
        # The last step logged per trial run: a trial restarted from a checkpoint (or by a
        # --resume) may report a step again; its curves keep each step once.
        self._last_step: dict[str, int] = {}
        # Trial writes, queued by Tune's callback; `_trial_runs` and `_last_step` are the
        # writer thread's once it exists (the main thread reads them after a flush).
        self._writer: MlflowWriter | None = None

    def _create_run(self, name: str, tags: Mapping[str, str]) -> str:
        """A run with the provenance tags, as if started by MLflow's fluent API."""
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={**self.provenance, **tags}
        )
        return run.info.run_id

    def _mark_training_experiment(self) -> None:
        """Say the experiment holds training runs (MLflow 3 assumes GenAI traces otherwise);
        a kind the user chose in the UI is kept."""
        if EXPERIMENT_KIND not in self.client.get_experiment(self.experiment_id).tags:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, TRAINING_KIND)

    # -- parent -------------------------------------------------------------------------
    def start_parent(
        self, run_dir: str, config: Mapping[str, Any], resume_run_id: str | None = None
    ) -> str:
        self.provenance = provenance_tags(config, self.entry_point)
        self._mark_training_experiment()
        if resume_run_id:
            self.parent_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            self._trial_runs = self._existing_trial_runs()
            return resume_run_id
        self.parent_id = self._create_run(Path(run_dir).name, {ROLE: "parent", RUN_DIR: run_dir})
        self.client.log_text(
            self.parent_id, yaml.safe_dump(dict(config), sort_keys=False), "config.yaml"
        )
        for key, value in _parent_params(config).items():
            self.client.log_param(self.parent_id, key, value)
        return self.parent_id

    # -- growth (an experiment that a resume grew) --------------------------------------
    def log_planned_trials(self, stage: str, plain_specs: list[Mapping[str, Any]]) -> None:
        """Every trial a stage has, as specs: what a later resume keeps and grows from."""
        assert self.parent_id is not None, "start the parent run first"
        text = json.dumps([dict(plain) for plain in plain_specs], indent=1, sort_keys=True)
        self.client.log_text(self.parent_id, text, f"trials/{stage}.json")

    def planned_trials(self, stage: str) -> list[dict[str, Any]] | None:
        """The specs :meth:`log_planned_trials` logged; None for a run logged before them."""
        assert self.parent_id is not None, "start the parent run first"
        run = self.client.get_run(self.parent_id)
        try:
            text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/trials/{stage}.json")
        except Exception:  # MLflow raises per store kind (OSError, MlflowException): absent
            return None
        return list(json.loads(text))

    def finished_trial_keys(self) -> set[str]:
        """The trial keys of the parent's child runs that finished."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_id}' and attributes.status = 'FINISHED'",
            max_results=50000,
        )
        return {run.data.tags[TRIAL_KEY] for run in runs if TRIAL_KEY in run.data.tags}

    def log_growth(
        self, config: Mapping[str, Any], added: Mapping[str, Any], trials: Mapping[str, list[str]]
    ) -> int:
        """Record one growth on the parent run: ``growth/<n>.json`` (what was added, when, the
        trials it brought), the grown config as ``config.yaml`` (the one before it kept as
        ``growth/<n>-before.yaml``) and the count in a tag. Params stay as first logged (MLflow
        params are immutable)."""
        assert self.parent_id is not None, "start the parent run first"
        run = self.client.get_run(self.parent_id)
        number = int(run.data.tags.get(GROWTHS, 0)) + 1
        before = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
        record = {
            "growth": number,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "added": dict(added),
            "trials": {stage: list(names) for stage, names in trials.items()},
        }
        self.client.log_text(self.parent_id, before, f"growth/{number}-before.yaml")
        self.client.log_text(self.parent_id, json.dumps(record, indent=1), f"growth/{number}.json")
        self.client.log_text(
            self.parent_id, yaml.safe_dump(dict(config), sort_keys=False), "config.yaml"
        )
        self.client.set_tag(self.parent_id, GROWTHS, str(number))
        return number

    def parent_location(self) -> str:
        """Where a person finds the parent run: its page on a tracking server, or the store
        and run id of a local one (`mlflow ui` serves it)."""
        page = f"#/experiments/{self.experiment_id}/runs/{self.parent_id}"
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/{page}"
        return f"{self.uri}, experiment {self.experiment_name!r}, parent run {self.parent_id}"

    def finish_run(self, run_id: str) -> None:
        self.client.set_terminated(run_id)

    def finish_parent(self, status: str = "FINISHED") -> None:
        """End the parent run once every queued write is in the store; child runs still
        RUNNING (trials cut short by a stop) end with the parent's status, so the store never
        shows a run as live after its driver left. Writes that failed for good turn FINISHED
        into FAILED, with what was lost in a tag: the records are incomplete, not the sweep."""
        if not self.parent_id:
            return
        self.flush()
        failures = self._writer.failures if self._writer is not None else []
        if failures:
            status = "FAILED" if status == "FINISHED" else status
            first = failures[0]
            note = f"{len(failures)} MLflow writes failed; first: {first.what}: {first.error}"
            log.error("%s; parent run %s marked %s", note, self.parent_id, status)
            self.client.set_tag(self.parent_id, TRACKING_ERRORS, note[-4000:])
        live = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_id}' and attributes.status = 'RUNNING'",
            max_results=5000,
        )
        for run in live:
            self.client.set_terminated(run.info.run_id, status=status)
        self.client.set_terminated(self.parent_id, status=status)

    # -- trials: written by the writer thread, in order; Tune's loop only enqueues ----------
    @property
    def writer(self) -> MlflowWriter:
        if self._writer is None:  # a tracker that only reads never starts a thread
            self._writer = MlflowWriter(self.client, interval_s=WRITE_INTERVAL_S)
        return self._writer

    def flush(self, timeout: float | None = FLUSH_TIMEOUT_S) -> None:
        """Wait until every queued trial write is in the store (or has failed)."""
        if self._writer is not None and not self._writer.flush(timeout):
            self._writer.failures.append(Failure("flush", f"not done after {timeout} s"))
            log.error("MLflow writes still queued after %s s; the parent run says so", timeout)

    def trial_run(self, trial_key: str) -> str | None:
        """The child run of a trial, once its queued start is written."""
        self.flush()
        return self._trial_runs.get(trial_key)

    def _existing_trial_runs(self) -> dict[str, str]:
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent_id}'", max_results=5000
        )
        return {
            run.data.tags[TRIAL_KEY]: run.info.run_id for run in runs if TRIAL_KEY in run.data.tags
        }

    def trial_started(
        self, trial_key: str, name: str, stage: str, plain_spec: Mapping[str, Any]
    ) -> None:
        """Queue the child run of a trial; a restarted or resumed trial keeps its run."""
        assert self.parent_id is not None, "start the parent run before the trials"
        params = trial_params(plain_spec)
        self.writer.submit(
            f"start of trial {name}", lambda: self._start_trial(trial_key, name, stage, params)
        )

    def _start_trial(self, trial_key: str, name: str, stage: str, params: dict[str, Any]) -> None:
        if trial_key in self._trial_runs:
            run_id = self._trial_runs[trial_key]
            self.client.update_run(run_id, status="RUNNING")
            if trial_key not in self._last_step:  # a run of an earlier driver (--resume)
                history = self.client.get_metric_history(run_id, str(MetricKey.ID_VAL_ACC))
                self._last_step[trial_key] = max((m.step for m in history), default=-1)
            return
        assert self.parent_id is not None
        run_id = self._create_run(
            name,
            {
                "mlflow.parentRunId": self.parent_id,
                ROLE: "trial",
                TRIAL_KEY: trial_key,
                "stage": str(stage),
            },
        )
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self._trial_runs[trial_key] = run_id

    def trial_result(self, trial_key: str, metrics: Mapping[str, Any]) -> None:
        """Queue a report's curve points; the writer merges a run's queued points into one
        request (on a cluster every request is a round trip to the server)."""
        if MetricKey.STEP not in metrics:
            return
        step, now = int(metrics[MetricKey.STEP]), int(time.time() * 1000)
        values = {
            str(key): float(metrics[key])
            for key in CURVE_METRICS
            if isinstance(metrics.get(key), (int, float))
        }
        self.writer.submit(
            f"step {step} of trial {trial_key}",
            lambda: self._buffer_result(trial_key, step, values, now),
            buffers=True,
        )

    def _buffer_result(self, trial_key: str, step: int, values: dict[str, float], now: int) -> None:
        run_id = self._trial_runs.get(trial_key)
        if run_id is None or step <= self._last_step.get(trial_key, -1):
            return  # trained again after a restart: the curve already has this step
        self._last_step[trial_key] = step
        points = [Metric(key, value, now, step) for key, value in values.items()]
        self.writer.buffer_metrics(run_id, points)

    def _on_trial_run(self, what: str, trial_key: str, write: Callable[[str], Any]) -> None:
        """Queue ``write(run_id)`` for a trial's run, if the trial has one by then."""

        def apply() -> None:
            run_id = self._trial_runs.get(trial_key)
            if run_id is not None:
                write(run_id)

        self.writer.submit(f"{what} of trial {trial_key}", apply)

    def trial_error(self, trial_key: str, error: str) -> None:
        """The last line of a failed trial's error, so the MLflow UI says why it failed."""
        self._on_trial_run(
            "error", trial_key, lambda run: self.client.set_tag(run, ERROR, error[-4000:])
        )

    def trial_excluded(self, trial_key: str, reason: str) -> None:
        """Tag a trial left out of every strategy with the reason (a diverged loss)."""
        self._on_trial_run(
            "exclusion", trial_key, lambda run: self.client.set_tag(run, EXCLUDED, reason[-4000:])
        )

    def trial_restarted(self, trial_key: str) -> None:
        """Count restarts from checkpoints (FailureConfig) on the trial's run."""

        def count(run_id: str) -> None:
            tags = self.client.get_run(run_id).data.tags
            self.client.set_tag(run_id, "ray.restarts", int(tags.get("ray.restarts", 0)) + 1)

        self._on_trial_run("restart", trial_key, count)

    def trial_finished(
        self, trial_key: str, failed: bool = False, metrics: Mapping[str, Any] | None = None
    ) -> None:
        final = dict(metrics or {})  # Tune updates its result dicts in place later
        status = "FAILED" if failed else "FINISHED"
        self._on_trial_run("end", trial_key, lambda run: self._finish_trial(run, final, status))

    def _finish_trial(self, run_id: str, metrics: Mapping[str, Any], status: str) -> None:
        now = int(time.time() * 1000)
        finals = [
            Metric(str(key), float(metrics[key]), now, 0)
            for key in FINAL_METRICS
            if isinstance(metrics.get(key), (int, float))
        ]
        tags = [
            RunTag(f"ray.{key}", str(metrics[key])) for key in PLACEMENT_METRICS if key in metrics
        ]
        if finals or tags:
            self.client.log_batch(run_id, metrics=finals, tags=tags)
        if isinstance(metrics.get(MetricKey.DATA_INPUT), str):
            record = json.loads(metrics[MetricKey.DATA_INPUT])
            self._log_inputs(run_id, [("training", record)])
        self.client.set_terminated(run_id, status=status)

    # -- reducer ------------------------------------------------------------------------
    def reducer_run(self) -> Run:
        """The one reducer child run of this parent, created on first use, reused after."""
        self.flush()  # the trials' queued records come first
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.`{ROLE}` = 'reducer'",
        )
        if runs:
            return runs[0]
        assert self.parent_id is not None, "start the parent run before the reducer"
        run_id = self._create_run(
            "reducer", {"mlflow.parentRunId": self.parent_id, ROLE: "reducer"}
        )
        return self.client.get_run(run_id)

    def log_reduction(
        self,
        metrics: Mapping[str, float],
        table: pd.DataFrame,
        figures: Mapping[str, Any],
        texts: Mapping[str, str],
        inputs: Sequence[tuple[str, Mapping[str, Any]]] = (),
        device: str = "cpu",
    ) -> tuple[str, bool]:
        """Log a reduction to the reducer run unless it holds these very results already;
        returns the run and whether anything was written. Changed results replace the table
        and figures and add one point to each metric (its step counts the reductions)."""
        run = self.reducer_run()
        run_id, tags = run.info.run_id, run.data.tags
        digest = reduction_sha256(metrics, table, inputs)
        if tags.get(REDUCTION_SHA256) == digest:
            return run_id, False
        self.client.update_run(run_id, status="RUNNING")
        step, now = int(tags.get(REDUCTIONS, 0)), int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()],
            tags=[
                *(RunTag(key, value) for key, value in self.provenance.items()),
                RunTag(REDUCER_DEVICE, device),
            ],
        )
        self._replace_table(run, table, COMPARISON_TABLE)
        self.client.log_text(run_id, table.to_csv(index=False), "comparison.csv")
        for name, text in texts.items():
            self.client.log_text(run_id, text, name)
        for name, figure in figures.items():
            self.client.log_figure(run_id, figure, f"figures/{name}.png")
        self._log_inputs(run_id, inputs)
        # written last: a reduction interrupted before this point is logged again in full
        tags_now = {REDUCTION_SHA256: digest, REDUCTIONS: str(step + 1)}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags_now.items()])
        return run_id, True

    def log_analysis(
        self,
        run_id: str,
        tables: Mapping[str, pd.DataFrame],
        figures: Mapping[str, Any],
    ) -> None:
        """Analysis across cells: each table (an MLflow table ``<name>.json`` and ``<name>.csv``)
        on the reducer run and the parent, each figure on the parent (``figures/<name>.png``),
        where a person opening the experiment looks first. Call it when
        :meth:`log_reduction` wrote something, so an unchanged sweep writes nothing."""
        for target in dict.fromkeys([run_id, self.parent_id]):
            if target is None:
                continue
            for name, table in tables.items():
                self._replace_table(self.client.get_run(target), table, f"{name}.json")
                self.client.log_text(target, table.to_csv(index=False), f"{name}.csv")
        parent = self.parent_id or run_id
        for name, figure in figures.items():
            self.client.log_figure(parent, figure, f"figures/{name}.png")

    def _log_inputs(self, run_id: str, inputs: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        """Inputs of a child run, and of the parent (MLflow keeps each dataset once per run),
        which is the one row the runs page shows until it is expanded."""
        if not inputs:
            return
        records = [dataset_input(record, context) for context, record in inputs]
        for target in dict.fromkeys([run_id, self.parent_id]):
            if target is not None:
                self.client.log_inputs(target, records)

    def _replace_table(self, run: Run, table: pd.DataFrame, name: str) -> None:
        """`MlflowClient.log_table` appends to an existing table; this writes the same format
        (pandas' split JSON, listed as a table in the run's logged-artifacts tag) in place."""
        run_id = run.info.run_id
        text = table.to_json(orient="split", index=False, double_precision=15)
        self.client.log_text(run_id, text, name)
        listed = json.loads(run.data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": name, "type": "table"}
        if entry not in listed:
            self.client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*listed, entry]))

    @staticmethod
    def champion_aliases(cell: str, latest: bool) -> list[str]:
        """A cell's final model is `champion-<cell>`; the latest one logged is also `champion`
        (MLflow aliases allow letters, digits, `_` and `-`)."""
        own = f"{CHAMPION}-{re.sub(r'[^A-Za-z0-9_-]', '_', cell)}"
        return [own, CHAMPION] if latest else [own]

    def log_final_model(
        self,
        run_id: str,
        model: torch.nn.Module,
        registered_name: str,
        artifact_name: str,
        tags: Mapping[str, str],
        input_example: np.ndarray,
        aliases: Sequence[str] = (),
        description: str = "",
    ) -> str:
        """The final model as a registered version (a new one only for weights not registered
        yet under this name), with ``aliases`` moved onto it and ``description`` (which rule
        chose it, and why) as the version's description; returns the version."""
        digest = weights_sha256(model.state_dict())
        found = self.client.search_model_versions(
            f"name = '{registered_name}' and tags.{WEIGHTS_SHA256} = '{digest}'"
        )
        if found:
            version = str(found[0].version)
        else:
            version = self._register_model(
                run_id,
                model,
                registered_name,
                artifact_name,
                {**tags, WEIGHTS_SHA256: digest},
                input_example,
            )
        if description:
            self.client.update_model_version(registered_name, version, description=description)
        for alias in aliases:
            self.client.set_registered_model_alias(registered_name, alias, version)
        return version

    def _register_model(
        self,
        run_id: str,
        model: torch.nn.Module,
        registered_name: str,
        artifact_name: str,
        tags: Mapping[str, str],
        input_example: np.ndarray,
    ) -> str:
        """Log the model to the parent run, as MLflow's sweeps do (the runs page shows a model
        on the row of the run that logged it, and the parent's is the one row shown until it is
        expanded), register it, and list it among the reducer run's outputs.

        The model is a torch.export program (MLflow's "pt2"): loading it unpickles nothing
        beyond tensors, so `models:/NAME@champion` is safe to load from a shared registry. An
        architecture torch.export cannot trace falls back to MLflow's pickle format, with
        the package source (code_paths) so it loads where ratatouille is not installed, and
        the version's MODEL_FORMAT / MODEL_FORMAT_REASON tags say so and why. Explicit
        requirements spare MLflow's slow inference by re-importing.
        """
        from mlflow.models import infer_signature

        example = _batch_of_two(input_example)
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        failure = _export_failure(model, example)
        tags = {**tags, MODEL_FORMAT: "pickle" if failure else "pt2"}
        if failure:
            tags[MODEL_FORMAT_REASON] = failure
            log.warning("%s: logged with pickle, torch.export failed: %s", artifact_name, failure)
        with mlflow.start_run(run_id=self.parent_id):
            info = mlflow.pytorch.log_model(
                model,
                name=artifact_name,
                tags=dict(tags),
                signature=infer_signature(example, output),
                input_example=example,
                serialization_format="pickle" if failure else "pt2",
                code_paths=[str(Path(__file__).parents[1])] if failure else None,
                pip_requirements=_model_requirements(),
            )
        version = str(
            mlflow.register_model(info.model_uri, registered_name, tags=dict(tags)).version
        )
        self.client.log_outputs(run_id, [LoggedModelOutput(info.model_id, step=0)])
        self.client.set_tag(
            run_id, f"registered_model/{artifact_name}", f"{registered_name}/{version}"
        )
        return version


def _batch_of_two(example: np.ndarray) -> np.ndarray:
    """At least two rows: torch.export turns a batch dimension of 1 into a constant, and the
    exported model would then refuse every other batch size."""
    return example if len(example) > 1 else np.concatenate([example, example])


def _export_failure(model: torch.nn.Module, example: np.ndarray) -> str | None:
    """Why torch.export cannot trace ``model`` the way MLflow's pt2 format does (batch
    dimension dynamic), or None when it can. Tried before `log_model`, which would otherwise
    leave a half-made logged model behind in the experiment."""
    batch = {0: torch.export.Dim.AUTO}
    try:
        torch.export.export(model, (torch.from_numpy(example),), dynamic_shapes=[batch])
    except Exception as error:  # torch.export raises many kinds; each one means "cannot"
        first_line = (str(error).strip().splitlines() or [""])[0]
        return f"{type(error).__name__}: {first_line}"[:500]
    return None


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


def read_claims(tracker: Tracker) -> pd.DataFrame | None:
    """The claims table (``claims.csv``) of the tracker's parent run; None for a sweep reduced
    before the reducer computed claims."""
    if tracker.parent_id is None:
        return None
    run = tracker.client.get_run(tracker.parent_id)
    try:
        text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/claims.csv")
    except Exception:  # MLflow raises per store kind (OSError, MlflowException): absent
        return None
    return pd.read_csv(io.StringIO(text))


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
