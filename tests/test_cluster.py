"""The same sweep on a real two-node Ray cluster (ray.cluster_utils) with shared storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray


def _run_cluster_script(name: str, root: Path) -> dict:
    """Run a script that drives its own ray.cluster_utils cluster, in its own process (this
    session's Ray is already initialised for the other tests); its JSON summary."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    script = Path(__file__).with_name(name)
    done = subprocess.run(
        [sys.executable, str(script), str(root)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sweep_on_two_nodes_places_gpu_trials_on_the_gpu_worker(tmp_path):
    summary = _run_cluster_script("two_node_sweep.py", tmp_path)
    stages = Counter(stage for stage, _, _ in summary["placements"])
    assert stages == {"pretrain": 1, "aux": 2, "probe": 1, "target": 4}
    for stage, node, gpus in summary["placements"]:
        assert node == summary["worker_node"], f"{stage} trial ran on {node}"
        assert gpus == "0"  # the worker's only GPU, shared by two half-GPU trials
    assert summary["worker_node"] != summary["head_node"]
    checkpoints = list(Path(summary["storage"]).glob("two-nodes/run-*/target/*/checkpoint_*"))
    assert len(checkpoints) == 4  # one best checkpoint per target trial, in the shared folder
    assert "ratatouille_uniform" in summary["table"]


def test_a_lost_node_costs_each_trial_at_most_one_evaluation(tmp_path):
    script = Path(__file__).with_name("node_loss_sweep.py")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert "new_node" in summary, "the worker was never removed: the target stage ended first"
    targets = summary["target_runs"]
    assert sorted(r["run"] for r in targets) == ["0", "1"]  # one child run per trial, no more
    assert all(r["status"] == "FINISHED" for r in targets)
    assert all(r["node"] == summary["new_node"] for r in targets)  # finished on the fresh node
    assert any(int(r["restarts"]) >= 1 for r in targets)
    every_eval = [*range(0, 60, 5), 59]
    for run in targets:
        assert run["mlflow_steps"] == every_eval  # each step once, even if trained twice
    for steps in summary["tune_steps"].values():
        assert steps.count(0) == 1  # restarted from a checkpoint, never from scratch
        repeated = [step for step in set(steps) if steps.count(step) > 1]
        assert len(repeated) <= 1  # at most the evaluation in flight when the node died
    assert "soup_uniform" in summary["table"]
