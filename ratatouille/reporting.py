"""From the trained stages to the answer: reduce every cell, log it to MLflow, print the table.

The reducer of a cell runs where the trials ran (a Ray task with a trial's resources), because
evaluating dozens of networks on a CPU head node would take longer than training them.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from ratatouille.config import ExperimentConfig, parse_config
from ratatouille.models import build_classifier, join_state
from ratatouille.reduce import (
    ReduceInputs,
    ReduceResult,
    ReduceSettings,
    TargetRun,
    reduce_cell,
)
from ratatouille.stages import context_for
from ratatouille.summary import format_table, long_form, summarize, summarize_long
from ratatouille.sweep import PRETRAINED, Cell, cell_key

REPORT_MD = "report.md"


@dataclass
class Outcome:
    """What `ratatouille run` / `reduce` hand back: the table and where to look further."""

    experiment: str
    table_markdown: str
    tracking_uri: str
    parent_run_id: str
    final_strategies: dict[str, str]


def _key(test_domain: str, split_seed: int) -> str:
    return cell_key({"test_domain": test_domain, "split_seed": split_seed})


def _target_runs(outcomes) -> list[TargetRun]:
    from ratatouille.search import read_weights  # loaders run inside the reducer's task
    return [TargetRun(run_id=f"{o.spec['arm']}-{o.spec['run']}", arm=o.spec["arm"],
                      init_source=o.spec["init_source"],
                      id_val_acc=float(o.metrics["best_id_val_acc"]),
                      load_state=functools.partial(read_weights, o.checkpoint, "model"),
                      hparams=dict(o.spec["hparams"]))
            for o in outcomes]


def _recycled_sources(runs: list[TargetRun]) -> list[str]:
    """Pool entries for Hypothesis 1: those of the ratatouille arm (the robust arm's otherwise),
    so a curve never joins a featurizer to its own moving average."""
    for arm in ("ratatouille", "robust_ratatouille"):
        names = sorted({r.init_source for r in runs if r.arm == arm} - {PRETRAINED})
        if names:
            return names
    return []


def reduce_one_cell(config: ExperimentConfig, cell: Cell, runs: list[TargetRun],
                    featurizers: dict, w_lp: dict) -> ReduceResult:
    """Build one cell's reducer inputs where the data lives, and reduce it."""
    from ratatouille.data import target_splits
    context = context_for(config)
    dataset = context.dataset(config.data.dataset)
    splits = target_splits(dataset, [cell.test_env], cell.split_seed, config.data.holdout_fraction)
    phi_pt = featurizers[PRETRAINED]
    build = functools.partial(build_classifier, config.model.arch, dataset.num_classes,
                              freeze_bn=config.model.freeze_bn)
    pool_loaders = {name: functools.partial(dict, featurizers[name])
                    for name in _recycled_sources(runs)}
    settings = ReduceSettings(wise_alpha=config.reduce.wise_alpha,
                              lmc_tolerance=config.reduce.lmc_tolerance,
                              ablation_draws=config.reduce.ablation_draws,
                              max_pairs=config.reduce.max_pairs, seed=config.seed,
                              device=context.device())
    inputs = ReduceInputs(test_domain=cell.test_domain, split_seed=cell.split_seed, runs=runs,
                          build_model=build, id_val=splits.id_val, ood_test=splits.ood_test,
                          init_state=join_state(phi_pt, w_lp), w_lp=w_lp,
                          pool_featurizers=pool_loaders, settings=settings)
    return reduce_cell(inputs)


def reduce_metrics(results: dict[tuple[str, int], ReduceResult]) -> dict[str, float]:
    """MLflow metrics: means over cells, and per cell when there are several."""
    long = long_form(results)
    metrics: dict[str, float] = {}
    for strategy, rows in long.groupby("strategy"):
        metrics[f"ood_acc/{strategy}"] = rows.ood_acc.mean()
        metrics[f"id_val_acc/{strategy}"] = rows.id_val_acc.mean()
        if len(results) > 1:
            for row in rows.itertuples():
                metrics[f"ood_acc/{strategy}/{_key(row.test_domain, row.split_seed)}"] = row.ood_acc
    diversity = pd.concat([r.diversity for r in results.values()], ignore_index=True)
    for arm, rows in diversity.groupby("arm"):
        metrics[f"q_diversity/{arm}"] = rows.q_diversity.mean()
        metrics[f"ratio_error/{arm}"] = rows.ratio_error.mean()
    return {key: float(value) for key, value in metrics.items() if pd.notna(value)}


def reduce_and_log(config: ExperimentConfig, state, tracker) -> Outcome:
    """Reduce every cell (as Ray tasks), then log metrics, tables, figures and the model."""
    from ratatouille.plots import figures as cell_figures
    from ratatouille.search import run_remote
    by_cell: dict[str, list] = {cell.key: [] for cell in state.cells}
    for outcome in state.targets:
        by_cell[cell_key(outcome.spec["cell"])].append(outcome)
    pending = {cell: run_remote(reduce_one_cell, config.resources, config, cell,
                                _target_runs(by_cell[cell.key]), state.featurizers,
                                state.heads[cell.key])
               for cell in state.cells}
    results = {(cell.test_domain, cell.split_seed): future() for cell, future in pending.items()}
    summary = summarize(results)
    table = format_table(summary)
    figures = {}
    for (domain, seed), result in results.items():
        suffix = "" if len(results) == 1 else f"_{_key(domain, seed)}"
        figures.update({f"{name}{suffix}": fig for name, fig in cell_figures(result).items()})
    run_id = tracker.log_reduction(reduce_metrics(results), long_form(results), figures,
                                   {REPORT_MD: table + "\n"})
    _log_models(config, tracker, run_id, results)
    return Outcome(config.name, table, tracker.uri, tracker.parent_id,
                   {_key(d, s): r.final_strategy for (d, s), r in results.items()})


def _log_models(config: ExperimentConfig, tracker, run_id: str, results) -> None:
    """One final model per cell (each trained without its test domain), all registered under
    one name; their tags say which held-out domain and split each version belongs to."""
    name = config.tracking.registered_model_name or f"{config.name}-ratatouille"
    for result in results.values():
        num_classes = result.final_model_state["head.weight"].shape[0]
        model = build_classifier(config.model.arch, num_classes, freeze_bn=config.model.freeze_bn)
        model.load_state_dict(result.final_model_state)
        cell = _key(result.test_domain, result.split_seed)
        tracker.log_final_model(run_id, model.eval(), name, artifact_name=f"model-{cell}", tags={
            "strategy": result.final_strategy, "test_domain": result.test_domain,
            "split_seed": str(result.split_seed)})
    tracker.finish_run(run_id)


def print_outcome(outcome: Outcome) -> None:
    print(f"\n{outcome.experiment}: OOD test accuracy (%)\n")
    print(outcome.table_markdown)
    print(f"\nfinal model: {outcome.final_strategies}")
    print(f"MLflow: {outcome.tracking_uri}, parent run {outcome.parent_run_id}")
    print(_mlflow_hint(outcome.tracking_uri))


def _mlflow_hint(uri: str) -> str:
    if uri.startswith("sqlite:"):
        beside = Path(sys.executable).with_name("mlflow")  # the venv's mlflow, maybe not on PATH
        command = str(beside) if beside.exists() else "mlflow"
        return f"open it with: {command} ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)"
    return f"open {uri} in a browser"


def reduce_latest(experiment: str | None, tracking_uri: str | None) -> Outcome:
    """`ratatouille reduce`: the latest run of an experiment, every stage restored, reduced again."""
    from ratatouille.pipeline import run_pipeline
    from ratatouille.tracking import latest_parent, read_config_text
    tracker, parent = latest_parent(experiment, tracking_uri)
    config = parse_config(yaml.safe_load(read_config_text(tracker)),
                          f"the config logged with run {parent.info.run_id}")
    config.tracking.mlflow_uri = tracker.uri
    return run_pipeline(config, reduce_only=True)


def write_report(experiment: str | None, tracking_uri: str | None, out: str) -> Path:
    """`ratatouille report`: print the comparison table, write Markdown and CSV."""
    from ratatouille.tracking import latest_parent, read_comparison
    tracker, parent = latest_parent(experiment, tracking_uri)
    long = read_comparison(tracker)
    table = format_table(summarize_long(long))
    folder = Path(out) / tracker.experiment_name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(
        f"# {tracker.experiment_name}: OOD test accuracy (%)\n\nrun {parent.info.run_id}\n\n{table}\n")
    long.to_csv(folder / "report.csv", index=False)
    print(f"{tracker.experiment_name}: OOD test accuracy (%), mean ± std over split seeds\n")
    print(table)
    print(f"\nwrote {folder / 'report.md'} and {folder / 'report.csv'}")
    print(_mlflow_hint(tracker.uri))
    return folder

