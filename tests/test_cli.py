"""The command line: exit codes, overrides, plan arithmetic, pool commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ratatouille.cli.main import main
from ratatouille.engine.models import create_featurizer

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _plan_rows(out):
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("pretrain", "aux_probe", "aux", "probe", "target"):
            rows[parts[0]] = (int(parts[1]), int(parts[2].replace(",", "")))
    return rows


def test_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: {dataset: digits}\ntarget: {n_runs: -1}\n")
    code, _, err = _run(capsys, "run", str(path))
    assert code == 2
    assert "target.n_runs" in err and "greater than 0" in err
    assert "Traceback" not in err


def test_plan_counts_trials_and_steps_of_the_quickstart(capsys):
    code, out, _ = _run(capsys, "plan", str(EXPERIMENTS / "quickstart.yaml"))
    assert code == 0
    # 1 T0 pre-training, 3 auxiliary tasks (a probe each, then 2 runs each), 1 probe,
    # 3 arms x 8 runs on one test domain.
    assert _plan_rows(out) == {
        "pretrain": (1, 800),
        "aux_probe": (3, 900),
        "aux": (6, 1800),
        "probe": (1, 300),
        "target": (24, 24 * 400),
    }
    assert "GPU-hours" in out


def test_plan_of_a_domainbed_config_follows_table_1_protocol(capsys):
    code, out, _ = _run(capsys, "plan", str(EXPERIMENTS / "domainbed" / "pacs.yaml"))
    assert code == 0
    # 4 test domains x 3 data splits = 12 cells; 4 arms (robust included) x 20 runs of 5001 steps.
    rows = _plan_rows(out)
    assert rows["probe"] == (12, 12 * 5001)
    assert rows["target"] == (12 * 80, 12 * 80 * 5001)
    # the reference's pool: VLCS, OfficeHome, TerraIncognita (5001 steps) and DomainNet
    # (15001), one linear probe each, then 4 runs each from that probe
    per_task = 3 * 5001 + 15001
    assert rows["aux_probe"] == (4, per_task)
    assert rows["aux"] == (16, 4 * per_task)


def test_overrides_for_quick_tries(capsys):
    code, out, err = _run(
        capsys,
        "plan",
        str(EXPERIMENTS / "domainbed" / "pacs.yaml"),
        "--steps",
        "10",
        "--n-runs",
        "2",
        "--test-env",
        "sketch",
        "--test-env",
        "0",
    )
    assert code == 0
    rows = _plan_rows(out)
    assert rows["target"] == (
        2 * 3 * 4 * 2,
        2 * 3 * 4 * 2 * 10,
    )  # 2 domains x 3 splits x 4 arms x 2
    assert "featurizer freeze shortened" in err


def test_unknown_test_env_is_a_clear_error(capsys):
    code, _, err = _run(
        capsys, "plan", str(EXPERIMENTS / "quickstart.yaml"), "--test-env", "sketch"
    )
    assert code == 2 and "sketch" in err and "rot30" in err


def test_pool_commands_import_list_verify(tmp_path, capsys):
    weights = tmp_path / "phi.safetensors"
    save_file(create_featurizer("test_resnet").state_dict(), str(weights))
    pool = str(tmp_path / "pool")
    code, out, _ = _run(
        capsys,
        "pool",
        "import",
        str(weights),
        "--pool",
        pool,
        "--name",
        "mine",
        "--arch",
        "test_resnet",
    )
    assert code == 0
    code, out, _ = _run(capsys, "pool", "list", "--pool", pool)
    assert code == 0 and "mine" in out and "test_resnet" in out
    code, _, _ = _run(capsys, "pool", "verify", "--pool", pool)
    assert code == 0
    (tmp_path / "pool" / "mine.safetensors").write_bytes(b"tampered")
    code, out, err = _run(capsys, "pool", "verify", "--pool", pool)
    assert code == 1 and "mine" in out + err


def test_pickle_import_refused_without_trust(tmp_path, capsys):
    weights = tmp_path / "phi.pt"
    torch.save(create_featurizer("test_resnet").state_dict(), weights)
    code, _, err = _run(
        capsys,
        "pool",
        "import",
        str(weights),
        "--pool",
        str(tmp_path / "p"),
        "--name",
        "x",
        "--arch",
        "test_resnet",
    )
    assert code == 2 and "--trust-pickle" in err


def test_report_without_any_run_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "report")
    assert code == 2 and "ratatouille run" in err


@pytest.mark.parametrize(
    "config",
    [
        str(EXPERIMENTS / "quickstart.yaml"),
        str(EXPERIMENTS / "domainbed" / "pacs.yaml"),
        str(EXPERIMENTS / "domainbed" / "vlcs.yaml"),
        str(EXPERIMENTS / "domainbed" / "office_home.yaml"),
        str(EXPERIMENTS / "domainbed" / "terra_incognita.yaml"),
        str(EXPERIMENTS / "domainbed" / "domain_net.yaml"),
    ],
)
def test_shipped_configs_are_valid(config, capsys):
    assert _run(capsys, "plan", config)[0] == 0


def test_missing_domainbed_folder_fails_before_anything_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, _, err = _run(
        capsys,
        "run",
        str(EXPERIMENTS / "domainbed" / "pacs.yaml"),
        "--data-root",
        str(tmp_path / "data"),
    )
    assert code == 2
    assert str(tmp_path / "data") in err and "download" in err.lower()
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run, no Ray: nothing half-started


def _write_config(tmp_path, **sections):
    import yaml

    from tiny import TINY

    raw = {
        **TINY,
        "tracking": {
            "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "storage_path": str(tmp_path / "ray_results"),
        },
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("sections", "names"),
    [
        ({"model": {"arch": "resnet5O"}}, ["model.arch 'resnet5O'", "resnet50"]),
        (
            {"model": {"init": "file", "weights_file": "/nowhere/phi.safetensors"}},
            ["/nowhere/phi.safetensors", "does not exist"],
        ),
        ({"model": {"init": "file", "weights_file": "phi.pth"}}, ["phi.pth", ".safetensors"]),
        ({"data": {"dataset": "pacs"}}, ["data.dataset", "'pacs'"]),
        (
            {"aux": {"tasks": ["digits_aux_flipped", "digits_aux_blurred"]}},
            ["aux.tasks", "'digits_aux_blurred'"],
        ),
        ({"pretrain": {"task": "imagenet"}}, ["pretrain.task", "'imagenet'"]),
        ({"data": {"test_envs": ["rot45"]}}, ["'rot45'", "rot30"]),
        ({"target": {"hparams_override": {"momentum": [0.9]}}}, ["'momentum'"]),
    ],
)
def test_bad_input_stops_before_ray_or_mlflow_start(tmp_path, capsys, sections, names):
    code, _out, err = _run(capsys, "run", str(_write_config(tmp_path, **sections)))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(name in lines[0] for name in names), lines[0]
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow store, experiment or parent run
    assert not (tmp_path / "ray_results").exists()


def test_an_arch_typo_never_starts_ray_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    path = _write_config(tmp_path, model={"arch": "resnet5O"})
    result = subprocess.run(
        [sys.executable, "-m", "ratatouille.cli.main", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    # the run prints "ray: ..." once Ray is attached or started; nothing but the error here
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: model.arch 'resnet5O'")
    assert list(tmp_path.iterdir()) == [path]


def test_pool_commands_share_the_cli_error_handler(tmp_path, capsys):
    code, _, err = _run(
        capsys,
        "pool",
        "import",
        str(tmp_path / "w.bin"),
        "--pool",
        str(tmp_path / "pool"),
        "--name",
        "a",
        "--arch",
        "test_resnet",
    )
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def _tiny_yaml(tmp_path, name="tiny"):
    import yaml

    from tiny import TINY

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "name": name}))
    return path


def _total_hours(out):
    return float(out.split("total ")[1].split()[0])


def test_bench_throughput_writes_what_plan_then_uses(tmp_path, capsys):
    import json

    config = _tiny_yaml(tmp_path)
    code, out, _ = _run(capsys, "bench-throughput", str(config), "--steps", "2")
    assert code == 0
    written = tmp_path / "tiny.throughput.json"  # beside the config, named after it
    measured = json.loads(written.read_text())
    # test_resnet at the embedded benchmark's 16 px; 32 images x 3 training domains per step
    assert (measured["arch"], measured["image_size"], measured["batch"]) == ("test_resnet", 16, 96)
    assert measured["device"].startswith("cpu (1 threads")  # resources.cpus_per_trial: 1
    assert measured["train_images_per_s"] == pytest.approx(96 * measured["train_steps_per_s"])
    assert measured["eval_images_per_s"] > 0

    # Round rates, written by hand, so that the GPU-hours can be checked by hand.
    written.write_text(
        json.dumps({**measured, "train_images_per_s": 50.0, "eval_images_per_s": 500.0})
    )
    code, out, _ = _run(capsys, "plan", str(config))
    assert code == 0
    assert f"measured on {measured['device']} at {measured['measured_at']}" in out
    # TINY: pretrain 960 + aux 768 + target 10,368 training images (test_plan_prices_each_
    # stage_at_what_it_costs); evaluation: sizes of the embedded domains (300 each, T0 and
    # aux 597): pretrain 4 x 119, aux 2 x 3 x 119, probe 900, target 9 x 5 x 180 (ID val only,
    # never the test domain), and the reducer's images as its own count gives them
    # (tests/test_reduce_plan.py checks that count against an instrumented reduction).
    from ratatouille.cli.main import reducer_evaluations
    from ratatouille.core.config import load_config
    from ratatouille.recipe.checks import experiment_cells
    from ratatouille.recipe.sweep import domain_sizes_of

    parsed = load_config(config)
    reduce_images = reducer_evaluations(
        parsed, experiment_cells(parsed), domain_sizes_of(parsed.seed)
    ).images
    train = 960 + 768 + 9 * 12 * 32 * 3
    evals = 4 * 119 + 6 * 119 + 900 + 9 * 5 * 180 + reduce_images
    assert _total_hours(out) == pytest.approx((train / 50 + evals / 500) / 3600, abs=0.005)


def test_plan_says_when_its_rates_are_assumed(tmp_path, capsys):
    import json

    config = _tiny_yaml(tmp_path)
    code, out, _ = _run(capsys, "plan", str(config))
    assert code == 0 and "assumed" in out and "measured" not in out
    other = {
        "arch": "resnet50",
        "image_size": 224,
        "batch": 96,
        "device": "NVIDIA H100",
        "measured_at": "2026-11-26T00:00:00+00:00",
        "train_steps_per_s": 1.0,
        "train_images_per_s": 96.0,
        "eval_images_per_s": 300.0,
    }
    (tmp_path / "tiny.throughput.json").write_text(json.dumps(other))
    code, out, err = _run(capsys, "plan", str(config))
    assert code == 0 and "assumed" in out
    assert "resnet50 at 224 px" in err and "test_resnet at 16 px" in err
    (tmp_path / "tiny.throughput.json").write_text("{not json")
    code, _, err = _run(capsys, "plan", str(config))
    assert code == 2 and "tiny.throughput.json" in err and "bench-throughput" in err
