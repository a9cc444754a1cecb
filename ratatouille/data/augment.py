"""DomainBed's training augmentation, batched on tensors on any device (the decoded pipeline).

The PIL reference (``transforms.domainbed_train_transform``) is RandomResizedCrop(S,
scale=(0.7, 1)), RandomHorizontalFlip, ColorJitter(0.3, 0.3, 0.3, 0.3) (its four ops in a random
order), RandomGrayscale(0.1), ToTensor, ImageNet normalisation. Here the same ops run on a whole
uint8 batch at once: crop + resize + flip is one bilinear ``grid_sample``, the colour ops are
elementwise. The random parameters are drawn on the CPU, per item, from a ``torch.Generator``
seeded with the item's seed, in exactly the order torchvision's transforms draw them from the
global RNG: for an S x S input the parameters equal the PIL pipeline's for the same seed, and a
batch is a pure function of its items' seeds whatever the device, the batching or the workers.

Documented difference: the crop is taken from the stored S x S image (the eval transform's
``Resize((S, S))`` output), not from the original file, as FFCV does. The crop's share of the
image and its aspect ratio are drawn the same way; for non-square originals the aspect ratio is
relative to the resized image, and no detail finer than S x S survives (every crop is upscaled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ratatouille.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CROP_SCALE = (0.7, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = 0.3  # brightness, contrast, saturation and hue
GRAYSCALE_P = 0.1
FLIP_P = 0.5
# ITU-R 601-2 luma, PIL's "L" conversion (torchvision's rgb_to_grayscale uses the same).
_LUMA = (0.299, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # torchvision's ColorJitter op indices


@dataclass(frozen=True)
class AugmentParams:
    """Per-item parameters of a batch (CPU tensors, first dimension = batch)."""

    crop: Tensor  # (B, 4) int64: top, left, height, width in stored-image pixels
    flip: Tensor  # (B,) bool
    order: Tensor  # (B, 4) int64: the ColorJitter ops in the order they apply
    factors: Tensor  # (B, 4) float64: brightness, contrast, saturation, hue factors
    gray: Tensor  # (B,) bool

    def __len__(self) -> int:
        return len(self.flip)


def _uniform(low: float, high: float, gen: torch.Generator) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=gen))


def _crop_params(size: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params on a size x size image, same draws in the same order."""
    area = size * size
    log_ratio = torch.log(torch.tensor(CROP_RATIO))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*CROP_SCALE, generator=gen).item()
        low, high = float(log_ratio[0]), float(log_ratio[1])
        aspect = math.exp(torch.empty(1).uniform_(low, high, generator=gen).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= size and 0 < h <= size:
            top = int(torch.randint(0, size - h + 1, size=(1,), generator=gen).item())
            left = int(torch.randint(0, size - w + 1, size=(1,), generator=gen).item())
            return top, left, h, w
    return 0, 0, size, size  # torchvision's fallback: a square image is its own centre crop


def draw_one(size: int, gen: torch.Generator) -> tuple:
    """One item's parameters, drawn from ``gen`` in torchvision's order: crop, flip, jitter
    (op order, then brightness, contrast, saturation, hue), grayscale."""
    crop = _crop_params(size, gen)
    flip = bool(torch.rand(1, generator=gen) < FLIP_P)
    order = torch.randperm(4, generator=gen)
    factors = [_uniform(1 - JITTER, 1 + JITTER, gen) for _ in range(3)]
    factors.append(_uniform(-JITTER, JITTER, gen))
    gray = bool(torch.rand(1, generator=gen) < GRAYSCALE_P)
    return crop, flip, order, factors, gray


def stack_params(items: list[tuple]) -> AugmentParams:
    crops, flips, orders, factors, grays = zip(*items) if items else ((), (), (), (), ())
    return AugmentParams(
        crop=torch.tensor(crops, dtype=torch.long).reshape(-1, 4),
        flip=torch.tensor(flips, dtype=torch.bool),
        order=torch.stack(orders) if orders else torch.empty(0, 4, dtype=torch.long),
        factors=torch.tensor(factors, dtype=torch.float64).reshape(-1, 4),
        gray=torch.tensor(grays, dtype=torch.bool),
    )


def draw_params(item_seeds: list[int], size: int) -> AugmentParams:
    """The augmentation parameters of items with these seeds, for size x size stored images."""
    return stack_params(
        [draw_one(size, torch.Generator().manual_seed(int(seed))) for seed in item_seeds]
    )


def _crop_flip_resize(x: Tensor, params: AugmentParams, out: int) -> Tensor:
    """Each item's crop box resized to out x out (bilinear, pixel centres), mirrored if drawn."""
    n, size = len(x), x.shape[-1]
    box = params.crop.to(device=x.device, dtype=x.dtype)
    top, left, h, w = (box[:, k].view(n, 1) for k in range(4))
    centres = (torch.arange(out, device=x.device, dtype=x.dtype) + 0.5).view(1, out)
    flip = params.flip.to(x.device).view(n, 1)
    centres_x = torch.where(flip, out - centres, centres)
    # Output pixel centre u maps to left + u * w / out in input pixels; grid_sample
    # (align_corners=False) takes it normalised as 2 * x / size - 1.
    src_x = (left + centres_x * (w / out)) * (2.0 / size) - 1.0  # (n, out)
    src_y = (top + centres * (h / out)) * (2.0 / size) - 1.0  # (n, out)
    grid = torch.stack(
        [src_x.view(n, 1, out).expand(n, out, out), src_y.view(n, out, 1).expand(n, out, out)],
        dim=-1,
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _luma(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r, g, b = x.unbind(1)
    value, argmax = x.max(dim=1)
    chroma = value - x.min(dim=1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        argmax == 0,
        ((g - b) / safe) % 6,
        torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, 1.0), 0.0)
    return hue, saturation, value


def _hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    # Channel n (R: 5, G: 3, B: 1) is v - v * s * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) % 6.
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6 * hue) % 6
        channels.append(value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(channels, dim=1)


def _colour_op(op: int, x: Tensor, factor: Tensor) -> Tensor:
    """One ColorJitter op on a sub-batch, ``factor`` of shape (n,); results clamped to [0, 1]."""
    f = factor.view(-1, 1, 1, 1)
    if op == BRIGHTNESS:  # blend with black
        return (x * f).clamp_(0, 1)
    if op == CONTRAST:  # blend with the image's mean grey level
        mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
        return (mean + f * (x - mean)).clamp_(0, 1)
    if op == SATURATION:  # blend with the image's own greyscale
        grey = _luma(x)
        return (grey + f * (x - grey)).clamp_(0, 1)
    hue, saturation, value = _rgb_to_hsv(x)
    return _hsv_to_rgb((hue + f.view(-1, 1, 1)) % 1.0, saturation, value)


def _colour_jitter(x: Tensor, params: AugmentParams) -> Tensor:
    factors = params.factors.to(device=x.device, dtype=x.dtype)
    for position in range(4):
        for op in range(4):
            rows = (params.order[:, position] == op).nonzero().flatten()
            if len(rows) == 0:
                continue
            rows = rows.to(x.device)
            x = x.index_copy(0, rows, _colour_op(op, x.index_select(0, rows), factors[rows, op]))
    return x


def normalize(x: Tensor) -> Tensor:
    """ImageNet normalisation of a float [0, 1] batch (N x 3 x H x W)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def to_unit(images: Tensor) -> Tensor:
    """uint8 0..255 -> float32 0..1 (ToTensor's scaling)."""
    return images.to(torch.float32).div_(255.0)


def eval_batch(images: Tensor) -> Tensor:
    """Stored uint8 images (N x 3 x S x S) as the eval transform's output: ToTensor + normalise."""
    return normalize(to_unit(images))


def augment_batch(images: Tensor, params: AugmentParams, out_size: int | None = None) -> Tensor:
    """DomainBed's training augmentation of stored uint8 images (N x 3 x S x S, any device),
    normalised float32 output. ``params`` come from :func:`draw_params` (on the CPU)."""
    if len(images) != len(params):
        raise ValueError(f"{len(images)} images but parameters for {len(params)}")
    out = images.shape[-1] if out_size is None else out_size
    x = _crop_flip_resize(to_unit(images), params, out)
    x = _colour_jitter(x, params)
    gray = params.gray.to(x.device).view(-1, 1, 1, 1)
    x = torch.where(gray, _luma(x).expand_as(x), x)
    return normalize(x)
