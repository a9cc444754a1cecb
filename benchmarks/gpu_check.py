"""`make gpu-check`: one whole `ratatouille run` on CUDA, then the CUDA figures (issue 21).

What it runs: a small DomainBed-layout JPEG tree it writes (PACS as the target, VLCS as the one
auxiliary task), ResNet-50 from a random init (a safetensors file the script writes: nothing is
downloaded), the decoded store and augmentation on the GPU, 2 arms x 4 target runs with
`gpus_per_trial: 0.25`, a few hundred steps each. Then it checks the records the run left:

- every target trial ran on a GPU (its `ray.gpu_ids` tag), four at a time on one GPU (the peak
  overlap of their MLflow run intervals per GPU equals 1 / gpus_per_trial);
- the reducer evaluated on CUDA (tag `ratatouille.reducer_device`);
- MLflow holds every record: the parent and each trial FINISHED, the reducer's `ood_acc/*` of
  each arm's uniform soup and of vanilla fine-tuning, a registered model version;

and ends with `make bench-cuda` (skip with --no-bench). `--device cpu` is a dry run of the same
script on a CPU box (a small arch, a few steps, the checks expecting the CPU), for its own tests.
Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
VLCS_DOMAINS = ("Caltech101", "LabelMe", "SUN09", "VOC2007")
CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse")
ARMS = ("soups", "ratatouille")
N_RUNS = 4
#: one strategy of each arm, and vanilla fine-tuning (the reducer logs every strategy)
REDUCER_METRICS = ("ood_acc/erm", "ood_acc/soup_uniform", "ood_acc/ratatouille_uniform")


@dataclass(frozen=True)
class Scale:
    """What the run trains: ResNet-50 on the GPU, a tiny stand-in for the CPU dry run."""

    device: str
    arch: str
    image_size: int
    images_per_class: int
    aux_steps: int
    target_steps: int
    checkpoint_freq: int
    gpus_per_trial: float
    cpus_per_trial: float


SCALES = {
    "cuda": Scale("cuda", "resnet50", 224, 12, 100, 300, 100, 0.25, 2.0),
    "cpu": Scale("cpu", "test_resnet", 32, 4, 4, 6, 3, 0.0, 1.0),
}


# -- the data and the config ------------------------------------------------------------------
def write_tree(root: Path, folder: str, domains: Iterable[str], per_class: int, size: int) -> None:
    """JPEG images whose colour and texture depend on the class, shifted per domain."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for d, domain in enumerate(domains):
        for c, name in enumerate(CLASSES):
            target = root / folder / domain / name
            target.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                base = np.array([40 * c, 255 - 40 * c, 30 * d], dtype=np.float32)
                noise = rng.normal(0, 25, (size, size, 3))
                stripes = 40 * np.sin(np.arange(size) * (c + 1) / 4)[None, :, None]
                pixels = np.clip(base + noise + stripes, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(target / f"{k}.jpg", quality=90)


def write_random_init(path: Path, arch: str) -> None:
    """phi_pt as a timm featurizer from a random init (no hub download)."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(arch, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def check_config(work: Path, scale: Scale) -> dict[str, Any]:
    model: dict[str, Any] = {"arch": scale.arch, "precision": "bf16"}
    if scale.device == "cuda":
        model.update(init="file", weights_file=str(work / "phi_pt.safetensors"))
    else:  # test_resnet is not a timm hub arch: the project pre-trains it
        model.update(init="pretrain")
    config: dict[str, Any] = {
        "name": f"gpu-check-{scale.device}",
        "seed": 0,
        "data": {
            "dataset": "PACS",
            "root": str(work / "data"),
            "test_envs": ["sketch"],
            "pipeline": "decoded",
            "cache_dir": str(work / "decoded"),
            "image_size": scale.image_size,
        },
        "model": model,
        "aux": {
            "tasks": ["VLCS"],
            "runs_per_task": 1,
            "steps": scale.aux_steps,
            "checkpoint_freq": scale.checkpoint_freq,
            "hparams": "mild",
        },
        "probe": {"steps": scale.aux_steps},
        "target": {
            "arms": list(ARMS),
            "n_runs": N_RUNS,
            "steps": scale.target_steps,
            "checkpoint_freq": scale.checkpoint_freq,
            "lp_steps": 10,
            "hparams": "mild",
        },
        "reduce": {"ablation_draws": 1, "max_pairs": 2},
        "resources": {
            "cpus_per_trial": scale.cpus_per_trial,
            "gpus_per_trial": scale.gpus_per_trial,
            "max_failures": 0,
        },
        "tracking": {
            "mlflow_uri": f"sqlite:///{work / 'mlflow.db'}",
            "storage_path": str(work / "ray_results"),
            "registered_model_name": "gpu-check",
        },
    }
    if scale.device == "cpu":
        config["pretrain"] = {"task": "digits_t0", "steps": 6, "checkpoint_freq": 3}
    return config


# -- the checks ------------------------------------------------------------------------------
def peak_sharing(intervals: Iterable[tuple[str, float, float]]) -> dict[str, int]:
    """Per GPU id, the most trials whose [start, end) intervals overlap at one instant."""
    events: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for gpu, start, end in intervals:
        events[gpu] += [(start, 1), (end, -1)]
    peaks = {}
    for gpu, points in events.items():
        running = peak = 0
        for _, delta in sorted(points):  # an end sorts before a start at the same instant
            running += delta
            peak = max(peak, running)
        peaks[gpu] = peak
    return peaks


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def check_trials(trials: list[Mapping[str, Any]], scale: Scale) -> list[Check]:
    """``trials``: the target trials' runs as {status, tags, start, end}."""
    expected = len(ARMS) * N_RUNS
    finished = [t for t in trials if t["status"] == "FINISHED"]
    checks = [Check("target trials", len(finished) == expected, f"{len(finished)}/{expected}")]
    gpus = [t["tags"].get("ray.gpu_ids", "") for t in trials]
    if scale.device == "cpu":
        checks.append(Check("placement", all(g == "" for g in gpus), "no GPU ids on the CPU"))
        return checks
    on_gpu = all(g != "" for g in gpus)
    checks.append(Check("on CUDA", on_gpu and bool(gpus), f"ray.gpu_ids {sorted(set(gpus))}"))
    packing = round(1 / scale.gpus_per_trial)
    peaks = peak_sharing((t["tags"].get("ray.gpu_ids", ""), t["start"], t["end"]) for t in trials)
    checks.append(
        Check(f"{packing} to a GPU", bool(peaks) and max(peaks.values()) == packing, f"{peaks}")
    )
    return checks


def check_reduction(
    parent: Mapping[str, Any],
    reducer: Mapping[str, Any] | None,
    versions: int,
    scale: Scale,
) -> list[Check]:
    checks = [Check("parent run", parent["status"] == "FINISHED", parent["status"])]
    if reducer is None:
        return [*checks, Check("reducer run", False, "missing")]
    device = reducer["tags"].get("ratatouille.reducer_device", "unrecorded")
    checks.append(Check("reducer device", device == scale.device, device))
    missing = [key for key in REDUCER_METRICS if key not in reducer["metrics"]]
    checks.append(Check("reducer metrics", not missing, f"missing {missing}" if missing else "ok"))
    checks.append(Check("registered model", versions >= 1, f"{versions} version(s)"))
    return checks


def read_records(work: Path, name: str) -> tuple[list[dict], dict, dict | None, int]:
    """The run's records from its MLflow store, as plain dicts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=5000)

    def plain(run: Any) -> dict[str, Any]:
        info = run.info
        return {
            "status": info.status,
            "tags": run.data.tags,
            "metrics": run.data.metrics,
            "start": info.start_time / 1000,
            "end": (info.end_time or time.time() * 1000) / 1000,
        }

    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [plain(r) for r in runs if "mlflow.parentRunId" in r.data.tags]
    trials = [
        c
        for c in children
        if c["tags"].get("ratatouille.role") == "trial" and c["tags"].get("stage") == "target"
    ]
    reducers = [c for c in children if c["tags"].get("ratatouille.role") == "reducer"]
    versions = len(client.search_model_versions("name = 'gpu-check'"))
    return trials, plain(parents[0]), reducers[0] if reducers else None, versions


# -- the run ---------------------------------------------------------------------------------
def prepare(work: Path, scale: Scale) -> Path:
    write_tree(work / "data", "PACS", PACS_DOMAINS, scale.images_per_class, scale.image_size)
    write_tree(work / "data", "VLCS", VLCS_DOMAINS, scale.images_per_class, scale.image_size)
    if scale.device == "cuda":
        write_random_init(work / "phi_pt.safetensors", scale.arch)
    path = work / "gpu_check.yaml"
    path.write_text(yaml.safe_dump(check_config(work, scale), sort_keys=False))
    return path


def run(work: Path, scale: Scale, bench: bool) -> int:
    if scale.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("FAIL cuda: no CUDA device here; `--device cpu` is the dry run", flush=True)
            return 1
        print(f"device: {torch.cuda.get_device_name(0)}", flush=True)
    config = prepare(work, scale)
    ratatouille = str(Path(sys.executable).with_name("ratatouille"))
    started = time.monotonic()
    done = subprocess.run([ratatouille, "run", str(config)], cwd=work, check=False)
    print(f"ratatouille run: exit {done.returncode} in {time.monotonic() - started:.0f} s")
    trials, parent, reducer, versions = read_records(work, f"gpu-check-{scale.device}")
    checks = check_trials(trials, scale) + check_reduction(parent, reducer, versions, scale)
    for check in checks:
        print(check.line(), flush=True)
    ok = done.returncode == 0 and all(check.ok for check in checks)
    summary = {"ok": ok, "checks": [check.line() for check in checks]}
    (work / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    if bench and scale.device == "cuda":
        ok = subprocess.run(["make", "bench-cuda"], cwd=REPO, check=False).returncode == 0 and ok
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=tuple(SCALES), default="cuda")
    parser.add_argument("--work", type=Path, help="folder for the data and stores (kept)")
    parser.add_argument("--no-bench", action="store_true", help="skip `make bench-cuda`")
    args = parser.parse_args(argv)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        return run(args.work.resolve(), SCALES[args.device], not args.no_bench)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        return run(Path(folder), SCALES[args.device], not args.no_bench)


if __name__ == "__main__":
    sys.exit(main())
