"""P15: Tune's loop time per trial checkpoint with S3 storage vs local storage, 64 trials.

Run: ``python benchmarks/bench_tune_s3.py [--quick] [--interval 6] [--snapshots 5]``

64 simulated target trials of the quickstart sweep run at once through the project's own Tuner
(``StageRunner._new_tuner``: its RunConfig, CheckpointConfig, storage path and callbacks; the
MLflow callback writes to a no-op tracker, P12 measures its share) with a snapshot at every
checkpoint (``resources.snapshot_every_s: 0``, the most a config can ask). A trial trains
nothing: it sleeps ``--interval`` seconds per checkpoint, the GPU's share of a real loop, with
a metrics-only report halfway, then reports a snapshot as ``TuneReporter`` does (a train state
of engine.train's structure encoded by ``engine.state_files``, in a fresh folder handed to
``tune.report``), ``--snapshots`` times, and ends with its closing report (its weights file,
written once). Trials request 1/64 of Ray's two CPUs each, so all 64 run concurrently; each
waits until all have started, so the actors' start-up (most of the run time) is not timed and
every timed checkpoint has 63 neighbours.

Timed in the trial, per snapshot: the loop time (end of one snapshot report to the end of the
next: the sleep, the metrics report, writing the files and the report) and the time inside
``tune.report`` with the checkpoint, where the trial uploads it and then waits for the driver
to ask for the next result: where a driver syncing the experiment folder after checkpoints
(``CheckpointConfig(num_to_keep)``) held every trial. One side stores on a local folder, the
other on ``s3://`` served by moto on 127.0.0.1 (local first, then S3, in this run). P15 =
mean loop time S3 / local (a stalled checkpoint costs the sweep its whole stall, which a median
would hide). Goal <= 1.2x. moto shares the two cores with the trials and the driver, so every
request costs the S3 side, as a bucket's latency does on a cluster; the line counts moto's
requests, those for trial checkpoints apart from the rest (start-up checks and what Tune's
driver uploads on its own: the experiment folder, on its experiment checkpoint period), so
that a miss says where the requests came from. Other load on the machine slows moto, not the
local side: run it on a quiet machine.

Both sides run with the sweep's ``resources.experiment_sync_s`` (default 300 s), applied as
``StageRunner.run`` applies it; ``--experiment-sync-s auto`` runs them with Tune's own period
instead (at least every 10 s: every trial's results re-uploaded that often), to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from loopback_s3 import free_port, loopback_filesystem, point_aws_at, start_moto

FIGURES = {"P15": "cpu"}  # benchmarks/run.py: the figures this script prints
GOAL = 1.2
TRIALS = 64
CPUS = 2
BUCKET = "ratatouille-bench"
CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
BARRIER_TIMEOUT_S = 240.0
REQUEST = re.compile(r'"(?:GET|PUT|POST|HEAD|DELETE) (\S+)')  # moto's access log


def sweep_config(storage: str, experiment_sync_s: float | None) -> Any:
    """The quickstart, grown to TRIALS target runs sharing Ray's CPUs, stored at ``storage``;
    ``experiment_sync_s``: the config's period of experiment-state uploads (None: Tune's auto)."""
    from ratatouille.core.config import parse_config

    raw = yaml.safe_load(CONFIG.read_text())
    raw["target"]["n_runs"] = -(-TRIALS // len(raw["target"]["arms"]))
    raw["resources"]["cpus_per_trial"] = CPUS / TRIALS
    raw["resources"]["snapshot_every_s"] = 0  # a snapshot at every checkpoint: the worst case
    raw["resources"]["experiment_sync_s"] = experiment_sync_s
    raw.setdefault("tracking", {})["storage_path"] = storage
    return parse_config(raw, str(CONFIG))


def checkpoint_files(snapshot_mb: float) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(snapshot, closing checkpoint) files as a trial writes them: a train state of the
    structure engine.train snapshots (model, Adam's state after a step, best weights, history,
    RNG) holding ``snapshot_mb`` MB of tensors, in state_files' two files; then the model's
    weights file. Encoded here, once: the workers then need no torch, which 64 processes
    could not each import on two cores in the time."""
    import torch
    from safetensors.torch import save

    from ratatouille.core.names import WeightsFile
    from ratatouille.engine.state_files import STRUCTURE_FILE, TENSORS_FILE, encode
    from ratatouille.engine.train import SNAPSHOT_VERSION

    # four float32 copies of the parameters: the model, two Adam moments, the best weights
    size = max(1, int(snapshot_mb * 1e6 / 4 / 4 / 16))
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(size, generator=generator)) for _ in range(16)]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    sum(p.square().sum() for p in params).backward()
    optimizer.step()
    model = {f"block{i}.weight": p.detach().clone() for i, p in enumerate(params)}
    snapshot = {
        "version": SNAPSHOT_VERSION,
        "step": 199,
        "model": model,
        "optimizer": optimizer.state_dict(),
        "optimizer_phase": "all",
        "best_state": {k: v.clone() for k, v in model.items()},
        "best_id_val_acc": 0.5,
        "best_step": 150,
        "history": [
            {"step": s, "loss": 1.0 / (s + 1), "id_val_acc": 0.5} for s in range(0, 200, 50)
        ],
        "ma_state": None,
        "rng": {"torch": torch.get_rng_state()},
    }
    tensors, structure = encode(snapshot)
    return (
        {TENSORS_FILE: tensors, STRUCTURE_FILE: structure.encode()},
        {WeightsFile.MODEL.filename: save(model)},
    )


