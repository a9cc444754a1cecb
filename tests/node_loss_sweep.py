"""Run by test_cluster.py in its own process: the worker node dies while target trials run.

The head has no CPU, so every trial runs on the worker. Trials snapshot on a time budget
(resources.snapshot_every_s, here SNAPSHOT_EVERY_S) while evaluating every checkpoint_freq
steps. As soon as every target trial has stored its second snapshot, the worker node is removed
(as a preempted cloud node is) and a fresh one is added. Prints a JSON summary on its last line,
with every Tune report of every target trial (progress.csv), so the test can check from where
each restarted trial resumed.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import ray
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).parent))
from ratatouille.orchestration.pipeline import run_pipeline
from tiny import tiny_config

NODE = {"object_store_memory": 150 * 1024**2}
SNAPSHOT_EVERY_S = 0.3
CHECKPOINT_FREQ = 5
# long enough (about 7 s of training each on 2 cores) that neither trial can finish before the
# other has stored its second snapshot, whatever the skew of their actors' start (at 80 steps,
# 2 s each, one trial once finished on the old node before the removal)
STEPS = 300
N_TARGETS = 2  # target.n_runs x one arm
TUNE_COLUMNS = [
    "step",
    "checkpoint_dir_name",
    "iterations_since_restore",
    "time_total_s",
    "id_val_acc",
    "loss",
]


def _every_target_has_two_snapshots(target_dir: Path) -> bool:
    """A trial's second snapshot on storage means the driver has long processed the report of
    its first, so a restore has a known point to resume from. Waiting for one trial only (as
    this once did) let a slow machine remove the node before the other trial's first snapshot,
    which then restarted from step 0."""
    trials = list(target_dir.glob("target_*"))
    return len(trials) == N_TARGETS and all(
        (trial / "checkpoint_000001" / "train_state.json").exists() for trial in trials
    )


def _replace_worker_when_targets_checkpointed(cluster, worker, target_dir: Path, log: dict):
    """Once every target trial has stored its second snapshot, the worker node dies (as a
    preempted node does) and, 2 s later, a fresh one joins. Progress goes to stderr, which
    the test shows when it fails."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if _every_target_has_two_snapshots(target_dir):
            print("removing the worker node", file=sys.stderr, flush=True)
            cluster.remove_node(worker)
            time.sleep(2)
            log["new_node"] = cluster.add_node(num_cpus=2, **NODE).node_id
            print(f"added node {log['new_node']}", file=sys.stderr, flush=True)
            return
        time.sleep(0.1)


def main(root: Path) -> dict:
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **NODE}
    )
    worker = cluster.add_node(num_cpus=2, **NODE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    config = tiny_config(
        root,
        name="node-loss",
        aux={"tasks": []},
        target={
            "arms": ["soups"],
            "n_runs": N_TARGETS,
            "steps": STEPS,
            "checkpoint_freq": CHECKPOINT_FREQ,
        },
        resources={"cpus_per_trial": 1, "max_failures": 3, "snapshot_every_s": SNAPSHOT_EVERY_S},
    )
    log: dict = {"lost_node": worker.node_id}
    run_dir_glob = Path(config.tracking.storage_path, "node-loss")
    # The driver in a thread: Ray adds nodes from the main thread only (signal handlers).
    outcomes: list = []
    driver = threading.Thread(target=lambda: outcomes.append(run_pipeline(config)), daemon=True)
    driver.start()
    _watch(run_dir_glob, cluster, worker, log)
    driver.join(timeout=400)
    (outcome,) = outcomes
    client = MlflowClient(config.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name("node-loss")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'"
    )
    targets = [r for r in runs if r.data.tags.get("stage") == "target"]
    run_dir = next(run_dir_glob.glob("run-*"))
    progress, rows = {}, {}
    for path in (run_dir / "target").glob("target_*/progress.csv"):
        run = path.parent.name.split("_")[3]
        table = pd.read_csv(path)
        progress[run] = table.step.dropna().astype(int).tolist()
        reports = table[table.step.notna()][TUNE_COLUMNS]
        rows[run] = json.loads(reports.to_json(orient="records"))
    summary = {
        **log,
        "target_runs": [
            {
                "run": r.data.params["run"],
                "restarts": r.data.tags.get("ray.restarts", "0"),
                "node": r.data.tags.get("ray.node_id"),
                "status": r.info.status,
                "mlflow_steps": [
                    m.step for m in client.get_metric_history(r.info.run_id, "id_val_acc")
                ],
            }
            for r in targets
        ],
        "tune_steps": progress,
        "tune_rows": rows,
        "snapshot_every_s": SNAPSHOT_EVERY_S,
        "checkpoint_freq": CHECKPOINT_FREQ,
        "steps": STEPS,
        "table": outcome.table_markdown,
    }
    ray.shutdown()
    cluster.shutdown()
    return summary


def _watch(run_dir_glob: Path, cluster, worker, log: dict) -> None:
    """The run folder appears once the driver opens the run; then watch its target stage."""
    deadline = time.time() + 300
    while time.time() < deadline:
        run_dir = next(run_dir_glob.glob("run-*"), None)
        if run_dir is not None:
            _replace_worker_when_targets_checkpointed(cluster, worker, run_dir / "target", log)
            return
        time.sleep(0.1)


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
