"""What the linear-probe tests share: a stand-in phi_pt, and the reference's probe route."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ratatouille.data import InfiniteLoader, eval_loader, get_dataset
from ratatouille.engine.models import build_classifier, featurizer_state, freeze_bn
from ratatouille.engine.train import autocast_for, loader_seed


def calibrated_phi_pt(arch: str) -> dict[str, torch.Tensor]:
    """A stand-in for a pre-trained featurizer: random weights, but BN statistics estimated on
    the pre-training task's images (random frozen-BN features are degenerate otherwise)."""
    model = build_classifier(arch, 10, seed=0, freeze_bn=False)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.momentum = None  # cumulative average over the calibration batches
            module.reset_running_stats()
    model.train()
    t0 = get_dataset("digits_t0", augment=False)
    with torch.no_grad():
        for x, _ in eval_loader(t0.domain(0, train=False), batch_size=128):
            model.featurizer(x)
    return featurizer_state(freeze_bn(model))


def frozen_featurizer_loop(model, train, steps, lr, batch_size, seed, device=torch.device("cpu")):
    """The reference's route: the head trained by Adam through the frozen featurizer, every step
    (each domain's batches drawn as its split asks, from the stream fine_tune opens at step 0).
    The cached probe is tested against it here and timed against it in
    benchmarks/bench_linear_probe.py (P1)."""
    for p in model.featurizer.parameters():
        p.requires_grad_(False)
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
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model
