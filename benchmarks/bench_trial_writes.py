"""P13: bytes a target trial writes to storage / bytes of its final weights files, on real S3.

One target trial of the soups arm (it keeps a moving average, so it has two weights files: its
best ID-val weights and the average) runs the way a sweep runs it: ``StageRunner.run`` of the
target stage, the project's Tuner and trainable, with Tune's ``storage_path`` an ``s3://``
bucket on a moto server on 127.0.0.1. The schedule is the PACS config's
(experiments/domainbed/pacs.yaml: 5001 steps, a report and ID-val evaluation every 100, 200
linear-probe steps, the mild grid), the network and data the quickstart's (timm's
``test_resnet`` on the embedded digits), so the trial takes a minute or two on two cores, not
hours on a GPU; ``--quick`` draws 8 images per domain and step instead of 32, which changes
its time, not one of its files. ``resources.snapshot_every_s`` is 15 s here
(``--snapshot-every-s``), not PACS's 300, so that this short trial takes resumable snapshots.

The bytes are counted by the bucket, not by the code: versioning is on, so every object ever
written under the trial's folder stays listed as a version, even after the stage deletes the
trial's snapshots (``_drop_snapshots``) and Tune rewrites its logs. Written = the sizes of all
those versions (checkpoints and Tune's per-trial logs); floor W = the bytes of the weights files
of its closing checkpoint. The stage's own files (experiment state, shared by all its trials)
are not the trial's and are left out.

Goal: ``2 + n x S / W``, where S is the mean bytes of one snapshot checkpoint as written here,
and n = floor(T / snapshot_every_s) the snapshots the time budget allows a trial of T seconds
(T: Tune's ``time_total_s`` of the trial, an upper bound on its training time; the clock takes
one at the first report after each budget has run out, never at the last step). The old policy
(a train state at every evaluation, the weights files once) is priced from the same measured
sizes: evaluations x S + W + the measured logs.

    python benchmarks/bench_trial_writes.py [--quick] [--snapshot-every-s 15] [--steps N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loopback_s3 import free_port, point_aws_at, start_moto

FIGURES = {"P13": "cpu"}  # benchmarks/run.py: the figure printed here
BUCKET = "ratatouille-bench"
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
WEIGHTS_FILES = ("model.safetensors", "model_ma.safetensors")
TRAIN_STATE_FILES = ("train_state.safetensors", "train_state.json")
QUICK_BATCH = 8


def _bucket(port: int) -> Any:
    """A boto3 client on the server, with BUCKET created and versioned (a versioned bucket
    keeps every object written, which is what is counted)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return client


def bench_config(
    storage: str, snapshot_every_s: float, steps: int | None, batch_size: int | None
) -> Any:
    """PACS's target schedule and checkpoint policy on the quickstart's network and data."""
    from ratatouille.core.config import parse_config

    raw = yaml.safe_load((EXPERIMENTS / "domainbed" / "pacs.yaml").read_text())
    small = yaml.safe_load((EXPERIMENTS / "quickstart.yaml").read_text())
    for section in ("data", "model", "pretrain", "aux", "probe", "reduce"):
        raw[section] = small[section]
    raw["name"] = "bench-trial-writes"
    raw["target"].update(arms=["soups"], n_runs=1)
    if steps is not None:
        raw["target"]["steps"] = steps
    if batch_size is not None:
        raw["target"].setdefault("hparams_override", {})["batch_size"] = [batch_size]
    raw["resources"].update(
        cpus_per_trial=1, gpus_per_trial=0, max_failures=0, snapshot_every_s=snapshot_every_s
    )
    raw["tracking"] = {"storage_path": storage}
    return parse_config(raw, "pacs.yaml on the quickstart's model")


class Reports:
    """The tracker MlflowTrialCallback writes to: it keeps the trial's reports (to count its
    evaluations) and writes nothing (P12 measures MLflow)."""

    parent_id = "bench"

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def trial_result(self, key: str, result: dict[str, Any]) -> None:
        self.rows.append(dict(result))

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def run_trial(config: Any) -> tuple[Any, Reports]:
    """The target stage of one trial, as `run_stages` runs it; its outcome and reports."""
    import torch

    from ratatouille.core.names import PRETRAINED, Stage
    from ratatouille.data import get_dataset
    from ratatouille.engine.models import build_classifier, featurizer_state, head_state
    from ratatouille.orchestration.search import StageRunner, new_run_dir
    from ratatouille.recipe.checks import experiment_cells
    from ratatouille.recipe.stages import context_for
    from ratatouille.recipe.sweep import target_specs

    torch.set_num_threads(1)
    cells = experiment_cells(config)
    (spec,) = target_specs(config, cells)
    classes = get_dataset(config.data.dataset, seed=config.seed).num_classes
    # phi_pt and w_lp stand-ins: their values change no byte that is counted
    model = build_classifier(config.model.arch, classes, seed=0)
    reports = Reports()
    runner = StageRunner(config, new_run_dir(config), reports)  # type: ignore[arg-type]
    featurizers = runner.share({PRETRAINED: featurizer_state(model)})
    heads = runner.share({cells[0].key: head_state(model)})
    context = context_for(config, featurizers=featurizers, heads=heads)
    with contextlib.redirect_stdout(io.StringIO()):  # Tune's progress table
        (outcome,) = runner.run(Stage.TARGET, [spec], context)
    return outcome, reports


