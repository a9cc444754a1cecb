"""P17: the streamed merges of ``ratatouille.merging.merges`` over M checkpoints read from disk.

The M files are safetensors featurizer states of one architecture (ResNet-50 by default, random
weights), ``theta_0`` one more such file, read with ``safetensors.torch.load_file`` as the
reducer reads trial checkpoints. For each merge (task arithmetic, TIES in one pass, DARE
then averaging, Model Stock, Fisher averaging with a stand-in Fisher ``|theta|`` computed per
run, since estimating one needs data and is not what is measured here):

- peak resident memory at M = 40 vs M = 5, each in a fresh process: the kernel's high-water
  mark of resident pages (``VmHWM``, reset through ``/proc/self/clear_refs`` after the imports
  and ``theta_0``'s read), as P3 measures the uniform soup. Goal <= 1.15x: memory independent
  of M. Linux only.
- time at M = 40 vs the time to only read the bytes of the same M files once (page cache warm),
  in one process. Goal <= 3x (set when TIES read every file twice; it now reads each once).
- two floors, in the same terms, timed in the TIES child: loading each run as the merges do and
  reading each floating entry once (a sum per tensor), the least any method that reads every
  entry pays; and TIES's exact per-tensor selection of the k-th magnitudes alone
  (``MagnitudeTrim.prepare``, the task vectors made untimed), which TIES pays on top of it.

    python benchmarks/bench_merges.py [--quick] [--arch resnet50] [--models 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

FIGURES = {"P17": "cpu"}  # benchmarks/run.py: the figure printed here
MEMORY_GOAL, TIME_GOAL = 1.15, 3.0
METHODS = ("task_arithmetic", "ties", "dare", "model_stock", "fisher")

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
from safetensors.torch import load_file
from ratatouille.merging import merges
folder, models, method, task = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
paths = sorted(folder.glob("run*.safetensors"))[:models]
loaders = [lambda p=p: load_file(str(p)) for p in paths]
def status_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
def read_only():  # the bytes themselves, into one reused buffer (as P4)
    buffer = bytearray(max(p.stat().st_size for p in paths))
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            f.readinto(buffer)
def merge(base):
    if method == "task_arithmetic":
        return merges.task_arithmetic(base, loaders).task_arithmetic(0.1)
    if method == "ties":
        return merges.ties_merging(base, loaders, {0.2: merges.MagnitudeTrim(0.2)}).merge(0.2, 1.0)
    if method == "dare":
        return merges.dare(base, loaders, [0.5]).mean(1.0, 0.5)
    if method == "model_stock":
        return merges.model_stock(base, loaders).state_dict
    pairs = ((s, {k: v.abs() for k, v in s.items() if v.is_floating_point()})
             for s in (load() for load in loaders))
    return merges.fisher_average(pairs)
def floors(base):  # in the TIES child only: see the module's docstring
    if method != "ties":
        return {}
    t0 = time.perf_counter()
    for load in loaders:
        for tensor in load().values():
            if tensor.is_floating_point():
                tensor.sum()
    touch_s = time.perf_counter() - t0
    ancestor, trim, select_s = merges._Ancestor(base), merges.MagnitudeTrim(0.2), 0.0
    for index, load in enumerate(loaders):
        taus = list(ancestor.task_vectors(load(), index))
        t0 = time.perf_counter(); trim.prepare(index, taus); select_s += time.perf_counter() - t0
    return {"touch_s": touch_s, "select_s": select_s}
base = load_file(str(folder / "base.safetensors"))
if task == "memory":
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS now
    start = status_mib("VmRSS"); result = merge(base)
    print(json.dumps({"peak_mib": status_mib("VmHWM") - start}))
else:
    read_only()  # warm the page cache for both routes
    t0 = time.perf_counter(); read_only(); read_s = time.perf_counter() - t0
    t0 = time.perf_counter(); merge(base); merge_s = time.perf_counter() - t0
    print(json.dumps({"read_s": read_s, "merge_s": merge_s, **floors(base)}))
"""


def write_states(folder: Path, arch: str, models: int) -> float:
    """``theta_0`` and M random states of ``arch``'s featurizer; returns one file's MiB."""
    import timm
    import torch
    from safetensors.torch import save_file

    shapes = {
        k: (v.shape, v.dtype)
        for k, v in timm.create_model(arch, num_classes=0).state_dict().items()
    }
    for i, name in enumerate(["base", *(f"run{i:03d}" for i in range(models))]):
        g = torch.Generator().manual_seed(i)
        state = {
            k: torch.randn(s, generator=g).to(d) if d.is_floating_point else torch.zeros(s, dtype=d)
            for k, (s, d) in shapes.items()
        }
        save_file(state, str(folder / f"{name}.safetensors"))
    return (folder / "base.safetensors").stat().st_size / 2**20


def child(folder: Path, models: int, method: str, task: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(models), method, task],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{method} {task} M={models} failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--models", type=int, default=40, help="M (vs 5)")
    parser.add_argument("--quick", action="store_true", help="(the default sizes already are)")
    args = parser.parse_args()
    import torch

    small = 5
    parts, worst_memory, worst_time, floors = [], 0.0, 0.0, ""
    with tempfile.TemporaryDirectory(prefix="bench_merges_") as tmp:
        folder = Path(tmp)
        size = write_states(folder, args.arch, args.models)
        print(f"{args.models} x {args.arch} featurizer states + theta_0, {size:.0f} MiB each")
        for method in METHODS:
            big = child(folder, args.models, method, "memory")["peak_mib"]
            little = child(folder, small, method, "memory")["peak_mib"]
            times = child(folder, args.models, method, "time")
            memory, slowdown = big / little, times["merge_s"] / times["read_s"]
            if "touch_s" in times:
                touch, select = (times[k] / times["read_s"] for k in ("touch_s", "select_s"))
                floors = (
                    f"; floors: load and one read of every entry {touch:.1f}x, "
                    f"TIES's per-tensor selection alone {select:.1f}x"
                )
            worst_memory, worst_time = max(worst_memory, memory), max(worst_time, slowdown)
            parts.append(
                f"{method} {memory:.2f}x (+{big:.0f} vs +{little:.0f} MiB), "
                f"{slowdown:.1f}x ({times['merge_s']:.2f} s vs {times['read_s']:.2f} s)"
            )
            print(f"# {parts[-1]}", flush=True)
    verdict = "meets" if worst_memory <= MEMORY_GOAL and worst_time <= TIME_GOAL else "MISSES"
    print(
        f"P17 streamed merges, peak memory M={args.models} vs M={small} (worst "
        f"{worst_memory:.2f}x) and time vs only reading the M files once (worst "
        f"{worst_time:.1f}x): {'; '.join(parts)}{floors}; VmHWM, one {args.arch} file = "
        f"{size:.0f} MiB, "
        f"{torch.get_num_threads()} torch threads; goals <= {MEMORY_GOAL}x and "
        f"<= {TIME_GOAL:g}x: {verdict}"
    )


if __name__ == "__main__":
    main()
