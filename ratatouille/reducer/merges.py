"""Merge methods beyond averaging, built for an arm's runs on ID validation only.

Every method takes the arm's M fine-tunings ``theta_i`` and their shared ancestor
``theta_0 = (phi_pt, w_lp)`` (``ReduceInputs.init_state``: the pre-trained featurizer with the
linear probe's head, the soups arm's init; the recycling arms start from ``(phi_aux, w_lp)``,
which are themselves fine-tunings of ``phi_pt``). Its hyperparameters come from the grid of
``reduce.merges`` (:class:`ratatouille.core.config.MergesConfig`): each grid point is scored on
ID val, the best kept (the first of equal scores, in grid order), and its values returned as
``params`` so they are logged. The math is in :mod:`ratatouille.merging.merges`, streamed over
the runs' loaders; this module only chooses and scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pandas
from torch import Tensor

from ratatouille.core.config import MergesConfig
from ratatouille.engine.fisher import diagonal_fisher
from ratatouille.merging.merges import (
    MagnitudeTrim,
    RandomDrop,
    Sparsifier,
    dare,
    fisher_average,
    model_stock,
    task_arithmetic,
    ties_merging,
)
from ratatouille.reducer.evaluate import ID_VAL, Evaluator
from ratatouille.reducer.inputs import ReduceError, ReduceInputs, TargetRun

State = dict[str, Tensor]
#: The prefix of the MLflow metrics holding the values each merge chose.
PARAM_PREFIX = "merge_param"


@dataclass
class MergeChoice:
    """The merged weights kept, their ID-val accuracy and the values that made them."""

    state: State
    id_val_acc: float
    params: dict[str, float]

    @property
    def selection(self) -> str:
        values = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
        return f"ID-val grid: {values}" if values else "ID val"


def _best_on_id_val(
    candidates: Iterator[tuple[dict[str, float], Callable[[], State]]], ev: Evaluator
) -> MergeChoice:
    """Score each candidate on ID val; keep the first best (two states alive at most)."""
    best: MergeChoice | None = None
    for params, build in candidates:
        state = build()
        accuracy = ev.accuracy(state, ID_VAL)
        if best is None or accuracy > best.id_val_acc:
            best = MergeChoice(state, accuracy, params)
        del state
    assert best is not None, "a merge grid has at least one point (MergesConfig checks it)"
    return best


def _loaders(runs: list[TargetRun]) -> list[Callable[[], Mapping[str, Tensor]]]:
    return [run.load_state for run in runs]


def build_task_arithmetic(
    runs: list[TargetRun], inputs: ReduceInputs, ev: Evaluator, grid: MergesConfig
) -> MergeChoice:
    """Task arithmetic (Ilharco et al., "Editing models with task arithmetic", ICLR 2023):
    ``theta_0 + lambda * sum_i (theta_i - theta_0)``, lambda from ``task_arithmetic_lambdas``
    (``1/M`` is the uniform soup). Inputs: the arm's runs, theta_0. One read per run."""
    sums = task_arithmetic(inputs.init_state, _loaders(runs))
    candidates = [
        ({"lambda": lam}, lambda lam=lam: sums.task_arithmetic(lam))
        for lam in grid.task_arithmetic_lambdas
    ]
    return _best_on_id_val(iter(candidates), ev)


def build_ties(
    runs: list[TargetRun], inputs: ReduceInputs, ev: Evaluator, grid: MergesConfig
) -> MergeChoice:
    """TIES-merging (Yadav et al., "TIES-Merging: resolving interference when merging
    models", NeurIPS 2023): trim each task vector to its top-``density`` magnitudes, elect a
    sign per entry by summed magnitude, average the agreeing entries, scale by lambda; density
    and lambda from ``ties_densities`` x ``ties_lambdas``. Inputs: the arm's runs, theta_0. One
    read per run (whatever the grid)."""
    merge = ties_merging(
        inputs.init_state, _loaders(runs), {d: MagnitudeTrim(d) for d in grid.ties_densities}
    )
    candidates = [
        ({"density": d, "lambda": lam}, lambda d=d, lam=lam: merge.merge(d, lam))
        for d in grid.ties_densities
        for lam in grid.ties_lambdas
    ]
    return _best_on_id_val(iter(candidates), ev)


def build_dare(
    runs: list[TargetRun], inputs: ReduceInputs, ev: Evaluator, grid: MergesConfig
) -> MergeChoice:
    """DARE (Yu et al., "Language models are Super Mario: absorbing abilities from homologous
    models as a free lunch", ICML 2024): drop each entry of each task vector with probability p
    (seeded by the experiment's seed, the run's index and the tensor's name), rescale the rest
    by ``1/(1-p)``, then ``dare_merge``: the average (``theta_0 + lambda * mean``) or TIES's sign
    election and agreeing mean; p and lambda from ``dare_drop_rates`` x ``dare_lambdas``.
    Inputs: the arm's runs, theta_0. One read per run (TIES too)."""
    seed, loaders = inputs.settings.seed, _loaders(runs)
    rates, lambdas = grid.dare_drop_rates, grid.dare_lambdas
    build: Callable[[float, float], State]
    if grid.dare_merge == "ties":
        drops: dict[Hashable, Sparsifier] = {p: RandomDrop(p, seed) for p in rates}
        build = ties_merging(inputs.init_state, loaders, drops).merge
    else:
        sums = dare(inputs.init_state, loaders, rates, seed)
        build = lambda p, lam: sums.mean(lam, p)  # noqa: E731
    candidates = [
        ({"p": p, "lambda": lam}, lambda p=p, lam=lam: build(p, lam))
        for p in rates
        for lam in lambdas
    ]
    return _best_on_id_val(iter(candidates), ev)


