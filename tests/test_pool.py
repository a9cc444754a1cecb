"""The auxiliary pool: manifest, hashes, shape checks, safe import, balanced sampling, CLI."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from ratatouille.cli.main import main
from ratatouille.pool.store import (
    Pool,
    PoolError,
    import_weights,
    incompatibilities,
)

ARCH = "test_resnet"
torch.set_num_threads(1)


def featurizer_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, num_classes=0).state_dict()


def full_model_state(seed: int, num_classes: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, num_classes=num_classes).state_dict()


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def phi_a() -> dict[str, torch.Tensor]:
    return featurizer_state(1)


@pytest.fixture(scope="module")
def phi_b() -> dict[str, torch.Tensor]:
    return featurizer_state(2)


def test_add_list_load_roundtrip_keeps_tensors_and_manifest_fields(tmp_path, phi_a, phi_b):
    pool = Pool(tmp_path / "pool")
    assert not (tmp_path / "pool").exists()  # created lazily, on first add
    before = datetime.now(UTC).replace(microsecond=0)
    pool.add("zeta", phi_b, source_task="vlcs", arch=ARCH)
    pool.add("alpha", phi_a, source_task="pacs", arch=ARCH, id_val_acc=0.875, robust=True)

    assert [e.name for e in pool.entries()] == ["alpha", "zeta"]
    assert "alpha" in pool and "missing" not in pool
    alpha = pool.get("alpha")
    assert (alpha.source_task, alpha.arch, alpha.id_val_acc, alpha.robust) == (
        "pacs",
        ARCH,
        0.875,
        True,
    )
    assert alpha.file == "alpha.safetensors"
    created = datetime.fromisoformat(alpha.created)
    assert created.utcoffset() == timedelta(0)
    assert before <= created <= datetime.now(UTC)
    zeta = pool.get("zeta")
    assert (zeta.id_val_acc, zeta.robust) == (None, False)

    on_disk = json.loads((tmp_path / "pool" / "manifest.json").read_text())
    by_name = {item["name"]: item for item in on_disk["entries"]}
    assert by_name["alpha"]["sha256"] == alpha.sha256 and by_name["alpha"]["robust"] is True
    assert by_name["zeta"]["id_val_acc"] is None

    assert_same_tensors(pool.load("alpha", expected_arch=ARCH), phi_a)
    assert_same_tensors(
        Pool(tmp_path / "pool").load("zeta"), phi_b
    )  # a fresh handle reads the manifest


def test_recipe_is_recorded_and_older_manifests_without_it_still_read(tmp_path, phi_a):
    pool = Pool(tmp_path / "pool")
    recipe = {"arch": ARCH, "pretrained": "hub-x", "image_size": None, "steps": 5001}
    pool.add("with", phi_a, source_task="pacs", arch=ARCH, recipe=recipe)
    pool.add("without", phi_a, source_task="pacs", arch=ARCH)
    assert pool.get("with").recipe == recipe and pool.get("without").recipe is None
    path = tmp_path / "pool" / "manifest.json"
    manifest = json.loads(path.read_text())
    for item in manifest["entries"]:
        del item["recipe"]  # a manifest written before recipes were recorded
    path.write_text(json.dumps(manifest))
    assert [e.recipe for e in Pool(tmp_path / "pool").entries()] == [None, None]


def test_incompatibilities_name_each_entry_and_field(tmp_path, phi_a):
    pool = Pool(tmp_path / "pool")
    base = {"arch": ARCH, "pretrained": "hub-x", "image_size": None, "freeze_bn": True}
    pool.add("same", phi_a, source_task="t", arch=ARCH, recipe={**base, "steps": 3})
    pool.add("bigger", phi_a, source_task="t", arch=ARCH, recipe={**base, "image_size": 64})
    pool.add("imported", phi_a, source_task="t", arch=ARCH)
    keys = ("arch", "pretrained", "image_size", "freeze_bn")
    assert incompatibilities(pool.entries(), base, keys) == [
        "bigger: image_size 64 (expected None)"
    ]


def test_sha256_in_manifest_equals_hashlib_of_the_file(tmp_path, phi_a):
    pool = Pool(tmp_path)
    entry = pool.add("a", phi_a, source_task="pacs", arch=ARCH)
    raw = (tmp_path / "a.safetensors").read_bytes()
    assert entry.sha256 == hashlib.sha256(raw).hexdigest()


def test_tampered_file_is_refused_on_load_and_reported_by_verify(tmp_path, phi_a, phi_b):
    pool = Pool(tmp_path)
    pool.add("good", phi_a, source_task="pacs", arch=ARCH)
    pool.add("bad", phi_b, source_task="pacs", arch=ARCH)
    path = tmp_path / "bad.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # one byte of one weight: still a valid safetensors file
    path.write_bytes(bytes(raw))

    with pytest.raises(PoolError, match=r"'bad'.*sha256.*ratatouille pool verify"):
        pool.load("bad")
    report = dict(pool.verify())
    assert report["good"] is None
    assert "sha256" in report["bad"]

    path.unlink()
    assert "missing" in dict(pool.verify())["bad"]


def test_load_refuses_an_entry_of_another_architecture(tmp_path, phi_a):
    pool = Pool(tmp_path)
    pool.add("a", phi_a, source_task="pacs", arch=ARCH)
    with pytest.raises(PoolError, match=r"'test_resnet'.*'resnet18'"):
        pool.load("a", expected_arch="resnet18")


def test_add_refuses_wrong_shape_naming_the_tensor_and_writes_nothing(tmp_path, phi_a):
    broken = dict(phi_a)
    broken["layer1.0.conv1.weight"] = torch.zeros(3, 3)
    with pytest.raises(PoolError, match=r"'layer1\.0\.conv1\.weight'.*\(3, 3\)"):
        Pool(tmp_path / "p").add("a", broken, source_task="pacs", arch=ARCH)
    assert not (tmp_path / "p" / "manifest.json").exists()
    missing = {k: v for k, v in phi_a.items() if k != "bn1.weight"}
    with pytest.raises(PoolError, match=r"missing tensors \['bn1\.weight'\]"):
        Pool(tmp_path / "p").add("a", missing, source_task="pacs", arch=ARCH)


def test_load_checks_shapes_even_when_the_hash_matches(tmp_path, phi_a):
    pool = Pool(tmp_path)
    pool.add("a", phi_a, source_task="pacs", arch=ARCH)
    wrong = dict(phi_a)
    wrong["fc_extra"] = torch.zeros(2)
    save_file(wrong, tmp_path / "a.safetensors")
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["entries"][0]["sha256"] = hashlib.sha256(
        (tmp_path / "a.safetensors").read_bytes()
    ).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(PoolError, match=r"unexpected tensors \['fc_extra'\]"):
        pool.load("a")
    assert "fc_extra" in dict(pool.verify())["a"]


def test_adding_an_existing_name_needs_overwrite(tmp_path, phi_a, phi_b):
    pool = Pool(tmp_path)
    pool.add("a", phi_a, source_task="pacs", arch=ARCH)
    with pytest.raises(PoolError, match="already has an entry 'a'"):
        pool.add("a", phi_b, source_task="vlcs", arch=ARCH)
    assert_same_tensors(pool.load("a"), phi_a)  # the refused add left the old weights in place
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    pool.add("a", phi_b, source_task="vlcs", arch=ARCH, overwrite=True)
    assert pool.get("a").source_task == "vlcs"
    assert_same_tensors(pool.load("a"), phi_b)


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden"])
def test_entry_names_that_are_not_plain_file_names_are_refused(tmp_path, phi_a, name):
    with pytest.raises(PoolError, match="not allowed"):
        Pool(tmp_path).add(name, phi_a, source_task="pacs", arch=ARCH)


def test_unknown_architecture_is_one_clear_error(tmp_path, phi_a):
    with pytest.raises(PoolError, match="unknown architecture 'no_such_net'"):
        Pool(tmp_path).add("a", phi_a, source_task="pacs", arch="no_such_net")


def test_import_refuses_pickle_without_trust(tmp_path, phi_a):
    torch.save(phi_a, tmp_path / "w.pt")
    with pytest.raises(PoolError, match="pickle.*--trust-pickle"):
        import_weights(tmp_path / "w.pt", Pool(tmp_path / "pool"), name="a", arch=ARCH)
    assert not (tmp_path / "pool").exists()


def test_import_loads_trusted_pickle(tmp_path, phi_a):
    torch.save(phi_a, tmp_path / "w.pth")
    pool = Pool(tmp_path / "pool")
    entry = import_weights(tmp_path / "w.pth", pool, name="a", arch=ARCH, trust_pickle=True)
    assert entry.source_task == "imported"
    assert_same_tensors(pool.load("a"), phi_a)


class _Payload:
    """Unpickling this calls os.mkdir: a stand-in for code a malicious checkpoint would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class _Config:
    pass


