"""P16: peak memory of a reducer task at 10x the OOD images vs 1x: bounded, not per image.

The reducer keeps each run's *predicted labels* (2 bytes per image) and writes its float32
logits to local disk (``ratatouille.reducer.evaluate``); forward passes run over chunks of
``CHUNK_IMAGES`` images. Holding every run's logits instead costs runs x images x classes x 4
bytes: 20-36 GB in one task on DomainNet. This benchmark reduces one cell in full, as P14 does
(every strategy, the ablations and the curves, inside ``local_weights()``, each run read from
its Tune checkpoint's ``model.safetensors`` by ``orchestration.search.read_weights``), on an
OOD test split of N images and then of 10 N, each in a fresh process. Everything else is the
same: 13 seeded runs over the four arms of the reducer tests' sweep (tests/reduce_sweep.py),
its BN-MLP featurizer with a 345-class head (DomainNet's), the same ID-val split (2 domains of
1,024 images, so every selection decision, and so every forward pass, is the same on both
sides), the real ``predict_logits``. The weights are seeded perturbations, not trained: memory
does not depend on what a network learnt.

N defaults to ``CHUNK_IMAGES``: the 1x side already holds a full chunk of logits (the bounded
part), and the logits of its runs would already outweigh it 13 times over, so a reducer whose
memory grew with the data would be far above the goal. The line prints what every run's
logits on both splits would hold next to the measured increments.

Peak memory is the kernel's high-water mark of resident pages (``VmHWM``), reset through
``/proc/self/clear_refs`` after the imports and the setup (datasets in memory, weights files
written), minus the resident size at the reset, as P3 and P17 measure it. Linux only.
P16 = increment at 10 N / increment at N. Goal <= 1.5.

The children run glibc's malloc with one arena and its initial mmap and trim thresholds held
fixed (``MALLOC_ARENA_MAX=1``, ``MALLOC_MMAP_THRESHOLD_`` = ``MALLOC_TRIM_THRESHOLD_`` = 128 KiB),
so freed memory goes back to the kernel at once and ``VmHWM`` follows what the reducer holds.
With the defaults, glibc raises both thresholds to the largest buffer freed so far and a helper
thread gets an arena of its own: freed chunk buffers stay resident, by an amount that changes
from one run of the same size to the next and exceeds what is measured (seen on a 2-core VM:
+14 to +17 MiB at N = 4,096, +25 to +60 MiB at 10 N, +17 MiB at 20 N; with the settings above,
+17 to +20 MiB at N and +19 to +24 MiB at 10 N).

    python benchmarks/bench_reducer_memory.py [--quick] [--images N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FIGURES = {"P16": "cpu"}
GOAL = 1.5
SCALE = 10
CLASSES = 345  # DomainNet's: what makes per-image logits heavy
ID_VAL_IMAGES = 1024  # per training domain, two domains, the same on both sides
AUX = ("aux_a", "aux_b", "aux_c")  # the pool's featurizers
QUICK_IMAGES = 4096  # evaluate.CHUNK_IMAGES (asserted in the child)
# (arm, init source) of each run: the four arms of tests/reduce_sweep.py
PLAN = (
    [("soups", "pretrained")] * 3
    + [("ratatouille", s) for s in ("pretrained", "aux_a", "aux_b", "aux_c", "aux_a")]
    + [("fusing", "fusing")] * 2
    + [("robust_ratatouille", s) for s in ("pretrained", "aux_a", "aux_b")]
)
# one arena, glibc's initial thresholds held fixed: see the module docstring
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_TRIM_THRESHOLD_": "131072",
}
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build_model():
    import torch

    from ratatouille.engine.models import Classifier, freeze_bn
    from reduce_sweep import TinyFeaturizer

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return freeze_bn(Classifier(TinyFeaturizer(), CLASSES))


def _perturbed(state: dict, params: set[str], seed: int, scale: float) -> dict:
    """``state`` with seeded noise on its parameters; BN statistics kept (a variance must stay
    positive)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=gen) if k in params else v.clone()
        for k, v in state.items()
    }


def _sweep() -> dict:
    """phi_pt + w_lp, three pool featurizers and the runs' states: the same on both sides."""
    from ratatouille.engine.models import join_state
    from reduce_sweep import hand_average

    model = build_model()
    pt = model.state_dict()
    params = {k for k, _ in model.named_parameters()}
    w_lp = {k[len("head.") :]: v for k, v in pt.items() if k.startswith("head.")}
    phi = {k[len("featurizer.") :]: v for k, v in pt.items() if k.startswith("featurizer.")}
    phi_params = {k[len("featurizer.") :] for k in params if k.startswith("featurizer.")}
    pool = {n: _perturbed(phi, phi_params, s, 0.3) for s, n in enumerate(AUX, start=1)}
    inits = {n: {**pt, **join_state(f, w_lp)} for n, f in pool.items()}
    inits["pretrained"] = pt
    inits["fusing"] = {**pt, **join_state(hand_average(list(pool.values())), w_lp)}
    states = {}
    for k, (arm, source) in enumerate(PLAN):
        init = inits[source]
        if arm == "robust_ratatouille":
            init = hand_average([init, pt], [0.6, 0.4])
        states[f"{arm[:4]}{k:02d}"] = _perturbed(init, params, 100 + k, 0.05)
    return dict(pt=pt, w_lp=w_lp, pool=pool, states=states)


