"""Tracker.log_analysis: the claims table and the cross-cell figures reach MLflow."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from matplotlib.figure import Figure

from ratatouille.tracking.store import Tracker
from tiny import tiny_config


@pytest.fixture
def tracker(tmp_path):
    config = tiny_config(tmp_path)
    tracker = Tracker("analysed", config.tracking.mlflow_uri, entry_point="ratatouille run")
    tracker.start_parent(str(tmp_path / "run-1"), config.model_dump(mode="json"))
    return tracker


def _artifacts(tracker: Tracker, run_id: str, path: str = "") -> set[str]:
    return {f.path for f in tracker.client.list_artifacts(run_id, path)}


def test_claims_table_lands_on_reducer_and_parent_and_figures_on_the_parent(tracker):
    claims = pd.DataFrame({"claim": ["a_diversity"], "verdict": ["held"], "value": [0.15]})
    run_id, _ = tracker.log_reduction({"claims/a_diversity/held": 1.0}, claims, {}, {})
    figure = Figure()
    figure.subplots().plot([0, 1], [0, 1])
    tracker.log_analysis(run_id, {"claims": claims}, {"all_cells_strategies": figure})
    tracker.log_analysis(run_id, {"claims": claims}, {})  # again: replaced, not appended
    for target in (run_id, tracker.parent_id):
        assert {"claims.json", "claims.csv"} <= _artifacts(tracker, target)
        table = tracker.client.load_table(tracker.experiment_id, "claims.json", run_ids=[target])
        assert list(table.verdict) == ["held"] and table.value.iloc[0] == pytest.approx(0.15)
    assert _artifacts(tracker, tracker.parent_id, "figures") == {"figures/all_cells_strategies.png"}
    run = tracker.client.get_run(tracker.parent_id)
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/claims.csv")
    assert text.splitlines()[0] == "claim,verdict,value"
