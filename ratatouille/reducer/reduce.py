"""From a finished sweep (one test domain, one data split) to every strategy of Table 1.

The reducer works in three phases, and the OOD test domain is only readable in the last two:

1. **selection, on ID validation only**: each run's ID-val logits (computed once, cached),
   the best-ID-val runs (``erm``, ``inter_training`` over every run of the recycling arm, phi_pt
   runs included, ``fusing``), the uniform and greedy soups
   of each averaging arm (paper Sec. 3, step 5), WiSE-FT (App. A), and the final model (by
   the rule ``ReduceSettings.final_model``, ratatouille's uniform soup by default);
2. **final evaluation**: each run's OOD logits (once), then each strategy's OOD accuracy;
3. **analysis** (OOD allowed, nothing is selected any more): diversity (Sec. 4.2, App. C.1),
   diversity-vs-gain points (Fig. 3c), interpolation curves (Sec. 4.3, App. D.2) and the
   subsampling ablations (App. B.1, B.3) -- see :mod:`ratatouille.reducer.ablations` and
   :mod:`ratatouille.reducer.curves`.

Memory stays bounded by a few networks and the runs' predicted labels: runs are loaded only
when needed, soups stream (:mod:`ratatouille.merging.soups`), the runs' logits wait on local disk
(:mod:`ratatouille.reducer.evaluate`), and the few strategy weights (soups, WiSE-FT) wait on disk
in a temporary folder between phases 1 and 2.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas
from torch import Tensor, nn
from torch.utils.data import Dataset

from ratatouille.core.arms import ARMS, final_model_rules
from ratatouille.core.names import PRETRAINED  # init_source of runs from (w_lp, phi_pt): T0
from ratatouille.merging.soups import uniform_soup
from ratatouille.reducer.ablations import analyse
from ratatouille.reducer.curves import CurveResult
from ratatouille.reducer.evaluate import ID_VAL, OOD_TEST, Evaluator, Predict
from ratatouille.reducer.inputs import ReduceError, ReduceInputs, ReduceSettings, TargetRun
from ratatouille.reducer.strategies import (
    DAGGER_STRATEGIES,
    Selected,
    Selection,
    StateStore,
    choose_final,
    ma_views,
    select_all,
)
from ratatouille.reducer.summary import format_table, long_form, summarize

__all__ = [
    "PRETRAINED",
    "ReduceError",
    "ReduceInputs",
    "ReduceResult",
    "ReduceSettings",
    "TargetRun",
    "format_table",
    "long_form",
    "reduce_cell",
    "reduce_domain_dagger",
    "summarize",
]


@dataclass
class ReduceResult:
    """Everything :func:`reduce_cell` finds for one cell; accuracies are fractions in [0, 1].

    Strategies whose arm is absent are not in ``table``; arms with fewer than two runs have no
    diversity row and no gain points; an interpolation curve the sweep cannot support is absent
    from ``curves`` and named in ``skipped`` with the reason.
    """

    table: pandas.DataFrame  # strategy, ood_acc, id_val_acc, n_models, members, arm, selection
    diversity: pandas.DataFrame  # arm, q_diversity, ratio_error, n_models, split
    source_diversity: pandas.DataFrame  # arm, pairs (same/different), q_div, ratio, n_pairs, split
    gain_points: pandas.DataFrame  # arm, run_i, run_j, q_diversity, ratio_error, gain, ...
    curves: dict[str, CurveResult]  # "hypothesis_1", "hypothesis_2", "three_weights"
    ablation_runs: pandas.DataFrame  # arm, n_runs, ood_acc_mean, ood_acc_std, n_draws
    ablation_sources: pandas.DataFrame  # arm, n_sources, ood_acc_mean/std/se, n_draws, n_models
    final_model_state: dict[str, Tensor]
    final_strategy: str
    final_reason: str = ""  # which rule chose the final model, and with what numbers
    skipped: dict[str, str] = field(default_factory=dict)  # analysis item -> why it is absent
    test_domain: str = ""
    split_seed: int = 0
    # analysis frames of reducer.curves.lmc_pairs and reducer.ablations.mixing_ratio
    lmc: pandas.DataFrame = field(default_factory=pandas.DataFrame)  # per hypothesis/split/pair
    mixing: pandas.DataFrame = field(default_factory=pandas.DataFrame)  # per mu and draw
    # forward-passed: id_val_images, ood_test_images, id_val_passes, ood_test_passes
    evaluated: dict[str, int] = field(default_factory=dict)


def _validate(inputs: ReduceInputs) -> None:
    s = inputs.settings
    if not inputs.runs:
        raise ReduceError("ReduceInputs.runs is empty: the sweep has no finished target run")
    seen: set[str] = set()
    for run in inputs.runs:
        if run.arm not in ARMS:
            raise ReduceError(
                f"run {run.run_id!r} has arm {run.arm!r}; valid arms are {tuple(ARMS)}"
            )
        if run.run_id in seen:
            raise ReduceError(f"run_id {run.run_id!r} appears twice in ReduceInputs.runs")
        if not math.isfinite(run.id_val_acc):
            raise ReduceError(f"run {run.run_id!r} has id_val_acc={run.id_val_acc}; need a number")
        seen.add(run.run_id)
    if s.final_model not in final_model_rules():
        raise ReduceError(
            f"reduce.final_model={s.final_model!r} is not a rule; use one of "
            f"{final_model_rules()} (default ratatouille_uniform, the paper's main method)"
        )
    if not inputs.id_val or not inputs.ood_test:
        raise ReduceError("ReduceInputs.id_val and ood_test must each hold at least one dataset")
    checks = {
        "wise_alpha": 0.0 <= s.wise_alpha <= 1.0,
        "lmc_tolerance": s.lmc_tolerance >= 0.0,
        "n_lambdas": s.n_lambdas >= 2,
        "ablation_draws": s.ablation_draws >= 1,
        "max_pairs": s.max_pairs >= 0,
        "ablation_points": s.ablation_points >= 2,
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


def _check_logged_scores(runs: list[TargetRun], ev: Evaluator) -> None:
    """Cache every run's ID-val logits; warn when a logged score disagrees with them."""
    for run in runs:
        ev.run_logits(run.run_id, run.load_state, ID_VAL)
        logged, measured = run.id_val_acc, ev.run_accuracy(run.run_id, ID_VAL)
        if abs(logged - measured) > 1e-3:
            warnings.warn(
                f"run {run.run_id!r} logged id_val_acc={logged:.4f} but scores {measured:.4f} on "
                "the reducer's ID-val split; selection uses the logged score",
                stacklevel=4,
            )


