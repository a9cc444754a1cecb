"""Multi-domain datasets, DomainBed splits, transforms, loaders and the embedded benchmark.

Pure module: no Ray, no MLflow.
"""

from __future__ import annotations

import os

from ratatouille.data.base import (
    DataError,
    DatasetNotFoundError,
    FileDomain,
    MultiDomainDataset,
    TensorDomain,
    labels_of,
)
from ratatouille.data.digits import (
    EMBEDDED_AUX_TASKS,
    EMBEDDED_NAMES,
    EMBEDDED_PRETRAIN_TASK,
    EMBEDDED_TARGET,
    EMBEDDED_TASKS,
    EmbeddedTask,
)
from ratatouille.data.domainbed import (
    DOMAINBED_DATASETS,
    PACS,
    PIPELINES,
    VLCS,
    DomainBedImageFolder,
    DomainNet,
    OfficeHome,
    Pipeline,
    TerraIncognita,
)
from ratatouille.data.loaders import InfiniteLoader, eval_loader
from ratatouille.data.pipeline import (
    StepStream,
    StoredDomain,
    TrainStream,
    eval_batches,
    train_batches,
)
from ratatouille.data.splits import (
    TaskSplits,
    auxiliary_splits,
    resolve_test_env,
    split_indices,
    target_splits,
)
from ratatouille.data.store import StoreError, default_cache_dir
from ratatouille.data.transforms import domainbed_eval_transform, domainbed_train_transform

DATASET_NAMES: tuple[str, ...] = tuple(DOMAINBED_DATASETS) + EMBEDDED_NAMES


def get_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = None,
    augment: bool = True,
    seed: int = 0,
    pipeline: Pipeline = "pil",
    cache_dir: str | os.PathLike[str] | None = None,
) -> MultiDomainDataset:
    """A task by name: a DomainBed dataset read under ``root``, or an embedded benchmark task.

    ``image_size`` defaults to 224 for DomainBed and 16 for the embedded benchmark.
    ``seed`` only matters for the embedded benchmark (how its target images are dealt into
    domains, and the random parts of its styles); DomainBed data is what is on disk.
    ``root`` is ignored for the embedded benchmark (it is built in memory).
    ``pipeline`` ("pil" or "decoded", see ``ratatouille.data.pipeline``) and ``cache_dir`` (the
    decoded store's folder) apply to DomainBed data; the embedded benchmark's images are
    tensors in memory already and take the same loaders either way.
    """
    if name in DOMAINBED_DATASETS:
        return DOMAINBED_DATASETS[name](
            root, image_size=image_size, augment=augment, pipeline=pipeline, cache_dir=cache_dir
        )
    if name in EMBEDDED_TASKS:
        return EmbeddedTask(name, image_size=image_size, augment=augment, seed=seed)
    close = [n for n in DATASET_NAMES if n.lower() == str(name).lower()]
    hint = f" (did you mean {close[0]!r}? names are case-sensitive)" if close else ""
    raise DataError(f"unknown dataset {name!r}{hint}; choose one of {list(DATASET_NAMES)}")


__all__ = [
    "DATASET_NAMES",
    "DOMAINBED_DATASETS",
    "EMBEDDED_AUX_TASKS",
    "EMBEDDED_NAMES",
    "EMBEDDED_PRETRAIN_TASK",
    "EMBEDDED_TARGET",
    "EMBEDDED_TASKS",
    "PACS",
    "PIPELINES",
    "VLCS",
    "DataError",
    "DatasetNotFoundError",
    "DomainBedImageFolder",
    "DomainNet",
    "EmbeddedTask",
    "FileDomain",
    "InfiniteLoader",
    "MultiDomainDataset",
    "OfficeHome",
    "Pipeline",
    "StepStream",
    "StoreError",
    "StoredDomain",
    "TaskSplits",
    "TensorDomain",
    "TerraIncognita",
    "TrainStream",
    "auxiliary_splits",
    "default_cache_dir",
    "domainbed_eval_transform",
    "domainbed_train_transform",
    "eval_batches",
    "eval_loader",
    "get_dataset",
    "labels_of",
    "resolve_test_env",
    "split_indices",
    "target_splits",
    "train_batches",
]
