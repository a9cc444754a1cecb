"""From the trained stages to the answer: reduce every cell, log it to MLflow, print the table.

The reducer of a cell runs where the trials ran (a Ray task with a trial's resources), because
evaluating dozens of networks on a CPU head node would take longer than training them.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ratatouille.core.config import ExperimentConfig
from ratatouille.core.names import PRETRAINED, MetricKey, WeightsFile
from ratatouille.data import MultiDomainDataset, TaskSplits
from ratatouille.data.identity import input_record
from ratatouille.engine.models import Classifier, build_classifier, join_state
from ratatouille.engine.probe import eval_train_views
from ratatouille.engine.train import predict_logits
from ratatouille.orchestration.search import (
    SweepIncomplete,
    TrialOutcome,
    local_weights,
    read_weights,
    run_remote,
)
from ratatouille.recipe.specs import Cell, TargetSpec, cell_key
from ratatouille.recipe.stages import StateDict, TrialContext, context_for
from ratatouille.recipe.sweep import domain_sizes_of
from ratatouille.reducer.claims import claims_metrics, claims_table, format_claims
from ratatouille.reducer.evaluate import reducer_memory_bytes
from ratatouille.reducer.inputs import recycled_sources, settings_from_config
from ratatouille.reducer.merges import param_metrics, params_text
from ratatouille.reducer.plots import cross_cell_figures
from ratatouille.reducer.plots import figures as cell_figures
from ratatouille.reducer.reduce import (
    ReduceInputs,
    ReduceResult,
    TargetRun,
    reduce_cell,
    reduce_domain_dagger,
)
from ratatouille.reducer.summary import format_table, long_form, summarize

REPORT_MD = "report.md"


@dataclass
class Outcome:
    """What `ratatouille run` / `reduce` hand back: the table and where to look further."""

    experiment: str
    table_markdown: str
    tracking_uri: str
    parent_run_id: str
    final_strategies: dict[str, str]
    excluded: list[str] = field(default_factory=list)  # "trial name: reason", one per trial
    experiment_id: str = ""
    model_versions: dict[str, str] = field(default_factory=dict)  # cell -> registered version
    claims_markdown: str = ""  # the paper's claims, computed (reducer.claims)


@dataclass
class CellReduction:
    """One cell's reducer result, with what its MLflow records need from the data, which only
    the reducer's task can read: the inputs (context, data.identity record) and one ID-val
    image for the final model's input example."""

    result: ReduceResult
    inputs: list[tuple[str, dict[str, Any]]]
    input_example: np.ndarray
    device: str = "cpu"  # where the task evaluated (cuda when the reducer got a GPU)


def _target_spec(outcome: TrialOutcome) -> TargetSpec:
    assert isinstance(outcome.spec, TargetSpec)
    return outcome.spec


def _target_runs(outcomes: list[TrialOutcome]) -> list[TargetRun]:
    runs = []
    for outcome in outcomes:
        spec = _target_spec(outcome)
        assert outcome.checkpoint is not None, f"{spec.trial_name} kept no best checkpoint"
        runs.append(
            TargetRun(
                run_id=spec.run_id,
                arm=spec.arm,
                init_source=spec.init_source,
                id_val_acc=float(outcome.metrics[MetricKey.BEST_ID_VAL_ACC]),
                # loaded inside the reducer's task, where the checkpoint is read
                load_state=functools.partial(read_weights, outcome.checkpoint, WeightsFile.MODEL),
                hparams=dict(vars(spec.hparams)),
                load_ma_state=_ma_loader(outcome),
            )
        )
    return runs


def _ma_loader(outcome: TrialOutcome) -> Callable[[], StateDict] | None:
    """A run's moving-average weights, when it kept them (its closing report scores them)."""
    if MetricKey.MA_ID_VAL_ACC not in outcome.metrics or outcome.checkpoint is None:
        return None
    return functools.partial(read_weights, outcome.checkpoint, WeightsFile.MODEL_MA)


def _recycled_sources(runs: list[TargetRun]) -> list[str]:
    return recycled_sources([r.arm for r in runs], [r.init_source for r in runs])


