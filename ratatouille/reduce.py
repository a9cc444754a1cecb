"""From a finished sweep (one test domain, one data split) to every strategy of Table 1.

The reducer works in three phases, and the OOD test domain is only readable in the last two:

1. **selection, on ID validation only**: each run's ID-val logits (computed once, cached),
   the best-ID-val runs (``erm``, ``inter_training``, ``fusing``), the uniform and greedy soups
   of each averaging arm (paper Sec. 3, step 5), WiSE-FT (App. A), and the final model;
2. **final evaluation**: each run's OOD logits (once), then each strategy's OOD accuracy;
3. **analysis** (OOD allowed, nothing is selected any more): diversity (Sec. 4.2, App. C.1),
   diversity-vs-gain points (Fig. 3c), interpolation curves (Sec. 4.3, App. D.2) and the
   subsampling ablations (App. B.1, B.3) -- see :mod:`ratatouille.ablations` and
   :mod:`ratatouille.curves`.

Memory stays bounded by a few networks: runs are loaded only when needed, soups stream
(:mod:`ratatouille.soups`), and the few strategy weights (soups, WiSE-FT) wait on disk in a
temporary folder between phases 1 and 2.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ratatouille.ablations import analyse
from ratatouille.curves import CurveResult
from ratatouille.models import Classifier
from ratatouille.reduce_eval import ID_VAL, OOD_TEST, Evaluator, Predict
from ratatouille.soups import greedy_soup, interpolate, uniform_soup
from ratatouille.summary import STRATEGY_ORDER, format_table, long_form, summarize
from ratatouille.sweep import PRETRAINED  # init_source of runs from (w_lp, phi_pt): task T0

__all__ = [
    "ARMS", "PRETRAINED", "STRATEGY_ORDER", "ReduceError", "ReduceInputs", "ReduceResult",
    "ReduceSettings", "TargetRun", "format_table", "long_form", "reduce_cell", "summarize",
]

ARMS = ("soups", "ratatouille", "fusing", "robust_ratatouille")
#: averaging arm -> strategy-name prefix of its uniform/greedy soups.
_SOUP_PREFIX = {
    "soups": "soup", "ratatouille": "ratatouille", "robust_ratatouille": "robust_ratatouille",
}
#: candidates for the final model, by preference: the first pair present wins.
_FINAL_CANDIDATES = (
    ("ratatouille_uniform", "ratatouille_greedy"),
    ("robust_ratatouille_uniform", "robust_ratatouille_greedy"),
    ("soup_uniform", "soup_greedy"),
    ("fusing",),
)


class ReduceError(ValueError):
    """The reducer's inputs are inconsistent; the message names the field to fix."""


@dataclass
class TargetRun:
    """One finished target fine-tuning (a Tune trial)."""

    run_id: str
    arm: str  # "soups" | "ratatouille" | "fusing" | "robust_ratatouille"
    init_source: str  # "pretrained" (source 0), a pool entry name, or "fusing"
    id_val_acc: float  # best ID-val accuracy logged by the run: its selection score
    load_state: Callable[[], dict[str, Tensor]]  # the run's best-ID-val Classifier state
    hparams: dict = field(default_factory=dict)


@dataclass
class ReduceSettings:
    """``wise_alpha``: WiSE-FT ``theta = (1 - alpha) * theta_erm + alpha * theta_init`` (App. A).

    ``max_pairs`` caps the diversity-vs-gain pairs (each costs one OOD evaluation; 0 disables);
    ``ablation_points`` caps the sizes M evaluated per arm in the runs ablation (Fig. 8).
    """

    wise_alpha: float = 0.5
    lmc_tolerance: float = 0.01
    n_lambdas: int = 11
    ablation_draws: int = 5
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 64
    max_pairs: int = 30
    ablation_points: int = 6


