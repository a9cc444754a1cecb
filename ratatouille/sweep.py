"""What each stage trains: trial specs built from the config, with no Ray in sight.

Every random choice of the sweep (hyperparameters, init source, fusing weights, training seed)
is made here, in the driver, by hashing the trial's identity. The specs are plain JSON-able
dicts, so `ratatouille plan` can count them, Tune can grid over them, MLflow can log them and a
resumed sweep rebuilds exactly the same ones.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ratatouille.config import ExperimentConfig
from ratatouille.hparams import dataset_schedule, default_hparams, random_hparams
from ratatouille.pool import balanced_sources
from ratatouille.seeding import seed_hash
from ratatouille.soups import fusing_weights

PRETRAINED = "pretrained"
FUSING = "fusing"
POOL_ARMS = {"ratatouille": False, "robust_ratatouille": True}


@dataclass(frozen=True)
class Cell:
    """One (held-out domain, data split) of the target dataset: one reducer table column."""

    test_env: int
    test_domain: str
    split_seed: int

    @property
    def key(self) -> str:
        return cell_key(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return {"test_env": self.test_env, "test_domain": self.test_domain,
                "split_seed": self.split_seed}


def cell_key(cell: dict[str, Any]) -> str:
    """Names a cell in paths, MLflow metric names and the w_lp lookup."""
    return f"{cell['test_domain']}-split{cell['split_seed']}".replace(" ", "_")


def digest(payload: Any, length: int = 8) -> str:
    """Short stable hash of a JSON-able payload (identities of reusable artefacts)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def pretrained_identity(config: ExperimentConfig) -> str:
    """Names phi_pt: what the pool's entries were fine-tuned from."""
    model = config.model
    if model.init == "pretrain":
        assert config.pretrain is not None
        return f"pretrain-{config.pretrain.task}-{model.arch}-{digest(config.pretrain.model_dump())}"
    if model.init == "file":
        return f"file-{model.arch}-{digest(model.weights_file)}"
    return f"hub-{model.arch}"


def _stage_steps(config: ExperimentConfig) -> tuple[int, int]:
    default_steps, default_freq = dataset_schedule(config.data.dataset)
    return (config.target.steps or default_steps,
            config.target.checkpoint_freq or default_freq)


def pretrain_spec(config: ExperimentConfig) -> dict[str, Any] | None:
    """The T0 pre-training trial, when phi_pt is ours to make."""
    if config.model.init != "pretrain":
        return None
    stage = config.pretrain
    assert stage is not None
    hparams = {"lr": stage.lr, "weight_decay": stage.weight_decay,
               "batch_size": stage.batch_size, "dropout": stage.dropout}
    return {"stage": "pretrain", "name": pretrained_identity(config), "task": stage.task,
            "hparams": hparams, "steps": stage.steps, "checkpoint_freq": stage.checkpoint_freq,
            "seed": seed_hash(config.seed, "pretrain", stage.task)}


def aux_entry_name(config: ExperimentConfig, task: str, run: int) -> str:
    """Pool name of an auxiliary fine-tuning: same recipe and phi_pt -> same name -> reused."""
    recipe = {"aux": config.aux.model_dump(exclude={"tasks", "extra_sources"}),
              "from": pretrained_identity(config)}
    arch = re.sub(r"[^A-Za-z0-9._-]", "_", config.model.arch)  # e.g. "hf-hub:timm/..." names
    return f"{task}-{arch}-r{run}-{digest(recipe)}"


def robust_name(entry_name: str) -> str:
    return f"{entry_name}-ma"


def _aux_hparams(config: ExperimentConfig, task: str, run: int) -> dict[str, Any]:
    if config.aux.hparams == "default":
        return default_hparams()
    seed = seed_hash(config.seed, "aux", task, run)
    return random_hparams(config.aux.hparams, seed, overrides=config.aux.hparams_override)


def aux_specs(config: ExperimentConfig) -> list[dict[str, Any]]:
    """One trial per (auxiliary task x run); the pool stage skips names it already holds."""
    specs = []
    for task in config.aux.tasks:
        for run in range(config.aux.runs_per_task):
            specs.append({
                "stage": "aux", "name": aux_entry_name(config, task, run), "task": task,
                "run": run, "hparams": _aux_hparams(config, task, run),
                "steps": config.aux.steps, "checkpoint_freq": config.aux.checkpoint_freq,
                "robust": config.aux.robust, "seed": seed_hash(config.seed, "aux", task, run),
            })
    return specs


