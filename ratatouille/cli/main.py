"""`ratatouille run | reduce | report | pool | plan | bench-throughput`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ratatouille.core.config import ExperimentConfig, load_config, parse_config
from ratatouille.core.errors import UserError

if TYPE_CHECKING:
    from ratatouille.reducer.dry_run import EvalCount

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_EXCLUDED = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for Ctrl-C (SIGTERM stops the same way)
STOPPED = "stopped: finished trials are kept; `ratatouille run CONFIG --resume` continues"


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, e.g. experiments/quickstart.yaml")
    parser.add_argument("--data-root", help="folder holding the DomainBed datasets")
    parser.add_argument(
        "--test-env",
        action="append",
        dest="test_envs",
        metavar="NAME|INDEX",
        help="held-out domain to sweep (repeatable); default: the config's",
    )
    parser.add_argument("--steps", type=int, help="steps of every training stage (quick tries)")
    parser.add_argument("--n-runs", type=int, help="target runs per arm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratatouille",
        description="Model ratatouille as a Ray Tune sweep: recycle auxiliary fine-tunings as "
        "initializations, average the target runs, compare every strategy in MLflow.",
        epilog="example: ratatouille run experiments/quickstart.yaml",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the whole pipeline of a config")
    _add_overrides(run)
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest run of this experiment; finished trials are kept, and a "
        "config that only adds (aux tasks or extra sources, runs, test domains, split seeds, "
        "arms) trains only what is new",
    )

    plan = commands.add_parser("plan", help="print trials per stage and the compute they need")
    _add_overrides(plan)
    plan.add_argument(
        "--throughput",
        help="measurements from `ratatouille bench-throughput` (default: CONFIG's "
        "<name>.throughput.json beside it, when it exists)",
    )
    plan.add_argument(
        "--resume",
        action="store_true",
        help="price only what `ratatouille run CONFIG --resume` would train now",
    )

    bench = commands.add_parser(
        "bench-throughput",
        help="measure the config's model on this machine's device, for `plan`",
    )
    bench.add_argument("config", help="experiment YAML")
    bench.add_argument(
        "--out", help="JSON file to write (default: <name>.throughput.json beside CONFIG)"
    )
    bench.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up ones)")
    bench.add_argument(
        "--device",
        help="torch device (default: cuda when present, else cpu); on the CPU, "
        "resources.cpus_per_trial threads, as a trial gets",
    )

    for name, text in (
        ("reduce", "rerun only the reducer on a finished sweep"),
        ("report", "print the comparison table, write Markdown and CSV"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--experiment", help="MLflow experiment (default: the latest one)")
        sub.add_argument(
            "--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)"
        )
    commands.choices["report"].add_argument(
        "--out", default="reports", help="folder for report.md and report.csv"
    )

    pool = commands.add_parser("pool", help="list, verify or import auxiliary featurizers")
    pool_commands = pool.add_subparsers(dest="pool_command", required=True)
    for name in ("list", "verify"):
        pool_commands.add_parser(name).add_argument(
            "--pool", required=True, help="pool folder or URI (s3://bucket/pool)"
        )
    imp = pool_commands.add_parser(
        "import", help="add a featurizer (a file, a timm model folder or hub repo) to a pool"
    )
    imp.add_argument(
        "file",
        metavar="SOURCE",
        help="a .safetensors file, a timm model folder local-dir:/path (config.json + "
        "model.safetensors) or a timm hub repo hf-hub:timm/NAME",
    )
    imp.add_argument("--pool", required=True, help="pool folder or URI (s3://bucket/pool)")
    imp.add_argument("--name", required=True)
    imp.add_argument(
        "--arch",
        required=True,
        help="the pool's architecture, as model.arch names it: resnet50, hf-hub:timm/NAME or "
        "local-dir:/path; the weights' shapes are checked against it",
    )
    imp.add_argument("--source-task", default="imported")
    imp.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a pickle checkpoint (still loaded with weights_only=True)",
    )
    return parser


def apply_overrides(config: ExperimentConfig, args: argparse.Namespace) -> ExperimentConfig:
    """The command line's quick-try overrides, validated like the file itself."""
    raw = config.model_dump()
    if args.data_root:
        raw["data"]["root"] = args.data_root
    if args.test_envs:
        raw["data"]["test_envs"] = [int(t) if t.isdigit() else t for t in args.test_envs]
    if args.n_runs is not None:
        raw["target"]["n_runs"] = args.n_runs
    if args.steps is not None:
        for section in ("target", "aux", "probe", "pretrain"):
            if raw.get(section) is not None:
                raw[section]["steps"] = args.steps
        if raw["target"]["lp_steps"] >= args.steps:
            raw["target"]["lp_steps"] = args.steps // 2
            print(
                f"note: --steps {args.steps} <= target.lp_steps: featurizer freeze shortened "
                f"to {args.steps // 2} steps",
                file=sys.stderr,
            )
    return parse_config(raw, f"{args.config} (with command-line overrides)")