def test_trusted_pickle_is_read_with_weights_only(tmp_path, phi_a):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": dict(phi_a), "hook": _Payload(str(marker))}, evil)
    pool = Pool(tmp_path / "pool")
    with pytest.raises(PoolError, match="refused even with --trust-pickle"):
        import_weights(evil, pool, name="a", arch=ARCH, trust_pickle=True)
    assert not marker.exists()
    # The payload is live: a full unpickle (weights_only=False) does run it.
    torch.load(evil, weights_only=False)
    assert marker.is_dir()

    torch.save({"state_dict": dict(phi_a), "cfg": _Config()}, tmp_path / "obj.pt")
    with pytest.raises(PoolError, match="refused even with --trust-pickle"):
        import_weights(tmp_path / "obj.pt", pool, name="a", arch=ARCH, trust_pickle=True)
    assert not (tmp_path / "pool" / "manifest.json").exists()


@pytest.mark.parametrize("prefix", ["", "module.", "featurizer.", "module.featurizer."])
def test_import_strips_prefix_and_drops_classifier(tmp_path, prefix):
    full = full_model_state(3, num_classes=5)
    assert {"fc.weight", "fc.bias"} <= set(full)  # the head the featurizer must not carry
    saved = {prefix + k: v for k, v in full.items()}
    saved["classifier.weight"] = torch.zeros(5, 8)  # a separate head, outside the featurizer
    save_file(saved, tmp_path / "w.safetensors")
    pool = Pool(tmp_path / "pool")
    import_weights(tmp_path / "w.safetensors", pool, name="a", arch=ARCH, source_task="imagenet")
    want = {k: v for k, v in full.items() if not k.startswith("fc.")}
    assert_same_tensors(pool.load("a"), want)
    assert pool.get("a").source_task == "imagenet"