@dataclass
class ReduceInputs:
    """One cell (test domain, split seed) of a finished sweep: its runs and evaluation data."""

    test_domain: str
    split_seed: int
    runs: list[TargetRun]
    build_model: Callable[[], Classifier]  # a fresh model of the right arch / num_classes
    id_val: list[Dataset]
    ood_test: list[Dataset]
    init_state: dict[str, Tensor]  # (w_lp, phi_pt): the soups arm's init, WiSE-FT's anchor
    w_lp: dict[str, Tensor]  # head state of the shared linear probe
    pool_featurizers: dict[str, Callable[[], dict[str, Tensor]]]  # name -> phi_aux loader
    settings: ReduceSettings = field(default_factory=ReduceSettings)
    predict: Predict | None = None  # defaults to ratatouille.train.predict_logits


@dataclass
class ReduceResult:
    """Everything :func:`reduce_cell` finds for one cell; accuracies are fractions in [0, 1].

    Strategies whose arm is absent are not in ``table``; arms with fewer than two runs have no
    diversity row and no gain points; an interpolation curve the sweep cannot support is absent
    from ``curves`` and named in ``skipped`` with the reason.
    """

    table: pandas.DataFrame  # strategy, ood_acc, id_val_acc, n_models, members, arm, selection
    diversity: pandas.DataFrame  # arm, q_diversity, ratio_error, n_models
    source_diversity: pandas.DataFrame  # arm, pairs (same/different_source), q_div, ratio, n_pairs
    gain_points: pandas.DataFrame  # arm, run_i, run_j, q_diversity, ratio_error, gain, ...
    curves: dict[str, CurveResult]  # "hypothesis_1", "hypothesis_2", "three_weights"
    ablation_runs: pandas.DataFrame  # arm, n_runs, ood_acc_mean, ood_acc_std, n_draws
    ablation_sources: pandas.DataFrame  # arm, n_sources, ood_acc_mean, ood_acc_std, n_draws, ...
    final_model_state: dict[str, Tensor]
    final_strategy: str
    skipped: dict[str, str] = field(default_factory=dict)  # analysis item -> why it is absent
    test_domain: str = ""
    split_seed: int = 0


@dataclass
class _Selected:
    """A strategy decided on ID val; ``kind`` says how its OOD accuracy is obtained."""

    strategy: str
    arm: str
    selection: str
    kind: str  # "run" (a run's cached logits), "ensemble" (mean logits), "state" (saved weights)
    members: tuple[str, ...]
    id_val_acc: float


