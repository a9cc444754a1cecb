"""Linear probe ``w_lp``: cached features vs the reference's frozen-featurizer loop, side by side.

Both routes fit the same head (same init, same Adam, same lr, same per-domain batches, same
number of steps) on the embedded benchmark's target task. The reference pushes every batch
through the frozen featurizer at every step; ``ratatouille.engine.probe.linear_probe`` extracts the
ID-train features once (evaluation transform) and trains on the cache. The reference loop is
given its best case: the featurizer's parameters do not require grad, so no backward runs
through it.

Without ``--weights`` the featurizer is trained for 30 steps on the pre-training task T0 (a
random one leaves the probe at chance), so that the accuracies mean something.
The speed-up grows with the steps: the cache costs one pass over the ID-train split, the
reference ``steps x domains x batch_size`` forward passes. Each route runs at two step counts;
the line through them gives its fixed and per-step cost, and the P1 ratio at the paper's 5,001
steps comes from those fitted costs (measured, not assumed); the head accuracies at the larger
count are printed side by side.

    python benchmarks/bench_linear_probe.py                       # CPU-sized defaults
    python benchmarks/bench_linear_probe.py --arch resnet50 --image-size 224 --steps 200 1000 \
        --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ratatouille.data import InfiniteLoader, get_dataset, target_splits
from ratatouille.engine.models import build_classifier, featurizer_state, freeze_bn, head_state
from ratatouille.engine.probe import eval_train_views, linear_probe
from ratatouille.engine.train import evaluate_accuracy

# The reference route the tests check the cached probe against is the one timed here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from probe_routes import frozen_featurizer_loop

FIGURES = {"P1": "cpu"}  # benchmarks/run.py: the figures this script prints


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pretrained_featurizer(arch: str, image_size: int, steps: int = 30) -> dict[str, torch.Tensor]:
    """A few Adam steps on the pre-training task T0 (digit mod 5): features a head can read.

    Random featurizers, even with BN statistics calibrated on T0, leave the digits probe at
    chance, where equal accuracies would prove nothing."""
    torch.manual_seed(0)
    model = build_classifier(arch, 5, seed=0, freeze_bn=False).train()
    t0 = get_dataset("digits_t0", image_size=image_size, augment=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stream = iter(InfiniteLoader(t0.domain(0, train=True), 64, 0))
    for _ in range(steps):
        x, y = next(stream)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return featurizer_state(freeze_bn(model))


def fit_costs(steps: tuple[int, int], seconds: tuple[float, float]) -> tuple[float, float]:
    """(fixed, per-step) seconds of the line through the two measurements."""
    per_step = (seconds[1] - seconds[0]) / (steps[1] - steps[0])
    return seconds[0] - per_step * steps[0], per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs=2, default=(100, 400), help="two step counts")
    parser.add_argument("--weights", default=None, help=".safetensors file of the featurizer")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32, help="per training domain")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="steps 25 and 100")
    args = parser.parse_args()
    steps = (25, 100) if args.quick else tuple(args.steps)
    # The cached route's per-step cost is a few ms: fitted over 100 vs 25 steps it drowns in
    # the noise of the fixed cost, so its second count is 10x the larger one (seconds).
    route_steps = {"cached": (steps[1], 10 * steps[1]), "reference": steps}
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    dataset = get_dataset("digits", image_size=args.image_size)
    splits = target_splits(dataset, [0], split_seed=0)
    train = eval_train_views(dataset, splits)
    phi = args.weights or pretrained_featurizer(args.arch, args.image_size)
    model = build_classifier(args.arch, splits.num_classes, featurizer_weights=phi, seed=0)
    model.to(device)
    w_init = {k: v.detach().clone() for k, v in head_state(model).items()}
    print(
        f"{args.arch} at {args.image_size}px on {device}; steps {steps}, "
        f"{len(train)} domains x {args.batch_size}; ID-train sizes {[len(t) for t in train]}"
    )

    def cached(n: int) -> tuple[float, float]:
        _sync(device)
        start = time.perf_counter()
        probe = linear_probe(
            model.featurizer,
            train,
            splits.id_val,
            splits.num_classes,
            steps=n,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=0,
            device=str(device),
            head_init=w_init,
        )
        _sync(device)
        return time.perf_counter() - start, probe.id_val_acc

    def reference(n: int) -> tuple[float, float]:
        model.head.load_state_dict(w_init)
        start = time.perf_counter()  # both timings include the final ID-val evaluation
        frozen_featurizer_loop(model, train, n, args.lr, args.batch_size, 0, device)
        acc = evaluate_accuracy(model, splits.id_val, device=device)
        _sync(device)
        return time.perf_counter() - start, acc

    runs = {
        "cached": [cached(n) for n in route_steps["cached"]],
        "reference": [reference(n) for n in route_steps["reference"]],
    }
    costs = {}
    for route, results in runs.items():
        costs[route] = fit_costs(route_steps[route], (results[0][0], results[1][0]))
        for n, (seconds, acc) in zip(route_steps[route], results):
            print(f"{route:<10} {n:>5} steps: {seconds:8.2f} s   ID-val acc {acc:.4f}")
        print(f"{route:<10} fixed {costs[route][0]:.3f} s + {costs[route][1] * 1e3:.2f} ms/step")
    paper = 5001
    at_paper = {route: fixed + per_step * paper for route, (fixed, per_step) in costs.items()}
    gap = abs(runs["cached"][0][1] - runs["reference"][1][1]) * 100  # both at steps[1]
    print(
        f"P1 linear probe, frozen-featurizer loop / cached features at {paper:,} steps: "
        f"{at_paper['reference'] / at_paper['cached']:.1f}x (fitted costs: reference "
        f"{costs['reference'][0]:.2f} s + {costs['reference'][1] * 1e3:.1f} ms/step from "
        f"{steps[0]} and {steps[1]} steps, cached {costs['cached'][0]:.2f} s + "
        f"{costs['cached'][1] * 1e3:.2f} ms/step from {steps[1]} and {10 * steps[1]}; "
        f"{args.arch} {args.image_size}px on {device.type}; ID-val acc at {steps[1]} steps "
        f"{runs['cached'][0][1]:.3f} vs {runs['reference'][1][1]:.3f}, "
        f"chance {1 / splits.num_classes:.2f}, gap "
        f"{gap:.1f} points: {'within' if gap <= 1.0 else 'NOT within'} 1)"
    )


if __name__ == "__main__":
    main()