def _select_on_id_val(
    inputs: ReduceInputs, arms: dict[str, list[TargetRun]], ev: Evaluator, store: StateStore
) -> list[Selected]:
    """Phase 1: every decision, from ID-val data and logged ID-val scores only."""
    _check_logged_scores(inputs.runs, ev)
    return select_all(arms, Selection(inputs, ev, store))


def _evaluate_on_ood(
    selected: list[Selected], runs: list[TargetRun], ev: Evaluator, store: StateStore
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
        elif s.kind == "mean":
            ood = sum(ev.run_accuracy(m, OOD_TEST) for m in s.members) / len(s.members)
        else:
            ood = ev.accuracy(store.load(s.strategy), OOD_TEST)
        rows.append(
            {
                "strategy": s.strategy,
                "ood_acc": ood,
                "id_val_acc": s.id_val_acc,
                "n_models": len(s.members),
                "members": list(s.members),
                "arm": s.arm,
                "selection": s.selection,
                "params": dict(s.params),
            }
        )
    return pandas.DataFrame(rows)


def reduce_cell(inputs: ReduceInputs) -> ReduceResult:
    """Every strategy, diversity, curves and ablations for one (test domain, split seed) cell."""
    _validate(inputs)
    s = inputs.settings
    ev = Evaluator(
        inputs.build_model,
        inputs.id_val,
        inputs.ood_test,
        batch_size=s.batch_size,
        device=s.device,
        predict=inputs.predict,
    )
    arms = _by_arm(inputs.runs)
    runs_by_id = {run.run_id: run for run in inputs.runs}
    with tempfile.TemporaryDirectory(prefix="ratatouille-reduce-") as folder:
        store = StateStore(Path(folder))
        selected = _select_on_id_val(inputs, arms, ev, store)
        final_strategy, final_reason = choose_final(selected, s.final_model)
        ev.open_ood()  # every selection decision is final from here on
        table = _evaluate_on_ood(selected, inputs.runs + ma_views(inputs.runs), ev, store)
        final = next(x for x in selected if x.strategy == final_strategy)
        final_state = (
            runs_by_id[final.members[0]].load_state()
            if final.kind == "run"
            else store.load(final_strategy)
        )
    analysis = analyse(inputs, arms, ev, table)
    ev.close()
    evaluated = {
        f"{split}_{what}": counter[split]
        for what, counter in (("images", ev.images_evaluated), ("passes", ev.passes))
        for split in (ID_VAL, OOD_TEST)
    }
    return ReduceResult(
        evaluated=evaluated,
        table=table,
        final_model_state=final_state,
        final_strategy=final_strategy,
        final_reason=final_reason,
        test_domain=inputs.test_domain,
        split_seed=inputs.split_seed,
        **analysis,
    )


# -- uniform† (across the split seeds of a test domain) -------------------------------------

#: The split seed of the uniform† rows: every split at once (the reference's --trial_seed -1).
DAGGER_SPLIT_SEED = -1


def _check_dagger_inputs(test_domain: str, runs_by_seed: Mapping[int, list[TargetRun]]) -> None:
    if len(runs_by_seed) < 2:
        raise ReduceError(
            f"uniform† of {test_domain!r} needs the runs of at least two split seeds, got "
            f"{sorted(runs_by_seed)}; with one split it is the uniform soup already reported"
        )


def reduce_domain_dagger(
    test_domain: str,
    runs_by_seed: Mapping[int, list[TargetRun]],
    build_model: Callable[[], nn.Module],
    ood_test: list[Dataset],
    *,
    batch_size: int = 64,
    device: str = "cpu",
    predict: Predict | None = None,
) -> pandas.DataFrame:
    """The uniform† rows of one test domain: for each averaging arm with runs in every split,
    the uniform average of all its runs of all split seeds, scored on ``ood_test``.

    The OOD test set is the held-out domain in full, the same images whatever the split seed
    (a split only divides the *training* domains into train and ID val), so the cross-split
    model is evaluated once, on it, as the reference does. It has no ID-val accuracy: each
    split's ID val holds images the other splits trained on (``id_val_acc`` is nan). Members
    are ``<split_seed>:<run_id>``, since run ids repeat across splits. Weights stream: one
    run is loaded at a time.
    """
    _check_dagger_inputs(test_domain, runs_by_seed)
    ev = Evaluator(build_model, [], ood_test, batch_size=batch_size, device=device, predict=predict)
    ev.open_ood()  # nothing is selected: every run of every split is averaged
    rows = []
    for dagger in DAGGER_STRATEGIES.values():
        picked = {
            seed: [r for r in runs if r.arm == dagger.arm] for seed, runs in runs_by_seed.items()
        }
        if not all(picked.values()):
            continue
        loaders = [run.load_state for runs in picked.values() for run in runs]
        state = uniform_soup(load() for load in loaders)
        members = [f"{seed}:{run.run_id}" for seed, runs in picked.items() for run in runs]
        rows.append(
            {
                "test_domain": test_domain,
                "split_seed": DAGGER_SPLIT_SEED,
                "strategy": dagger.name,
                "ood_acc": ev.accuracy(state, OOD_TEST),
                "id_val_acc": math.nan,
                "n_models": len(members),
                "members": members,
                "arm": dagger.arm,
                "selection": "uniform†",
            }
        )
    return pandas.DataFrame(rows)