def written(client: Any, prefix: str) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Per object under ``prefix``, the sizes of every version written; and the sizes of
    those still there (the latest versions that are not deletions)."""
    versions: dict[str, list[int]] = defaultdict(list)
    live: dict[str, int] = {}
    for page in client.get_paginator("list_object_versions").paginate(Bucket=BUCKET, Prefix=prefix):
        for version in page.get("Versions", []):
            key = version["Key"][len(prefix) :]
            versions[key].append(version["Size"])
            if version["IsLatest"]:
                live[key] = version["Size"]
    return dict(versions), live


@dataclass
class Written:
    """What the bucket holds of one trial, every version counted (bytes)."""

    weights: int  # the weights files of its closing checkpoint: the floor
    closing: int  # that whole checkpoint
    snapshots: list[int]  # each snapshot checkpoint
    logs: int  # Tune's files beside the checkpoints, every upload of them
    left: int  # snapshot checkpoints still there once the stage has ended

    @property
    def total(self) -> int:
        return self.closing + sum(self.snapshots) + self.logs

    @property
    def snapshot(self) -> float:
        return sum(self.snapshots) / len(self.snapshots) if self.snapshots else 0.0


def tally(versions: dict[str, list[int]], live: dict[str, int], closing: str) -> Written:
    folders: dict[str, dict[str, int]] = defaultdict(dict)
    logs = 0
    for key, sizes in versions.items():
        folder, _, name = key.rpartition("/")
        if folder.startswith("checkpoint_"):
            folders[folder][name] = sum(sizes)
        else:  # result.json, progress.csv, ...: Tune uploads them again as the trial reports
            logs += sum(sizes)
    snapshots = {
        folder: sum(files.values())
        for folder, files in folders.items()
        if folder != closing and any(name in files for name in TRAIN_STATE_FILES)
    }
    return Written(
        weights=sum(folders[closing].get(name, 0) for name in WEIGHTS_FILES),
        closing=sum(folders[closing].values()),
        snapshots=list(snapshots.values()),
        logs=logs,
        left=len({key.split("/")[0] for key in live} & set(snapshots)),
    )


def p13(client: Any, args: argparse.Namespace) -> str:
    from ratatouille.core.names import MetricKey

    config = bench_config(
        f"s3://{BUCKET}/ray-results", args.snapshot_every_s, args.steps, args.batch_size
    )
    outcome, reports = run_trial(config)
    trial_dir, closing = outcome.checkpoint.path.rsplit("/", 1)
    w = tally(*written(client, trial_dir.removeprefix(f"{BUCKET}/") + "/"), closing)
    ratio = w.total / w.weights
    seconds = float(outcome.metrics["time_total_s"])
    every = config.resources.snapshot_every_s
    allowed = int(seconds // every)
    goal = 2 + allowed * w.snapshot / w.weights
    verdict = "meets" if ratio <= goal else "MISSES"
    evaluations = sum(MetricKey.ID_VAL_ACC.value in row for row in reports.rows)
    old = ""
    if w.snapshots:  # priced only from a train state measured here
        old_total = evaluations * w.snapshot + w.weights + w.logs
        old = (
            f"; the old policy (a train state at each of the {evaluations} evaluations) would "
            f"write ~{old_total / 1e6:.1f} MB, {old_total / w.weights:.1f}x"
        )
    return (
        f"P13 bytes a target trial writes to storage / bytes of its final weights files: "
        f"{ratio:.2f}x ({w.total / 1e6:.2f} MB written under the trial's folder: "
        f"{len(w.snapshots)} snapshots of {w.snapshot / 1e6:.2f} MB, closing checkpoint "
        f"{w.closing / 1e6:.2f} MB, Tune's logs {w.logs / 1e3:.0f} kB; weights files "
        f"{w.weights / 1e6:.2f} MB; {config.target.steps} steps, {evaluations} evaluations, "
        f"trial {seconds:.0f} s, snapshot_every_s {every:g}: {allowed} allowed; {w.left} "
        f"snapshots left after the stage{old}; {config.model.arch} on {config.data.dataset}, "
        f"versioned moto S3 on 127.0.0.1) goal <= 2 + {allowed} x "
        f"{w.snapshot / w.weights:.2f} = {goal:.2f}: {verdict}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_BATCH} images per domain and step"
    )
    parser.add_argument(
        "--snapshot-every-s",
        type=float,
        default=15.0,
        help="resources.snapshot_every_s: a few seconds, so this short trial snapshots",
    )
    parser.add_argument("--steps", type=int, help="target steps (default: the PACS config's)")
    parser.add_argument("--batch-size", type=int, help="per training domain (default: mild's)")
    args = parser.parse_args(argv)
    if args.quick and args.batch_size is None:
        args.batch_size = QUICK_BATCH
    port = free_port()
    point_aws_at(port)  # before Ray starts: its workers inherit the environment
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.update(
        {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true"}
    )
    server = start_moto(port)
    import ray

    # Ray's session files (Tune's staging of the trial's logs among them) in a folder of ours
    with tempfile.TemporaryDirectory(prefix="ray-", ignore_cleanup_errors=True) as ray_tmp:
        try:
            client = _bucket(port)
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                _temp_dir=ray_tmp,
            )
            print(p13(client, args), flush=True)
        finally:
            ray.shutdown()
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
