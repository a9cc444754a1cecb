"""Faults: a lost trial restarts from its checkpoint; an interrupted sweep resumes."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from faults import inject_fault
from ratatouille.cli.main import main
from ratatouille.orchestration.pipeline import PipelineError, check_resumable, run_pipeline
from ratatouille.orchestration.search import SweepIncomplete
from ratatouille.recipe.checks import experiment_cells
from ratatouille.recipe.sweep import target_specs
from ratatouille.tracking.store import Tracker, latest_parent
from tiny import tiny_config

pytestmark = pytest.mark.ray
SOUPS_ONLY = {"arms": ["soups"], "n_runs": 2}
ALL_STEPS = [0, 3, 6, 9, 11]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("resilience")  # shared: phi_pt is pre-trained once


def _target_runs(config, parent_id):
    client = MlflowClient(config.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name(config.name)
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}' and tags.stage = 'target'",
    )
    return client, {int(run.data.params["run"]): run for run in runs}


def _steps(client, run):
    return [m.step for m in client.get_metric_history(run.info.run_id, "id_val_acc")]


def test_lost_trial_restarts_from_its_checkpoint(ray_session, root, monkeypatch):
    config = tiny_config(
        root, name="restart", target=SOUPS_ONLY, aux={"tasks": []}, resources={"max_failures": 1}
    )
    inject_fault(monkeypatch, step=6, stage="target", arm="soups", run=1)
    outcome = run_pipeline(config)
    client, runs = _target_runs(config, outcome.parent_run_id)
    assert runs[1].data.tags["ray.restarts"] == "1" and "ray.restarts" not in runs[0].data.tags
    steps = _steps(client, runs[1])
    # Restarted from a checkpoint, not from scratch: step 0 is never trained twice.
    assert steps.count(0) == 1 and steps[-1] == 11 and set(steps) == set(ALL_STEPS)
    assert _steps(client, runs[0]) == ALL_STEPS


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(
    ray_session, root, monkeypatch
):
    config = tiny_config(root, name="resume", target=SOUPS_ONLY, aux={"tasks": []})
    with monkeypatch.context() as patch, pytest.raises(SweepIncomplete, match="--resume"):
        inject_fault(patch, step=6, stage="target", arm="soups", run=1)
        run_pipeline(config)
    _tracker, parent = latest_parent("resume", config.tracking.mlflow_uri)
    assert parent.info.status == "KILLED"
    client, before = _target_runs(config, parent.info.run_id)
    assert before[1].info.status == "FAILED" and before[0].info.status == "FINISHED"
    finished_steps = _steps(client, before[0])

    outcome = run_pipeline(config, resume=True)

    assert outcome.parent_run_id == parent.info.run_id
    client, after = _target_runs(config, parent.info.run_id)
    assert set(after) == {0, 1}  # the same two child runs, none added
    assert _steps(client, after[0]) == finished_steps == ALL_STEPS  # not run again
    resumed = _steps(client, after[1])
    assert resumed.count(0) == 1 and resumed[-1] == 11
    assert after[1].info.status == "FINISHED"
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert "erm" in outcome.table_markdown


def _logged_experiment(tmp_path, **sections):
    """An MLflow store holding one parent run with tiny's config logged, as a run leaves it."""
    config = tiny_config(tmp_path, name="logged", **sections)
    tracker = Tracker(config.name, config.tracking.mlflow_uri)
    tracker.start_parent(str(tmp_path / "run-1"), config.model_dump(mode="json"))
    return config


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (["--steps", "280"], ["target.steps", "aux.steps", "probe.steps", "pretrain.steps"]),
        (["--n-runs", "2"], ["target.n_runs"]),  # fewer runs; more would grow the sweep
        (["--test-env", "thick"], ["data.test_envs"]),
    ],
)
def test_resume_refuses_a_config_that_changes_trials(tmp_path, capsys, override, named):
    config = _logged_experiment(tmp_path)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert main(["run", str(path), "--resume", *override]) == 2
    # (MLflow's own INFO lines about the store this test made also go to stderr)
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert error.startswith("error: --resume: ")
    changed = error.split("--resume: ")[1].split(" differ")[0].split(", ")
    assert sorted(changed) == sorted(named)  # exactly the changed fields, nothing else


def test_resume_accepts_changes_that_only_affect_the_reducer(tmp_path):
    config = _logged_experiment(tmp_path)
    reducer_only = tiny_config(
        tmp_path,
        name="logged",
        reduce={"max_pairs": 7, "wise_alpha": 0.3},
        resources={"max_failures": 5},
    )
    check_resumable(reducer_only)  # no error
    with pytest.raises(PipelineError, match=r"--resume: target\.fusing_spread differ"):
        check_resumable(tiny_config(tmp_path, name="logged", target={"fusing_spread": 2.0}))
    assert config.name == reducer_only.name


def test_diverging_trials_are_excluded_and_the_rest_is_reduced(ray_session, tmp_path, capsys):
    # lr 1e4 makes Adam's loss NaN within the first steps; 3e-4 trains normally.
    target = {"arms": ["soups"], "n_runs": 4, "hparams_override": {"lr": [1e4, 3e-4]}}
    config = tiny_config(tmp_path, name="diverging", target=target, aux={"tasks": []})
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    specs = target_specs(config, experiment_cells(config))
    diverging = {spec.run for spec in specs if spec.hparams.lr == 1e4}
    assert 0 < len(diverging) < len(specs)  # the draw has both kinds (fixed seeds)

    assert main(["run", str(path)]) == 3  # done, with excluded trials
    out = capsys.readouterr().out
    excluded_lines = [line for line in out.splitlines() if line.startswith("excluded ")]
    assert len(excluded_lines) == len(diverging)
    assert all("training diverged at step" in line for line in excluded_lines)
    client, runs = _target_runs(
        config, latest_parent("diverging", config.tracking.mlflow_uri)[1].info.run_id
    )
    for run_index, run in runs.items():
        if run_index in diverging:
            assert run.info.status == "FAILED"
            assert "training diverged" in run.data.tags["ratatouille.excluded"]
            assert "training diverged" in run.data.tags["ratatouille.error"]
        else:
            assert run.info.status == "FINISHED" and "ratatouille.excluded" not in run.data.tags
    reducer = client.search_runs(
        [client.get_experiment_by_name("diverging").experiment_id],
        "tags.`ratatouille.role` = 'reducer'",
    )[0]
    n_models = _comparison(reducer).set_index("strategy").n_models
    kept = len(runs) - len(diverging)  # every run not excluded, and only those
    assert n_models["soup_uniform"] == n_models["ensemble_soups"] == kept


def _comparison(reducer_run) -> pd.DataFrame:
    text = mlflow.artifacts.load_text(f"{reducer_run.info.artifact_uri}/comparison.json")
    table = json.loads(text)
    return pd.DataFrame(table["data"], columns=table["columns"])