def build_model_stock(
    runs: list[TargetRun], inputs: ReduceInputs, ev: Evaluator, grid: MergesConfig
) -> MergeChoice:
    """Model Stock (Jang et al., "Model Stock: all we need is just a few fine-tuned models",
    ECCV 2024): per tensor, ``theta_0 + t * mean_i tau_i`` with ``t = k cos / (1 + (k-1) cos)``,
    k = M and cos the mean pairwise cosine of the task vectors. No hyperparameter; the mean
    ratio t over the tensors with an angle is logged. Inputs: the arm's runs, theta_0. One
    read per run."""
    stock = model_stock(inputs.init_state, _loaders(runs))
    ratios = [t for key, t in stock.ratios.items() if not math.isnan(stock.cosines[key])]
    mean_t = sum(ratios) / len(ratios) if ratios else 1.0
    return MergeChoice(stock.state_dict, ev.accuracy(stock.state_dict, ID_VAL), {"t_mean": mean_t})


def build_fisher(
    runs: list[TargetRun], inputs: ReduceInputs, ev: Evaluator, grid: MergesConfig
) -> MergeChoice:
    """Fisher-weighted averaging (Matena & Raffel, "Merging models with Fisher-weighted
    averaging", NeurIPS 2022): per entry ``sum_i F_i theta_i / sum_i F_i``, ``F_i`` the diagonal
    Fisher of run i (:func:`ratatouille.engine.fisher.diagonal_fisher`) on the first
    ``fisher_batches`` batches (``reduce`` batch size) of each training domain's ID-train split,
    labels sampled from the run's own predictions. No hyperparameter. Inputs: the arm's runs,
    ``ReduceInputs.id_train``. One read per run."""
    if not inputs.id_train:
        raise ReduceError(
            "reduce.merges lists fisher, but ReduceInputs.id_train is empty: the Fisher is "
            "estimated on the ID-train split; pass it, or drop fisher from reduce.merges.methods"
        )
    s = inputs.settings
    model = inputs.build_model()

    def pairs() -> Iterator[tuple[State, State]]:
        for index, run in enumerate(runs):
            state = dict(run.load_state())
            fisher = diagonal_fisher(
                model,
                state,
                inputs.id_train,
                n_batches=grid.fisher_batches,
                batch_size=s.batch_size,
                device=s.device,
                seed=s.seed + index,
            )
            yield state, fisher

    state = fisher_average(pairs())
    params = {"fisher_batches": float(grid.fisher_batches)}
    return MergeChoice(state, ev.accuracy(state, ID_VAL), params)


MergeBuild = Callable[[list[TargetRun], ReduceInputs, Evaluator, MergesConfig], MergeChoice]

#: method -> (label, build), in ``MERGE_METHODS`` order.
MERGE_BUILDS: dict[str, tuple[str, MergeBuild]] = {
    "task_arithmetic": ("Task arithmetic", build_task_arithmetic),
    "ties": ("TIES-merging", build_ties),
    "dare": ("DARE", build_dare),
    "model_stock": ("Model Stock", build_model_stock),
    "fisher": ("Fisher-weighted averaging", build_fisher),
}


def chosen_params(results: Mapping[Any, Any]) -> pandas.DataFrame:
    """One row per (cell, merge strategy, hyperparameter) of the values chosen on ID val."""
    rows = []
    for (domain, seed), result in results.items():
        if "params" not in result.table:
            continue
        for row in result.table.itertuples():
            for name, value in (row.params or {}).items():
                rows.append(
                    {
                        "test_domain": domain,
                        "split_seed": seed,
                        "strategy": row.strategy,
                        "param": name,
                        "value": float(value),
                    }
                )
    return pandas.DataFrame(
        rows, columns=["test_domain", "split_seed", "strategy", "param", "value"]
    )


def param_metrics(results: Mapping[Any, Any]) -> dict[str, float]:
    """``merge_param/<strategy>/<param>``: the chosen value, its mean over cells when several
    (each cell's value is in the report)."""
    frame = chosen_params(results)
    return {
        f"{PARAM_PREFIX}/{strategy}/{param}": float(rows.value.mean())
        for (strategy, param), rows in frame.groupby(["strategy", "param"])
    }


def params_text(results: Mapping[Any, Any]) -> str:
    """The report's lines: per cell and merge strategy, the values chosen on ID val."""
    frame = chosen_params(results)
    if frame.empty:
        return ""
    lines = ["", "merge hyperparameters chosen on ID val:"]
    for (domain, seed, strategy), rows in frame.groupby(
        ["test_domain", "split_seed", "strategy"], sort=False
    ):
        values = ", ".join(f"{r.param}={r.value:g}" for r in rows.itertuples())
        lines.append(f"- {domain}-split{seed} {strategy}: {values}")
    return "\n".join(lines) + "\n"
