"""The arm registry: one definition per target arm of the sweep.

An arm is a family of ``n_runs`` target fine-tunings that differ only by their initialization
(paper Sec. 3): where its runs start from, whether it needs the auxiliary pool, and which of
the reducer's strategies (Table 1) its runs feed. The sweep planner, the config's validation,
the reducer and the figures all read this registry; adding an arm is one entry here (and, for a
new way of picking inits, one policy function).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ratatouille.core.names import FUSING, PRETRAINED
from ratatouille.core.seeding import seed_hash
from ratatouille.merging.soups import fusing_weights


@dataclass(frozen=True)
class InitChoice:
    """Where one target run starts: ``init_source`` is ``PRETRAINED``, a pool entry or ``FUSING``
    (then ``fusing`` maps each source's featurizer to its softmax(kappa) weight)."""

    init_source: str
    fusing: dict[str, float] | None = None


@dataclass(frozen=True)
class InitDraw:
    """What an init policy may use: the arm's source groups (group 0 is ``[PRETRAINED]``, then
    one group of pool entries per auxiliary source) and the seeds of the cell."""

    arm: str
    groups: list[list[str]]
    n_runs: int
    seed: int  # the experiment's seed
    cell_key: str
    fusing_spread: float


InitPolicy = Callable[[InitDraw], list[InitChoice]]
#: Inits of the runs an experiment gains when it grows (`ratatouille run --resume`):
#: ``(draw, existing, previous_groups)`` -> one choice per added run, ``draw.n_runs`` being
#: the new total; the existing runs keep theirs.
GrowPolicy = Callable[[InitDraw, Sequence[InitChoice], Sequence[Sequence[str]]], list[InitChoice]]

#: Strategies that are not one network (ensembles average predictions, ``ma`` is a mean over
#: runs): none of them can be the registered final model (``reduce.final_model``).
MULTI_MODEL_STRATEGIES = frozenset({"ma", "ensemble_ma", "ensemble_soups", "ensemble_ratatouille"})
#: ``reduce.final_model``'s rule that registers the highest-ID-val averaged model.
BEST_ID_VAL = "best_id_val"
#: The merge methods beyond averaging (``reduce.merges``), in table order; each is a strategy
#: ``<method>_<arm>`` of every averaging arm, built only when ``reduce.merges`` is set.
MERGE_METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "dare", "model_stock", "fisher")


def merge_strategies(arm: str) -> tuple[str, ...]:
    """The merge strategies of ``arm``: ``task_arithmetic_soups``, ``ties_soups``, ..."""
    return tuple(f"{method}_{arm}" for method in MERGE_METHODS)


def final_model_rules() -> list[str]:
    """Valid values of ``reduce.final_model``: ``best_id_val`` or a single-model strategy."""
    names = [name for arm in ARMS.values() for name in arm.strategies]
    return [BEST_ID_VAL, *(n for n in names if n not in MULTI_MODEL_STRATEGIES)]


