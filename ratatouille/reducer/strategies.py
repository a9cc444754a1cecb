"""The strategy registry: every row of the comparison table (paper Table 1, App. A and E).

Each strategy is one registered unit, in the spirit of mergekit's merge methods: its name (the
MLflow metric key ``ood_acc/<name>``), its label (tables and figures), the arm whose runs it
uses, and how it builds its weights or predictions from those runs **on ID validation only**
(the OOD split is sealed while strategies are built, see :mod:`ratatouille.reducer.evaluate`).
The registry's order is the table's order. Adding a strategy is one entry here, and its name in
the arm's ``strategies`` (:mod:`ratatouille.core.arms`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ratatouille.core.arms import BEST_ID_VAL, MERGE_METHODS, merge_strategies
from ratatouille.merging.soups import greedy_soup, interpolate, uniform_soup
from ratatouille.reducer.evaluate import ID_VAL, Evaluator
from ratatouille.reducer.inputs import ReduceError, ReduceInputs, TargetRun
from ratatouille.reducer.merges import MERGE_BUILDS


@dataclass
class Selected:
    """A strategy decided on ID val; ``kind`` says how its OOD accuracy is obtained: ``run``
    (a run's cached logits), ``ensemble`` (mean logits of ``members``), ``mean`` (the mean of
    the members' accuracies) or ``state`` (weights parked in the :class:`StateStore` under the
    strategy's name). Members may be moving-average views of runs (:func:`ma_views`)."""

    strategy: str
    arm: str
    selection: str
    kind: str
    members: tuple[str, ...]
    id_val_acc: float
    params: dict[str, float] = field(default_factory=dict)  # hyperparameters chosen on ID val


class StateStore:
    """Strategy weights parked on disk between selection and final evaluation."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(self, name: str, state: dict[str, Tensor]) -> None:
        torch.save(state, self.folder / f"{name}.pt")

    def load(self, name: str) -> dict[str, Tensor]:
        return torch.load(self.folder / f"{name}.pt", map_location="cpu", weights_only=True)


@dataclass
class Selection:
    """What a strategy may use while it is built: the cell's inputs, the evaluator (OOD
    sealed) and the store for the weights it builds."""

    inputs: ReduceInputs
    ev: Evaluator
    store: StateStore


Build = Callable[[str, str, list[TargetRun], Selection], Selected | None]


@dataclass(frozen=True)
class Strategy:
    name: str
    label: str
    arm: str
    build: Build


def best_run(runs: list[TargetRun]) -> TargetRun:
    """Highest logged ID-val score; ties go to the earliest run (as greedy's stable sort)."""
    return max(runs, key=lambda r: r.id_val_acc)  # max keeps the first of equal keys


def _best_id_val(name: str, arm: str, runs: list[TargetRun], sel: Selection) -> Selected:
    """The run with the best logged ID-val score among every run of the arm. For inter-training
    that includes the runs started from phi_pt, as the reference's ``collect_results`` selects
    over the whole recycling sweep (source 0 is one of its sources)."""
    best = best_run(runs)
    return Selected(
        name, arm, "ID val", "run", (best.run_id,), sel.ev.run_accuracy(best.run_id, ID_VAL)
    )


#: Suffix of the run id of a run's moving-average view.
MA_SUFFIX = "@ma"


def ma_views(runs: list[TargetRun]) -> list[TargetRun]:
    """Each run that kept a moving average of its weights, as a run of its own whose weights
    are that average (id ``<run_id>@ma``), so the evaluator caches its logits like a run's."""
    return [
        TargetRun(r.run_id + MA_SUFFIX, r.arm, r.init_source, math.nan, r.load_ma_state)
        for r in runs
        if r.load_ma_state is not None
    ]


def _ma_members(runs: list[TargetRun], sel: Selection) -> tuple[str, ...]:
    views = ma_views(runs)
    for view in views:
        sel.ev.run_logits(view.run_id, view.load_state, ID_VAL)
    return tuple(view.run_id for view in views)


def _ma(name: str, arm: str, runs: list[TargetRun], sel: Selection) -> Selected | None:
    """MA (Arpit et al.): each run's uniform trajectory average, scored as the mean over runs,
    as the paper's MA row reports a mean over runs."""
    members = _ma_members(runs, sel)
    if not members:
        return None
    id_val = sum(sel.ev.run_accuracy(m, ID_VAL) for m in members) / len(members)
    return Selected(name, arm, "uniform trajectory", "mean", members, id_val)


def _ensemble_of_averages(
    name: str, arm: str, runs: list[TargetRun], sel: Selection
) -> Selected | None:
    """Ensemble of averages (Arpit et al.): the mean logits of the runs' moving averages."""
    members = _ma_members(runs, sel)
    if not members:
        return None
    accuracy = sel.ev.ensemble_accuracy(members, ID_VAL)
    return Selected(name, arm, "ensemble", "ensemble", members, accuracy)


def _wise_ft(name: str, arm: str, runs: list[TargetRun], sel: Selection) -> Selected:
    """WiSE-FT (App. A): ``(1 - alpha) * theta_erm + alpha * theta_init``."""
    best = best_run(runs)
    alpha = sel.inputs.settings.wise_alpha
    state = interpolate(best.load_state(), sel.inputs.init_state, alpha)
    sel.store.save(name, state)
    return Selected(
        name, arm, f"WiSE alpha={alpha:g}", "state", (best.run_id,), sel.ev.accuracy(state, ID_VAL)
    )


def _ensemble(name: str, arm: str, runs: list[TargetRun], sel: Selection) -> Selected:
    """The functional ensemble: mean logits of every run of the arm."""
    ids = tuple(r.run_id for r in runs)
    return Selected(name, arm, "ensemble", "ensemble", ids, sel.ev.ensemble_accuracy(ids, ID_VAL))


def _uniform(name: str, arm: str, runs: list[TargetRun], sel: Selection) -> Selected:
    """The uniform average of every run (paper Sec. 3, step 5). A soup of one model is that
    run's weights: scored from its cached logits, never predicted a second time."""
    members = tuple(r.run_id for r in runs)
    if len(runs) == 1:
        return Selected(
            name, arm, "uniform", "run", members, sel.ev.run_accuracy(members[0], ID_VAL)
        )
    state = uniform_soup(run.load_state() for run in runs)
    sel.store.save(name, state)
    return Selected(name, arm, "uniform", "state", members, sel.ev.accuracy(state, ID_VAL))


def _greedy(name: str, arm: str, runs: list[TargetRun], sel: Selection) -> Selected:
    """The greedy soup: runs by decreasing logged ID-val score, each kept iff the average's
    ID-val accuracy does not drop below the threshold: at first the best run's logged score, or
    its measured one (``greedy_threshold: measured``)."""
    greedy = greedy_soup(
        [run.load_state for run in runs],
        [run.id_val_acc for run in runs],
        lambda state: sel.ev.accuracy(state, ID_VAL),
        threshold=sel.inputs.settings.greedy_threshold,
    )
    chosen = tuple(runs[i].run_id for i in greedy.selected)
    if len(chosen) == 1:  # GreedySoup.score is then the logged score; the table shows measured ones
        return Selected(name, arm, "greedy", "run", chosen, sel.ev.run_accuracy(chosen[0], ID_VAL))
    sel.store.save(name, greedy.state_dict)
    return Selected(name, arm, "greedy", "state", chosen, greedy.score)


def _merge(method: str) -> Build:
    """The strategy of one merge method (:mod:`ratatouille.reducer.merges`, whose builds cite
    their papers and inputs): built only when ``reduce.merges`` lists the method."""
    merge = MERGE_BUILDS[method][1]

    def build(name: str, arm: str, runs: list[TargetRun], sel: Selection) -> Selected | None:
        grid = sel.inputs.settings.merges
        if grid is None or method not in grid.methods:
            return None
        choice = merge(runs, sel.inputs, sel.ev, grid)
        sel.store.save(name, choice.state)
        members = tuple(r.run_id for r in runs)
        return Selected(
            name, arm, choice.selection, "state", members, choice.id_val_acc, choice.params
        )

    build.__doc__ = merge.__doc__
    return build


_ARM_LABELS = {"soups": "soups", "ratatouille": "ratatouille", "robust_ratatouille": "robust"}


def _merge_rows(arm: str) -> tuple[Strategy, ...]:
    """``<method>_<arm>`` for every merge method, after the arm's greedy soup."""
    return tuple(
        Strategy(name, f"{MERGE_BUILDS[method][0]} ({_ARM_LABELS[arm]} runs)", arm, _merge(method))
        for method, name in zip(MERGE_METHODS, merge_strategies(arm))
    )


STRATEGIES: dict[str, Strategy] = {
    strategy.name: strategy
    for strategy in (
        Strategy("erm", "Vanilla fine-tuning (ID val)", "soups", _best_id_val),
        Strategy("ma", "MA (uniform trajectory, mean over runs)", "soups", _ma),
        Strategy("ensemble_ma", "Ensemble* of averages (EoA)", "soups", _ensemble_of_averages),
        Strategy("wise_ft", "WiSE fine-tuning", "soups", _wise_ft),
        Strategy("ensemble_soups", "Ensemble* (uniform)", "soups", _ensemble),
        Strategy("soup_uniform", "Model soups (uniform)", "soups", _uniform),
        Strategy("soup_greedy", "Model soups (greedy)", "soups", _greedy),
        *_merge_rows("soups"),
        Strategy(
            "inter_training",
            "Inter-training (ID val)",
            "ratatouille",
            _best_id_val,
        ),
        Strategy(
            "ensemble_ratatouille",
            "Ensemble* of inter-training (uniform)",
            "ratatouille",
            _ensemble,
        ),
        Strategy("fusing", "Fusing (ID val)", "fusing", _best_id_val),
        Strategy("ratatouille_uniform", "Model ratatouille (uniform)", "ratatouille", _uniform),
        Strategy("ratatouille_greedy", "Model ratatouille (greedy)", "ratatouille", _greedy),
        *_merge_rows("ratatouille"),
        Strategy(
            "robust_inter_training",
            "Robust inter-training (ID val)",
            "robust_ratatouille",
            _best_id_val,
        ),
        Strategy(
            "robust_ratatouille_uniform",
            "Robust model ratatouille (uniform)",
            "robust_ratatouille",
            _uniform,
        ),
        Strategy(
            "robust_ratatouille_greedy",
            "Robust model ratatouille (restricted = greedy)",
            "robust_ratatouille",
            _greedy,
        ),
        *_merge_rows("robust_ratatouille"),
    )
}

#: ``reduce.final_model``'s default: the paper's main method, fixed before any score is seen.
DEFAULT_FINAL = "ratatouille_uniform"
#: When the configured strategy was not built in a cell (its arm is absent), the first of
#: these that was: uniform averages first, as the default.
FINAL_FALLBACK: tuple[str, ...] = (
    "ratatouille_uniform",
    "robust_ratatouille_uniform",
    "soup_uniform",
    "fusing",
)
#: The groups the ``best_id_val`` rule compares within: the first group with a strategy built.
FINAL_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("ratatouille_uniform", "ratatouille_greedy"),
    ("robust_ratatouille_uniform", "robust_ratatouille_greedy"),
    ("soup_uniform", "soup_greedy"),
    ("fusing",),
)