class _StateStore:
    """Strategy weights parked on disk between selection and final evaluation."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(self, name: str, state: dict[str, Tensor]) -> None:
        torch.save(state, self.folder / f"{name}.pt")

    def load(self, name: str) -> dict[str, Tensor]:
        return torch.load(self.folder / f"{name}.pt", map_location="cpu", weights_only=True)


def _validate(inputs: ReduceInputs) -> None:
    s = inputs.settings
    if not inputs.runs:
        raise ReduceError("ReduceInputs.runs is empty: the sweep has no finished target run")
    seen: set[str] = set()
    for run in inputs.runs:
        if run.arm not in ARMS:
            raise ReduceError(f"run {run.run_id!r} has arm {run.arm!r}; valid arms are {ARMS}")
        if run.run_id in seen:
            raise ReduceError(f"run_id {run.run_id!r} appears twice in ReduceInputs.runs")
        if not math.isfinite(run.id_val_acc):
            raise ReduceError(f"run {run.run_id!r} has id_val_acc={run.id_val_acc}; need a number")
        seen.add(run.run_id)
    if not inputs.id_val or not inputs.ood_test:
        raise ReduceError("ReduceInputs.id_val and ood_test must each hold at least one dataset")
    checks = {
        "wise_alpha": 0.0 <= s.wise_alpha <= 1.0, "lmc_tolerance": s.lmc_tolerance >= 0.0,
        "n_lambdas": s.n_lambdas >= 2, "ablation_draws": s.ablation_draws >= 1,
        "max_pairs": s.max_pairs >= 0, "ablation_points": s.ablation_points >= 2,
    }
    for name, ok in checks.items():
        if not ok:
            raise ReduceError(
                f"ReduceSettings.{name}={getattr(s, name)!r} is out of range (wise_alpha in "
                "[0, 1], lmc_tolerance >= 0, n_lambdas >= 2, ablation_draws >= 1, "
                "max_pairs >= 0, ablation_points >= 2)"
            )


def _by_arm(runs: list[TargetRun]) -> dict[str, list[TargetRun]]:
    arms: dict[str, list[TargetRun]] = {}
    for run in runs:
        arms.setdefault(run.arm, []).append(run)
    return arms


def _best(runs: list[TargetRun]) -> TargetRun:
    """Highest logged ID-val score; ties go to the earliest run (as greedy's stable sort)."""
    return max(runs, key=lambda r: r.id_val_acc)  # max keeps the first of equal keys


def _best_run(strategy: str, arm: str, runs: list[TargetRun], ev: Evaluator) -> _Selected:
    best = _best(runs)
    accuracy = ev.run_accuracy(best.run_id, ID_VAL)
    return _Selected(strategy, arm, "ID val", "run", (best.run_id,), accuracy)


def _soups(
    prefix: str, arm: str, runs: list[TargetRun], ev: Evaluator, store: _StateStore
) -> list[_Selected]:
    """Uniform and greedy soups of one arm (paper Sec. 3, step 5), scored on ID val.

    A soup of one model is that run's weights: it is scored from the run's cached logits
    (kind "run"), never predicted a second time.
    """
    members = tuple(r.run_id for r in runs)
    if len(runs) == 1:
        uniform = _Selected(f"{prefix}_uniform", arm, "uniform", "run", members,
                            ev.run_accuracy(members[0], ID_VAL))
    else:
        state = uniform_soup(run.load_state() for run in runs)
        store.save(f"{prefix}_uniform", state)
        uniform = _Selected(f"{prefix}_uniform", arm, "uniform", "state", members,
                            ev.accuracy(state, ID_VAL))
        del state
    greedy = greedy_soup(
        [run.load_state for run in runs], [run.id_val_acc for run in runs],
        lambda state: ev.accuracy(state, ID_VAL),
    )
    chosen = tuple(runs[i].run_id for i in greedy.selected)
    if len(chosen) == 1:  # GreedySoup.score is then the logged score; the table shows measured ones
        return [uniform, _Selected(f"{prefix}_greedy", arm, "greedy", "run", chosen,
                                   ev.run_accuracy(chosen[0], ID_VAL))]
    store.save(f"{prefix}_greedy", greedy.state_dict)
    return [uniform, _Selected(f"{prefix}_greedy", arm, "greedy", "state", chosen, greedy.score)]


def _check_logged_scores(runs: list[TargetRun], ev: Evaluator) -> None:
    """Cache every run's ID-val logits; warn when a logged score disagrees with them."""
    for run in runs:
        ev.run_logits(run.run_id, run.load_state, ID_VAL)
        logged, measured = run.id_val_acc, ev.run_accuracy(run.run_id, ID_VAL)
        if abs(logged - measured) > 1e-3:
            warnings.warn(
                f"run {run.run_id!r} logged id_val_acc={logged:.4f} but scores {measured:.4f} on "
                "the reducer's ID-val split; selection uses the logged score", stacklevel=4,
            )


def _vanilla(
    inputs: ReduceInputs, soups: list[TargetRun], ev: Evaluator, store: _StateStore
) -> list[_Selected]:
    """ERM (best ID val), WiSE-FT of that run toward its init (App. A), the soups ensemble."""
    erm = _best_run("erm", "soups", soups, ev)
    erm_run = next(r for r in soups if r.run_id == erm.members[0])
    alpha = inputs.settings.wise_alpha
    wise = interpolate(erm_run.load_state(), inputs.init_state, alpha)
    store.save("wise_ft", wise)
    ids = tuple(r.run_id for r in soups)
    return [
        erm,
        _Selected("wise_ft", "soups", f"WiSE alpha={alpha:g}", "state", erm.members,
                  ev.accuracy(wise, ID_VAL)),
        _Selected("ensemble_soups", "soups", "ensemble", "ensemble", ids,
                  ev.ensemble_accuracy(ids, ID_VAL)),
    ]


def _recycling(arm: str, runs: list[TargetRun], ev: Evaluator) -> list[_Selected]:
    """Inter-training (best ID val of the pool-initialised runs); for ratatouille, its ensemble."""
    prefix = "robust_" if arm == "robust_ratatouille" else ""
    out = []
    recycled = [r for r in runs if r.init_source != PRETRAINED]
    if recycled:
        out.append(_best_run(f"{prefix}inter_training", arm, recycled, ev))
    if arm == "ratatouille":
        ids = tuple(r.run_id for r in runs)
        out.append(_Selected("ensemble_ratatouille", arm, "ensemble", "ensemble", ids,
                             ev.ensemble_accuracy(ids, ID_VAL)))
    return out


def _select_on_id_val(
    inputs: ReduceInputs, arms: dict[str, list[TargetRun]], ev: Evaluator, store: _StateStore
) -> list[_Selected]:
    """Phase 1: every decision, from ID-val data and logged ID-val scores only."""
    _check_logged_scores(inputs.runs, ev)
    out: list[_Selected] = []
    if "soups" in arms:
        out.extend(_vanilla(inputs, arms["soups"], ev, store))
    for arm in ("ratatouille", "robust_ratatouille"):
        if arm in arms:
            out.extend(_recycling(arm, arms[arm], ev))
    if "fusing" in arms:
        out.append(_best_run("fusing", "fusing", arms["fusing"], ev))
    for arm, prefix in _SOUP_PREFIX.items():
        if arm in arms:
            out.extend(_soups(prefix, arm, arms[arm], ev, store))
    order = {name: i for i, name in enumerate(STRATEGY_ORDER)}
    return sorted(out, key=lambda s: order[s.strategy])


def _choose_final(selected: list[_Selected]) -> str:
    """The final model: the higher-ID-val of ratatouille uniform/greedy (ties -> uniform)."""
    by_name = {s.strategy: s for s in selected}
    for names in _FINAL_CANDIDATES:
        present = [by_name[n] for n in names if n in by_name]
        if present:
            return max(present, key=lambda s: s.id_val_acc).strategy  # first of equals: uniform
    raise ReduceError("no averaging or fusing strategy could be built; the sweep has no such arm")


def _evaluate_on_ood(
    selected: list[_Selected], runs: list[TargetRun], ev: Evaluator, store: _StateStore
) -> pandas.DataFrame:
    """Phase 2: each run's OOD logits (once), then each strategy's OOD accuracy."""
    for run in runs:
        ev.run_logits(run.run_id, run.load_state, OOD_TEST)
    rows = []
    for s in selected:
        if s.kind == "run":
            ood = ev.run_accuracy(s.members[0], OOD_TEST)
        elif s.kind == "ensemble":
            ood = ev.ensemble_accuracy(list(s.members), OOD_TEST)
        else:
            ood = ev.accuracy(store.load(s.strategy), OOD_TEST)
        rows.append({
            "strategy": s.strategy, "ood_acc": ood, "id_val_acc": s.id_val_acc,
            "n_models": len(s.members), "members": list(s.members), "arm": s.arm,
            "selection": s.selection,
        })
    return pandas.DataFrame(rows)


def reduce_cell(inputs: ReduceInputs) -> ReduceResult:
    """Every strategy, diversity, curves and ablations for one (test domain, split seed) cell."""
    _validate(inputs)
    s = inputs.settings
    ev = Evaluator(inputs.build_model, inputs.id_val, inputs.ood_test,
                   batch_size=s.batch_size, device=s.device, predict=inputs.predict)
    arms = _by_arm(inputs.runs)
    runs_by_id = {run.run_id: run for run in inputs.runs}
    with tempfile.TemporaryDirectory(prefix="ratatouille-reduce-") as folder:
        store = _StateStore(Path(folder))
        selected = _select_on_id_val(inputs, arms, ev, store)
        final_strategy = _choose_final(selected)
        ev.open_ood()  # every selection decision is final from here on
        table = _evaluate_on_ood(selected, inputs.runs, ev, store)
        final = next(x for x in selected if x.strategy == final_strategy)
        final_state = (runs_by_id[final.members[0]].load_state() if final.kind == "run"
                       else store.load(final_strategy))
    analysis = analyse(inputs, arms, ev, table)
    return ReduceResult(
        table=table, final_model_state=final_state, final_strategy=final_strategy,
        test_domain=inputs.test_domain, split_seed=inputs.split_seed, **analysis,
    )
