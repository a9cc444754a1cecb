"""A sweep small enough for the test suite: every stage and arm, a few steps each."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ratatouille.core.config import ExperimentConfig, parse_config

TINY: dict[str, Any] = {
    "name": "tiny",
    "data": {"dataset": "digits", "test_envs": ["rot30"]},
    "model": {"arch": "test_resnet", "init": "pretrain"},
    "pretrain": {"task": "digits_t0", "steps": 30, "checkpoint_freq": 10, "lr": 1e-3},
    "aux": {
        "tasks": ["digits_aux_flipped", "digits_aux_sheared"],
        "steps": 12,
        "checkpoint_freq": 6,
        "hparams": "mild",
        "hparams_override": {"lr": [3e-4]},
    },
    "probe": {"steps": 30, "lr": 1e-3},
    "target": {
        "arms": ["soups", "ratatouille", "fusing"],
        "n_runs": 3,
        "steps": 12,
        "checkpoint_freq": 3,
        "lp_steps": 3,
        "hparams_override": {"lr": [1e-4, 3e-4]},
    },
    "reduce": {"ablation_draws": 2, "max_pairs": 3},
    # a snapshot at every checkpoint_freq step: restarts in tests resume deterministically
    "resources": {"cpus_per_trial": 1, "max_failures": 0, "snapshot_every_s": 0},
}


def tiny_config(tmp_path: Path, name: str = "tiny", **sections: dict[str, Any]) -> ExperimentConfig:
    """TINY with local stores under tmp_path and `sections` merged over it."""
    raw = copy.deepcopy(TINY)
    raw["name"] = name
    raw["tracking"] = {
        "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "storage_path": str(tmp_path / "ray_results"),
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return parse_config(raw)
