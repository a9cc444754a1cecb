"""P9: training images/s of the data path per CPU core, decoded store vs PIL, side by side.

Writes a small DomainBed-style (PACS layout) folder of generated JPEGs, then times, in one run
and with the same torch thread count, DomainBed's training batches on both paths:

- PIL: decode each JPEG, RandomResizedCrop + flip + ColorJitter + RandomGrayscale with PIL,
  ToTensor, normalise, one item at a time (``data.pipeline: pil``, the reference);
- decoded: gather uint8 rows of the memory-mapped store and apply the same augmentation to the
  whole batch (``data.pipeline: decoded``), on ``--device``.

The store's one-off build (once per node and dataset) is timed apart and reported. With
``--threads 1`` (the default) and no loader workers both paths run on one core; images are
counted per CPU-second of this process (``time.process_time``), which a busy machine disturbs
less than wall-clock time (the wall-clock ratio is printed too). With ``--device cuda`` the
decoded path's augmentation runs on the GPU, and its CPU cost is what is left on the host
(gathering rows, drawing parameters, launching kernels).

    python benchmarks/bench_data_path.py                    # 224 px, CPU, one thread
    python benchmarks/bench_data_path.py --device cuda --batches 50
"""

from __future__ import annotations

import argparse
import itertools
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ratatouille.data import PACS, InfiniteLoader, train_batches

FIGURES = {"P9": "cpu"}  # benchmarks/run.py: the figures this script prints


def write_jpegs(root: Path, count: int, source_size: int, seed: int = 0) -> Path:
    """``count`` textured JPEGs (quality 90) in a PACS-layout folder, spread over its domains."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:source_size, 0:source_size].astype(np.float32)
    for k in range(count):
        folder = root / "PACS" / PACS.ENVIRONMENTS[k % 4] / f"class{k % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        phase = rng.uniform(0, 6, 3)
        waves = [np.sin(xs / (5 + 3 * c) + ys / (7 + c) + phase[c]) for c in range(3)]
        img = 128 + 60 * np.stack(waves, -1) + rng.normal(0, 20, (source_size, source_size, 3))
        pixels = np.clip(img, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{k}.jpg", quality=90)
    return root


def _rate(batches, count: int, batch: int, device: torch.device) -> tuple[float, float]:
    """(images per CPU-second of this process, images per wall-clock second)."""
    next(batches)  # warm-up: first page faults, kernel selection
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in itertools.islice(batches, count):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    images = count * batch
    return images / (time.process_time() - cpu), images / (time.perf_counter() - wall)


def measure(
    root: Path,
    cache_dir: Path,
    image_size: int = 224,
    batch: int = 32,
    batches: int = 8,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Training images/s of both paths on domain 0 of the PACS-layout folder under ``root``."""
    device = torch.device(device)
    pil = PACS(root, image_size=image_size).domain(0, train=True)
    decoded = PACS(root, image_size=image_size, pipeline="decoded", cache_dir=cache_dir)
    start = time.perf_counter()
    decoded.store()
    build = time.perf_counter() - start
    pil_cpu, pil_wall = _rate(iter(InfiniteLoader(pil, batch, seed=0)), batches, batch, device)
    stream = train_batches(decoded.domain(0, train=True), batch, seed=0, device=device)
    decoded_cpu, decoded_wall = _rate(stream, batches * 4, batch, device)
    return {
        "pil": pil_cpu,
        "decoded": decoded_cpu,
        "ratio": decoded_cpu / pil_cpu,
        "wall_ratio": decoded_wall / pil_wall,
        "build_s": build,
        "stored": decoded.store().count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--source-size", type=int, default=256, help="side of the JPEG files")
    parser.add_argument("--images", type=int, default=96, help="JPEGs written (over 4 domains)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="PIL batches timed (decoded: 4x)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = per core)")
    parser.add_argument("--device", default="cpu", help="where the decoded path augments")
    parser.add_argument("--quick", action="store_true", help="(the default sizes already are)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(tmp) / "data", args.images, args.source_size)
        result = measure(
            root, Path(tmp) / "cache", args.image_size, args.batch, args.batches, args.device
        )
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"P9 data path training images/s per CPU core: {result['ratio']:.1f}x "
        f"(decoded store + batched augmentation {result['decoded']:.0f} vs PIL "
        f"{result['pil']:.0f} images per CPU-second, wall-clock ratio "
        f"{result['wall_ratio']:.1f}x; {args.image_size} px from {args.source_size} px JPEGs, "
        f"batch {args.batch}, {args.threads} torch thread(s), augmentation on {args.device}"
        f"{f' ({card})' if card else ''}; one-off store build {result['build_s']:.1f} s for "
        f"{result['stored']:.0f} images; {platform.node()}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC)"
    )


if __name__ == "__main__":
    main()
