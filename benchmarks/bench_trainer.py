"""The trainer's overhead and a trial's GPU utilisation, each measured side by side in one run.

P5  (CPU) ``fine_tune`` steps/s vs a bare PyTorch loop: the same model, batch, threads and
    optimizer (Adam's fused kernel, as ``fine_tune``); the bare loop steps on batches made
    beforehand, ``fine_tune`` draws the same data from in-memory domains through its loaders.
    Each run's median step (start of one
    training forward to the next, batch fetch included, first step left out) is compared with
    the other route's run right beside it (which of the two runs first alternates); the figure
    is the median over such pairs, so that a burst of load on a shared machine does not decide
    it. Goal >= 0.95.
P10 (CUDA) a trial's training images/s vs the compute-bound rate: ``fine_tune`` with its real
    data path (JPEG files in DomainBed's PACS layout, through ``data.pipeline``: by default the
    decoded uint8 store with the augmentation batched on the GPU, as the DomainBed configs) vs
    the same model (ResNet-50, 224 px, bf16 autocast, channels_last) stepping on a batch
    already in GPU memory. Goal >= 0.9.
P11 (CUDA) the whole GPU, not one trial: aggregate training images/s of the trials one GPU holds
    (``--packing`` of them, as ``gpus_per_trial: 1/packing``, each with its share of the CPUs)
    vs the same model's saturated rate on that GPU: the compute-bound step of P10 at its
    fastest batch (the trial batch x 1, 2 and 4, as memory allows), measured in the same run.
    Goal >= 0.85. The line also gives the old ratio, packed trials vs one alone.

The trial windows cover ``--window`` steps between two snapshots, so they include what a real
trial pays every ``checkpoint_freq`` steps (the loaders are reopened) but not the start-up.

    python benchmarks/bench_trainer.py                  # P5; P10/P11 when CUDA is present
    python benchmarks/bench_trainer.py --device cuda    # one command on a GPU machine (< 4 min)
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

FIGURES = {"P5": "cpu", "P10": "cuda", "P11": "cuda"}
NUM_CLASSES = 7  # PACS
DOMAINS = 3  # training domains of a PACS cell: the batch is 3 x batch_size


# -- P5: trainer vs bare loop on the CPU ----------------------------------------------------------
def _cpu_domains(n: int, size: int, seed: int) -> list[Any]:
    import torch
    from torch.utils.data import TensorDataset

    gen = torch.Generator().manual_seed(seed)
    return [
        TensorDataset(
            torch.randn(n, 3, size, size, generator=gen),
            torch.randint(0, NUM_CLASSES, (n,), generator=gen),
        )
        for _ in range(DOMAINS)
    ]


def _step_intervals(model: Any) -> list[float]:
    """Seconds between the starts of consecutive training forwards (evaluation, in eval mode,
    is not counted): one full step each, batch fetch included."""
    marks: list[float] = []

    def mark(module: Any, _inputs: Any) -> None:
        if module.training:
            marks.append(time.perf_counter())

    model.register_forward_pre_hook(mark)
    return marks


def _bare_loop(arch: str, domains: list[Any], batch: int, steps: int) -> list[float]:
    """Plain Adam steps on batches made beforehand."""
    import torch
    import torch.nn.functional as F

    from ratatouille.engine.models import build_classifier
    from ratatouille.engine.train import adam

    model = build_classifier(arch, NUM_CLASSES, seed=0).train()
    optimizer = adam(model.parameters(), torch.device("cpu"), lr=1e-5)  # fine_tune's optimizer
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(steps + 1):
        rows = [torch.randint(0, len(d), (batch,), generator=gen) for d in domains]
        xs, ys = zip(*(d.tensors for d in domains))
        batches.append(
            (
                torch.cat([x[i] for x, i in zip(xs, rows)]),
                torch.cat([y[i] for y, i in zip(ys, rows)]),
            )
        )
    marks = _step_intervals(model)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return _intervals(marks)


def _fine_tune(arch: str, domains: list[Any], batch: int, steps: int) -> list[float]:
    """``fine_tune`` on the same in-memory data, reporting at its start and end only."""
    from torch.utils.data import Subset

    from ratatouille.engine.models import build_classifier
    from ratatouille.engine.train import FineTuneConfig, fine_tune

    cfg = FineTuneConfig(
        steps=steps + 1,
        checkpoint_freq=steps + 1,
        lr=1e-5,
        weight_decay=0.0,
        batch_size=batch,
        eval_freq="end",
    )
    model = build_classifier(arch, NUM_CLASSES, seed=0)
    marks = _step_intervals(model)
    fine_tune(model, domains, [Subset(domains[0], [0])], cfg)
    return _intervals(marks)


def _intervals(marks: list[float]) -> list[float]:
    # the first interval holds the warm-up (allocator, first checkpoint): left out of both
    return [b - a for a, b in itertools.pairwise(marks[1:])]


def p5(arch: str, size: int, batch: int, steps: int, repeats: int, threads: int) -> str:
    import statistics

    import torch

    torch.set_num_threads(threads)
    domains = _cpu_domains(4 * batch, size, seed=0)
    ours: list[float] = []
    bare: list[float] = []
    ratios: list[float] = []
    _fine_tune(arch, domains, batch, 2)  # untimed: the first run of a process pays its imports
    _bare_loop(arch, domains, batch, 2)  # and first allocations, whichever route it is
    for repeat in range(repeats):  # short runs back to back: each pair sees the same load
        if repeat % 2:  # which route runs first alternates: neither always gets the warm start
            plain = _bare_loop(arch, domains, batch, steps)
            mine = _fine_tune(arch, domains, batch, steps)
        else:
            mine = _fine_tune(arch, domains, batch, steps)
            plain = _bare_loop(arch, domains, batch, steps)
        ratios.append(statistics.median(plain) / statistics.median(mine))
        ours, bare = ours + mine, bare + plain
    ours_rate, bare_rate = 1 / statistics.median(ours), 1 / statistics.median(bare)
    return (
        f"P5 trainer steps/s vs bare PyTorch loop: {statistics.median(ratios):.3f} "
        f"(median over {repeats} back-to-back pairs of runs of their median step; fine_tune "
        f"{ours_rate:.2f} steps/s, bare fused-Adam loop {bare_rate:.2f} steps/s overall; "
        f"{arch} {size} px, batch {DOMAINS}x{batch}, {threads} threads, CPU; goal >= 0.95)"
    )


# -- P10 / P11: a trial on the GPU ----------------------------------------------------------------
def _write_fake_pacs(root: Path, per_class: int, side: int) -> None:
    """JPEGs in DomainBed's PACS layout: smooth random images (JPEG-typical content)."""
    import numpy as np
    from PIL import Image

    from ratatouille.data.domainbed import PACS

    rng = np.random.default_rng(0)
    for env in PACS.ENVIRONMENTS:
        for label in range(NUM_CLASSES):
            folder = root / PACS.FOLDER / env / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                coarse = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((side, side), Image.BILINEAR)
                image.save(folder / f"{i}.jpg", quality=90)