def simulated_trial(config: dict[str, Any], plan: dict[str, Any]) -> None:
    """The trainable: see the module doc. Runs in a Ray worker, without torch."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    ready = Path(plan["folder"], "ready")
    Path(ready, trial_id).touch()
    deadline = time.monotonic() + plan["barrier_s"]
    while len(joined := sorted(os.listdir(ready))) < plan["trials"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(joined)} of {plan['trials']} trials ran at once")
        time.sleep(0.05)
    # spread the trials' reports over an interval: a grid started together drifts apart
    interval = plan["interval"]
    time.sleep(interval * joined.index(trial_id) / plan["trials"])

    def checkpoint(row: dict[str, Any], files: dict[str, bytes]) -> float:
        with tempfile.TemporaryDirectory() as folder:
            for name, data in files.items():
                Path(folder, name).write_bytes(data)
            start = time.perf_counter()
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(folder))
            return time.perf_counter() - start

    loops, reports = [], []
    last = time.perf_counter()
    for index in range(plan["snapshots"]):
        step = (index + 1) * 50
        time.sleep(interval / 2)
        tune.report({"step": step - 25, "loss": 1.0 / step})
        time.sleep(interval / 2)
        reports.append(checkpoint({"step": step, "loss": 1.0 / step}, plan["snapshot"]))
        now = time.perf_counter()
        loops.append(now - last)
        last = now
    Path(plan["folder"], f"{trial_id}.json").write_text(
        json.dumps({"loops": loops, "reports": reports})
    )
    checkpoint({"done": True, "best_id_val_acc": 0.5}, plan["closing"])


class NoTracker:
    """The tracker MlflowTrialCallback writes to, writing nothing (P12 measures MLflow)."""

    parent_id = "bench"

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def run_side(storage: str, files: tuple[dict[str, bytes], dict[str, bytes]], args: Any) -> Any:
    """One Tuner.fit of TRIALS simulated trials storing at ``storage``; their timings."""
    from ray import tune

    from ratatouille.core.names import Stage
    from ratatouille.orchestration.search import StageRunner, new_run_dir
    from ratatouille.recipe.checks import experiment_cells
    from ratatouille.recipe.sweep import target_specs

    config = sweep_config(storage, args.experiment_sync_s)
    specs = target_specs(config, experiment_cells(config))[:TRIALS]
    runner = StageRunner(config, new_run_dir(config), NoTracker())  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="bench-tune-s3-") as folder:
        Path(folder, "ready").mkdir()
        plan = {
            "folder": folder,
            "trials": TRIALS,
            "barrier_s": BARRIER_TIMEOUT_S,
            "interval": args.interval,
            "snapshots": args.snapshots,
            "snapshot": files[0],
            "closing": files[1],
        }
        trainable = tune.with_resources(
            tune.with_parameters(simulated_trial, plan=plan), runner._resources()
        )
        tuner = runner._new_tuner(Stage.TARGET, specs, trainable, str(Stage.TARGET))
        # the stage's period of experiment-state uploads, as StageRunner.run applies it
        with runner._experiment_sync_period(), contextlib.redirect_stdout(io.StringIO()):
            results = list(tuner.fit())  # (redirected: Tune's progress table)
        timings = [json.loads(p.read_text()) for p in Path(folder).glob("*.json")]
    check_results(results, args.snapshots)
    return timings


def check_results(results: list[Any], snapshots: int) -> None:
    """Every trial ended, with its snapshots and its closing checkpoint in storage."""
    failed = [r for r in results if r.error is not None or not r.metrics.get("done")]
    if len(results) != TRIALS or failed:
        error = failed[0].error if failed else f"{len(results)} results"
        sys.exit(f"P15 FAILED: {len(failed)} of {TRIALS} trials did not finish: {error}")
    for result in results:
        stored = result.best_checkpoints or []
        if len(stored) != snapshots + 1:
            sys.exit(f"P15 FAILED: trial stored {len(stored)} checkpoints, not {snapshots + 1}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figures(timings: list[dict[str, list[float]]], key: str) -> tuple[float, float, float]:
    """Mean, median and p90 over every timed checkpoint of every trial."""
    values = [value for trial in timings for value in trial[key]]
    return statistics.fmean(values), statistics.median(values), percentile(values, 0.9)


def requests_served(log: Path) -> tuple[int, int]:
    """(all requests, those for trial checkpoints) in moto's request log."""
    paths = REQUEST.findall(log.read_text())
    return len(paths), sum("/checkpoint_" in path for path in paths)