def _cell_inputs(config: ExperimentConfig, dataset: Any, cell: Cell) -> list[tuple[str, dict]]:
    """The data a cell's numbers come from: ID val on the training domains, the held-out
    domain in full for the OOD test."""
    train = [index for index in range(len(dataset)) if index != cell.test_env]
    holdout = config.data.holdout_fraction
    return [
        ("validation", input_record(dataset, train, cell.split_seed, holdout)),
        ("test", input_record(dataset, [cell.test_env], None, None)),
    ]


def _predict(config: ExperimentConfig) -> Callable[..., tuple]:
    """The reducer's forward passes at the precision the runs trained with (model.precision)."""
    return functools.partial(predict_logits, precision=config.model.precision)


def _cell_data(
    config: ExperimentConfig, cell: Cell
) -> tuple[TrialContext, MultiDomainDataset, TaskSplits, Callable[[], Classifier]]:
    """What the reducer reads of a cell, built where the data lives: the trials' context, the
    dataset, the cell's splits (as the trials drew them) and a builder of its classifier."""
    context = context_for(config)
    dataset = context.dataset(config.data.dataset)
    splits = context.cell_splits(dataset, cell)
    build = functools.partial(
        build_classifier, config.model.arch, dataset.num_classes, freeze_bn=config.model.freeze_bn
    )
    return context, dataset, splits, build


def _copy_of(weights: Mapping[str, StateDict], name: str) -> StateDict:
    return dict(weights[name])


def reduce_one_cell(
    config: ExperimentConfig,
    cell: Cell,
    runs: list[TargetRun],
    featurizers: Mapping[str, StateDict],
    heads: Mapping[str, StateDict],
) -> CellReduction:
    """Build one cell's reducer inputs where the data lives, and reduce it, reading each run's
    weights files from storage once (into a node-local folder for the task's lifetime).
    ``featurizers`` and ``heads`` are read by key (object-store references under Ray): the task
    fetches phi_pt, the cell's w_lp and, when a curve needs them, the recycled pool entries."""
    with local_weights():
        dataset, inputs = cell_reduce_inputs(config, cell, runs, featurizers, heads)
        example = inputs.id_val[0][0][0][None].numpy()  # a batch of one image (N, C, H, W)
        return CellReduction(
            reduce_cell(inputs),
            _cell_inputs(config, dataset, cell),
            example,
            inputs.settings.device,
        )


def cell_reduce_inputs(
    config: ExperimentConfig,
    cell: Cell,
    runs: list[TargetRun],
    featurizers: Mapping[str, StateDict],
    heads: Mapping[str, StateDict],
) -> tuple[MultiDomainDataset, ReduceInputs]:
    """The dataset and the reducer's inputs of one cell. The ID-train split that Fisher
    averaging reads is under the evaluation transform: the training one draws a new random
    augmentation per read, and the Fisher (so the merged model) would differ from one
    reduction of the same sweep to the next."""
    context, dataset, splits, build = _cell_data(config, cell)
    phi_pt, w_lp = featurizers[PRETRAINED], heads[cell.key]
    pool_loaders: dict[str, Callable[[], StateDict]] = {
        name: functools.partial(_copy_of, featurizers, name) for name in _recycled_sources(runs)
    }
    settings = settings_from_config(config.reduce, config.seed, context.device())
    return dataset, ReduceInputs(
        test_domain=cell.test_domain,
        split_seed=cell.split_seed,
        runs=runs,
        build_model=build,
        id_val=splits.id_val,
        ood_test=splits.ood_test,
        init_state=join_state(phi_pt, w_lp),
        w_lp=w_lp,
        pool_featurizers=pool_loaders,
        settings=settings,
        predict=_predict(config),
        id_train=eval_train_views(dataset, splits),
    )


def reduce_domain_dagger_task(
    config: ExperimentConfig, cells: list[Cell], runs_by_seed: dict[int, list[TargetRun]]
) -> pd.DataFrame:
    """uniform† of one test domain, where the data lives: the held-out domain in full is the
    OOD test set of every split, so the first cell's serves them all."""
    cell = cells[0]
    context, _, splits, build = _cell_data(config, cell)
    with local_weights():
        return reduce_domain_dagger(
            cell.test_domain,
            runs_by_seed,
            build,
            splits.ood_test,
            device=context.device(),
            predict=_predict(config),
        )