def _best_of_candidates(by_name: dict[str, Selected]) -> tuple[str, str] | None:
    for names in FINAL_CANDIDATES:
        present = [by_name[n] for n in names if n in by_name]
        if present:
            best = max(present, key=lambda s: s.id_val_acc)  # first of equals: the uniform soup
            scores = ", ".join(f"{s.strategy} {100 * s.id_val_acc:.1f}%" for s in present)
            return best.strategy, (
                f"reduce.final_model={BEST_ID_VAL}: highest ID-val accuracy of {scores} (a "
                "greedy soup maximizes ID val by construction, so this rule favours it)"
            )
    return None


def choose_final(selected: list[Selected], rule: str) -> tuple[str, str]:
    """The final model of a cell and why: ``rule`` is ``reduce.final_model``."""
    by_name = {s.strategy: s for s in selected}
    if rule == BEST_ID_VAL:
        chosen = _best_of_candidates(by_name)
        if chosen is not None:
            return chosen
    elif rule in by_name:
        why = "the paper's main method" if rule == DEFAULT_FINAL else "as configured"
        return rule, f"reduce.final_model={rule} ({why}; fixed before any score is seen)"
    else:
        for name in FINAL_FALLBACK:
            if name in by_name:
                return name, (
                    f"reduce.final_model={rule} was not built in this cell (arm "
                    f"{STRATEGIES[rule].arm!r} has no runs); {name} is the first of "
                    f"{list(FINAL_FALLBACK)} that was"
                )
    raise ReduceError("no averaging or fusing strategy could be built; the sweep has no such arm")