def main(argv: list[str] | None = None) -> None:
    from ratatouille.core.config import ResourcesConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--interval", type=float, default=6.0, help="simulated training seconds per snapshot"
    )
    parser.add_argument("--snapshots", type=int, default=5, help="timed snapshots per trial")
    parser.add_argument("--snapshot-mb", type=float, default=1.0, help="train state size (MB)")
    parser.add_argument(
        "--experiment-sync-s",
        type=lambda v: None if v == "auto" else float(v),
        default=ResourcesConfig.model_fields["experiment_sync_s"].default,
        help="resources.experiment_sync_s of the sweep (default: the config's default; "
        "'auto': Tune's own period, at least every 10 s)",
    )
    parser.add_argument("--quick", action="store_true", help="2 snapshots per trial")
    args = parser.parse_args(argv)
    if args.quick:  # the actors' start-up, about a minute per side on two cores, is the rest
        args.snapshots = 2
    from ratatouille.orchestration.search import TUNE_QUIET

    for key, value in TUNE_QUIET.items():
        os.environ.setdefault(key, value)
    port = free_port()
    point_aws_at(port)  # before Ray starts: its workers inherit the environment
    import ray

    files = checkpoint_files(args.snapshot_mb)
    with tempfile.TemporaryDirectory(prefix="bench-tune-s3-") as root:
        log = Path(root, "moto.log")
        with open(log, "wb") as handle:
            server = start_moto(port, handle)
        try:
            loopback_filesystem(port).create_dir(BUCKET)
            ray.init(address="local", num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
            sides = {"local": run_side(str(Path(root, "ray")), files, args)}
            before = requests_served(log)
            sides["s3"] = run_side(f"s3://{BUCKET}/ray", files, args)
            served = tuple(n - m for n, m in zip(requests_served(log), before))
        finally:
            ray.shutdown()
            server.terminate()
            server.wait(timeout=10)
    print(line(sides, files, args, served), flush=True)


def _period(seconds: float | None) -> str:
    return "10 s or more (Tune's auto)" if seconds is None else f"{seconds:g} s"


def line(
    sides: dict[str, Any], files: tuple[dict[str, bytes], ...], args: Any, served: tuple[int, ...]
) -> str:
    s3_loop, local_loop = (figures(sides[side], "loops") for side in ("s3", "local"))
    s3_report, local_report = (figures(sides[side], "reports") for side in ("s3", "local"))
    counted = min(sum(len(t["loops"]) for t in side) for side in sides.values())
    ratio = s3_loop[0] / local_loop[0]
    verdict = "meets" if ratio <= GOAL else "MISSES"
    snapshot_mb = sum(len(data) for data in files[0].values()) / 1e6
    return (
        f"P15 Tune loop time per trial checkpoint, S3 / local storage: {ratio:.2f}x "
        f"(mean {s3_loop[0]:.2f} vs {local_loop[0]:.2f} s, median {s3_loop[1]:.2f} vs "
        f"{local_loop[1]:.2f} s, p90 {s3_loop[2]:.2f} vs {local_loop[2]:.2f} s; inside "
        f"tune.report with the checkpoint: median {s3_report[1] * 1e3:.0f} vs "
        f"{local_report[1] * 1e3:.0f} ms, p90 {s3_report[2] * 1e3:.0f} vs "
        f"{local_report[2] * 1e3:.0f} ms) {TRIALS} concurrent trials on {CPUS} CPUs, {counted} "
        f"checkpoints timed per side, a {snapshot_mb:.1f} MB train state every "
        f"{args.interval:g} s of simulated training, both sides through the project's Tuner in "
        f"this run, experiment state uploaded every {_period(args.experiment_sync_s)}; "
        f"moto on 127.0.0.1 served {served[0]} S3 requests, {served[1]} of them "
        "for trial checkpoints (the rest: start-up checks, Tune's syncs of the experiment "
        f"folder, directory markers); goal <= {GOAL}x: {verdict}"
    )


if __name__ == "__main__":
    main()