def test_import_unwraps_a_domainbed_checkpoint(tmp_path):
    full = full_model_state(4, num_classes=7)
    model_dict = {"featurizer.network." + k: v for k, v in full.items()}
    model_dict["classifier.weight"] = torch.zeros(7, 8)
    model_dict.update({"network.0.network." + k: v for k, v in full.items()})  # DomainBed's alias
    torch.save({"args": {"dataset": "PACS"}, "model_dict": model_dict}, tmp_path / "model.pkl")
    pool = Pool(tmp_path / "pool")
    import_weights(tmp_path / "model.pkl", pool, name="dbed", arch=ARCH, trust_pickle=True)
    assert_same_tensors(
        pool.load("dbed"), {k: v for k, v in full.items() if not k.startswith("fc.")}
    )


def test_import_picks_the_prefix_that_holds_the_whole_featurizer(tmp_path):
    full = full_model_state(5)
    saved = {"model." + k: v for k, v in full.items()}
    first = next(iter(full))
    saved["a." + first] = torch.zeros_like(full[first])  # a stray copy under a shorter prefix
    save_file(saved, tmp_path / "w.safetensors")
    pool = Pool(tmp_path / "pool")
    import_weights(tmp_path / "w.safetensors", pool, name="a", arch=ARCH)
    assert_same_tensors(pool.load("a"), {k: v for k, v in full.items() if not k.startswith("fc.")})


