"""Default and relative local stores never resolve inside a folder Ray owns (Ray Jobs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratatouille.core.config import parse_config
from ratatouille.orchestration.search import storage_root
from ratatouille.tracking.store import resolve_tracking_uri


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))
    return home


def _config(tracking=None):
    raw = {"name": "x", "data": {"dataset": "digits"}, "target": {"arms": ["soups"]}}
    return parse_config({**raw, "tracking": tracking or {}})


@pytest.mark.parametrize(
    "workdir",
    [
        # what `ray job submit --working-dir .` gives the driver
        "raytmp/session_2026-11-26_10-00-00_1/runtime_resources/working_dir_files/_ray_pkg_ab12",
        # runtime-env folders kept elsewhere (ray start --temp-dir=...)
        "elsewhere/session_1/runtime_resources/working_dir_files/_ray_pkg_cd34",
        "raytmp/session_latest",  # anywhere else in Ray's temp dir
    ],
)
def test_inside_a_ray_folder_stores_go_under_home(tmp_path, home, monkeypatch, workdir):
    folder = tmp_path / workdir
    folder.mkdir(parents=True)
    monkeypatch.chdir(folder)
    stable = home / "ratatouille"
    assert resolve_tracking_uri() == f"sqlite:///{stable / 'mlflow.db'}"
    assert resolve_tracking_uri("runs.db") == f"sqlite:///{stable / 'runs.db'}"
    assert storage_root(_config()) == str(stable / "ray_results")
    assert storage_root(_config({"storage_path": "sweeps"})) == str(stable / "sweeps")


def test_on_a_laptop_stores_sit_beside_the_checkout(tmp_path, home, monkeypatch):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    assert resolve_tracking_uri() == f"sqlite:///{checkout / 'mlflow.db'}"
    assert storage_root(_config()) == str(checkout / "ray_results")
    absolute = tmp_path / "shared" / "runs"
    assert storage_root(_config({"storage_path": str(absolute)})) == str(absolute)
    assert storage_root(_config({"storage_path": "s3://bucket/runs/"})) == "s3://bucket/runs"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert Path(resolve_tracking_uri("~/x.db").removeprefix("sqlite:///")) == home / "x.db"


def test_a_store_some_node_cannot_see_is_named_with_those_nodes():
    from ratatouille.orchestration.search import blind_fields

    probes = {"tracking.storage_path": "/runs/p", "tracking.pool_path": "/runs/pool/p"}
    seen = {
        "10.0.0.1 (head)": [True, True],
        "10.0.0.2 (gpu-1)": [False, True],
        "10.0.0.3 (gpu-2)": [False, False],
    }
    assert blind_fields(probes, seen) == {
        "tracking.storage_path": ["10.0.0.2 (gpu-1)", "10.0.0.3 (gpu-2)"],
        "tracking.pool_path": ["10.0.0.3 (gpu-2)"],
    }
    assert blind_fields(probes, {"a": [True, True], "b": [True, True]}) == {}


def test_only_tunes_storage_must_be_shared_a_head_local_pool_is_fine(tmp_path):
    from ratatouille.orchestration.pipeline import stores_workers_use
    from tiny import tiny_config

    config = tiny_config(tmp_path)
    config.tracking.pool_path = "/home/ubuntu/ratatouille-pool"  # the head's own disk
    assert stores_workers_use(config) == {"tracking.storage_path": str(tmp_path / "ray_results")}
