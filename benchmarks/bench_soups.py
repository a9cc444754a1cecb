"""Soups of M checkpoints read from disk: loads, peak memory and time, each against its baseline.

The M files are safetensors featurizer states of one architecture (ResNet-50 by default, random
weights), read with ``safetensors.torch.load_file`` as the reducer reads trial checkpoints.

- P2: the greedy soup reads each of the M checkpoints once. The load function is wrapped and
  counts its calls; the greedy soup is driven by an evaluation that keeps some runs and rejects
  others, so both branches run.
- P3: peak resident memory of ``uniform_soup`` over M = 40 files vs M = 5, each in a fresh
  process. The kernel's high-water mark of resident pages (``VmHWM``, reset to the current RSS
  through ``/proc/self/clear_refs`` after the imports) is used rather than tracemalloc: torch
  allocates tensor storage outside Python's allocator, which tracemalloc does not see, and the
  peak that kills a node includes deserialisation buffers and allocator slack. Not
  ``ru_maxrss``: Linux carries it over fork and exec, so a child reports its parent's peak.
  Linux only.
- P4: ``uniform_soup`` time vs the time to only read the bytes of the same M files, in one
  process, the page cache warmed by a first read of every file.

    python benchmarks/bench_soups.py [--quick] [--arch resnet50] [--models 40]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

FIGURES = {"P2": "cpu", "P3": "cpu", "P4": "cpu"}  # benchmarks/run.py: the figures printed here
P3_GOAL, P4_GOAL = 1.15, 1.5

CHILD = r"""
import json, sys, time
from pathlib import Path
from safetensors.torch import load_file
from ratatouille.merging.soups import uniform_soup
folder, models, task = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
paths = sorted(folder.glob("*.safetensors"))[:models]
def status_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
def read_only():  # the bytes themselves, into one reused buffer (no allocation per file):
    # load_file maps the file and may touch no page, and read_bytes would time the allocator
    buffer = bytearray(max(p.stat().st_size for p in paths))
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            f.readinto(buffer)
def soup():
    return uniform_soup(load_file(str(path)) for path in paths)
def timed(fn):
    start = time.perf_counter(); fn(); return time.perf_counter() - start
if task == "memory":
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS now
    base = status_mib("VmRSS"); result = soup()
    print(json.dumps({"peak_mib": status_mib("VmHWM") - base}))
else:
    read_only()  # warm the page cache for both routes
    print(json.dumps({"read_s": timed(read_only), "soup_s": timed(soup)}))
"""


def write_states(folder: Path, arch: str, models: int) -> float:
    """M random states of ``arch``'s featurizer; returns one file's size in MiB."""
    import timm
    import torch
    from safetensors.torch import save_file

    shapes = {
        k: (v.shape, v.dtype)
        for k, v in timm.create_model(arch, num_classes=0).state_dict().items()
    }
    for i in range(models):
        g = torch.Generator().manual_seed(i)
        state = {
            k: torch.randn(s, generator=g).to(d) if d.is_floating_point else torch.zeros(s, dtype=d)
            for k, (s, d) in shapes.items()
        }
        save_file(state, str(folder / f"run{i:03d}.safetensors"))
    return (folder / "run000.safetensors").stat().st_size / 2**20


def child(folder: Path, models: int, task: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(models), task],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {task} M={models} failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def greedy_loads(folder: Path, models: int) -> tuple[int, int]:
    """(file reads, runs kept) of one greedy soup over the first M files."""
    from safetensors.torch import load_file

    from ratatouille.merging.soups import greedy_soup

    paths = sorted(folder.glob("*.safetensors"))[:models]
    reads = 0

    def counted_load(path: Path):
        nonlocal reads
        reads += 1
        return load_file(str(path))

    rng = random.Random(0)  # an ID-val score that sometimes improves, sometimes drops
    result = greedy_soup(
        [lambda p=p: counted_load(p) for p in paths],
        [0.2 - i / (10 * models) for i in range(models)],
        lambda state: rng.random(),
    )
    return reads, len(result.selected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--models", type=int, default=40, help="M of P2, P3 (vs 5) and P4")
    parser.add_argument("--quick", action="store_true", help="(the default sizes already are)")
    args = parser.parse_args()
    small = 5
    with tempfile.TemporaryDirectory(prefix="bench_soups_") as tmp:
        folder = Path(tmp)
        size = write_states(folder, args.arch, args.models)
        print(f"{args.models} x {args.arch} featurizer states, {size:.0f} MiB each, in {folder}")

        reads, kept = greedy_loads(folder, args.models)
        print(
            f"P2 greedy soup checkpoint loads for M={args.models} runs: {reads} "
            f"({reads / args.models:.2f} per run, {kept} kept; goal M: "
            f"{'meets' if reads == args.models else 'MISSES'})"
        )

        big_peak = child(folder, args.models, "memory")["peak_mib"]
        small_peak = child(folder, small, "memory")["peak_mib"]
        ratio = big_peak / small_peak
        print(
            f"P3 uniform soup peak memory M={args.models} vs M={small}: {ratio:.2f}x "
            f"(+{big_peak:.0f} MiB vs +{small_peak:.0f} MiB above baseline, VmHWM, "
            f"one {args.arch} file = {size:.0f} MiB; goal <= {P3_GOAL}x: "
            f"{'meets' if ratio <= P3_GOAL else 'MISSES'})"
        )

        times = child(folder, args.models, "time")
        ratio = times["soup_s"] / times["read_s"]
        print(
            f"P4 uniform soup time vs only reading the M={args.models} files: {ratio:.2f}x "
            f"({times['soup_s']:.2f} s vs {times['read_s']:.2f} s, page cache warm; goal <= "
            f"{P4_GOAL}x: {'meets' if ratio <= P4_GOAL else 'MISSES'})"
        )


if __name__ == "__main__":
    main()
