"""Real `ratatouille run` processes: stopped by a signal, resumed; two at once on one machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tiny import tiny_config

pytestmark = pytest.mark.ray
# Long enough that a target trial is still training when the test looks (at 100 steps, once
# Adam ran fused, a whole run could finish between two polls).
SLOW_TARGET = {"arms": ["soups"], "n_runs": 2, "steps": 400, "checkpoint_freq": 10}


def _config_file(root: Path, name: str, **sections) -> Path:
    config = tiny_config(root, name=name, aux={"tasks": []}, **sections)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def _start(path: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "ratatouille.cli.main", "run", str(path), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=path.parent,
    )


def _runs(root: Path, name: str):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []
    return client, runs


def _wait_for_a_training_target_trial(root: Path, name: str, process) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        client, runs = _runs(root, name)
        for run in runs:
            if (
                run.data.tags.get("stage") == "target"
                and run.info.status == "RUNNING"
                and (client.get_metric_history(run.info.run_id, "id_val_acc"))
            ):
                return
        time.sleep(0.5)
    raise AssertionError(f"no target trial trained before the deadline: {process.poll()}")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_leaves_no_run_running_and_resume_finishes_it(tmp_path, stop):
    path = _config_file(tmp_path, "stopped", target=SLOW_TARGET)
    process = _start(path)
    _wait_for_a_training_target_trial(tmp_path, "stopped", process)
    process.send_signal(stop)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 130, err[-3000:]
    assert "--resume" in err
    _, runs = _runs(tmp_path, "stopped")
    statuses = {r.info.run_id: r.info.status for r in runs}
    assert "RUNNING" not in statuses.values()
    (parent,) = [r for r in runs if r.data.tags.get("ratatouille.role") == "parent"]
    assert parent.info.status == "KILLED"
    assert any(
        r.info.status == "KILLED" for r in runs if r.data.tags.get("stage") == "target"
    )  # the trial that was training when the signal came
    if stop == signal.SIGINT:
        return  # resuming is the same after either signal; do it once
    resumed = _start(path, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    client, runs = _runs(tmp_path, "stopped")
    assert [r.info.status for r in runs if r.info.run_id == parent.info.run_id] == ["FINISHED"]
    targets = [r for r in runs if r.data.tags.get("stage") == "target"]
    assert sorted(r.data.params["run"] for r in targets) == ["0", "1"]
    for run in targets:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "id_val_acc")]
        last = SLOW_TARGET["steps"] - 1  # every checkpoint_freq steps, and the last one
        assert steps == [*range(0, last + 1, 10), last] and run.info.status == "FINISHED"
    assert "soup_uniform" in out


def test_two_runs_on_one_machine_each_start_their_own_ray_and_both_finish(tmp_path):
    small = {"arms": ["soups"], "n_runs": 2}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = _start(_config_file(tmp_path / "a", "first", target=small))
    time.sleep(3)  # the first one's Ray is up when the second one starts
    second = _start(_config_file(tmp_path / "b", "second", target=small))
    outputs = [process.communicate(timeout=600) for process in (first, second)]
    for process, (out, err) in zip((first, second), outputs):
        assert process.returncode == 0, err[-3000:]
        assert "ray: started a local Ray for this run" in err
        assert "soup_uniform" in out