def _trial_splits(root: str, pipeline: str) -> Any:
    from ratatouille.data import get_dataset, target_splits

    dataset = get_dataset(
        "PACS",
        root,
        image_size=224,
        augment=True,
        pipeline=pipeline,  # type: ignore[arg-type]
        cache_dir=Path(root) / "decoded",  # built by the first trial, read by the others
    )
    return target_splits(dataset, [3], split_seed=0)  # train on 3 domains, as a PACS cell


def _trial_worker(root: str, trial: dict[str, Any], cpus: int, barrier: Any, results: Any) -> None:
    """One trial: fine_tune on the GPU, timed over ``window`` steps between two snapshots."""
    import torch

    from ratatouille.engine.models import build_classifier
    from ratatouille.engine.train import FineTuneConfig, fine_tune

    window, batch = trial["window"], trial["batch"]
    torch.set_num_threads(max(1, cpus))
    splits = _trial_splits(root, trial["pipeline"])
    cfg = FineTuneConfig(
        steps=2 * window + 2,
        checkpoint_freq=window,
        lr=5e-5,
        weight_decay=0.0,
        batch_size=batch,
        device=trial["device"],
        eval_freq="end",
        num_workers=max(0, cpus - 1),
    )
    marks: dict[int, float] = {}
    syncs = _SyncCounter(trial["device"] == "cuda")

    def on_checkpoint(step: int, metrics: dict, snapshot: Any) -> None:
        if step == 2 * window:
            syncs.stop()
        if step == window and barrier is not None:
            barrier.wait(timeout=300)  # every trial starts its window together (after its warm-up)
        marks[step] = time.time()  # wall clock: comparable across processes
        if step == window:
            syncs.start()

    model = build_classifier(trial["arch"], NUM_CLASSES, seed=0)
    fine_tune(model, splits.train, [splits.id_val[0]], cfg, on_checkpoint=on_checkpoint)
    images = window * DOMAINS * batch
    results.put({"t0": marks[window], "t1": marks[2 * window], "images": images, "syncs": syncs.n})