@dataclass(frozen=True)
class DaggerStrategy:
    """A ``uniform†`` row (paper Tables 1-2): the uniform average of every run of ``arm`` over
    every split seed of a test domain (the reference's ``--trial_seed -1``: 20 runs x 3 splits
    = 60 weights). No split's ID val is shared, so nothing is selected; it is one number per
    test domain, built across cells by :func:`ratatouille.reducer.reduce.reduce_domain_dagger`.
    ``after``: the per-split row it follows in the table."""

    name: str
    label: str
    arm: str
    after: str


DAGGER_STRATEGIES: dict[str, DaggerStrategy] = {
    d.name: d
    for d in (
        DaggerStrategy("soup_uniform_dagger", "Model soups (uniform†)", "soups", "soup_greedy"),
        DaggerStrategy(
            "ratatouille_uniform_dagger",
            "Model ratatouille (uniform†)",
            "ratatouille",
            "ratatouille_greedy",
        ),
        DaggerStrategy(
            "robust_ratatouille_uniform_dagger",
            "Robust model ratatouille (uniform†)",
            "robust_ratatouille",
            "robust_ratatouille_greedy",
        ),
    )
}


def _table_order() -> tuple[str, ...]:
    order: list[str] = []
    for name in STRATEGIES:
        order.append(name)
        order.extend(d.name for d in DAGGER_STRATEGIES.values() if d.after == name)
    return tuple(order)


#: Every row of the comparison table, in the paper's order (a † row after its arm's rows).
TABLE_ORDER: tuple[str, ...] = _table_order()


def strategy_label(name: str) -> str:
    """The registered label of a strategy (its name when it is not registered)."""
    if name in DAGGER_STRATEGIES:
        return DAGGER_STRATEGIES[name].label
    return STRATEGIES[name].label if name in STRATEGIES else name


def select_all(runs_by_arm: dict[str, list[TargetRun]], sel: Selection) -> list[Selected]:
    """Every registered strategy whose arm has runs, in registry (table) order."""
    selected = []
    for strategy in STRATEGIES.values():
        runs = runs_by_arm.get(strategy.arm)
        if runs:
            built = strategy.build(strategy.name, strategy.arm, runs, sel)
            if built is not None:
                selected.append(built)
    return selected
