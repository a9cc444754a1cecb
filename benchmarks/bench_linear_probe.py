"""Linear probe ``w_lp``: cached features vs the reference's frozen-featurizer loop, side by side.

Both routes fit the same head (same init, same Adam, same lr, same per-domain batches, same
number of steps) on the embedded benchmark's target task. The reference pushes every batch
through the frozen featurizer at every step; ``ratatouille.engine.probe.linear_probe`` extracts the
ID-train features once (evaluation transform) and trains on the cache. The reference loop is
given its best case: the featurizer's parameters do not require grad, so no backward runs
through it.

Without ``--weights`` the featurizer is random with BN statistics estimated on the pre-training
task's images (random frozen-BN features are degenerate), so that the accuracies mean something.
The speed-up grows with the steps: the cache costs one pass over the ID-train split, the
reference ``steps x domains x batch_size`` forward passes.

    python benchmarks/bench_linear_probe.py                       # CPU-sized defaults
    python benchmarks/bench_linear_probe.py --arch resnet50 --image-size 224 --steps 1000 \
        --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ratatouille.data import InfiniteLoader, eval_loader, get_dataset, target_splits
from ratatouille.engine.models import build_classifier, featurizer_state, freeze_bn, head_state
from ratatouille.engine.probe import eval_train_views, linear_probe
from ratatouille.engine.train import autocast_for, evaluate_accuracy, loader_seed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def calibrated_featurizer(arch: str, image_size: int) -> dict[str, torch.Tensor]:
    """Random weights, BN statistics averaged over the pre-training task T0's images."""
    model = build_classifier(arch, 10, seed=0, freeze_bn=False)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.momentum = None
            module.reset_running_stats()
    model.train()
    t0 = get_dataset("digits_t0", image_size=image_size, augment=False)
    for x, _ in eval_loader(t0.domain(0, train=False), batch_size=128):
        model.featurizer(x)
    return featurizer_state(freeze_bn(model))


def reference_loop(
    model, train, steps: int, lr: float, batch_size: int, seed: int, device: torch.device
) -> None:
    """The reference's probe: Adam on the head, every step through the frozen featurizer."""
    for param in model.featurizer.parameters():
        param.requires_grad_(False)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=lr)
    streams = [
        iter(InfiniteLoader(d, batch_size, loader_seed(seed, i, 0))) for i, d in enumerate(train)
    ]
    model.train()
    for _ in range(steps):
        xs, ys = zip(*(next(s) for s in streams))
        x, y = torch.cat(xs).to(device), torch.cat(ys).to(device)
        with autocast_for(device):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--weights", default=None, help=".safetensors file of the featurizer")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32, help="per training domain")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    dataset = get_dataset("digits", image_size=args.image_size)
    splits = target_splits(dataset, [0], split_seed=0)
    train = eval_train_views(dataset, splits)
    phi = args.weights or calibrated_featurizer(args.arch, args.image_size)
    model = build_classifier(args.arch, splits.num_classes, featurizer_weights=phi, seed=0)
    model.to(device)
    w_init = {k: v.detach().clone() for k, v in head_state(model).items()}
    print(
        f"{args.arch} at {args.image_size}px on {device}; {args.steps} steps, "
        f"{len(train)} domains x {args.batch_size}; ID-train sizes {[len(t) for t in train]}"
    )

    _sync(device)
    start = time.perf_counter()
    probe = linear_probe(
        model.featurizer,
        train,
        splits.id_val,
        splits.num_classes,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=0,
        device=str(device),
        head_init=w_init,
    )
    _sync(device)
    cached_s = time.perf_counter() - start

    start = time.perf_counter()  # both timings include the final ID-val evaluation
    reference_loop(model, train, args.steps, args.lr, args.batch_size, 0, device)
    reference_acc = evaluate_accuracy(model, splits.id_val, device=device)
    _sync(device)
    reference_s = time.perf_counter() - start

    print(f"cached features     : {cached_s:8.2f} s   ID-val acc {probe.id_val_acc:.4f}")
    print(f"frozen-featurizer   : {reference_s:8.2f} s   ID-val acc {reference_acc:.4f}")
    print(f"speed-up (reference / cached): {reference_s / cached_s:.1f}x")


if __name__ == "__main__":
    main()