class _SyncCounter:
    """Counts the host syncs CUDA's sync debug mode reports (each a warning) while started."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.n = enabled, -1
        self._log: Any = None

    def start(self) -> None:
        if not self.enabled:
            return
        import torch

        self._catch = warnings.catch_warnings(record=True)
        self._log = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self._log is None:
            return
        import torch

        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(None, None, None)
        self.n = sum("synchroniz" in str(w.message) for w in self._log)
        self._log = None


def _run_trials(root: str, trials: int, cpus: int, trial: dict[str, Any]) -> tuple[float, int]:
    """Aggregate images/s of ``trials`` concurrent processes over their common window, and
    the host syncs the first one made in its window (-1: not counted, off CUDA)."""
    ctx = mp.get_context("spawn")  # CUDA in children needs spawn
    barrier = ctx.Barrier(trials) if trials > 1 else None
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_trial_worker, args=(root, trial, cpus, barrier, results))
        for _ in range(trials)
    ]
    for proc in procs:
        proc.start()
    try:
        rows = _collect(results, procs)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
    span = max(r["t1"] for r in rows) - min(r["t0"] for r in rows)
    return sum(r["images"] for r in rows) / span, rows[0]["syncs"]


def _collect(results: Any, procs: list[Any], limit_s: float = 400) -> list[dict]:
    """Every trial's result; a trial that dies fails the figure at once (no hang)."""
    import queue

    rows: list[dict] = []
    deadline = time.monotonic() + limit_s
    while len(rows) < len(procs):
        try:
            rows.append(results.get(timeout=2))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a trial process exited with code {dead[0]}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"trials did not finish within {limit_s:.0f} s") from None
    return rows


