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


def _segments(rows: list[dict]) -> list[list[dict]]:
    """A trial's reports, split where Tune restored it (iterations_since_restore restarts)."""
    segments: list[list[dict]] = []
    for row in rows:
        if (
            not segments
            or row["iterations_since_restore"] <= segments[-1][-1]["iterations_since_restore"]
        ):
            segments.append([])
        segments[-1].append(row)
    return segments


def _check_resumed_from_last_snapshot(rows: list[dict], every_s: float, freq: int) -> int:
    """Each restore resumed right after the last snapshot stored before it, redid at most one
    snapshot interval of training, and redid it exactly (same losses and ID-val accuracies);
    returns how many restores had their snapshot in the segment the node loss cut."""
    segments, bounded = _segments(rows), 0
    for index in range(1, len(segments)):
        before = [row for segment in segments[:index] for row in segment]
        snapshots = [row for row in before if row["checkpoint_dir_name"]]
        assert snapshots, "a trial lost after its first snapshot restarts from it, not step 0"
        last = snapshots[-1]
        assert segments[index][0]["step"] == last["step"] + freq  # from its last snapshot
        if last in segments[index - 1]:
            lost = segments[index - 1][-1]["time_total_s"] - last["time_total_s"]
            assert lost <= every_s + 2.0, f"{lost:.2f} s of training redone"  # + upload, slack
            bounded += 1
        redone = {row["step"]: row for row in before if row["step"] > last["step"]}
        for row in segments[index]:
            if row["step"] in redone:  # a resumed trial trains exactly what it trained before
                assert row["loss"] == redone[row["step"]]["loss"]
                assert row["id_val_acc"] == redone[row["step"]]["id_val_acc"]
    return bounded


def test_a_lost_node_costs_each_trial_at_most_one_snapshot_interval(tmp_path):
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
    freq = summary["checkpoint_freq"]
    total_steps = summary["steps"]
    every_eval = [*range(0, total_steps, freq), total_steps - 1]
    for run in targets:
        assert run["mlflow_steps"] == every_eval  # each step once, even if trained twice
    for steps in summary["tune_steps"].values():
        assert steps.count(0) == 1  # restarted from a snapshot, never from scratch
    bounded = 0
    for rows in summary["tune_rows"].values():
        bounded += _check_resumed_from_last_snapshot(rows, summary["snapshot_every_s"], freq)
    assert bounded >= 1  # the trial whose second snapshot triggered the loss
    assert "soup_uniform" in summary["table"]
