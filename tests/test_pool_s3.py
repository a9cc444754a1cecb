"""The pool on object storage: a real S3 API (moto's standalone server) on 127.0.0.1.

The server runs as a subprocess for this module and is stopped in every outcome. Every address
the tests reach is 127.0.0.1: the endpoint comes from AWS_ENDPOINT_URL, credentials from the
environment, and the EC2 metadata lookup is switched off.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs
import pytest
import timm
import torch
from safetensors.torch import save_file

from local_processes import free_port
from ratatouille.cli.main import main
from ratatouille.core.names import PRETRAINED, MetricKey, WeightsFile
from ratatouille.orchestration.pipeline import _pretrained, pool_path
from ratatouille.orchestration.search import TrialOutcome
from ratatouille.pool.files import sibling_location
from ratatouille.pool.store import Pool, PoolError, import_weights
from ratatouille.recipe.sweep import pretrain_spec, pretrained_identity
from tiny import tiny_config

ARCH = "test_resnet"
BUCKET = "ratatouille-test"
torch.set_num_threads(1)


def _wait_for(port: int, server: subprocess.Popen[bytes], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moto server exited with code {server.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"moto server did not listen on 127.0.0.1:{port} in {seconds} s")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """``127.0.0.1:PORT`` of a moto S3 server holding the bucket BUCKET."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(port, server)
        endpoint = f"127.0.0.1:{port}"
        _s3(endpoint, allow_bucket_creation=True).create_dir(BUCKET)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _s3(endpoint: str, **options: bool) -> pafs.S3FileSystem:
    """A direct handle on the server, to look at or tamper with objects behind the pool."""
    return pafs.S3FileSystem(
        endpoint_override=endpoint,
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        **options,
    )


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> pafs.S3FileSystem:
    """The standard AWS variables point every ``s3://`` URI at the loopback server."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://{s3_endpoint}",
        "AWS_ENDPOINT_URL_S3": f"http://{s3_endpoint}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    return _s3(s3_endpoint)


@pytest.fixture
def prefix() -> str:
    """A fresh folder in the bucket for each test."""
    return f"{BUCKET}/{uuid.uuid4().hex[:12]}"


def featurizer_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, num_classes=0).state_dict()


@pytest.fixture(scope="module")
def phi_a() -> dict[str, torch.Tensor]:
    return featurizer_state(1)


@pytest.fixture(scope="module")
def phi_b() -> dict[str, torch.Tensor]:
    return featurizer_state(2)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    assert all(torch.equal(got[key], value) for key, value in want.items())


def _read(s3: pafs.S3FileSystem, path: str) -> bytes:
    with s3.open_input_stream(path) as stream:
        return bytes(stream.readall())


def test_add_list_load_verify_roundtrip_on_s3(s3, prefix, phi_a, phi_b):
    uri = f"s3://{prefix}/pool"
    pool = Pool(uri)
    assert pool.root == uri and not pool.exists() and pool.entries() == []
    pool.add("zeta", phi_b, source_task="vlcs", arch=ARCH)
    alpha = pool.add("alpha", phi_a, source_task="pacs", arch=ARCH, id_val_acc=0.875, robust=True)

    assert [e.name for e in pool.entries()] == ["alpha", "zeta"] and "alpha" in pool
    manifest = json.loads(_read(s3, f"{prefix}/pool/manifest.json"))
    assert manifest["version"] == 1
    by_name = {item["name"]: item for item in manifest["entries"]}
    raw = _read(s3, f"{prefix}/pool/alpha.safetensors")
    assert by_name["alpha"]["sha256"] == alpha.sha256 == hashlib.sha256(raw).hexdigest()
    assert_same_tensors(pool.load("alpha", expected_arch=ARCH), phi_a)
    assert_same_tensors(Pool(uri + "/").load("zeta"), phi_b)  # a fresh handle reads the manifest
    assert pool.verify() == [("alpha", None), ("zeta", None)]
    with pytest.raises(PoolError, match="already has an entry 'alpha'"):
        pool.add("alpha", phi_b, source_task="pacs", arch=ARCH)


def test_tampered_object_is_refused_on_load_and_reported_by_verify(s3, prefix, phi_a, phi_b):
    pool = Pool(f"s3://{prefix}")
    pool.add("good", phi_a, source_task="pacs", arch=ARCH)
    pool.add("bad", phi_b, source_task="pacs", arch=ARCH)
    raw = bytearray(_read(s3, f"{prefix}/bad.safetensors"))
    raw[-3] ^= 0xFF  # one byte of one weight: still a valid safetensors file
    with s3.open_output_stream(f"{prefix}/bad.safetensors") as stream:
        stream.write(bytes(raw))

    with pytest.raises(PoolError, match=r"'bad'.*sha256.*s3://.*ratatouille pool verify"):
        pool.load("bad")
    report = dict(pool.verify())
    assert report["good"] is None and "sha256" in report["bad"]
    s3.delete_file(f"{prefix}/bad.safetensors")
    assert "missing" in dict(pool.verify())["bad"]


def test_a_pickle_is_refused_before_anything_reaches_the_bucket(s3, prefix, tmp_path, phi_a):
    torch.save(phi_a, tmp_path / "w.pt")
    pool = Pool(f"s3://{prefix}/pool")
    with pytest.raises(PoolError, match="--trust-pickle"):
        import_weights(tmp_path / "w.pt", pool, name="a", arch=ARCH)
    assert not pool.exists()
    assert s3.get_file_info(pafs.FileSelector(prefix, allow_not_found=True)) == []
    import_weights(tmp_path / "w.pt", pool, name="a", arch=ARCH, trust_pickle=True)
    assert_same_tensors(pool.load("a"), phi_a)  # read back with weights_only, stored as safetensors


def test_two_pools_on_one_uri_see_each_others_entries(s3, prefix, phi_a, phi_b):
    first, second = Pool(f"s3://{prefix}/pool"), Pool(f"s3://{prefix}/pool")
    first.add("a", phi_a, source_task="pacs", arch=ARCH)
    second.add("b", phi_b, source_task="vlcs", arch=ARCH)  # re-reads the manifest: keeps "a"
    assert [e.name for e in first.entries()] == ["a", "b"] == [e.name for e in second.entries()]
    assert_same_tensors(first.load("b"), phi_b)


def test_an_unreachable_bucket_is_a_pool_error_that_says_where(s3, phi_a):
    pool = Pool("s3://no-such-bucket-here/pool")
    with pytest.raises(PoolError, match=r"cannot reach pool s3://no-such-bucket-here/pool"):
        pool.add("a", phi_a, source_task="pacs", arch=ARCH)


def test_pool_path_takes_an_s3_uri_with_local_or_s3_storage(tmp_path):
    local = tiny_config(tmp_path, tracking={"pool_path": "s3://bucket/team/pool/"})
    assert pool_path(local) == "s3://bucket/team/pool"
    remote = tiny_config(tmp_path, tracking={"storage_path": "s3://bucket/ray"})
    assert pool_path(remote) == "s3://bucket/ray/pool"  # beside Tune's results, as when local
    both = tiny_config(
        tmp_path, tracking={"storage_path": "s3://bucket/ray", "pool_path": "s3://other/pool"}
    )
    assert pool_path(both) == "s3://other/pool"
    assert pool_path(tiny_config(tmp_path)) == str(tmp_path / "ray_results" / "pool")
    # phi_pt's pool sits beside the auxiliary pool; a URI keeps its query options
    assert sibling_location(pool_path(local), "pretrained") == "s3://bucket/team/pretrained"
    query = "s3://b/pool?endpoint_override=127.0.0.1:9000&scheme=http"
    assert sibling_location(query, "pretrained") == (
        "s3://b/pretrained?endpoint_override=127.0.0.1:9000&scheme=http"
    )


def test_cli_lists_verifies_and_imports_an_s3_pool(s3, prefix, tmp_path, capsys, phi_a):
    uri = f"s3://{prefix}/pool"
    assert main(["pool", "list", "--pool", uri]) == 2  # no pool yet: bad input
    assert f"no pool at {uri}" in capsys.readouterr().err
    save_file(phi_a, tmp_path / "w.safetensors")
    argv = ["pool", "import", str(tmp_path / "w.safetensors"), "--pool", uri, "--name", "comm"]
    assert main([*argv, "--arch", ARCH]) == 0, capsys.readouterr().err
    assert uri in capsys.readouterr().out

    assert main(["pool", "list", "--pool", uri]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:3] == ["comm", "imported", ARCH]
    assert f"1 entries in {uri}" in out
    assert main(["pool", "verify", "--pool", uri]) == 0
    assert "1/1 entries ok" in capsys.readouterr().out


class _PretrainOnce:
    """A StageRunner stand-in: the pretrain stage 'trains' by returning a checkpoint folder."""

    def __init__(self, folder, state: dict[str, torch.Tensor]) -> None:
        from ray import tune

        save_file(state, folder / WeightsFile.FEATURIZER.filename)
        self.checkpoint = tune.Checkpoint.from_directory(str(folder))
        self.calls = 0

    def run(self, stage, specs, context):
        self.calls += 1
        metrics = {MetricKey.FINAL_ID_VAL_ACC.value: 0.75}
        return [TrialOutcome(specs[0], metrics, self.checkpoint)]


def test_pretrained_phi_pt_is_kept_in_an_s3_pool_beside_the_auxiliary_pool(
    s3, prefix, tmp_path, phi_a
):
    config = tiny_config(tmp_path, tracking={"pool_path": f"s3://{prefix}/pool"})
    assert pretrain_spec(config) is not None
    runner = _PretrainOnce(tmp_path, phi_a)
    assert_same_tensors(_pretrained(config, runner)[PRETRAINED], phi_a)
    assert_same_tensors(_pretrained(config, runner)[PRETRAINED], phi_a)
    assert runner.calls == 1  # the second experiment reuses phi_pt from the bucket
    entry = Pool(f"s3://{prefix}/pretrained").get(pretrained_identity(config))
    assert (entry.source_task, entry.id_val_acc) == ("digits_t0", 0.75)