def _cmd_run(args: argparse.Namespace) -> int:
    config = apply_overrides(load_config(args.config), args)
    from ratatouille.cli.report import print_outcome
    from ratatouille.orchestration.pipeline import run_pipeline

    outcome = run_pipeline(config, resume=args.resume)
    print_outcome(outcome)
    return EXIT_EXCLUDED if outcome.excluded else EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    config = apply_overrides(load_config(args.config), args)
    from ratatouille.recipe.checks import experiment_cells
    from ratatouille.recipe.sweep import (
        domain_sizes_of,
        format_plan,
        model_bytes,
        plan_rates,
        plan_rows,
    )

    rates, note = plan_rates(config, args.config, args.throughput)
    if note:
        print(note, file=sys.stderr)
    sizes = domain_sizes_of(config.seed)
    cells = experiment_cells(config)
    targets, done = None, None
    if args.resume:
        from ratatouille.orchestration.pipeline import resume_plan

        targets, done = resume_plan(config)
    images = reducer_evaluations(config, cells, sizes, targets).images
    rows = plan_rows(
        config, cells, sizes, rates, images, model_bytes(config), targets=targets, done=done
    )
    print(format_plan(rows, rates))
    return EXIT_OK


def reducer_evaluations(
    config: ExperimentConfig, cells: list, sizes: Callable, targets: list | None = None
) -> EvalCount:
    """What every reducer task of the sweep forward-passes, counted by running the reducer on
    the sweep's shape (:mod:`ratatouille.reducer.dry_run`); ``targets``: a resumed sweep's."""
    from ratatouille.recipe.sweep import reducer_cells
    from ratatouille.reducer.dry_run import CellShape, ShadowRun, count_sweep
    from ratatouille.reducer.inputs import settings_from_config

    shapes = [
        CellShape(
            cell.test_domain,
            cell.split_seed,
            tuple(ShadowRun(*run) for run in runs),
            tuple(id_val),
            tuple(ood),
        )
        for cell, runs, id_val, ood in reducer_cells(config, cells, sizes, targets)
    ]
    settings = settings_from_config(config.reduce, config.seed)
    return count_sweep(shapes, settings, config.reduce.uniform_dagger)


def _cmd_bench_throughput(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from ratatouille.recipe.sweep import bench_throughput

    result, out = bench_throughput(config, args.config, args.out, args.device, args.steps)
    print(
        f"{result.arch} at {result.image_size} px, batch {result.batch} on {result.device}: "
        f"{result.train_steps_per_s:.2f} training steps/s = {result.train_images_per_s:.1f} "
        f"training images/s, {result.eval_images_per_s:.1f} evaluation images/s; written to "
        f"{out} (`ratatouille plan {args.config}` reads it)"
    )
    return EXIT_OK


def _cmd_reduce(args: argparse.Namespace) -> int:
    from ratatouille.cli.report import print_outcome
    from ratatouille.orchestration.pipeline import reduce_latest

    outcome = reduce_latest(args.experiment, args.tracking_uri)
    print_outcome(outcome)
    return EXIT_EXCLUDED if outcome.excluded else EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from ratatouille.cli.report import write_report

    write_report(args.experiment, args.tracking_uri, args.out)
    return EXIT_OK


def _cmd_pool(args: argparse.Namespace) -> int:
    from ratatouille.cli import pool

    if args.pool_command == "list":
        return pool.cli_list(args.pool)
    if args.pool_command == "verify":
        return pool.cli_verify(args.pool)
    return pool.cli_import(
        args.file, args.pool, args.name, args.arch, args.trust_pickle, source_task=args.source_task
    )


COMMANDS = {
    "run": _cmd_run,
    "plan": _cmd_plan,
    "bench-throughput": _cmd_bench_throughput,
    "reduce": _cmd_reduce,
    "report": _cmd_report,
    "pool": _cmd_pool,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done; 1 trials failed (finished ones kept, `--resume` continues); 2 bad
    input (one line naming what to change, nothing started); 3 done, but some target trials
    diverged and were left out of every strategy (listed with the table); 130 stopped by Ctrl-C
    or SIGTERM (finished trials kept, `--resume` continues)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(STOPPED, file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        from ratatouille.orchestration.search import SweepIncomplete, SweepInterrupted

        if isinstance(error, SweepInterrupted):
            print(f"{STOPPED} ({error})", file=sys.stderr)
            return EXIT_INTERRUPTED
        if isinstance(error, SweepIncomplete):
            print(f"error: {error}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
