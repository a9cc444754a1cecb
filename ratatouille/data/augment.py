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

import functools
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from ratatouille.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CROP_SCALE = (0.7, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = 0.3  # brightness, contrast, saturation and hue
# torchvision takes the log of the ratio bounds in float32: the same bounds, hence the same draws.
_LOG_RATIO = tuple(float(v) for v in torch.log(torch.tensor(CROP_RATIO)))
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

    @classmethod
    def cat(cls, parts: list[AugmentParams]) -> AugmentParams:
        """The parameters of the batches' items, batch after batch."""
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})


def _uniform(low: float, high: float, gen: torch.Generator) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=gen))


def _crop_params(size: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params on a size x size image, same draws in the same order."""
    area = size * size
    low, high = _LOG_RATIO
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*CROP_SCALE, generator=gen).item()
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


def _crop_flip_resize(x: Tensor, box: Tensor, flip: Tensor, out: int) -> Tensor:
    """Each item's crop box (n x 4: top, left, height, width) resized to out x out (bilinear,
    pixel centres), mirrored where ``flip`` (n, bool); ``box`` and ``flip`` on x's device."""
    n, size = len(x), x.shape[-1]
    top, left, h, w = (box[:, k].view(n, 1).to(x.dtype) for k in range(4))
    centres = (torch.arange(out, device=x.device, dtype=x.dtype) + 0.5).view(1, out)
    centres_x = torch.where(flip.view(n, 1), out - centres, centres)
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
    """Grey level (..., 1, H, W) of RGB images (..., 3, H, W)."""
    r, g, b = x.unbind(-3)
    return (r * _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(-3)


Factor = Tensor | float  # (n, 1, 1, 1) for a batch, a number for one image


def _brightness_(x: Tensor, f: Factor) -> None:  # blend with black
    x.mul_(f).clamp_(0, 1)


def _contrast_(x: Tensor, f: Factor) -> None:  # blend with the image's mean grey level
    r, g, b = x.mean(dim=(-2, -1)).unbind(-1)  # the grey mean is the luma of channel means
    mean: Tensor | float
    if isinstance(f, Tensor):
        mean = (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2])[..., None, None, None]
    else:  # one image on the CPU: a number, not five ops on one-element tensors
        mean = float(r) * _LUMA[0] + float(g) * _LUMA[1] + float(b) * _LUMA[2]
    x.mul_(f).add_(mean * (1 - f)).clamp_(0, 1)


def _saturation_(x: Tensor, f: Factor) -> None:  # blend with the image's own greyscale
    x.lerp_(_luma(x).expand_as(x), 1 - f).clamp_(0, 1)


def _hue_(x: Tensor, f: Factor) -> None:
    """Rotate the HSV hue by ``f`` turns, keeping value (max) and chroma (max - min).

    Written without bool tensors, ``where``, ``heaviside`` or ``remainder`` (each several times
    slower than float arithmetic on the CPU, where every op costs a pass over the image):
    comparisons write floats (1 where a channel is the largest), and the output is one
    broadcast over the three channels.
    """
    r, g, b = x.unbind(-3)
    top = torch.maximum(r, g)
    torch.maximum(top, b, out=top)
    low = torch.minimum(r, g)
    torch.minimum(low, b, out=low)
    chroma = top - low
    is_r = torch.ge(r, top, out=torch.empty_like(r))
    not_r = 1 - is_r
    is_g = torch.ge(g, top, out=torch.empty_like(g)).mul_(not_r)  # r wins ties, then g
    is_b = not_r.sub_(is_g)
    # The hexcone hue times chroma: (g - b) when r is largest, (b - r) + 2C for g, (r - g) + 4C
    # for b; then the hue in sextants, rotated by 6 f and wrapped into [0, 6).
    h6 = (g - b).mul_(is_r)
    part = torch.sub(b, r).add_(chroma, alpha=2)
    h6.addcmul_(part, is_g)
    torch.sub(r, g, out=part).add_(chroma, alpha=4)
    h6.addcmul_(part, is_b)
    h6.div_(chroma.clamp_min(1e-12)).add_(_per_image(f) * 6)
    h6.sub_(torch.div(h6, 6).floor_().mul_(6))
    # A fully saturated colour of hue h6 has G = clamp(2 - |h6 - 2|), B = clamp(2 - |h6 - 4|)
    # and R = clamp(|h6 - 3| - 1) = 1 - clamp(2 - |h6 - 3|) (clamps to [0, 1]; |h6 - 3| <= 3);
    # scaled into [min, max].
    level = (h6.unsqueeze(-3) - _hue_centres(x.device, x.dtype)).abs_().neg_().add_(2)
    level.clamp_(0, 1).select(-3, 0).neg_().add_(1)
    torch.addcmul(low.unsqueeze(-3), chroma.unsqueeze(-3), level, out=x)