def _state_bytes(state: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def task_memory(config: ExperimentConfig, runs: list[TargetRun], state: Any, cell: Cell) -> int:
    """Ray ``memory=`` of a reducer task over ``runs``
    (:func:`ratatouille.reducer.evaluate.reducer_memory_bytes`), from the model's weights
    (phi_pt + w_lp, float32 as the runs store them) and every image of the dataset (ID val and
    OOD test together are at most all of them)."""
    w_lp = state.heads[cell.key]
    weights = _state_bytes(state.featurizers[PRETRAINED]) + _state_bytes(w_lp)
    n_states = len(runs) + sum(r.load_ma_state is not None for r in runs)
    images = sum(domain_sizes_of(config.seed)(config.data.dataset))
    return reducer_memory_bytes(weights, n_states, images, int(w_lp["weight"].shape[0]))


def _launch_daggers(
    config: ExperimentConfig, cells: list[Cell], by_cell: dict[str, list[TrialOutcome]], state: Any
) -> list[Callable[[], pd.DataFrame]]:
    """One uniform† task per test domain swept over several split seeds (none otherwise)."""
    if not config.reduce.uniform_dagger:
        return []
    by_domain: dict[str, list[Cell]] = {}
    for cell in cells:
        by_domain.setdefault(cell.test_domain, []).append(cell)
    pending = []
    for domain_cells in by_domain.values():
        if len(domain_cells) > 1:
            runs = {c.split_seed: _target_runs(by_cell[c.key]) for c in domain_cells}
            every = [run for seed_runs in runs.values() for run in seed_runs]
            memory = task_memory(config, every, state, domain_cells[0])
            pending.append(
                run_remote(
                    reduce_domain_dagger_task,
                    config.resources,
                    config,
                    domain_cells,
                    runs,
                    memory=memory,
                )
            )
    return pending


def _collect_daggers(pending: list[Callable[[], pd.DataFrame]]) -> pd.DataFrame | None:
    frames = [future() for future in pending]
    return pd.concat(frames, ignore_index=True) if frames else None


def reduce_metrics(
    results: dict[tuple[str, int], ReduceResult], dagger: pd.DataFrame | None = None
) -> dict[str, float]:
    """MLflow metrics: means over cells, and per cell when there are several (a uniform† row's
    cell is ``<domain>-split-1``: every split)."""
    long = long_form(results, dagger)
    metrics: dict[str, float] = {}
    for strategy, rows in long.groupby("strategy"):
        metrics[f"ood_acc/{strategy}"] = rows.ood_acc.mean()
        metrics[f"id_val_acc/{strategy}"] = rows.id_val_acc.mean()
        if len(results) > 1:
            for row in rows.itertuples():
                metrics[f"ood_acc/{strategy}/{cell_key(row.test_domain, row.split_seed)}"] = (
                    row.ood_acc
                )
    diversity = pd.concat([r.diversity for r in results.values()], ignore_index=True)
    for (arm, split), rows in diversity.groupby(["arm", "split"]):
        suffix = "" if split == "ood_test" else f"_{split}"  # OOD keeps its earlier key
        metrics[f"q_diversity{suffix}/{arm}"] = rows.q_diversity.mean()
        metrics[f"ratio_error{suffix}/{arm}"] = rows.ratio_error.mean()
    metrics.update(param_metrics(results))  # the merges' hyperparameters chosen on ID val
    return {key: float(value) for key, value in metrics.items() if pd.notna(value)}


def reduce_and_log(config: ExperimentConfig, state: Any, tracker: Any) -> Outcome:
    """Reduce every cell (as Ray tasks), then log metrics, tables, figures and the model.

    Reducing an unchanged sweep again writes nothing: the reducer run, its metrics and the
    registered versions stay as they are."""
    by_cell: dict[str, list[TrialOutcome]] = {cell.key: [] for cell in state.cells}
    for outcome in state.targets:
        by_cell[_target_spec(outcome).cell.key].append(outcome)
    excluded = [f"{e.spec.trial_name}: {e.reason}" for e in state.excluded]
    empty = [key for key, outcomes in by_cell.items() if not outcomes]
    if empty:
        raise SweepIncomplete(
            f"every target trial of {empty} was excluded ({excluded[:3]}...): "
            "nothing to reduce there; lower the learning rates and rerun"
        )
    pending = {}
    for cell in state.cells:
        runs = _target_runs(by_cell[cell.key])
        pending[cell] = run_remote(
            reduce_one_cell,
            config.resources,
            config,
            cell,
            runs,
            state.featurizers,  # references: the task fetches what it reads
            state.heads,
            memory=task_memory(config, runs, state, cell),
        )
    pending_daggers = _launch_daggers(config, state.cells, by_cell, state)
    cells = {}
    for index, (cell, future) in enumerate(pending.items(), start=1):
        reduction = cells[(cell.test_domain, cell.split_seed)] = future()
        print(
            f"reducer: cell {index}/{len(pending)} ({cell.key}) reduced: "
            f"{len(reduction.result.table)} strategies, final model "
            f"{reduction.result.final_strategy}",
            file=sys.stderr,
            flush=True,
        )
    results = {key: reduction.result for key, reduction in cells.items()}
    dagger = _collect_daggers(pending_daggers)
    table = format_table(summarize(results, dagger))
    figures = {}
    for (domain, seed), result in results.items():
        suffix = "" if len(results) == 1 else f"_{cell_key(domain, seed)}"
        figures.update({f"{name}{suffix}": fig for name, fig in cell_figures(result).items()})
    claims = claims_table(results)
    claims_md = format_claims(claims)
    report = table + "\n" + _final_models_text(results) + params_text(results)
    report += "".join(f"\nexcluded {line}" for line in excluded)
    report += f"\n\n## The paper's claims, computed over {len(results)} cells\n\n{claims_md}"
    inputs = [item for reduction in cells.values() for item in reduction.inputs]
    metrics = {**reduce_metrics(results, dagger), **claims_metrics(claims)}
    run_id, changed = tracker.log_reduction(
        metrics,
        long_form(results, dagger),
        figures,
        {REPORT_MD: report + "\n"},
        inputs,
        device=",".join(sorted({reduction.device for reduction in cells.values()})),
    )
    if changed:
        tracker.log_analysis(run_id, {"claims": claims}, cross_cell_figures(results))
    versions = _log_models(config, tracker, run_id, list(cells.values()))
    if changed:
        tracker.finish_run(run_id)
    return Outcome(
        config.name,
        table,
        tracker.uri,
        tracker.parent_id,
        {cell_key(d, s): r.final_strategy for (d, s), r in results.items()},
        excluded,
        experiment_id=tracker.experiment_id,
        model_versions=versions,
        claims_markdown=claims_md,
    )


def _final_models_text(results: dict[tuple[str, int], ReduceResult]) -> str:
    """The report's account of the registered models: which strategy, and which rule chose it."""
    lines = [
        f"\nfinal model {cell_key(d, s)}: {r.final_strategy} ({r.final_reason})"
        for (d, s), r in results.items()
    ]
    return "".join(lines) + "\n"


def registered_model_name(config: ExperimentConfig) -> str:
    return config.tracking.registered_model_name or f"{config.name}-ratatouille"


def _log_models(
    config: ExperimentConfig, tracker: Any, run_id: str, cells: list[CellReduction]
) -> dict[str, str]:
    """One final model per cell (each trained without its test domain), all registered under
    one name; their tags say which held-out domain and split each version belongs to. Each
    version carries its cell's alias; `champion` marks the last one logged. Returns the
    version of each cell."""
    versions = {}
    for index, reduction in enumerate(cells):
        result = reduction.result
        num_classes = result.final_model_state["head.weight"].shape[0]
        model = build_classifier(config.model.arch, num_classes, freeze_bn=config.model.freeze_bn)
        model.load_state_dict(result.final_model_state)
        cell = cell_key(result.test_domain, result.split_seed)
        last = index == len(cells) - 1
        versions[cell] = tracker.log_final_model(
            run_id,
            model.eval(),
            registered_model_name(config),
            artifact_name=f"model-{cell}",
            tags={
                "strategy": result.final_strategy,
                "selection_rule": config.reduce.final_model,
                "test_domain": result.test_domain,
                "split_seed": str(result.split_seed),
            },
            input_example=reduction.input_example,
            aliases=tracker.champion_aliases(cell, latest=last),
            description=f"{result.final_strategy}: {result.final_reason}",
        )
    return versions
