"""Training throughput (images/s) of one target fine-tuning step, side by side in one run.

On CUDA: float32 vs bf16 autocast (what `fine_tune` uses on a GPU). On CPU: one thread vs every
core (what `torch.set_num_threads` = the trial's CPUs buys, since Ray's launcher exports
OMP_NUM_THREADS=1). `ratatouille bench-throughput CONFIG` measures a config's own model, image
size and batch (bf16 on CUDA) and writes the figures that `ratatouille plan` turns into
GPU-hours; this script shows what the precision or the threads change.

    python benchmarks/bench_throughput.py                      # test_resnet, 16 px, CPU
    python benchmarks/bench_throughput.py --arch resnet50 --image-size 224 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
import torch.nn.functional as F

from ratatouille.engine.models import build_classifier


def images_per_second(
    arch: str, image_size: int, batch: int, steps: int, device: str, bf16: bool
) -> float:
    model = build_classifier(arch, num_classes=10, seed=0).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: cudnn autotuning, allocator
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="test_resnet")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=96, help="3 training domains x 32")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(
        f"{time.strftime('%Y-%m-%d')}  {args.arch} @ {args.image_size}px, batch {args.batch}, "
        f"{args.steps} steps on {name}"
    )
    if args.device == "cuda":
        rows = {
            "float32": images_per_second(
                args.arch, args.image_size, args.batch, args.steps, "cuda", bf16=False
            ),
            "bf16 autocast": images_per_second(
                args.arch, args.image_size, args.batch, args.steps, "cuda", bf16=True
            ),
        }
        baseline = "float32"
    else:
        rows = {}
        for threads in (1, os.cpu_count() or 1):
            torch.set_num_threads(threads)
            rows[f"{threads} thread(s)"] = images_per_second(
                args.arch, args.image_size, args.batch, args.steps, "cpu", bf16=False
            )
        baseline = "1 thread(s)"
    for label, rate in rows.items():
        print(f"  {label:<14} {rate:9.1f} images/s   x{rate / rows[baseline]:.2f}")


if __name__ == "__main__":
    main()
