"""`ray job submit --working-dir .` on a real two-node Ray cluster started with `ray start` on
loopback, with Ray 2.60's token authentication on: the whole recipe runs, and its MLflow store
and pool outlive the job's ephemeral working directory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from local_processes import free_port, stop_group

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    # --block keeps `ray start` in the foreground: the test ends exactly this node's processes
    # (its session), never others' (no `ray stop`, which ends every Ray on the machine).
    return subprocess.Popen(
        [RAY, "start", "--block", "--node-ip-address=127.0.0.1", *args],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _ray(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def cluster(tmp_path):
    """A head (1 CPU) and a worker (2 CPUs), each with its own temp dir and agent ports, token
    authentication on with a token in the (test's) home."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        # `python` in the job's entrypoint is this environment's, as on a provisioned cluster
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
    }
    # what a user's shell has: no cluster address, no store that an earlier test's
    # mlflow.set_tracking_uri left in this process's environment
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    assert _ray(env, "get-auth-token", "--generate").returncode == 0
    assert (home / ".ray" / "auth_token").is_file()
    gcs, dashboard = free_port(), free_port()
    # short temp dirs: Ray's socket paths under them must fit AF_UNIX's 107 bytes
    temp = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))
    nodes = [
        _node(
            [
                f"--port={gcs}",
                "--head",
                "--num-cpus=1",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--temp-dir={temp / 'head'}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}",
            ],
            env,
            tmp_path / "head.log",
        )
    ]
    try:
        # on a loaded machine the dashboard can take far longer than the GCS to listen
        _wait_listening(gcs, tmp_path / "head.log")
        _wait_listening(dashboard, tmp_path / "head.log")
        nodes.append(
            _node(
                [
                    f"--address=127.0.0.1:{gcs}",
                    "--num-cpus=2",
                    f"--temp-dir={temp / 'worker'}",
                    f"--dashboard-agent-listen-port={free_port()}",
                    f"--metrics-export-port={free_port()}",
                ],
                env,
                tmp_path / "worker.log",
            )
        )
        yield env, f"http://127.0.0.1:{dashboard}", home
    finally:
        for node in reversed(nodes):
            stop_group(node)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_listening(port: int, log: Path, timeout_s: float = 180.0) -> None:
    """Until something accepts TCP connections on 127.0.0.1:port (fails with the node's log)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(1)
    tail = log.read_text()[-3000:]
    pytest.fail(f"nothing listens on port {port} after {timeout_s:.0f} s; the node's log:\n{tail}")


def _submit(env: dict, address: str, home: Path) -> subprocess.CompletedProcess:
    runtime_env = {
        "env_vars": {
            "HOME": str(home),
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
        }
    }
    command = [
        "job",
        "submit",
        f"--address={address}",
        f"--working-dir={REPO}",
        f"--runtime-env-json={json.dumps(runtime_env)}",
        "--",
        "python",
        "experiments/submit.py",
        "experiments/quickstart.yaml",
        "--steps",
        "12",
        "--n-runs",
        "2",
    ]
    deadline = time.time() + 120
    while True:  # the job agent may not listen yet right after `ray start` on a loaded machine
        done = _ray(env, *command, timeout=900)
        agent_not_ready = "No available agent" in done.stdout + done.stderr
        if not agent_not_ready or time.time() > deadline:
            return done
        time.sleep(5)


def test_ray_job_submit_runs_the_recipe_and_keeps_its_stores(cluster):
    env, address, home = cluster
    done = _submit(env, address, home)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "succeeded" in output and "soup_uniform" in output
    assert "attached to the cluster at" in output  # the job's driver used the two-node cluster
    stable = home / "ratatouille"  # the working dir was Ray's: the stores went under home
    client = MlflowClient(f"sqlite:///{stable / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("ratatouille.role") == "parent"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ratatouille.run_dir"].startswith(str(stable / "ray_results"))
    assert [r for r in runs if r.data.tags.get("ratatouille.role") == "reducer"]
    manifest = json.loads((stable / "ray_results" / "pool" / "manifest.json").read_text())
    assert len(manifest["entries"]) == 6  # the quickstart's 3 auxiliary tasks x 2 runs
    nodes = {r.data.tags.get("ray.node_id") for r in runs if r.data.tags.get("stage")}
    assert len(nodes - {None}) == 2  # trials ran on both nodes