def probe_specs(config: ExperimentConfig, cells: list[Cell]) -> list[dict[str, Any]]:
    """w_lp: one linear probe of phi_pt per (test domain, split), default hparams (paper F.1)."""
    return [{"stage": "probe", "cell": cell.as_dict(), "steps": config.probe.steps,
             "hparams": {"lr": config.probe.lr, "weight_decay": config.probe.weight_decay,
                         "batch_size": config.probe.batch_size, "dropout": 0.0},
             "seed": seed_hash(config.seed, "probe", cell.test_env, cell.split_seed)}
            for cell in cells]


def arm_sources(config: ExperimentConfig, arm: str) -> list[list[str]]:
    """Sources of an arm: source 0 is phi_pt, then one group of pool entries per aux task."""
    if arm not in POOL_ARMS and arm != "fusing":
        return [[PRETRAINED]]
    robust = POOL_ARMS.get(arm, False)
    groups = [[PRETRAINED]]
    for task in config.aux.tasks:
        names = [aux_entry_name(config, task, run) for run in range(config.aux.runs_per_task)]
        groups.append([robust_name(name) if robust else name for name in names])
    groups.extend([name] for name in config.aux.extra_sources)
    return groups


def _init_for_run(config: ExperimentConfig, arm: str, groups: list[list[str]], cell: Cell,
                  run: int, assignment: list[int]) -> dict[str, Any]:
    if arm == "fusing":
        # One featurizer per source (the first run of each task) mixed by softmax(kappa).
        names = [group[0] for group in groups]
        rng = np.random.default_rng(seed_hash(config.seed, "fusing", cell.key, run))
        weights = fusing_weights(len(names), config.target.fusing_spread, rng)
        return {"init_source": FUSING, "fusing": dict(zip(names, map(float, weights)))}
    group = groups[assignment[run]]
    # Runs that share a source cycle through that source's aux runs.
    nth_of_source = assignment[:run].count(assignment[run])
    return {"init_source": group[nth_of_source % len(group)], "fusing": None}


def target_specs(config: ExperimentConfig, cells: list[Cell]) -> list[dict[str, Any]]:
    """n_runs trials per arm and cell, hyperparameters from Table 3, inits balanced over sources."""
    steps, checkpoint_freq = _stage_steps(config)
    specs = []
    for cell in cells:
        for arm in config.target.arms:
            groups = arm_sources(config, arm)
            assignment = balanced_sources(config.target.n_runs, len(groups),
                                          seed_hash(config.seed, "sources", arm, cell.key))
            for run in range(config.target.n_runs):
                init = _init_for_run(config, arm, groups, cell, run, assignment)
                hparams = random_hparams(
                    config.target.hparams, seed_hash(config.seed, "target", cell.split_seed, run),
                    overrides=config.target.hparams_override)
                specs.append({
                    "stage": "target", "cell": cell.as_dict(), "arm": arm, "run": run, **init,
                    "hparams": hparams, "steps": steps, "checkpoint_freq": checkpoint_freq,
                    "lp_steps": 0 if init["init_source"] == PRETRAINED else config.target.lp_steps,
                    "seed": seed_hash(config.seed, config.data.dataset, arm, cell.key, run),
                })
    return specs


def plan_rows(config: ExperimentConfig, cells: list[Cell],
              n_domains: Callable[[str], int]) -> list[dict[str, Any]]:
    """Trials and compute per stage: trials x steps, and images seen (per-domain batches)."""
    target_domains = n_domains(config.data.dataset) - 1  # leave-one-domain-out
    stages = []
    if (spec := pretrain_spec(config)) is not None:
        stages.append(("pretrain", [spec], lambda s: n_domains(s["task"])))
    stages.append(("aux", aux_specs(config), lambda s: n_domains(s["task"])))
    stages.append(("probe", probe_specs(config, cells), lambda s: target_domains))
    stages.append(("target", target_specs(config, cells), lambda s: target_domains))
    rows = []
    for stage, specs, domains in stages:
        images = sum(s["steps"] * s["hparams"]["batch_size"] * domains(s) for s in specs)
        rows.append({"stage": stage, "trials": len(specs),
                     "steps": sum(s["steps"] for s in specs), "images": images,
                     "gpu_hours": images / config.resources.images_per_second / 3600})
    return rows


def format_plan(rows: list[dict[str, Any]], config: ExperimentConfig) -> str:
    lines = [f"{'stage':<10}{'trials':>8}{'trials x steps':>16}{'images':>14}{'GPU-hours':>11}"]
    for row in rows:
        lines.append(f"{row['stage']:<10}{row['trials']:>8}{row['steps']:>16,}"
                     f"{row['images']:>14,}{row['gpu_hours']:>11.2f}")
    total = sum(row["gpu_hours"] for row in rows)
    lines.append(f"total {total:.2f} GPU-hours at {config.resources.images_per_second:g} "
                 "training images/s per trial (resources.images_per_second); the aux stage "
                 "skips entries already in the pool, and evaluation is not counted.")
    return "\n".join(lines)
