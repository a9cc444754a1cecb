"""P6: how well Ray Tune packs a quickstart-size sweep onto the slots it has.

A real Tune sweep with the settings `StageRunner` gives the target stage (a grid of 24 trials,
``tune.with_resources`` of ``cpus_per_trial`` = 1, ``reuse_actors=True``, metrics reported
every 50 steps, the quickstart's checkpoint_freq) on a local Ray with ``--slots`` CPUs. Each
trial trains timm's tiny ``test_resnet`` for a fixed number of steps and reports its own
wall-clock start and end.
Packing = sum of trial busy time / (slots x makespan), the makespan running from the first
trial's start to the last trial's end: 1.0 means no slot ever waited for Ray between trials.
(Not `StageRunner` itself: it needs an MLflow parent run and the datasets, whose costs are not
the scheduler's.)

    python benchmarks/bench_packing.py [--quick] [--trials 24] [--steps 200] [--slots 2]

Short trials pack worse: Ray's gap between two trials on a slot is a fixed cost (about 0.3 s
per trial on the 2-core machine of docs/performance.md), so 40-step trials of 1.4 s each
gave 0.84 there.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

FIGURES = {"P6": "cpu"}  # benchmarks/run.py: the figures this script prints
GOAL = 0.9


def trial(config: dict) -> None:
    """A target-like trial: Adam steps of test_resnet, a report every `freq` steps."""
    import torch
    import torch.nn.functional as F
    from ray import tune

    from ratatouille.engine.models import build_classifier

    start = time.time()
    torch.set_num_threads(1)
    model = build_classifier("test_resnet", num_classes=10, seed=config["seed"]).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(96, 3, 16, 16), torch.randint(0, 10, (96,))
    for step in range(1, config["steps"] + 1):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config["freq"] == 0 and step < config["steps"]:
            tune.report({"step": step, "loss": loss.item()})
    tune.report({"step": config["steps"], "start": start, "end": time.time()})


def packing(trials: int, steps: int, slots: int) -> tuple[float, float, float]:
    """(packing, busy seconds, makespan seconds) of one sweep."""
    import ray
    from ray import tune

    ray.init(address="local", num_cpus=slots, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_packing_") as storage:
            tuner = tune.Tuner(
                tune.with_resources(trial, {"cpu": 1}),
                param_space={
                    "seed": tune.grid_search(list(range(trials))),
                    "steps": steps,
                    "freq": 50,
                },
                tune_config=tune.TuneConfig(reuse_actors=True),
                run_config=tune.RunConfig(storage_path=storage, verbose=0),
            )
            results = [r for r in tuner.fit() if r.error is None]
    finally:
        ray.shutdown()

    if len(results) != trials:
        raise RuntimeError(f"only {len(results)} of {trials} trials finished")
    spans = [(r.metrics["start"], r.metrics["end"]) for r in results]
    busy = sum(end - start for start, end in spans)
    makespan = max(end for _, end in spans) - min(start for start, _ in spans)
    return busy / (slots * makespan), busy, makespan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24, help="the quickstart's target stage")
    parser.add_argument(
        "--steps", type=int, default=200, help="steps per trial (the quickstart's: 400)"
    )
    parser.add_argument("--slots", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true", help="(the default sizes already are)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ratio, busy, makespan = packing(args.trials, args.steps, args.slots)
    print(
        f"P6 Ray packing, {args.trials} trials x {args.steps} steps on {args.slots} slots: "
        f"{ratio:.2f} (busy {busy:.1f} s / ({args.slots} x makespan {makespan:.1f} s), "
        f"{busy / args.trials:.2f} s per trial; goal >= {GOAL}: "
        f"{'meets' if ratio >= GOAL else 'MISSES'})"
    )


if __name__ == "__main__":
    main()