def test_pool_on_a_uri_pyarrow_cannot_open_is_refused_with_what_to_do():
    with pytest.raises(PoolError, match=r"'nosuch://bucket/pool'.*s3://bucket/pool"):
        Pool("nosuch://bucket/pool")


def test_import_checks_arch_before_writing(tmp_path):
    torch.manual_seed(0)
    other = timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict()
    save_file(other, tmp_path / "w.safetensors")
    with pytest.raises(PoolError, match="'test_resnet'"):
        import_weights(tmp_path / "w.safetensors", Pool(tmp_path / "pool"), name="a", arch=ARCH)
    assert not (tmp_path / "pool").exists()


def test_cli_list_and_verify_report_entries_and_exit_codes(tmp_path, capsys, phi_a, phi_b):
    pool_dir = str(tmp_path / "pool")
    assert main(["pool", "list", "--pool", pool_dir]) == 2  # no pool yet: bad input
    assert "no pool" in capsys.readouterr().err
    pool = Pool(pool_dir)
    a = pool.add("alpha", phi_a, source_task="pacs", arch=ARCH, id_val_acc=0.5)
    pool.add("beta", phi_b, source_task="vlcs", arch=ARCH, robust=True)

    assert main(["pool", "list", "--pool", pool_dir]) == 0
    out = capsys.readouterr().out
    alpha_line = next(line for line in out.splitlines() if line.startswith("alpha"))
    assert alpha_line.split() == ["alpha", "pacs", ARCH, "0.5000", "no", a.created, a.sha256[:12]]
    assert "beta" in out and "yes" in out

    assert main(["pool", "verify", "--pool", pool_dir]) == 0
    assert "2/2 entries ok" in capsys.readouterr().out
    (tmp_path / "pool" / "beta.safetensors").write_bytes(b"garbage")
    assert main(["pool", "verify", "--pool", pool_dir]) == 1
    out = capsys.readouterr().out
    assert "FAIL  beta" in out and "ok    alpha" in out


def test_cli_import_exit_codes(tmp_path, capsys, phi_a):
    torch.save(phi_a, tmp_path / "w.pt")
    pool_dir = str(tmp_path / "pool")
    pickle_import = [
        "pool",
        "import",
        str(tmp_path / "w.pt"),
        "--pool",
        pool_dir,
        "--name",
        "a",
        "--arch",
        ARCH,
    ]
    assert main(pickle_import) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main([*pickle_import, "--trust-pickle"]) == 0
    assert "imported" in capsys.readouterr().out
    assert_same_tensors(Pool(pool_dir).load("a"), phi_a)
    assert (
        main(
            [
                "pool",
                "import",
                str(tmp_path / "nope.safetensors"),
                "--pool",
                pool_dir,
                "--name",
                "b",
                "--arch",
                ARCH,
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def _add_many(pool_dir: str, prefix: str, count: int, barrier, state) -> None:
    torch.set_num_threads(1)
    pool = Pool(pool_dir)
    barrier.wait()  # start both writers together so their manifest updates interleave
    for i in range(count):
        pool.add(f"{prefix}{i}", state, source_task=prefix, arch=ARCH)


def test_concurrent_adds_from_two_processes_all_reach_the_manifest(tmp_path, phi_a):
    # fork: the writers start in milliseconds and inherit phi_a and the cached arch shapes
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    pool_dir = str(tmp_path / "pool")
    workers = [
        ctx.Process(target=_add_many, args=(pool_dir, p, 8, barrier, phi_a)) for p in ("x", "y")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    names = {
        item["name"] for item in json.loads(Path(pool_dir, "manifest.json").read_text())["entries"]
    }
    assert names == {f"{p}{i}" for p in ("x", "y") for i in range(8)}
    assert all(problem is None for _, problem in Pool(pool_dir).verify())
