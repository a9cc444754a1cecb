"""benchmarks/gpu_check.py's checks, on records whose answers are known by hand (the script
itself needs a GPU; `--device cpu` is its dry run)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from ratatouille.core.config import parse_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_peak_sharing_counts_overlaps_per_gpu(gpu_check):
    intervals = [
        ("0", 0, 10), ("0", 1, 5), ("0", 2, 6), ("0", 3, 4),  # four at t=3.5
        ("0", 10, 12),  # starts as the first ends: not an overlap
        ("1", 0, 1), ("1", 1, 2),  # back to back
    ]  # fmt: skip
    assert gpu_check.peak_sharing(intervals) == {"0": 4, "1": 1}


def _trial(gpu, start, end, status="FINISHED"):
    return {"status": status, "tags": {"ray.gpu_ids": gpu}, "start": start, "end": end}


def test_four_finished_trials_at_once_on_one_gpu_pass(gpu_check):
    scale = gpu_check.SCALES["cuda"]
    trials = [_trial("0", k, 10 + k) for k in range(4)] + [_trial("0", 20, 30)] * 4
    assert all(check.ok for check in gpu_check.check_trials(trials, scale))


def test_trials_that_never_shared_a_gpu_or_ran_on_the_cpu_fail(gpu_check):
    scale = gpu_check.SCALES["cuda"]
    serial = [_trial("0", 10 * k, 10 * k + 9) for k in range(8)]
    failed = {c.name for c in gpu_check.check_trials(serial, scale) if not c.ok}
    assert failed == {"4 to a GPU"}
    on_cpu = [_trial("", 0, 1)] * 7 + [_trial("", 0, 1, status="FAILED")]
    failed = {c.name for c in gpu_check.check_trials(on_cpu, scale) if not c.ok}
    assert failed == {"target trials", "on CUDA", "4 to a GPU"}


def test_the_reducer_must_have_run_on_the_device_with_every_record(gpu_check):
    scale = gpu_check.SCALES["cuda"]
    parent = {"status": "FINISHED"}
    reducer = {
        "tags": {"ratatouille.reducer_device": "cuda"},
        "metrics": {
            "ood_acc/erm": 0.4,
            "ood_acc/soup_uniform": 0.5,
            "ood_acc/ratatouille_uniform": 0.6,
        },
    }
    assert all(c.ok for c in gpu_check.check_reduction(parent, reducer, 1, scale))
    on_cpu = {**reducer, "tags": {"ratatouille.reducer_device": "cpu"}}
    failed = {c.name for c in gpu_check.check_reduction(parent, on_cpu, 0, scale) if not c.ok}
    assert failed == {"reducer device", "registered model"}
    failed = {c.name for c in gpu_check.check_reduction({"status": "FAILED"}, None, 1, scale)}
    assert failed == {"parent run", "reducer run"}
    partial = {**reducer, "metrics": {"ood_acc/erm": 0.4}}
    failed = {c.name for c in gpu_check.check_reduction(parent, partial, 1, scale) if not c.ok}
    assert failed == {"reducer metrics"}


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_config_it_writes_is_a_valid_experiment(gpu_check, device, tmp_path):
    scale = gpu_check.SCALES[device]
    config = parse_config(gpu_check.check_config(tmp_path, scale))
    assert config.resources.gpus_per_trial == scale.gpus_per_trial
    assert config.target.arms == list(gpu_check.ARMS) and config.target.n_runs == 4
    assert config.data.pipeline == "decoded"
    if device == "cuda":
        assert config.model.arch == "resnet50" and config.model.init == "file"
        assert config.resources.gpus_per_trial == 0.25
