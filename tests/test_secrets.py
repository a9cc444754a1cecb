"""No secret in a record: a sweep run with credentials and tokens in its environment leaves none
of them in the MLflow store (database, artifacts), the run folder (Tune's storage, the pool) or
its own output.

What runs: `python -m ratatouille.cli.main run tiny.yaml`, tests/tiny.py's sweep (every stage,
the soups/ratatouille/fusing arms, a few steps each), in a fresh process with its own local Ray,
so that the driver, Ray and every trial see the secrets as they would on a cluster node.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tiny import tiny_config

pytestmark = pytest.mark.ray

#: Each a unique random string: a hit can only come from this run's environment.
SECRET_NAMES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "RAY_AUTH_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "HF_TOKEN",
)
#: What ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE hands from the driver to trials.
RAY_TUNE_PROPAGATES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _payloads(path: Path) -> Iterator[tuple[str, bytes]]:
    """A file's bytes, and those of each member when it is a zip archive (a pt2 model, Ray's
    packed folders), whose members may be compressed."""
    data = path.read_bytes()
    yield str(path), data
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                yield f"{path}!{name}", archive.read(name)


def _leaks(root: Path, values: dict[str, str]) -> list[str]:
    needles = {name: value.encode() for name, value in values.items()}
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        for where, data in _payloads(path):
            found += [f"{name} in {where}" for name, needle in needles.items() if needle in data]
    return found


def _records(client: MlflowClient) -> Iterator[str]:
    """Every param, tag and metric key (and value) the MLflow API returns for the store."""
    for experiment in client.search_experiments():
        yield from (f"{k}={v}" for k, v in experiment.tags.items())
        for run in client.search_runs([experiment.experiment_id], max_results=1000):
            data = run.data
            yield from (f"{k}={v}" for k, v in {**data.params, **data.tags}.items())
            yield from (f"{k}={v}" for k, v in data.metrics.items())
            yield run.info.run_name or ""
        for model in client.search_logged_models([experiment.experiment_id]):
            yield from (f"{k}={v}" for k, v in {**model.tags, **model.params}.items())
    for registered in client.search_registered_models():
        yield from (f"{k}={v}" for k, v in registered.tags.items())
        for version in client.search_model_versions(f"name = '{registered.name}'"):
            yield from (f"{k}={v}" for k, v in version.tags.items())
            yield version.description or ""


def test_a_sweep_with_secrets_in_its_environment_records_none_of_them(tmp_path):
    config = tiny_config(tmp_path, name="secrets")
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    values = {name: f"{name.lower()}-{secrets.token_hex(12)}" for name in SECRET_NAMES}
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: Ray's socket paths
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
        **values,
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "MLFLOW_TRACKING_USERNAME": "someone",
        "RAY_AUTH_MODE": "token",  # the cluster's mode: every Ray connection carries the token
        "RAY_TMPDIR": str(ray_tmp),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ratatouille.cli.main", "run", str(config_path)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        client = MlflowClient(config.tracking.mlflow_uri)
        (parent,) = client.search_runs(
            [client.get_experiment_by_name("secrets").experiment_id],
            "tags.`ratatouille.role` = 'parent'",
        )
        assert parent.info.status == "FINISHED"
        assert client.search_model_versions("name = 'secrets-ratatouille'")  # the whole pipeline
        records = list(_records(client))
        assert len(records) > 100
        hits = [f"{n} in record {r!r}" for r in records for n, v in values.items() if v in r]
        # the store's files (database, artifacts), the run folder (Tune's storage, the pool),
        # and everything the command printed (its log lines, Tune's tables)
        hits += _leaks(tmp_path, values)
        hits += [f"{n} in the output" for n, v in values.items() if v in done.stdout + done.stderr]
        assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "ray_results").is_dir()
        assert not hits, "\n".join(hits)
        # Ray's own logs are not the product's records, but no token or password is in them
        # either. Ray Tune itself copies the driver's AWS_* keys into each trial's runtime_env,
        # which Ray's runtime-env agent logs (docs/cluster.md, "Who can reach what").
        in_ray_logs = [
            hit
            for hit in _leaks(ray_tmp, values)
            if not (hit.startswith(RAY_TUNE_PROPAGATES) and "runtime_env_agent.log" in hit)
        ]
        assert not in_ray_logs, "\n".join(in_ray_logs)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_scan_finds_a_secret_wherever_a_record_could_hide_it(tmp_path):
    """The scan above has teeth: a secret in a tag, a param, a metric key, a compressed archive
    member and a plain file is found, in the API's records and in the store's files."""
    value = secrets.token_hex(12)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment).info.run_id
    client.set_tag(run, "env", f"X={value}")
    client.log_param(run, "p", value)
    client.log_metric(run, f"m_{value}", 1.0)
    with zipfile.ZipFile(tmp_path / "packed.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("inner.txt", value * 3)
    (tmp_path / "plain.log").write_text(f"token={value}\n")
    records = [r for r in _records(client) if value in r]
    assert len(records) == 3
    where = {hit.split(" in ", 1)[1] for hit in _leaks(tmp_path, {"S": value})}
    assert str(tmp_path / "mlflow.db") in where
    assert f"{tmp_path / 'packed.zip'}!inner.txt" in where
    assert str(tmp_path / "plain.log") in where
