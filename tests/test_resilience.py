"""Faults: a lost trial restarts from its checkpoint; an interrupted sweep resumes."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from faults import inject_fault
from ratatouille.orchestration.pipeline import run_pipeline
from ratatouille.orchestration.search import SweepIncomplete
from ratatouille.tracking.store import latest_parent
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
