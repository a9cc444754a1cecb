"""DomainBed's five image datasets, read from the folders its download script writes.

Layout under ``root``: ``<FOLDER>/<domain>/<class>/<image>``. Domains are DomainBed's
``ENVIRONMENTS`` (sorted folder names); classes are the sorted union of the class folders
over all domains, so that a class missing from one domain cannot shift the labels of the
others (DomainBed builds one ``ImageFolder`` per domain and would).

``pipeline="pil"`` reads and transforms each file per item (the reference);
``pipeline="decoded"`` reads the decoded store (``ratatouille.data.store``), built on first use,
and its domains are :class:`~ratatouille.data.pipeline.StoredDomain` that the loaders of
``ratatouille.data.pipeline`` augment batched on the trial's device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from ratatouille.data.base import (
    DataError,
    DatasetNotFoundError,
    FileDomain,
    MultiDomainDataset,
    load_rgb,
)
from ratatouille.data.pipeline import StoredDomain
from ratatouille.data.store import DecodedStore, open_store
from ratatouille.data.transforms import domainbed_eval_transform, domainbed_train_transform

DOWNLOAD_HINT = (
    "Download it with DomainBed's script (git clone https://github.com/facebookresearch/DomainBed; "
    "python -m domainbed.scripts.download --data_dir=ROOT) and pass ROOT as the data root, "
    "or use the embedded offline benchmark (dataset 'digits', no download)."
)


Pipeline = Literal["pil", "decoded"]
PIPELINES: tuple[str, ...] = ("pil", "decoded")


class DomainBedImageFolder(MultiDomainDataset):
    """A DomainBed dataset stored as ``root/FOLDER/<domain>/<class>/*.jpg``."""

    FOLDER: str = ""
    DEFAULT_IMAGE_SIZE = 224

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        *,
        image_size: int | None = None,
        augment: bool = True,
        pipeline: Pipeline = "pil",
        cache_dir: str | os.PathLike[str] | None = None,
        build_workers: int | None = None,
    ) -> None:
        if pipeline not in PIPELINES:
            raise DataError(f"unknown data pipeline {pipeline!r}: choose one of {PIPELINES}")
        self.pipeline, self.cache_dir, self.build_workers = pipeline, cache_dir, build_workers
        self._store: DecodedStore | None = None
        self.name = type(self).__name__
        self.augment = augment
        size = self.DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
        if size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        self.image_size = size
        self.input_shape = (3, size, size)
        self.root = self._dataset_dir(root)
        self.classes = self._find_classes()
        class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self._samples = [
            make_dataset(
                str(self.root / env), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True
            )
            for env in self.ENVIRONMENTS
        ]
        for env, samples in zip(self.ENVIRONMENTS, self._samples):
            if not samples:
                raise DatasetNotFoundError(
                    f"{self.name}: no images found under {self.root / env} (expected "
                    f"<class>/<image> with extensions {', '.join(IMG_EXTENSIONS)}). {DOWNLOAD_HINT}"
                )
        self._train_transform = domainbed_train_transform(size)
        self._eval_transform = domainbed_eval_transform(size)

    def _dataset_dir(self, root: str | os.PathLike[str] | None) -> Path:
        layout = f"{self.FOLDER}/{{{','.join(self.ENVIRONMENTS)}}}/<class>/<image>"
        if root is None:
            raise DatasetNotFoundError(
                f"{self.name} needs a data root: the folder containing {layout}. {DOWNLOAD_HINT}"
            )
        base = Path(root).expanduser() / self.FOLDER
        missing = [env for env in self.ENVIRONMENTS if not (base / env).is_dir()]
        if missing:
            raise DatasetNotFoundError(
                f"{self.name} not found: expected the domain folders {missing} under {base} "
                f"(layout {Path(root).expanduser()}/{layout}). {DOWNLOAD_HINT}"
            )
        return base

    def _find_classes(self) -> list[str]:
        classes: set[str] = set()
        for env in self.ENVIRONMENTS:
            with os.scandir(self.root / env) as entries:
                classes.update(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DatasetNotFoundError(
                f"{self.name}: no class folders under the domains of {self.root}. {DOWNLOAD_HINT}"
            )
        return sorted(classes)

    def domain_size(self, index: int) -> int:
        self._check_index(index)
        return len(self._samples[index])

    def store(self) -> DecodedStore:
        """The decoded store of every domain, opened (or built) on first use."""
        if self._store is None:
            self._store, _ = open_store(
                self.name,
                self.root,
                self._samples,
                self.image_size,
                self.cache_dir,
                self.build_workers,
            )
        return self._store

    def _domain_items(self, index: int, train: bool) -> Dataset:
        if self.pipeline == "decoded":
            return StoredDomain(self._samples[index], self.store(), index, train)
        transform = self._train_transform if train else self._eval_transform
        return FileDomain(self._samples[index], load_rgb, transform)


class PACS(DomainBedImageFolder):
    FOLDER = "PACS"
    ENVIRONMENTS = ("art_painting", "cartoon", "photo", "sketch")


class VLCS(DomainBedImageFolder):
    FOLDER = "VLCS"
    ENVIRONMENTS = ("Caltech101", "LabelMe", "SUN09", "VOC2007")


class OfficeHome(DomainBedImageFolder):
    FOLDER = "office_home"
    ENVIRONMENTS = ("Art", "Clipart", "Product", "Real World")


class TerraIncognita(DomainBedImageFolder):
    FOLDER = "terra_incognita"
    ENVIRONMENTS = ("location_100", "location_38", "location_43", "location_46")


class DomainNet(DomainBedImageFolder):
    FOLDER = "domain_net"
    ENVIRONMENTS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


DOMAINBED_DATASETS: dict[str, type[DomainBedImageFolder]] = {
    cls.__name__: cls for cls in (PACS, VLCS, OfficeHome, TerraIncognita, DomainNet)
}
