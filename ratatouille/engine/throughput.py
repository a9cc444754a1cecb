"""Measured throughput of a config's model on this machine, for `ratatouille plan`.

`ratatouille bench-throughput CONFIG` times the training step a target trial runs (the config's
architecture and image size, a batch of per-domain batch x training domains, Adam, bf16
autocast on CUDA as `fine_tune` does) and the evaluation forward pass, on synthetic images
already on the device, and writes a small JSON file beside the config that `plan` reads. The
figures are therefore the model's compute-bound rates: a data path slower than that makes
the real trial slower than planned, which `make bench` (P9, P10) measures separately.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from ratatouille.core.errors import UserError
from ratatouille.engine.models import build_classifier
from ratatouille.engine.train import adam, autocast_for

EVAL_BATCH = 64  # predict_logits' batch in the reducer and the trainer's evaluations


class ThroughputFileError(UserError, ValueError):
    """A throughput file that cannot be read; the message names it and how to remake it."""


@dataclass(frozen=True)
class Throughput:
    arch: str
    image_size: int
    batch: int  # images per training step, all training domains together
    device: str  # "cpu (N threads, <model>)" or the CUDA card's name
    measured_at: str  # ISO date-time, UTC
    train_steps_per_s: float
    train_images_per_s: float
    eval_images_per_s: float

    def matches(self, arch: str, image_size: int, batch: int) -> bool:
        return (self.arch, self.image_size, self.batch) == (arch, image_size, batch)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads of {os.cpu_count()})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(step, device: torch.device, steps: int, warmup: int) -> float:
    """Calls of ``step`` per second after ``warmup`` untimed calls (cudnn autotuning, allocator)."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps / (time.perf_counter() - start)


def measure_throughput(
    arch: str,
    image_size: int,
    batch: int,
    device: str | torch.device = "cpu",
    steps: int = 20,
    warmup: int = 3,
    num_classes: int = 10,
) -> Throughput:
    """Training steps/s and images/s of ``arch`` at ``image_size`` with ``batch`` images per
    step, and evaluation images/s, on ``device``."""
    device = torch.device(device)
    model = build_classifier(arch, num_classes, seed=0).to(device).train()
    optimizer = adam(model.parameters(), device, lr=1e-5)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    if device.type == "cuda":  # fine_tune's model and inputs on CUDA
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)

    def train_step() -> None:
        with autocast_for(device):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    x_eval = torch.randn(EVAL_BATCH, 3, image_size, image_size, device=device)

    @torch.no_grad()
    def eval_step() -> None:
        with autocast_for(device):
            model(x_eval)

    train_steps = _rate(train_step, device, steps, warmup)
    model.eval()
    eval_batches = _rate(eval_step, device, steps, warmup)
    return Throughput(
        arch=arch,
        image_size=image_size,
        batch=batch,
        device=_device_name(device),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        train_steps_per_s=train_steps,
        train_images_per_s=train_steps * batch,
        eval_images_per_s=eval_batches * EVAL_BATCH,
    )


def default_throughput_path(config_path: str | Path) -> Path:
    """``experiments/pacs.yaml`` -> ``experiments/pacs.throughput.json``: beside the config,
    where `plan` of that config finds it without an option."""
    path = Path(config_path)
    return path.with_name(f"{path.stem}.throughput.json")


def save_throughput(result: Throughput, path: str | Path) -> None:
    Path(path).write_text(json.dumps(asdict(result), indent=2) + "\n")


def load_throughput(path: str | Path) -> Throughput:
    try:
        raw = json.loads(Path(path).read_text())
        return Throughput(**raw)
    except (OSError, ValueError, TypeError) as error:
        raise ThroughputFileError(
            f"cannot read the throughput file {path} ({error}): rerun "
            "`ratatouille bench-throughput CONFIG` to remake it, or delete it"
        ) from None
