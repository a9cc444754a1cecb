"""The embedded offline benchmark: style domains of scikit-learn's bundled handwritten digits.

A miniature of the DomainBed setting that builds in-process in well under a second, with no
download (``sklearn.datasets.load_digits`` ships the 1,797 UCI 8x8 digits inside the package):

- target task T, ``digits``: 10 digit classes in four style domains (``inverted``, ``noisy``,
  ``rot30``, ``thick``), 300 images each, evaluated leave-one-domain-out;
- pre-training task T0, ``digits_t0``: clean digits labelled ``digit mod 5`` (5 classes that pair
  unrelated shapes: 0/5, 1/6, 2/7, 3/8, 4/9) with strong generic augmentation (random affine,
  polarity inversion, brightness/contrast; see ``StrongAugment``). Its features must
  describe all ten shapes, yet it never trains the 10-way read-out, so T0 does not give the
  target task away and there is something left for auxiliary tasks to add;
- auxiliary tasks T_i, ``digits_aux_flipped|sheared|shrunk``: the 10 digit classes in styles
  that none of the target domains uses.

Partition (why no target image is ever seen by T0 or an auxiliary task): a permutation of the
1,797 indices drawn with a FIXED seed (independent of the benchmark seed, so that no choice of
seeds can leak) gives 1,200 target images and 597 source images. The benchmark ``seed`` then
deals the 1,200 target images into the four target domains (300 each, disjoint) and drives the
random parts of the styles (noise, shrunk positions). T0 and every auxiliary task draw on the
597 source images only, each in its own style.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ratatouille.core.seeding import seed_hash
from ratatouille.data.base import DataError, MultiDomainDataset, TensorDomain
from ratatouille.data.transforms import (
    EMBEDDED_MEAN,
    EMBEDDED_STD,
    RandomShift,
    StrongAugment,
    affine,
)

EMBEDDED_TARGET = "digits"
EMBEDDED_PRETRAIN_TASK = "digits_t0"
EMBEDDED_AUX_TASKS = ("digits_aux_flipped", "digits_aux_sheared", "digits_aux_shrunk")

DEFAULT_IMAGE_SIZE = 16
MIN_IMAGE_SIZE = 8
NUM_TARGET_IMAGES = 1200  # 4 target domains x 300 images; the other 597 are the source pool
TARGET_STYLES = ("inverted", "noisy", "rot30", "thick")
SOURCE_STYLES = ("clean", "flipped", "sheared", "shrunk")
PARTITION_SEED = seed_hash("ratatouille.digits", "partition")

DIGIT_CLASSES = [str(d) for d in range(10)]
MOD5_CLASSES = [f"{d} or {d + 5}" for d in range(5)]


@dataclass(frozen=True)
class EmbeddedTaskSpec:
    """One task of the embedded benchmark: its style domains, label set and augmentation."""

    name: str
    styles: tuple[str, ...]
    labels: str  # "digit" (10 classes) or "digit_mod5" (5 classes)
    augmentation: str  # "mild" (random shifts) or "strong" (random affine + brightness/contrast)
    description: str


EMBEDDED_TASKS: dict[str, EmbeddedTaskSpec] = {
    spec.name: spec
    for spec in (
        EmbeddedTaskSpec(
            EMBEDDED_TARGET,
            TARGET_STYLES,
            "digit",
            "mild",
            "target T: 10 digits, 4 style domains, leave-one-domain-out",
        ),
        EmbeddedTaskSpec(
            EMBEDDED_PRETRAIN_TASK,
            ("clean",),
            "digit_mod5",
            "strong",
            "pre-training T0: clean digits, label = digit mod 5, strong augmentation",
        ),
        EmbeddedTaskSpec(
            "digits_aux_flipped", ("flipped",), "digit", "mild", "auxiliary: mirrored digits"
        ),
        EmbeddedTaskSpec(
            "digits_aux_sheared",
            ("sheared",),
            "digit",
            "mild",
            "auxiliary: horizontally sheared digits",
        ),
        EmbeddedTaskSpec(
            "digits_aux_shrunk",
            ("shrunk",),
            "digit",
            "mild",
            "auxiliary: digits shrunk to 65% at a random offset",
        ),
    )
}
EMBEDDED_NAMES = tuple(EMBEDDED_TASKS)


@dataclass(frozen=True)
class StyleDomain:
    """The built tensors of one style domain (treat as read-only: they are cached)."""

    images: Tensor  # N x 3 x S x S, normalised
    digits: Tensor  # N, the digit 0..9
    source_index: Tensor  # N, the index of each image in sklearn's load_digits()


def partition() -> tuple[np.ndarray, np.ndarray]:
    """(target indices, source indices) into ``load_digits()``: fixed, disjoint, covering all."""
    order = np.random.RandomState(PARTITION_SEED).permutation(_raw_digits()[1].shape[0])
    return order[:NUM_TARGET_IMAGES], order[NUM_TARGET_IMAGES:]


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as (images N x 8 x 8 in [0, 1], digit labels N).

    Reads the CSV that ``load_digits`` reads, without importing ``sklearn.datasets`` (which
    costs seconds, paid again in every Ray worker process); falls back to ``load_digits``
    should a scikit-learn release move the file.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0], "datasets", "data", "digits.csv.gz") if locations else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",")
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, target = bunch.images, bunch.target
    return images.astype(np.float32) / 16.0, target.astype(np.int64)


def base_images(indices: np.ndarray) -> Tensor:
    """Clean 16x16 grey digits in [0, 1]: the 8x8 digit upsampled to 12x12, with a 2-pixel
    black margin so that rotations, shears and shifts do not cut strokes off."""
    raw = torch.from_numpy(_raw_digits()[0][indices]).unsqueeze(1)
    up = F.interpolate(raw, size=(12, 12), mode="bilinear", align_corners=False)
    return F.pad(up, (2, 2, 2, 2)).clamp(0.0, 1.0)


def _noisy(x: Tensor, gen: torch.Generator) -> Tensor:
    # Smooth colour clutter behind the strokes: a background, not a per-pixel speckle.
    noise = torch.rand(len(x), 3, 8, 8, generator=gen)
    noise = F.interpolate(noise, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return (x.expand(-1, 3, -1, -1) + 0.6 * noise).clamp(0.0, 1.0)


def _shrunk(x: Tensor, gen: torch.Generator) -> Tensor:
    offsets = torch.rand(len(x), 2, generator=gen) * 6.0 - 3.0
    return affine(x, scale=0.65, translate=offsets)


STYLES: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "clean": lambda x, gen: x,
    "inverted": lambda x, gen: 1.0 - x,
    "noisy": _noisy,
    "rot30": lambda x, gen: affine(x, angle_deg=30.0),
    # A 2x2 dilation: one pixel bolder (3x3 turns 16 px digits into blobs).
    "thick": lambda x, gen: F.max_pool2d(F.pad(x, (0, 1, 0, 1)), kernel_size=2, stride=1),
    "flipped": lambda x, gen: affine(x, flip=True),
    "sheared": lambda x, gen: affine(x, shear=0.5),
    "shrunk": _shrunk,
}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # The build is ~1,800 tiny images: intra-op threads only add barriers, which cost
    # seconds instead of milliseconds when the cores are busy (e.g. with parallel trials).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@functools.lru_cache(maxsize=8)
def build_style_domains(seed: int, image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, StyleDomain]:
    """Every style domain of the benchmark for ``seed``, built once per process (cached)."""
    target_idx, source_idx = partition()
    deal = np.random.RandomState(seed_hash("digits", seed, "deal")).permutation(len(target_idx))
    dealt = target_idx[deal]
    per_domain = len(target_idx) // len(TARGET_STYLES)
    members = {s: dealt[i * per_domain : (i + 1) * per_domain] for i, s in enumerate(TARGET_STYLES)}
    members.update({s: source_idx for s in SOURCE_STYLES})
    labels = _raw_digits()[1]
    domains = {}
    with _one_thread():
        for style, idx in members.items():
            gen = torch.Generator().manual_seed(seed_hash("digits", seed, style))
            images = STYLES[style](base_images(idx), gen).clamp(0.0, 1.0).expand(-1, 3, -1, -1)
            if image_size != DEFAULT_IMAGE_SIZE:
                images = F.interpolate(
                    images,
                    size=(image_size, image_size),
                    mode="bilinear",
                    align_corners=False,
                    antialias=image_size < DEFAULT_IMAGE_SIZE,
                )
            images = ((images - EMBEDDED_MEAN) / EMBEDDED_STD).contiguous()
            domains[style] = StyleDomain(
                images, torch.from_numpy(labels[idx]), torch.from_numpy(idx)
            )
    return domains


class EmbeddedTask(MultiDomainDataset):
    """One task of the embedded benchmark as a :class:`MultiDomainDataset` (domains = styles)."""

    def __init__(
        self, name: str, *, image_size: int | None = None, augment: bool = True, seed: int = 0
    ) -> None:
        if name not in EMBEDDED_TASKS:
            raise DataError(f"unknown embedded task {name!r}; choose one of {list(EMBEDDED_TASKS)}")
        size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
        if size < MIN_IMAGE_SIZE:
            raise DataError(
                f"image_size for {name!r} must be at least {MIN_IMAGE_SIZE}, got {image_size!r}"
            )
        self.spec = EMBEDDED_TASKS[name]
        self.name = name
        self.seed = int(seed)
        self.image_size = size
        self.augment = augment
        self.ENVIRONMENTS = self.spec.styles
        self.classes = list(MOD5_CLASSES if self.spec.labels == "digit_mod5" else DIGIT_CLASSES)
        self.input_shape = (3, size, size)
        self._styles = build_style_domains(self.seed, size)
        shift = max(1, round(2 * size / DEFAULT_IMAGE_SIZE))
        strong = self.spec.augmentation == "strong"
        self._train_transform = (
            StrongAugment(max_shift=float(shift)) if strong else RandomShift(shift)
        )

    def style_domain(self, index: int) -> StyleDomain:
        """The cached tensors behind domain ``index`` (with provenance in ``source_index``)."""
        self._check_index(index)
        return self._styles[self.ENVIRONMENTS[index]]

    def domain_size(self, index: int) -> int:
        return len(self.style_domain(index).digits)

    def _domain_items(self, index: int, train: bool) -> Dataset:
        style = self.style_domain(index)
        labels = style.digits % 5 if self.spec.labels == "digit_mod5" else style.digits
        return TensorDomain(style.images, labels, self._train_transform if train else None)