def balanced_sources(n_runs: int, n_sources: int, seed: int) -> list[int]:
    """Source index of each of the M target runs over K+1 sources (0 is the pretrained ``phi_pt``).

    Each source gets ``M // (K+1)`` runs or one more; which sources get the extra run, and the
    order, come from ``numpy.random.default_rng(seed)``, so the assignment is reproducible.
    """
    checks = (("n_runs", n_runs, 0), ("n_sources (K+1)", n_sources, 1), ("seed", seed, 0))
    for label, value, minimum in checks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}")
    rng = np.random.default_rng(seed)
    counts = np.full(n_sources, n_runs // n_sources)
    counts[rng.permutation(n_sources)[: n_runs % n_sources]] += 1
    sources = np.repeat(np.arange(n_sources), counts)
    return [int(source) for source in rng.permutation(sources)]


def balanced_over_sources(draw: InitDraw) -> list[InitChoice]:
    """Runs spread evenly over the source groups (paper Sec. 3, step 4); runs that share a
    group cycle through that group's entries (an auxiliary task's several runs) in order, so
    no featurizer of a group repeats before every one of them has been used once. With 20
    runs over phi_pt and 4 tasks x 4 runs, each of the 16 auxiliary featurizers starts one run."""
    assignment = balanced_sources(
        draw.n_runs, len(draw.groups), seed_hash(draw.seed, "sources", draw.arm, draw.cell_key)
    )
    choices = []
    for run, group_index in enumerate(assignment):
        group = draw.groups[group_index]
        nth_of_group = assignment[:run].count(group_index)
        choices.append(InitChoice(group[nth_of_group % len(group)]))
    return choices


def grow_balanced(
    draw: InitDraw, existing: Sequence[InitChoice], previous_groups: Sequence[Sequence[str]]
) -> list[InitChoice]:
    """Each added run goes to the source group with the fewest runs so far; among equals, a
    group the experiment did not have before first (new sources first), then config order.
    Within the group, the entry that started the fewest runs (then config order). So an arm
    stays as balanced over its sources as the added runs allow, and no existing run moves."""
    known = {name for group in previous_groups for name in group}
    runs_of_group = [
        sum(choice.init_source in group for choice in existing) for group in draw.groups
    ]
    runs_of_entry = {name: 0 for group in draw.groups for name in group}
    for choice in existing:
        if choice.init_source in runs_of_entry:
            runs_of_entry[choice.init_source] += 1
    added = []
    for _ in range(draw.n_runs - len(existing)):
        group_index = min(
            range(len(draw.groups)),
            key=lambda g: (runs_of_group[g], any(n in known for n in draw.groups[g]), g),
        )
        group = draw.groups[group_index]
        entry = min(group, key=lambda name: (runs_of_entry[name], group.index(name)))
        runs_of_group[group_index] += 1
        runs_of_entry[entry] += 1
        added.append(InitChoice(entry))
    return added


def grow_fusing(
    draw: InitDraw, existing: Sequence[InitChoice], previous_groups: Sequence[Sequence[str]]
) -> list[InitChoice]:
    """Added fusing runs mix every source of the grown pool, drawn as a new experiment's run of
    the same index would be; the existing runs keep their mixtures."""
    return fusing_mixture(draw)[len(existing) :]


def fusing_mixture(draw: InitDraw) -> list[InitChoice]:
    """Every run starts from a softmax(kappa) mixture of one featurizer per source, kappa_i ~
    U(0, fusing_spread) drawn per run (paper F.1, Fusing); run ``r`` takes entry ``r mod size``
    of each source, so the runs mix every featurizer of the pool, not only each task's first."""
    choices = []
    for run in range(draw.n_runs):
        names = [group[run % len(group)] for group in draw.groups]
        rng = np.random.default_rng(seed_hash(draw.seed, "fusing", draw.cell_key, run))
        weights = fusing_weights(len(names), draw.fusing_spread, rng)
        choices.append(InitChoice(FUSING, dict(zip(names, map(float, weights)))))
    return choices


@dataclass(frozen=True)
class Arm:
    """One target arm.

    ``needs_pool``: its inits come from auxiliary featurizers (``aux.tasks`` or
    ``aux.extra_sources`` required); ``robust``: from their moving averages (``aux.robust``
    required, App. E); ``recycles``: its runs start from distinct pool sources, so same- vs
    different-source diversity and the interpolation curves are computed on it; ``averaged``:
    its runs are meant to be averaged (the runs ablation of Fig. 8); ``strategies``: the
    reducer strategies built from its runs; ``color``: its colour in the figures;
    ``grow_policy``: the inits of runs added to a finished experiment (``--resume``).
    """

    name: str
    description: str
    needs_pool: bool
    robust: bool
    recycles: bool
    averaged: bool
    init_policy: InitPolicy
    strategies: tuple[str, ...]
    color: str
    grow_policy: GrowPolicy = grow_balanced


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm(
            "soups",
            "model soups: every run starts from (w_lp, phi_pt)",
            needs_pool=False,
            robust=False,
            recycles=False,
            averaged=True,
            init_policy=balanced_over_sources,
            strategies=(
                "erm",
                "ma",
                "ensemble_ma",
                "wise_ft",
                "ensemble_soups",
                "soup_uniform",
                "soup_greedy",
                *merge_strategies("soups"),
            ),
            color="tab:blue",
        ),
        Arm(
            "ratatouille",
            "model ratatouille: runs balanced over phi_pt and the pool",
            needs_pool=True,
            robust=False,
            recycles=True,
            averaged=True,
            init_policy=balanced_over_sources,
            strategies=(
                "inter_training",
                "ensemble_ratatouille",
                "ratatouille_uniform",
                "ratatouille_greedy",
                *merge_strategies("ratatouille"),
            ),
            color="tab:orange",
        ),
        Arm(
            "fusing",
            "fusing: every run starts from a softmax-kappa mixture of the sources",
            needs_pool=True,
            robust=False,
            recycles=False,
            averaged=False,
            init_policy=fusing_mixture,
            strategies=("fusing",),
            color="tab:green",
            grow_policy=grow_fusing,
        ),
        Arm(
            "robust_ratatouille",
            "ratatouille over the pool's moving-average featurizers, uniform or restricted "
            "(greedy) selection (App. E, Table 2)",
            needs_pool=True,
            robust=True,
            recycles=True,
            averaged=True,
            init_policy=balanced_over_sources,
            strategies=(
                "robust_inter_training",
                "robust_ratatouille_uniform",
                "robust_ratatouille_greedy",
                *merge_strategies("robust_ratatouille"),
            ),
            color="tab:red",
        ),
    )
}


def get_arm(name: str) -> Arm:
    """The registered arm ``name``; ValueError naming the registered ones otherwise."""
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}: registered arms are {sorted(ARMS)}")
    return ARMS[name]


def arms_where(predicate: Callable[[Arm], bool], names: Sequence[str] | None = None) -> list[str]:
    """Registered arm names (in registry order, restricted to ``names`` if given) that match."""
    return [
        arm.name for arm in ARMS.values() if predicate(arm) and (names is None or arm.name in names)
    ]


__all__ = [
    "ARMS",
    "MERGE_METHODS",
    "PRETRAINED",
    "Arm",
    "GrowPolicy",
    "InitChoice",
    "InitDraw",
    "InitPolicy",
    "arms_where",
    "balanced_over_sources",
    "balanced_sources",
    "final_model_rules",
    "fusing_mixture",
    "get_arm",
    "grow_balanced",
    "grow_fusing",
    "merge_strategies",
]
