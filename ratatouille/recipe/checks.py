"""Everything a user can get wrong, checked before Ray or MLflow start.

A typo in `model.arch`, a missing weights file, an unknown dataset or auxiliary task, a
held-out domain that does not exist, a bad hyperparameter grid: each stops `ratatouille run`
with one `UserError` naming the field, before a cluster is attached, an MLflow run is created
or a trial is scheduled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import cast

from ratatouille.core.config import ConfigError, ExperimentConfig
from ratatouille.data import DATASET_NAMES, DOMAINBED_DATASETS, get_dataset, resolve_test_env
from ratatouille.data.base import MultiDomainDataset
from ratatouille.engine.models import (
    LOCAL_DIR_SOURCE,
    check_arch,
    check_folder_weights,
    check_weights_file,
    model_source,
)
from ratatouille.recipe.specs import Cell
from ratatouille.recipe.sweep import aux_probe_specs, aux_specs, target_specs


def domain_names(dataset: str, seed: int) -> list[str]:
    if dataset in DOMAINBED_DATASETS:  # no disk access: the data may live on the workers only
        return list(DOMAINBED_DATASETS[dataset].ENVIRONMENTS)
    return get_dataset(dataset, seed=seed).domains


class _NamesOnly:
    """Just enough of a MultiDomainDataset for resolve_test_env, without reading any data."""

    def __init__(self, name: str, domains: list[str]):
        self.name, self.domains = name, domains

    def __len__(self) -> int:
        return len(self.domains)


def experiment_cells(config: ExperimentConfig) -> list[Cell]:
    """(held-out domain x split seed) cells of the target dataset."""
    domains = domain_names(config.data.dataset, config.seed)
    names_only = cast(MultiDomainDataset, _NamesOnly(config.data.dataset, domains))
    chosen = config.data.test_envs if config.data.test_envs is not None else range(len(domains))
    indices = [resolve_test_env(names_only, env) for env in chosen]
    return [
        Cell(index, domains[index], split) for index in indices for split in config.data.split_seeds
    ]


def _check_dataset_names(config: ExperimentConfig) -> None:
    fields = {"data.dataset": [config.data.dataset], "aux.tasks": config.aux.tasks}
    if config.pretrain is not None:
        fields["pretrain.task"] = [config.pretrain.task]
    for field, names in fields.items():
        unknown = [name for name in names if name not in DATASET_NAMES]
        if unknown:
            raise ConfigError(
                f"{field}: unknown dataset {unknown[0]!r}; choose one of {list(DATASET_NAMES)}"
            )


def _check_local_data(config: ExperimentConfig) -> None:
    """DomainBed folders must be where the config says, on a local run. On a cluster
    (RAY_ADDRESS set) the data may live on the workers alone, and trials report it."""
    if os.environ.get("RAY_ADDRESS"):
        return
    for name in {config.data.dataset, *config.aux.tasks}:
        if name in DOMAINBED_DATASETS:
            get_dataset(name, config.data.root)  # raises DatasetNotFoundError naming the path


def _check_model(config: ExperimentConfig) -> None:
    check_arch(config.model.arch)  # a hub repo's config.json is fetched here, before any run
    if config.model.init == "hub" and model_source(config.model.arch)[0] == LOCAL_DIR_SOURCE:
        check_folder_weights(config.model.arch)
    if config.model.init == "file":
        assert config.model.weights_file is not None  # the config's own validator ensures it
        check_weights_file(config.model.weights_file)


def _check_trial_specs(config: ExperimentConfig, cells: list[Cell]) -> None:
    """Build every spec once: a bad hyperparameter grid fails here, not inside a trial."""
    try:
        aux_probe_specs(config)
        aux_specs(config)
        target_specs(config, cells)
    except ValueError as error:
        raise ConfigError(f"invalid config {config.name!r}: {error}") from None


def check_source_leakage(config: ExperimentConfig, source_tasks: Mapping[str, str]) -> None:
    """``aux.extra_sources`` against the target, as ``aux.tasks`` and ``pretrain.task`` are in
    the config's validation: ``source_tasks`` maps each pool entry to the task it was trained on
    (the pool's manifest), known only where the pool is, so the pipeline calls this."""
    target = config.data.dataset
    leaking = sorted(name for name in config.aux.extra_sources if source_tasks.get(name) == target)
    if leaking:
        raise ConfigError(
            f"aux.extra_sources {leaking} were fine-tuned on the target dataset {target!r}: they "
            "would leak the target into its own initializations; remove them"
        )


def check_experiment(config: ExperimentConfig) -> list[Cell]:
    """Every check of the user's input that needs no Ray and no MLflow; returns the cells."""
    _check_dataset_names(config)
    _check_model(config)
    cells = experiment_cells(config)
    _check_trial_specs(config, cells)
    _check_local_data(config)
    return cells