def _datasets(ood_images: int):
    """ID val (two domains) and OOD test (one), in memory before the reset: the task's data
    pipeline, not the reducer's own memory."""
    import torch
    from torch.utils.data import TensorDataset

    from reduce_sweep import DIM

    gen = torch.Generator().manual_seed(7)
    protos = torch.randn(CLASSES, DIM, generator=gen)

    def domain(shift: float, n: int) -> TensorDataset:
        y = torch.randint(0, CLASSES, (n,), generator=gen)
        return TensorDataset(protos[y] + shift + 1.6 * torch.randn(n, DIM, generator=gen), y)

    return [domain(s, ID_VAL_IMAGES) for s in (0.0, 0.3)], [domain(0.9, ood_images)]


def _inputs(folder: Path, ood_images: int):
    """The cell's ReduceInputs; each run's loader reads its weights file from its checkpoint."""
    import functools

    from ray import tune
    from safetensors.torch import save_file

    from ratatouille.core.names import WeightsFile
    from ratatouille.engine.train import evaluate_accuracy
    from ratatouille.orchestration.search import read_weights
    from ratatouille.reducer.reduce import ReduceInputs, ReduceSettings, TargetRun

    sweep = _sweep()
    id_val, ood_test = _datasets(ood_images)
    model, runs = build_model(), []
    for (arm, source), (run_id, state) in zip(PLAN, sweep["states"].items()):
        checkpoint = folder / run_id / "checkpoint_000001"
        checkpoint.mkdir(parents=True)
        save_file(state, str(checkpoint / WeightsFile.MODEL.filename))
        load = functools.partial(read_weights, tune.Checkpoint(str(checkpoint)), WeightsFile.MODEL)
        model.load_state_dict(state)
        # the run's logged score is what the reducer measures: no mismatch warning
        logged = evaluate_accuracy(model, id_val)
        runs.append(TargetRun(run_id, arm, source, logged, load, {}))
    return ReduceInputs(
        test_domain="d2",
        split_seed=0,
        runs=runs,
        build_model=build_model,
        id_val=id_val,
        ood_test=ood_test,
        init_state=sweep["pt"],
        w_lp=sweep["w_lp"],
        pool_featurizers={n: (lambda f=f: dict(f)) for n, f in sweep["pool"].items()},
        settings=ReduceSettings(ablation_draws=3, max_pairs=6),  # as P14 (tests' make_inputs)
    )


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def measure(folder: Path, ood_images: int) -> dict:
    """In a fresh process: the peak resident increment of reducing the cell, MiB."""
    import torch

    from ratatouille.orchestration.search import local_weights
    from ratatouille.reducer.evaluate import CHUNK_IMAGES
    from ratatouille.reducer.reduce import reduce_cell

    assert QUICK_IMAGES == CHUNK_IMAGES, "QUICK_IMAGES is meant to be one evaluation chunk"
    torch.set_num_threads(1)  # one thread pool's worth of buffers, the same on both sides
    inputs = _inputs(folder, ood_images)
    gc.collect()
    with local_weights():
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
        base = _status_mib("VmRSS")
        result = reduce_cell(inputs)
        peak = _status_mib("VmHWM") - base
    return {
        "peak_mib": peak,
        "base_mib": base,
        "strategies": len(result.table),
        "runs": len(inputs.runs),
        **result.evaluated,
    }


def child(folder: Path, ood_images: int) -> dict:
    # TMPDIR inside our TemporaryDirectory: the logits cache and weights copies go there,
    # removed with it even if the child dies
    env = {**os.environ, **MALLOC_ENV, "TMPDIR": str(folder), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(ood_images), str(folder)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child at {ood_images} OOD images failed: {done.stderr[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def p16(images: int) -> str:
    with tempfile.TemporaryDirectory(prefix="bench_reducer_memory_") as tmp:
        sides = {}
        for n in (images, SCALE * images):
            folder = Path(tmp) / f"ood{n}"
            folder.mkdir()
            sides[n] = child(folder, n)
    small, big = sides[images], sides[SCALE * images]
    if any(small[k] != big[k] for k in ("ood_test_passes", "id_val_passes", "strategies")):
        raise RuntimeError(f"the two sides did different work: {small} vs {big}")
    ratio = big["peak_mib"] / small["peak_mib"]
    id_images = 2 * ID_VAL_IMAGES

    def full_logits_mib(ood: int) -> float:  # the unbounded design's cache
        return small["runs"] * (id_images + ood) * CLASSES * 4 / 2**20

    verdict = "meets" if ratio <= GOAL else "MISSES"
    return (
        f"P16 reducer peak memory at {SCALE}x the OOD images vs 1x: {ratio:.2f}x "
        f"(+{big['peak_mib']:.0f} MiB at {SCALE * images:,} vs +{small['peak_mib']:.0f} MiB "
        f"at {images:,} OOD images above the resident size after setup, VmHWM, fresh process "
        f"each; ID val {id_images:,} images both; {small['runs']} runs, {CLASSES} classes, "
        f"one cell reduced in full: {small['strategies']} strategies, ablations and curves, "
        f"{small['ood_test_passes']} OOD and {small['id_val_passes']} ID-val passes each side; "
        f"every run's float32 logits on both splits would hold "
        f"{full_logits_mib(SCALE * images):,.0f} MiB vs {full_logits_mib(images):,.0f} MiB; "
        f"glibc malloc: one arena, fixed thresholds; goal <= {GOAL}x: {verdict})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"N = {QUICK_IMAGES:,}")
    parser.add_argument("--images", type=int, help="N, the 1x side's OOD images")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child[1]), int(args.child[0]))), flush=True)
        return
    images = args.images or (QUICK_IMAGES if args.quick else 2 * QUICK_IMAGES)
    print(p16(images), flush=True)


if __name__ == "__main__":
    main()
