"""The arm registry: balanced init sources, fusing mixtures, and the config's arm validation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ratatouille.core.arms import (
    ARMS,
    InitDraw,
    balanced_over_sources,
    balanced_sources,
    fusing_mixture,
    get_arm,
)
from ratatouille.core.config import ConfigError, parse_config
from ratatouille.core.names import FUSING, PRETRAINED
from ratatouille.core.seeding import seed_hash
from ratatouille.merging.soups import fusing_weights


@pytest.mark.parametrize(
    ("n_runs", "n_sources", "want_counts"),
    [
        (10, 4, [2, 2, 3, 3]),
        (12, 4, [3, 3, 3, 3]),
        (3, 5, [0, 0, 1, 1, 1]),
        (7, 1, [7]),
        (0, 3, [0, 0, 0]),
    ],
)
def test_balanced_sources_gives_each_source_floor_or_one_more(n_runs, n_sources, want_counts):
    for seed in range(5):
        sources = balanced_sources(n_runs, n_sources, seed)
        assert len(sources) == n_runs
        counts = Counter(sources)
        assert set(counts) <= set(range(n_sources))
        assert sorted(counts.get(s, 0) for s in range(n_sources)) == want_counts


def test_balanced_sources_is_deterministic_by_seed_and_varies_across_seeds():
    assert balanced_sources(20, 6, seed=7) == balanced_sources(20, 6, seed=7)
    orders = {tuple(balanced_sources(20, 6, seed)) for seed in range(10)}
    assert len(orders) > 1
    # which sources get the extra run also depends on the seed
    extras = {
        frozenset(s for s, c in Counter(balanced_sources(8, 6, seed)).items() if c == 2)
        for seed in range(10)
    }
    assert len(extras) > 1


@pytest.mark.parametrize(
    ("n_runs", "n_sources", "seed"), [(-1, 3, 0), (5, 0, 0), (5, 3, None), (2.5, 3, 0)]
)
def test_balanced_sources_rejects_bad_arguments(n_runs, n_sources, seed):
    with pytest.raises(ValueError):
        balanced_sources(n_runs, n_sources, seed)


def _draw(groups, n_runs=6, arm="ratatouille"):
    return InitDraw(
        arm=arm, groups=groups, n_runs=n_runs, seed=3, cell_key="rot30-split0", fusing_spread=4.0
    )


def test_balanced_policy_cycles_through_each_sources_runs():
    groups = [[PRETRAINED], ["a0", "a1"], ["b0"]]
    choices = balanced_over_sources(_draw(groups))
    # by hand: the group of each run from balanced_sources, then the k-th run of a group takes
    # entry k mod len(group)
    assignment = balanced_sources(6, 3, seed_hash(3, "sources", "ratatouille", "rot30-split0"))
    seen = Counter()
    for choice, group in zip(choices, assignment):
        assert choice.init_source == groups[group][seen[group] % len(groups[group])]
        assert choice.fusing is None
        seen[group] += 1
    assert Counter(c.init_source for c in choices) == {PRETRAINED: 2, "a0": 1, "a1": 1, "b0": 2}


def test_fusing_policy_run_r_mixes_entry_r_mod_size_of_every_source():
    choices = fusing_mixture(_draw([[PRETRAINED], ["a0", "a1"], ["b0"]], n_runs=3, arm="fusing"))
    # by hand: run 0 takes a0, run 1 a1, run 2 a0 again; single-entry sources always their one
    mixed = [[PRETRAINED, "a0", "b0"], [PRETRAINED, "a1", "b0"], [PRETRAINED, "a0", "b0"]]
    for run, choice in enumerate(choices):
        rng = np.random.default_rng(seed_hash(3, "fusing", "rot30-split0", run))
        want = fusing_weights(3, 4.0, rng)
        assert choice.init_source == FUSING
        assert list(choice.fusing) == mixed[run]
        assert list(choice.fusing.values()) == pytest.approx(list(want))


def _reference_pool(runs_per_task=4, tasks="ABCD"):
    return [[PRETRAINED]] + [[f"{t}{r}" for r in range(runs_per_task)] for t in tasks]


def test_twenty_runs_over_four_tasks_of_four_runs_start_from_sixteen_distinct_featurizers():
    # by hand: 20 runs over 5 sources -> 4 each; a task's 4 runs take its 4 entries once each
    choices = balanced_over_sources(_draw(_reference_pool(), n_runs=20))
    counts = Counter(c.init_source for c in choices)
    assert counts == {PRETRAINED: 4, **{f"{t}{r}": 1 for t in "ABCD" for r in range(4)}}


def test_featurizers_repeat_round_robin_per_source_only_after_all_were_used():
    # by hand: 40 runs -> 8 per source; within a task the entries come in order 0,1,2,3,0,1,2,3
    choices = balanced_over_sources(_draw(_reference_pool(), n_runs=40))
    for task in "ABCD":
        order = [c.init_source for c in choices if c.init_source.startswith(task)]
        assert order == [f"{task}{r}" for r in (0, 1, 2, 3, 0, 1, 2, 3)]
    assert sum(c.init_source == PRETRAINED for c in choices) == 8


def test_balance_per_source_comes_before_distinct_featurizers():
    # sources of unequal size: 12 runs over 3 sources -> 4 each even though B has one entry
    groups = [[PRETRAINED], ["A0", "A1", "A2", "A3", "A4", "A5"], ["B0"]]
    counts = Counter(c.init_source for c in balanced_over_sources(_draw(groups, n_runs=12)))
    assert counts == {PRETRAINED: 4, "A0": 1, "A1": 1, "A2": 1, "A3": 1, "B0": 4}


def test_balanced_assignment_is_deterministic_given_the_seed():
    draw = _draw(_reference_pool(), n_runs=20)
    assert balanced_over_sources(draw) == balanced_over_sources(draw)
    other = InitDraw(**{**draw.__dict__, "seed": 4})
    orders = [[c.init_source for c in balanced_over_sources(d)] for d in (draw, other)]
    assert orders[0] != orders[1]  # the order of runs follows the seed; the counts do not
    assert Counter(orders[0]) == Counter(orders[1])


def test_every_arm_feeds_registered_strategies_and_has_a_policy():
    from ratatouille.reducer.strategies import STRATEGIES

    fed = [name for arm in ARMS.values() for name in arm.strategies]
    assert len(fed) == len(set(fed))  # a strategy belongs to one arm
    assert set(fed) == set(STRATEGIES)
    for name, strategy in STRATEGIES.items():
        assert name in get_arm(strategy.arm).strategies


def test_config_refuses_an_unregistered_arm_naming_the_registered_ones():
    raw = {"name": "x", "data": {"dataset": "digits"}, "target": {"arms": ["soups", "stew"]}}
    with pytest.raises(ConfigError, match=r"target.arms: unknown arms \['stew'\].*soups"):
        parse_config(raw)


def test_pool_arms_need_a_pool_and_robust_arms_need_robust_aux_runs():
    raw = {"name": "x", "data": {"dataset": "digits"}, "target": {"arms": ["ratatouille"]}}
    with pytest.raises(ConfigError, match="need aux.tasks or aux.extra_sources"):
        parse_config(raw)
    raw = {
        "name": "x",
        "data": {"dataset": "digits"},
        "aux": {"tasks": ["digits_aux_flipped"]},
        "target": {"arms": ["robust_ratatouille"]},
    }
    with pytest.raises(ConfigError, match="robust_ratatouille needs aux.robust"):
        parse_config(raw)
