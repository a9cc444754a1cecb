"""A set but unusable RAY_ADDRESS is refused in seconds, before Ray or MLflow start (issue 18):
`ray.init` would retry an unreachable GCS for minutes."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ratatouille.orchestration.search import (
    RayEndpoint,
    RayUnreachable,
    check_ray_address,
    probe_endpoint,
    ray_endpoint,
)

REPO = Path(__file__).resolve().parents[1]
RATATOUILLE = str(Path(sys.executable).with_name("ratatouille"))


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def listener():
    """Something accepting TCP connections on loopback (not Ray)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.1.2.3:6380", RayEndpoint("", "10.1.2.3", 6380)),
        ("head-node", RayEndpoint("", "head-node", 6379)),
        ("ray://head:10002", RayEndpoint("ray", "head", 10002)),
        ("ray://head", RayEndpoint("ray", "head", 10001)),
        ("http://head:8265", RayEndpoint("http", "head", 8265)),
        ("HTTPS://head", RayEndpoint("https", "head", 443)),
        ("[::1]:6379", RayEndpoint("", "::1", 6379)),
    ],
)
def test_each_form_of_address_names_its_host_and_port(address, expected):
    assert ray_endpoint(address) == expected


@pytest.mark.parametrize("address", ["auto", "local", " AUTO "])
def test_addresses_ray_resolves_itself_are_not_probed(address):
    assert ray_endpoint(address) is None
    check_ray_address({"RAY_ADDRESS": address})  # no error, no network


@pytest.mark.parametrize("address", ["ftp://head:1", "head:port", "ray://", "head:99999"])
def test_a_malformed_address_names_the_forms_ray_takes(address):
    with pytest.raises(RayUnreachable, match="RAY_ADDRESS=.*(not an address|no valid host)"):
        ray_endpoint(address)


def test_no_address_means_a_local_ray_and_no_check():
    check_ray_address({})


@pytest.mark.parametrize("scheme", ["", "ray://", "http://"])
def test_nothing_listening_is_refused_naming_the_address(scheme):
    address = f"{scheme}127.0.0.1:{_closed_port()}"
    with pytest.raises(RayUnreachable) as refused:
        check_ray_address({"RAY_ADDRESS": address})
    message = str(refused.value)
    assert f"RAY_ADDRESS={address}" in message and "Connection refused" in message
    assert "unset RAY_ADDRESS" in message


def test_an_unresolvable_host_is_refused_within_the_deadline():
    started = time.monotonic()
    with pytest.raises(RayUnreachable, match="no-such-host.invalid does not resolve|did not"):
        check_ray_address({"RAY_ADDRESS": "no-such-host.invalid:6379"})
    assert time.monotonic() - started < 15


def test_a_dashboard_url_that_answers_is_refused_with_the_jobs_command(listener):
    address = f"http://127.0.0.1:{listener}"
    with pytest.raises(RayUnreachable, match="ray job submit --address http://127.0.0.1"):
        check_ray_address({"RAY_ADDRESS": address})


def test_a_gcs_address_that_answers_passes_the_check(listener):
    probe_endpoint(RayEndpoint("", "127.0.0.1", listener))
    check_ray_address({"RAY_ADDRESS": f"127.0.0.1:{listener}"})


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:{port}",
        "no-such-host.invalid:6379",
        "ray://127.0.0.1:{port}",
        "http://127.0.0.1:{port}",
    ],
)
def test_ratatouille_run_exits_2_in_seconds_with_nothing_started(address, tmp_path):
    address = address.format(port=_closed_port())
    env = {
        **os.environ,
        "RAY_ADDRESS": address,
        "RAY_TMPDIR": str(tmp_path / "ray-tmp"),  # a Ray that started would write here
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # the quickstart's store: ./mlflow.db in the cwd
    config = REPO / "experiments" / "quickstart.yaml"
    started = time.monotonic()
    done = subprocess.run(
        [RATATOUILLE, "run", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert elapsed < 15
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: RAY_ADDRESS={address}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no Ray, no MLflow store, no runs
