"""Run by test_cluster.py in its own process: a tiny sweep on a two-node Ray cluster.

The head has CPUs only; the worker node has a (fake) GPU. Trials ask for half a GPU, so Ray must
place every one of them on the worker, with checkpoints in a storage folder both nodes share.
Prints a JSON summary on its last line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).parent))
from ratatouille.orchestration.pipeline import run_pipeline
from tiny import tiny_config


def main(root: Path) -> dict:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "object_store_memory": 150 * 1024**2,
        },
    )
    worker = cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=150 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    config = tiny_config(
        root,
        name="two-nodes",
        target={"arms": ["soups", "ratatouille"], "n_runs": 2},
        resources={"cpus_per_trial": 1, "gpus_per_trial": 0.5},
    )
    outcome = run_pipeline(config)
    client = MlflowClient(config.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name("two-nodes")
    trials = [
        run
        for run in client.search_runs(
            [experiment.experiment_id], f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'"
        )
        if run.data.tags.get("ratatouille.role") == "trial"
    ]
    summary = {
        "worker_node": worker.node_id,
        "head_node": cluster.head_node.node_id,
        "placements": [
            [
                run.data.tags["stage"],
                run.data.tags.get("ray.node_id"),
                run.data.tags.get("ray.gpu_ids"),
            ]
            for run in trials
        ],
        "table": outcome.table_markdown,
        "storage": config.tracking.storage_path,
    }
    ray.shutdown()
    cluster.shutdown()
    return summary


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
