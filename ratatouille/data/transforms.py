"""Image transforms: DomainBed's (PIL, torchvision) and the embedded benchmark's (tensor).

Every random draw goes through torch's global RNG, never Python's ``random`` or numpy, so
that :class:`ratatouille.data.loaders.InfiniteLoader`, which seeds the global RNG for each
item it loads, makes augmented batches a pure function of the loader's seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The embedded benchmark maps [0, 1] pixels to [-1, 1].
EMBEDDED_MEAN = 0.5
EMBEDDED_STD = 0.5


def domainbed_eval_transform(image_size: int = 224) -> T.Compose:
    """DomainBed's evaluation transform: Resize((s, s)), ToTensor, ImageNet normalisation."""
    return T.Compose(
        [
            T.Resize((image_size, image_size)),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def domainbed_train_transform(image_size: int = 224) -> T.Compose:
    """DomainBed's training augmentation for the training domains."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.7, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3, 0.3),
            T.RandomGrayscale(),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def affine(
    image: Tensor,
    angle_deg: float = 0.0,
    scale: float = 1.0,
    shear: float = 0.0,
    translate: tuple[float, float] | Tensor = (0.0, 0.0),
    flip: bool = False,
) -> Tensor:
    """Affine warp of a ``C x H x W`` (or ``N x C x H x W``) tensor about its centre.

    A positive ``angle_deg`` turns the content clockwise on screen; ``shear`` slants it
    (``x_in = x + shear * y``); ``flip`` mirrors left-right; ``scale < 1`` shrinks.
    ``translate`` is in pixels (x, y), or an ``N x 2`` tensor of per-image shifts. Borders
    repeat the edge pixels so that a domain's background (black, white, noisy) stays its own.
    The sampling grid is built with elementwise ops rather than ``F.affine_grid``: its tiny
    batched matmul goes through a multithreaded BLAS that is ~20x slower on a busy machine.
    """
    batch = image if image.dim() == 4 else image.unsqueeze(0)
    n, height, width = len(batch), batch.shape[-2], batch.shape[-1]
    rad = math.radians(angle_deg)
    cos, sin = math.cos(rad), math.sin(rad)
    fx = -1.0 if flip else 1.0
    shift = torch.as_tensor(translate, dtype=batch.dtype).reshape(-1, 2).expand(n, 2)
    # Output pixel centres in normalised [-1, 1] coordinates (align_corners=False).
    ys = (torch.arange(height, dtype=batch.dtype) * 2 + 1) / height - 1
    xs = (torch.arange(width, dtype=batch.dtype) * 2 + 1) / width - 1
    gy, gx = ys.view(1, height, 1), xs.view(1, 1, width)
    # The inverse map: output -> input coordinates.
    shift_x = (2.0 / width) * shift[:, 0].view(n, 1, 1)
    shift_y = (2.0 / height) * shift[:, 1].view(n, 1, 1)
    src_x = (fx * cos * gx + (sin + shear * cos) * gy) / scale - shift_x
    src_y = (-fx * sin * gx + (cos - shear * sin) * gy) / scale - shift_y
    grid = torch.stack([src_x, src_y], dim=-1)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out if image.dim() == 4 else out[0]


class RandomShift:
    """Mild augmentation: shift by up to ``max_shift`` pixels in x and y (edge pixels repeated)."""

    def __init__(self, max_shift: int) -> None:
        self.max_shift = max_shift

    def __call__(self, image: Tensor) -> Tensor:
        m = self.max_shift
        if m == 0:
            return image.clone()
        height, width = image.shape[-2:]
        padded = F.pad(image[None], (m, m, m, m), mode="replicate")[0]
        dx, dy = torch.randint(0, 2 * m + 1, (2,)).tolist()
        return padded[:, dy : dy + height, dx : dx + width]

    def __repr__(self) -> str:
        return f"RandomShift(max_shift={self.max_shift})"


class StrongAugment:
    """T0's generic augmentation: random affine (rotation, scale, shear, translation),
    random polarity inversion and random brightness/contrast.

    Works on images normalised to [-1, 1] around 0 (the embedded benchmark's), where
    inverting the polarity is a sign flip.
    """

    def __init__(
        self,
        max_angle: float = 20.0,
        scale: tuple[float, float] = (0.8, 1.15),
        max_shear: float = 0.3,
        max_shift: float = 2.0,
        jitter: float = 0.3,
        invert_p: float = 0.5,
    ) -> None:
        self.max_angle = max_angle
        self.scale = scale
        self.max_shear = max_shear
        self.max_shift = max_shift
        self.jitter = jitter
        self.invert_p = invert_p

    def __call__(self, image: Tensor) -> Tensor:
        out = affine(
            image,
            angle_deg=_uniform(-self.max_angle, self.max_angle),
            scale=_uniform(*self.scale),
            shear=_uniform(-self.max_shear, self.max_shear),
            translate=(
                _uniform(-self.max_shift, self.max_shift),
                _uniform(-self.max_shift, self.max_shift),
            ),
        )
        if _uniform(0.0, 1.0) < self.invert_p:
            out = -out
        contrast = _uniform(1.0 - self.jitter, 1.0 + self.jitter)
        brightness = _uniform(-self.jitter, self.jitter)
        return out * contrast + brightness

    def __repr__(self) -> str:
        return (
            f"StrongAugment(max_angle={self.max_angle}, scale={self.scale}, "
            f"max_shear={self.max_shear}, max_shift={self.max_shift}, jitter={self.jitter}, "
            f"invert_p={self.invert_p})"
        )
