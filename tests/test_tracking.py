"""The MLflow records, without Ray: provenance on every run, a reduction logged once however
often it is repeated, and a model version per distinct final model."""

from __future__ import annotations

import getpass
import hashlib
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ratatouille.engine.models import build_classifier
from ratatouille.tracking.server import mlflow_server
from ratatouille.tracking.store import Tracker
from tiny import tiny_config

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "ratatouille"


@pytest.fixture
def tracker(tmp_path):
    config = tiny_config(tmp_path)
    tracker = Tracker("tracked", config.tracking.mlflow_uri, entry_point="ratatouille run")
    tracker.start_parent(str(tmp_path / "run-1"), config.model_dump(mode="json"))
    return tracker


def _git_head() -> str | None:
    result = subprocess.run(
        ["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 else None


def _logged_config_sha256(tracker: Tracker) -> str:
    """sha256 of the parent's config.yaml as canonical JSON, without its tracking section."""
    run = tracker.client.get_run(tracker.parent_id)
    config = yaml.safe_load(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml"))
    del config["tracking"]
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def test_runs_carry_the_fluent_context_tags_the_version_and_the_config_hash(tracker):
    tracker.trial_started("k1", "target_soups_rot30_0", "target", {"arm": "soups"})
    trial = tracker.trial_run("k1")
    reducer = tracker.reducer_run().info.run_id
    head, config_sha256 = _git_head(), _logged_config_sha256(tracker)
    for run_id in (tracker.parent_id, trial, reducer):
        tags = tracker.client.get_run(run_id).data.tags
        assert tags["mlflow.user"] == getpass.getuser()
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.name"] == sys.argv[0]  # the main script, as MLflow says
        assert tags["mlflow.project.entryPoint"] == "ratatouille run"
        assert tags["ratatouille.version"] == version("ratatouille")
        assert tags["ratatouille.config_sha256"] == config_sha256
        if head is not None:  # run from a checkout: the commit of the code that ran
            assert tags["mlflow.source.git.commit"] == head
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def _reduction(wise: float) -> tuple[dict[str, float], pd.DataFrame]:
    table = pd.DataFrame(
        {"strategy": ["erm", "wise_ft"], "test_domain": ["rot30", "rot30"], "ood_acc": [0.5, wise]}
    )
    return {"ood_acc/erm": 0.5, "ood_acc/wise_ft": wise}, table


def _points(tracker: Tracker, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, key)]


def _table(tracker: Tracker, run_id: str) -> pd.DataFrame:
    return tracker.client.load_table(tracker.experiment_id, "comparison.json", run_ids=[run_id])


def test_a_reduction_is_logged_once_and_a_changed_one_replaces_the_table(tracker):
    run_id, wrote = tracker.log_reduction(*_reduction(0.6), {}, {"report.md": "first"})
    assert wrote
    again_id, wrote_again = tracker.log_reduction(*_reduction(0.6), {}, {"report.md": "first"})
    assert (again_id, wrote_again) == (run_id, False)
    assert _points(tracker, run_id, "ood_acc/wise_ft") == [(0, 0.6)]
    assert len(_table(tracker, run_id)) == 2
    _, wrote_change = tracker.log_reduction(*_reduction(0.7), {}, {"report.md": "second"})
    assert wrote_change
    assert _points(tracker, run_id, "ood_acc/wise_ft") == [(0, 0.6), (1, 0.7)]
    assert _points(tracker, run_id, "ood_acc/erm") == [(0, 0.5), (1, 0.5)]
    table = _table(tracker, run_id)  # replaced, not appended to
    assert len(table) == 2
    assert table.set_index("strategy").ood_acc["wise_ft"] == pytest.approx(0.7)
    run = tracker.client.get_run(run_id)
    assert mlflow.artifacts.load_text(f"{run.info.artifact_uri}/report.md") == "second"


def test_a_model_version_per_distinct_final_model_and_aliases_follow_the_latest(tracker):
    name, example = "tracked-model", np.zeros((1, 3, 16, 16), dtype=np.float32)
    model = build_classifier("test_resnet", 3, seed=0).eval()
    run_id = tracker.reducer_run().info.run_id

    def log(aliases):
        tags = {"test_domain": "rot30", "split_seed": "0"}
        return tracker.log_final_model(run_id, model, name, "model-rot30", tags, example, aliases)

    assert log(["champion", "champion-rot30-split0"]) == "1"
    assert log(["champion", "champion-rot30-split0"]) == "1"  # the same weights: no new version
    with torch.no_grad():
        model.head.bias.add_(1.0)
    assert log(["champion"]) == "2"
    client = tracker.client
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(name, "champion-rot30-split0").version) == "1"
    versions = client.search_model_versions(f"name = '{name}'")
    assert len({v.tags["weights_sha256"] for v in versions}) == len(versions) == 2
    assert {v.run_id for v in versions} == {tracker.parent_id}
    info = mlflow.models.get_model_info(f"models:/{name}@champion")
    assert info.signature.inputs.inputs[0].shape == (-1, 3, 16, 16)
    assert info.signature.outputs.inputs[0].shape == (-1, 3)
    assert info.saved_input_example_info is not None


def test_a_server_that_cannot_start_is_one_error_carrying_its_log(tmp_path):
    with (
        pytest.raises(RuntimeError, match="did not start(.|\n)*unsupported URI 'bogus://store'"),
        mlflow_server("bogus://store", tmp_path),
    ):
        pass


def test_artifacts_live_beside_their_store_never_in_the_working_directory(tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"  # stands for a Ray Jobs runtime-env folder
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    stores = [tmp_path / "a", tmp_path / "b"]
    for store in stores:
        tracker = Tracker("same-name", f"sqlite:///{store / 'mlflow.db'}")
        assert tracker.experiment_id == "1"  # the same id in both stores
        run_id = tracker._create_run("r", {})
        tracker.client.log_text(run_id, store.name, "which.txt")
    for store in stores:
        (written,) = (store / "mlruns" / "same-name").glob("*/artifacts/which.txt")
        assert written.read_text() == store.name  # each store kept its own artifact
    assert list(workdir.iterdir()) == []
