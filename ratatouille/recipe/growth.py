"""Updatable sweeps: what a grown config adds to a finished experiment, and the trials it adds.

A resumed config may add auxiliary tasks, ``aux.extra_sources``, target runs, test domains,
split seeds and arms; every other field that shapes a trial must be as logged. The trials that
exist are kept as they are, identified by the digest of their spec (``TrialSpec.key``); the new
target runs of an existing (cell, arm) get their inits from the arm's ``grow_policy``, and the
(cell, arm) pairs the experiment did not have get the arm's ordinary ``init_policy``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ratatouille.core.arms import InitChoice, InitDraw, get_arm
from ratatouille.core.config import ExperimentConfig
from ratatouille.recipe.checks import experiment_cells
from ratatouille.recipe.specs import Cell, TargetSpec
from ratatouille.recipe.sweep import arm_sources, target_spec, target_specs

#: Config fields a resume may grow, and how: a list may gain items (never lose or reorder the
#: logged ones), a count may rise. Sections a resume may change freely are not compared.
GROWABLE_LISTS = ("aux.tasks", "aux.extra_sources", "data.split_seeds", "target.arms")
GROWABLE_COUNTS = ("target.n_runs",)
TEST_ENVS = "data.test_envs"  # a list that may grow, or None (every domain) once it covers all
GROWABLE = (*GROWABLE_LISTS, *GROWABLE_COUNTS, TEST_ENVS)
FREE_SECTIONS = ("reduce", "resources", "tracking")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _grows_list(before: Any, after: Any) -> bool:
    return isinstance(before, list) and isinstance(after, list) and after[: len(before)] == before


@dataclass(frozen=True)
class Growth:
    """How a resumed config differs from the logged one."""

    added: dict[str, Any]  # field -> the items added (lists) or "old -> new" (counts)
    refused: list[str]  # fields changed in a way that would alter an existing trial

    @property
    def grows(self) -> bool:
        return bool(self.added)

    def summary(self) -> str:
        return "; ".join(f"{field} + {value}" for field, value in self.added.items())


def compare(logged: ExperimentConfig, config: ExperimentConfig) -> Growth:
    """What ``config`` adds to ``logged``, and which of its changes are not additions."""
    before = _flatten(logged.model_dump(mode="json", exclude=set(FREE_SECTIONS)))
    after = _flatten(config.model_dump(mode="json", exclude=set(FREE_SECTIONS)))
    added: dict[str, Any] = {}
    refused = []
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        if path in GROWABLE_LISTS and isinstance(old, list) and isinstance(new, list):
            if not _grows_list(old, new):
                refused.append(path)
                continue
            added[path] = new[len(old) :]
        elif (
            path in GROWABLE_COUNTS and isinstance(old, int) and isinstance(new, int) and new > old
        ):
            added[path] = f"{old} -> {new}"
        elif path == TEST_ENVS and _test_envs_grow(logged, config):
            added[path] = sorted(
                {c.test_domain for c in experiment_cells(config)}
                - {c.test_domain for c in experiment_cells(logged)}
            )
        else:
            refused.append(path)
    return Growth(added, refused)


def _test_envs_grow(logged: ExperimentConfig, config: ExperimentConfig) -> bool:
    old = logged.data.test_envs
    return old is not None and (
        config.data.test_envs is None or _grows_list(old, config.data.test_envs)
    )


def grown_target_specs(
    config: ExperimentConfig,
    cells: Sequence[Cell],
    existing: Sequence[TargetSpec],
    previous: ExperimentConfig,
) -> list[TargetSpec]:
    """Every target trial of the grown experiment: the ``existing`` ones unchanged, then the
    added runs of each (cell, arm), and whole new (cell, arm) pairs as a new sweep draws them."""
    by_pair: dict[tuple[str, str], list[TargetSpec]] = {}
    for spec in existing:
        by_pair.setdefault((spec.cell.key, spec.arm), []).append(spec)
    fresh = {(s.cell.key, s.arm, s.run): s for s in target_specs(config, list(cells))}
    specs: list[TargetSpec] = []
    for cell in cells:
        for arm_name in config.target.arms:
            old = sorted(by_pair.get((cell.key, arm_name), []), key=lambda s: s.run)
            if not old:
                specs += [fresh[(cell.key, arm_name, run)] for run in range(config.target.n_runs)]
                continue
            specs += old
            draw = InitDraw(
                arm=arm_name,
                groups=arm_sources(config, arm_name),
                n_runs=config.target.n_runs,
                seed=config.seed,
                cell_key=cell.key,
                fusing_spread=config.target.fusing_spread,
            )
            inits = [InitChoice(s.init_source, s.fusing) for s in old]
            added = get_arm(arm_name).grow_policy(draw, inits, arm_sources(previous, arm_name))
            specs += [
                target_spec(config, cell, arm_name, run, init)
                for run, init in enumerate(added, start=len(old))
            ]
    return specs