@functools.cache
def _hue_centres(device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor([3.0, 2.0, 4.0], dtype=dtype).view(3, 1, 1).to(device)


def _per_image(f: Factor) -> Factor:
    """A batch's factors (n, 1, 1, 1) as (n, 1, 1), to broadcast over (n, H, W) channels."""
    return f.view(-1, 1, 1) if isinstance(f, Tensor) else f


_COLOUR_OPS = (_brightness_, _contrast_, _saturation_, _hue_)  # torchvision's op indices


def _send(tensor: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on ``device`` without a host-device sync (pinned, non-blocking on CUDA)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _augment_batched(images: Tensor, params: AugmentParams, out: int) -> Tensor:
    """One grid_sample for every crop, each colour op on the sub-batch that applies it at
    each position of the op order: few, large kernels (GPU). The parameters and the
    sub-batches' rows are worked out on the CPU and sent in two copies: no kernel waits for
    the host, and the host never waits for the device."""
    device = images.device
    groups = [
        (op, (params.order[:, position] == op).nonzero().flatten())
        for position in range(4)
        for op in range(4)
    ]
    rows = _send(torch.cat([g for _, g in groups]), device)
    packed = torch.cat(
        [params.crop, params.flip[:, None], params.factors, params.gray[:, None]], dim=1
    )
    packed = _send(packed.to(torch.float32), device)  # crop 0..3, flip 4, factors 5..8, gray 9
    x = _crop_flip_resize(to_unit(images), packed[:, :4], packed[:, 4] > 0.5, out)
    start = 0
    for op, cpu_rows in groups:
        count = len(cpu_rows)
        if count:
            part_rows = rows[start : start + count]
            part = x.index_select(0, part_rows)
            _COLOUR_OPS[op](part, packed[part_rows, 5 + op].view(-1, 1, 1, 1))
            x.index_copy_(0, part_rows, part)  # in place: one copy of the group, not the batch
        start += count
    gray = (packed[:, 9] > 0.5).view(-1, 1, 1, 1)
    return torch.where(gray, _luma(x).expand_as(x), x)


def _augment_items(images: Tensor, params: AugmentParams, out: int) -> Tensor:
    """Item by item, in place, on cache-sized images (CPU): no sub-batch copies. The crop is
    resized in uint8 (rounded, as PIL does) by torch's antialiased bilinear kernel, fastest on
    channels-last input (the store's layout)."""
    x = torch.empty(len(images), 3, out, out, dtype=torch.float32)
    crops, flips, grays = params.crop.tolist(), params.flip.tolist(), params.gray.tolist()
    orders, factors = params.order.tolist(), params.factors.tolist()
    for i, (top, left, h, w) in enumerate(crops):
        patch = images[i : i + 1, :, top : top + h, left : left + w]
        if (h, w) != (out, out):
            patch = F.interpolate(patch, size=(out, out), mode="bilinear", antialias=True)
        image = x[i]
        torch.mul(patch[0].flip(-1) if flips[i] else patch[0], 1 / 255.0, out=image)
        for op in orders[i]:
            _COLOUR_OPS[op](image, factors[i][op])
        if grays[i]:
            image.copy_(_luma(image).expand_as(image))
    return x


@functools.cache
def _imagenet(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """ImageNet mean and std on ``device``, made once (a copy per batch would sync on CUDA)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1)
    return mean.to(device), std.to(device)


def normalize(x: Tensor) -> Tensor:
    """ImageNet normalisation of a float [0, 1] batch (N x 3 x H x W), in place."""
    mean, std = _imagenet(x.device, x.dtype)
    return x.sub_(mean).div_(std)


def to_unit(images: Tensor) -> Tensor:
    """uint8 0..255 -> float32 0..1 (ToTensor's scaling)."""
    return images.to(torch.float32).div_(255.0)


def eval_batch(images: Tensor) -> Tensor:
    """Stored uint8 images (N x 3 x S x S) as the eval transform's output: ToTensor + normalise."""
    return normalize(to_unit(images))


def augment_batch(
    images: Tensor,
    params: AugmentParams,
    out_size: int | None = None,
    batched: bool | None = None,
) -> Tensor:
    """DomainBed's training augmentation of stored uint8 images (N x 3 x S x S, any device),
    normalised float32 output. ``params`` come from :func:`draw_params` (on the CPU).

    ``batched`` (default: on every device but the CPU) picks the few-large-kernels form; the
    CPU default works item by item in place, which a single core runs several times faster.
    Both compute the same ops; they differ by the uint8 rounding after the crop.
    """
    if len(images) != len(params):
        raise ValueError(f"{len(images)} images but parameters for {len(params)}")
    out = images.shape[-1] if out_size is None else out_size
    if batched is None:
        batched = images.device.type != "cpu"
    x = _augment_batched(images, params, out) if batched else _augment_items(images, params, out)
    return normalize(x)
