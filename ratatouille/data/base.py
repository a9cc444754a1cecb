"""The multi-domain dataset abstraction shared by DomainBed and the embedded benchmark.

A task (the target T, the pre-training task T0 or an auxiliary task T_i) is a list of
domains ("environments" in DomainBed) that share one label set. Each domain is exposed
twice: with the training augmentation and with the deterministic evaluation transform,
so that the ID-validation split can use the evaluation transform (DomainBed applies the
training augmentation to it, which makes its validation scores noisy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Sized
from typing import Any, cast

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ratatouille.core.errors import UserError


class DataError(UserError, ValueError):
    """Bad data configuration: unknown dataset, bad domain, bad split parameters."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A DomainBed dataset's folder is missing under the given root."""


Transform = Callable[[Any], Tensor]


def load_rgb(path: str) -> Image.Image:
    """Open an image file as RGB (DomainBed's ImageFolder loader)."""
    with open(path, "rb") as handle:
        return Image.open(handle).convert("RGB")


class MultiDomainDataset:
    """A task made of several domains sharing one label set (DomainBed's ``MultipleDomainDataset``).

    Subclasses set ``ENVIRONMENTS`` (domain names, in DomainBed's sorted order), ``name``,
    ``classes`` and ``input_shape`` and implement :meth:`_domain_items` and :meth:`domain_size`.
    """

    ENVIRONMENTS: tuple[str, ...] = ()
    name: str = ""
    classes: list[str]
    input_shape: tuple[int, int, int]
    augment: bool = True

    @property
    def domains(self) -> list[str]:
        """Domain names in DomainBed's (sorted) order; index ``i`` is environment ``i``."""
        return list(self.ENVIRONMENTS)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        """The number of domains (as in DomainBed, iterating a dataset walks its domains)."""
        return len(self.ENVIRONMENTS)

    def domain(self, index: int, train: bool) -> Dataset:
        """Domain ``index`` as a dataset of ``(image C x H x W float tensor, int label)``.

        ``train=True`` applies the training augmentation when the dataset was built with
        ``augment=True``; otherwise (and always for ``train=False``) the evaluation transform.
        """
        self._check_index(index)
        return self._domain_items(index, train and self.augment)

    def domain_size(self, index: int) -> int:
        """Number of images in domain ``index``."""
        raise NotImplementedError

    def _domain_items(self, index: int, train: bool) -> Dataset:
        raise NotImplementedError

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self):
            raise DataError(
                f"{self.name} has no domain index {index!r}; valid indices are 0..{len(self) - 1} "
                f"for {self.domains}"
            )

    def __repr__(self) -> str:
        sizes = ", ".join(f"{d}={self.domain_size(i)}" for i, d in enumerate(self.domains))
        return f"{type(self).__name__}({self.name!r}, {self.num_classes} classes, domains: {sizes})"


class TensorDomain(Dataset):
    """Images held in memory as one tensor; ``transform`` (which must not work in place)
    is applied per item."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Transform | None = None) -> None:
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        # Never hand out the cached storage itself: a caller editing an item in place would
        # corrupt the dataset. Transforms return new tensors (ours never work in place).
        image = image.clone() if self.transform is None else self.transform(image)
        return image, int(self.labels[index])


class FileDomain(Dataset):
    """Images on disk as ``(path, label)`` samples, loaded with ``loader`` then ``transform``."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        loader: Callable[[str], Any],
        transform: Transform,
    ) -> None:
        self.samples = list(samples)
        self.loader = loader
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return self.transform(self.loader(path)), label


def labels_of(dataset: Dataset) -> Tensor:
    """All labels of a ``TensorDomain``/``FileDomain`` (or a ``Subset`` of one), images unloaded."""
    if isinstance(dataset, torch.utils.data.Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, TensorDomain):
        return dataset.labels.clone()
    if isinstance(dataset, FileDomain):
        return torch.tensor([label for _, label in dataset.samples], dtype=torch.long)
    size = len(cast(Sized, dataset))
    return torch.tensor([int(dataset[i][1]) for i in range(size)], dtype=torch.long)