def _compute_bound_rate(window: int, batch: int) -> float:
    """The same model and step on one batch already in GPU memory: the GPU's own limit."""
    import torch
    import torch.nn.functional as F

    from ratatouille.engine.models import build_classifier
    from ratatouille.engine.train import adam

    model = build_classifier("resnet50", NUM_CLASSES, seed=0).cuda().train()
    model.to(memory_format=torch.channels_last)
    optimizer = adam(model.parameters(), torch.device("cuda"), lr=5e-5)  # fine_tune's optimizer
    n = DOMAINS * batch
    x = torch.randn(n, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (n,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(window):
        step()
    torch.cuda.synchronize()
    return window * n / (time.perf_counter() - start)


def _saturated_rate(window: int, batch: int) -> tuple[float, int]:
    """The compute-bound rate at the fastest per-domain batch of ``batch`` x 1, 2, 4 (a larger
    one that does not fit is skipped): what the GPU does when nothing but the model limits it."""
    import torch

    rates = {}
    for factor in (1, 2, 4):
        try:
            rates[batch * factor] = _compute_bound_rate(window, batch * factor)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    best = max(rates, key=rates.__getitem__)
    return rates[best], best


def cuda_figures(
    window: int, batch: int, per_class: int, pipeline: str, packing: int = 4
) -> list[str]:
    import torch

    name, cores = torch.cuda.get_device_name(), os.cpu_count() or 1
    trial = {
        "window": window,
        "batch": batch,
        "device": "cuda",
        "arch": "resnet50",
        "pipeline": pipeline,
    }
    with tempfile.TemporaryDirectory() as root:
        _write_fake_pacs(Path(root), per_class, side=256)
        bound = _compute_bound_rate(window, batch)
        saturated, saturated_batch = _saturated_rate(window, batch)
        torch.cuda.empty_cache()  # the trials need the memory, not this process's cache
        alone_all_cpus, syncs = _run_trials(root, 1, cores, trial)
        share = max(1, cores // packing)
        alone, _ = _run_trials(root, 1, share, trial)
        shared, _ = _run_trials(root, packing, share, trial)
    where = f"{name}, {cores} CPU cores, resnet50 224 px bf16, batch {DOMAINS}x{batch}"
    return [
        f"P10 trial training images/s vs compute-bound rate: {alone_all_cpus / bound:.3f} "
        f"(fine_tune on JPEGs, data.pipeline {pipeline}, {alone_all_cpus:.0f} images/s with "
        f"{cores - 1} loader workers per domain, same model on a batch in GPU memory "
        f"{bound:.0f} images/s; {where}; "
        f"{window}-step window, {syncs} host syncs in it (CUDA sync debug mode; the trainer "
        f"reads the loss every 50 steps and at checkpoints); goal >= 0.9)",
        f"P11 aggregate images/s of the trials one GPU holds vs its saturated rate: "
        f"{shared / saturated:.3f} ({packing} trials at gpus_per_trial {1 / packing:g}: "
        f"{shared:.0f} images/s together, {share} CPUs each; saturated {saturated:.0f} images/s "
        f"at batch {DOMAINS}x{saturated_batch} on batches in GPU memory; packed vs one trial "
        f"alone {shared / alone:.2f}, alone {alone:.0f} images/s; data.pipeline {pipeline}; "
        f"{where}; goal >= 0.85)",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="cuda: also P10/P11 (default: when a GPU is present)",
    )
    parser.add_argument("--quick", action="store_true", help="the `make bench` sizes")
    parser.add_argument("--cuda-only", action="store_true", help="only P10 and P11")
    parser.add_argument("--arch", default="resnet18", help="P5 model")
    parser.add_argument("--image-size", type=int, default=32, help="P5 images")
    parser.add_argument("--batch", type=int, default=16, help="P5 per-domain batch")
    parser.add_argument("--steps", type=int, default=None, help="P5 steps per run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="P5 threads")
    parser.add_argument("--window", type=int, default=None, help="P10/P11 timed steps")
    parser.add_argument(
        "--packing", type=int, default=4, help="P11: trials per GPU (gpus_per_trial = 1/packing)"
    )
    parser.add_argument(
        "--pipeline",
        choices=["decoded", "pil"],
        default="decoded",
        help="P10/P11 data path (decoded: the DomainBed configs' choice)",
    )
    args = parser.parse_args(argv)

    import torch

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if not args.cuda_only:
        steps = args.steps or (20 if args.quick else 40)
        print(
            p5(args.arch, args.image_size, args.batch, steps, repeats=8, threads=args.threads),
            flush=True,
        )
    if not use_cuda:
        print("P10 trial training images/s vs compute-bound rate: not measured (no CUDA device)")
        print(
            "P11 aggregate images/s of the trials one GPU holds vs its saturated rate: not "
            "measured (no CUDA device)"
        )
        return
    print(f"# CUDA device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    window = args.window or (50 if args.quick else 100)  # DomainBed checkpoints every 100
    lines = cuda_figures(window, 32, per_class=25, pipeline=args.pipeline, packing=args.packing)
    for line in lines:
        print(line, flush=True)


if __name__ == "__main__":
    main()
