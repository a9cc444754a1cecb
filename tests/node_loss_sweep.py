"""Run by test_cluster.py in its own process: the worker node dies while target trials run.

The head has no CPU, so every trial runs on the worker. As soon as the target trials have
checkpointed a few evaluations, the worker node is removed (as a preempted cloud node is) and a
fresh one is added. Prints a JSON summary on its last line.
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


def _replace_worker_when_targets_checkpointed(cluster, worker, target_dir: Path, log: dict):
    """Once a target trial has checkpointed its third evaluation, the worker node dies (as a
    preempted node does) and, 2 s later, a fresh one joins. Progress goes to stderr, which
    the test shows when it fails."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if any(target_dir.glob("target_*/checkpoint_000002")):
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
        target={"arms": ["soups"], "n_runs": 2, "steps": 60, "checkpoint_freq": 5},
        resources={"cpus_per_trial": 1, "max_failures": 3},
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
    progress = {
        path.parent.name.split("_")[3]: pd.read_csv(path).step.dropna().astype(int).tolist()
        for path in (run_dir / "target").glob("target_*/progress.csv")
    }
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
