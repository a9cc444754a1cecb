"""Benchmark P12: Tune's per-report result processing with our MLflow logging vs without.

Run: ``python benchmarks/bench_tune_logging.py [--trials 64] [--rate 32] [--reports 3]``

Simulates ``--trials`` concurrent target trials of the quickstart sweep (real Tune ``Trial``
objects with our trial specs) reporting in turn, as Tune's event loop sees them. For each report
it times what Tune's controller does with a result besides scheduling: flatten it, run the
callback chain that ``Tuner.fit`` builds (Tune's progress callback and its CSV, JSON and
TensorBoard loggers, plus ours or a no-op in its place) and update the trial's last result.
The MLflow side writes through our real ``Tracker`` to a real SQLite store in a temporary
folder. Blocks alternate (none, MLflow, MLflow, none, ...) so a drifting machine load falls on
both sides; the writer is drained between blocks, untimed, and the store is read back at the
end: every report's points present once. P12 paces the reports at ``--rate``; a second line
(``# P12 flat out``) sends them back to back, where the writer's SQLAlchemy work (about 8 ms of
Python per request) competes with Tune's loop for the GIL the whole block. Needs a local Ray
(Tune's storage asks for its session folder); it starts one with one CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

FIGURES = {"P12": "cpu"}  # benchmarks/run.py: the figures this script prints
CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


def target_trials(trials: int, root: str, tag: str) -> list[Any]:
    """``trials`` Tune trials carrying the quickstart's target specs (n_runs raised to fit)."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from ratatouille.core.config import parse_config
    from ratatouille.recipe.checks import experiment_cells
    from ratatouille.recipe.sweep import target_specs

    raw = yaml.safe_load(CONFIG.read_text())
    raw["target"]["n_runs"] = -(-trials // len(raw["target"]["arms"]))
    config = parse_config(raw, str(CONFIG))
    specs = target_specs(config, experiment_cells(config))[:trials]
    storage = StorageContext(storage_path=root, experiment_dir_name=f"bench-{tag}")
    return [
        Trial(
            "bench",
            config={"spec": spec.to_plain()},
            trial_id=f"{tag}{index:05d}",
            storage=storage,
            stub=True,
        )
        for index, spec in enumerate(specs)
    ]


def report(trial: Any, step: int) -> dict[str, Any]:
    """A target trial's report as Tune's controller receives it (ours plus Tune's fields)."""
    now = time.time()
    return {
        "step": step,
        "loss": 1.0 / (step + 1),
        "id_val_acc": 0.5 + step * 1e-4,
        "node_id": "a" * 56,
        "gpu_ids": "0",
        "timestamp": int(now),
        "checkpoint_dir_name": f"checkpoint_{step:06d}",
        "done": False,
        "training_iteration": step + 1,
        "trial_id": trial.trial_id,
        "date": time.strftime("%Y-%m-%d_%H-%M-%S"),
        "time_this_iter_s": 0.5,
        "time_total_s": 0.5 * (step + 1),
        "pid": 4242,
        "hostname": platform.node(),
        "node_ip": "127.0.0.1",
        "config": trial.config,
        "time_since_restore": 0.5 * (step + 1),
        "iterations_since_restore": step + 1,
    }


class Side:
    """One callback chain and its trials: Tune's defaults plus ``ours``."""

    def __init__(self, ours: Any, trials: list[Any]):
        from ray.tune.callback import CallbackList
        from ray.tune.utils.callback import _create_default_callbacks

        self.trials = trials
        self.chain = CallbackList(_create_default_callbacks([ours], air_verbosity=None))
        self.chain.setup()
        self.times: list[float] = []
        self.step = 0
        for trial in trials:
            trial.init_local_path()
            self.chain.on_trial_start(iteration=0, trials=trials, trial=trial)

    def block(self, reports: int, rate: float) -> None:
        """``reports`` reports of every trial, trials in turn, each report timed; ``rate``
        reports per second in all (0: back to back)."""
        from ray.tune.utils import flatten_dict

        due = time.perf_counter()
        for _ in range(reports):
            for trial in self.trials:
                if rate:
                    due += 1.0 / rate
                    time.sleep(max(0.0, due - time.perf_counter()))
                result = report(trial, self.step)
                start = time.perf_counter()
                flatten_dict(result)
                self.chain.on_trial_result(
                    iteration=self.step, trials=self.trials, trial=trial, result=result
                )
                trial.update_last_result(result)
                self.times.append(time.perf_counter() - start)
            self.step += 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def check_store(tracker: Any, trials: list[Any], steps: int) -> None:
    """Every trial's run holds each reported step once, for each curve metric."""
    from ratatouille.recipe.specs import spec_from_plain

    for trial in trials:
        run_id = tracker.trial_run(spec_from_plain(trial.config["spec"]).key)
        for key in ("loss", "id_val_acc"):
            history = [m.step for m in tracker.client.get_metric_history(run_id, key)]
            if sorted(history) != list(range(steps)):
                sys.exit(f"store check failed: run {run_id} {key} holds steps {sorted(history)}")


def measure(sides: dict[str, Side], tracker: Any, reports: int, rate: float) -> dict[str, Any]:
    """p50 and p99 per side (ms) over blocks in ABBA order, and the longest drain (s)."""
    none, mlflow = sides["none"], sides["mlflow"]
    for side in sides.values():
        side.times = []
    drains = []
    for side in (none, mlflow, mlflow, none):
        side.block(reports, rate)
        start = time.perf_counter()
        tracker.flush()  # untimed: the writer catches up between blocks
        if side is mlflow:
            drains.append(time.perf_counter() - start)
    figures: dict[str, Any] = {"drain": max(drains), "reports": len(mlflow.times)}
    for name, side in sides.items():
        times = [t * 1e3 for t in side.times]
        figures[name] = (statistics.median(times), percentile(times, 0.99))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64, help="concurrent trials")
    parser.add_argument(
        "--rate",
        type=float,
        default=32.0,
        help="reports per second from all trials together (default 32: each of 64 trials "
        "reporting every 2 s; 64 trials checkpointing every 100 steps at 30 steps/s, an "
        "assumed ResNet-50 rate on a whole H100, would send about 19)",
    )
    parser.add_argument("--reports", type=int, default=3, help="reports per trial per block")
    parser.add_argument(
        "--flat-out-reports", type=int, default=4, help="per trial per block, back to back"
    )
    parser.add_argument("--quick", action="store_true", help="(the default sizes already are)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the pipeline's output engine
    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")

    import ray
    from ray import tune
    from ray.tune.utils.log import Verbosity, set_verbosity

    from ratatouille.orchestration.search import MlflowTrialCallback
    from ratatouille.tracking.store import Tracker

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    set_verbosity(Verbosity.V1_EXPERIMENT)  # the pipeline's `verbose=1`
    with tempfile.TemporaryDirectory(prefix="bench-tune-logging-") as root:
        tracker = Tracker("bench", f"sqlite:///{root}/mlflow.db")
        tracker.start_parent(f"{root}/run", yaml.safe_load(CONFIG.read_text()))
        sides = {
            "none": Side(tune.Callback(), target_trials(args.trials, root, "none")),
            "mlflow": Side(
                MlflowTrialCallback(tracker), target_trials(args.trials, root, "mlflow")
            ),
        }
        tracker.flush()
        paced = measure(sides, tracker, args.reports, args.rate)
        flat = measure(sides, tracker, args.flat_out_reports, 0.0)
        mlflow = sides["mlflow"]
        for trial in mlflow.trials:
            mlflow.chain.on_trial_complete(iteration=mlflow.step, trials=mlflow.trials, trial=trial)
        tracker.finish_parent()
        check_store(tracker, mlflow.trials, mlflow.step)
        ray.shutdown()

    print(
        f"# {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, CPU only (driver-side); every point read back "
        "once from the SQLite store"
    )
    print(f"P12 {line(paced, args.trials)} at {args.rate:g} reports/s in all")
    print(f"# P12 flat out: {line(flat, args.trials)} back to back")


def line(figures: dict[str, Any], trials: int) -> str:
    (mlflow_p50, mlflow_p99), (none_p50, none_p99) = figures["mlflow"], figures["none"]
    return (
        f"Tune result processing per report, MLflow logging vs none: "
        f"{mlflow_p50 / none_p50:.2f}x (p50 {mlflow_p50:.2f} vs {none_p50:.2f} ms, "
        f"p99 {mlflow_p99:.2f} vs {none_p99:.2f} ms) {trials} simulated concurrent trials, "
        f"{figures['reports']} reports per side, writer drained {figures['drain']:.2f} s "
        "at most after a block,"
    )


if __name__ == "__main__":
    main()
