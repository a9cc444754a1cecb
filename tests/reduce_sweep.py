"""A tiny real sweep for the reducer tests, and plain-torch references to check it against.

3 classes, two training domains (ID val) and one shifted OOD domain of small vectors; a
BN-MLP featurizer inside the project's ``Classifier``; ``phi_pt`` at random, three auxiliary
featurizers fine-tuned on other label maps, a linear probe ``w_lp``, then 13 short target
fine-tunings in the four arms. The ``hand_*`` references use plain forward passes (no
``predict_logits``) and plain loops over state dicts (no ``ratatouille.merging.soups``).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ratatouille.engine.models import Classifier, freeze_bn, join_state
from ratatouille.engine.train import predict_logits
from ratatouille.reducer.reduce import ReduceInputs, ReduceSettings, TargetRun

DIM, CLASSES, WIDTH = 24, 3, 8
State = dict[str, torch.Tensor]


class TinyFeaturizer(nn.Sequential):
    num_features = WIDTH

    def __init__(self) -> None:
        super().__init__(nn.Linear(DIM, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU())


def build_model() -> Classifier:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return freeze_bn(Classifier(TinyFeaturizer(), CLASSES))


def _domain(gen: torch.Generator, protos: torch.Tensor, shift: float, n: int, noise: float):
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return protos[y] + shift + noise * torch.randn(n, DIM, generator=gen), y


def _data():
    gen = torch.Generator().manual_seed(1)
    protos = torch.randn(CLASSES, DIM, generator=gen)
    train = [_domain(gen, protos, s, 90, 1.6) for s in (0.0, 0.3)]
    val = [_domain(gen, protos, s, 70, 1.6) for s in (0.0, 0.3)]
    ood = _domain(gen, protos * 0.8, 0.9, 240, 1.9)
    aux_protos = [torch.randn(CLASSES, DIM, generator=gen) for _ in range(3)]
    return train, val, ood, aux_protos


def _train(state: State, data, steps: int, lr: float, seed: int, head_only: bool = False) -> State:
    model = build_model()
    model.load_state_dict(state)
    opt = torch.optim.Adam(model.head.parameters() if head_only else model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        picks = [(x, y, torch.randint(0, len(y), (24,), generator=gen)) for x, y in data]
        x = torch.cat([x[i] for x, _, i in picks])
        y = torch.cat([y[i] for _, y, i in picks])
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def hand_logits(state: State, x: torch.Tensor) -> torch.Tensor:
    model = build_model()
    model.load_state_dict(state)
    model.eval()
    return model(x)


def hand_acc(state: State, domains) -> float:
    """Mean over domains of the accuracy, from a plain forward pass."""
    return float(
        np.mean([(hand_logits(state, x).argmax(1) == y).double().mean().item() for x, y in domains])
    )


def hand_average(states: list[State], weights: list[float] | None = None) -> State:
    weights = weights or [1.0 / len(states)] * len(states)
    out = {}
    for key in states[0]:
        if states[0][key].is_floating_point():
            out[key] = sum(w * s[key].double() for w, s in zip(weights, states)).float()
        else:
            out[key] = states[0][key].clone()
    return out


def _strip(state: State, prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def build_sweep() -> dict[str, Any]:
    train, val, ood, aux_protos = _data()
    pt = build_model().state_dict()
    pt_lp = _train(pt, train, 60, 0.05, 0, head_only=True)
    w_lp = _strip(pt_lp, "head.")
    pool = {}
    for name, protos, seed in zip(("aux_a", "aux_b", "aux_c"), aux_protos, (11, 12, 13)):
        gen = torch.Generator().manual_seed(seed)
        aux_data = [
            (protos[y] + 0.5 * torch.randn(len(y), DIM, generator=gen), y) for _, y in train
        ]
        pool[name] = _strip(_train(pt, aux_data, 25, 0.03, seed), "featurizer.")
    inits = {n: {**pt_lp, **join_state(f, w_lp)} for n, f in pool.items()}
    inits["pretrained"] = pt_lp
    fused = {**pt_lp, **join_state(hand_average(list(pool.values()), [0.5, 0.3, 0.2]), w_lp)}
    robust = {n: hand_average([inits[n], pt_lp], [0.6, 0.4]) for n in ("aux_a", "aux_b")}
    plan = (
        [("soups", "pretrained", pt_lp)] * 3
        + [("ratatouille", s, inits[s]) for s in ("pretrained", "aux_a", "aux_b", "aux_c", "aux_a")]
        + [("fusing", "fusing", fused)] * 2
        + [
            ("robust_ratatouille", "pretrained", pt_lp),
            ("robust_ratatouille", "aux_a", robust["aux_a"]),
            ("robust_ratatouille", "aux_b", robust["aux_b"]),
        ]
    )
    states, meta = {}, []
    for k, (arm, source, init) in enumerate(plan):
        run_id = f"{arm[:4]}{k:02d}"
        states[run_id] = _train(init, train, 12 + 3 * (k % 4), (0.004, 0.01, 0.02)[k % 3], 100 + k)
        meta.append((run_id, arm, source))
    return dict(
        train=train, val=val, ood=ood, pt_lp=pt_lp, w_lp=w_lp, pool=pool, states=states, meta=meta
    )


def runs_of(sweep: dict[str, Any], arm: str) -> list[tuple[str, State, str]]:
    """(run_id, state, init_source) of an arm's runs, in sweep order."""
    return [
        (run_id, sweep["states"][run_id], source) for run_id, a, source in sweep["meta"] if a == arm
    ]


class SpyDataset(Dataset):
    """Appends its split's name to ``log`` for every item read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, split: str, log: list) -> None:
        self.inner, self.split, self.log = TensorDataset(x, y), split, log

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        self.log.append(self.split)
        return self.inner[index]


class LoadedState(dict):
    """A run's state as handed to the reducer; weak-referenceable, to count how many live."""


def _loader(run_id: str, state: State, loads: dict[str, int], alive: list[int]) -> Callable:
    def freed() -> None:
        alive[0] -= 1

    def load() -> LoadedState:
        loads[run_id] = loads.get(run_id, 0) + 1
        loaded = LoadedState({k: v.clone() for k, v in state.items()})
        alive[0] += 1
        weakref.finalize(loaded, freed)
        loads["peak_alive"] = max(loads.get("peak_alive", 0), alive[0])
        return loaded

    return load


def make_inputs(
    sweep: dict[str, Any],
    *,
    ood_labels: torch.Tensor | None = None,
    log: list | None = None,
    loads: dict | None = None,
    settings: ReduceSettings | None = None,
    predict=None,
) -> ReduceInputs:
    """ReduceInputs over the sweep; ``log`` records split reads, ``loads`` counts state loads
    per run (and ``loads["peak_alive"]``, the most run states alive at once)."""
    log = [] if log is None else log
    loads = {} if loads is None else loads
    alive = [0]
    runs = [
        TargetRun(
            run_id,
            arm,
            source,
            hand_acc(sweep["states"][run_id], sweep["val"]),
            _loader(run_id, sweep["states"][run_id], loads, alive),
            {},
        )
        for run_id, arm, source in sweep["meta"]
    ]
    ood_x, ood_y = sweep["ood"]
    return ReduceInputs(
        test_domain="d2",
        split_seed=0,
        runs=runs,
        build_model=build_model,
        id_val=[SpyDataset(x, y, "id_val", log) for x, y in sweep["val"]],
        ood_test=[SpyDataset(ood_x, ood_y if ood_labels is None else ood_labels, "ood_test", log)],
        init_state=sweep["pt_lp"],
        w_lp=sweep["w_lp"],
        pool_featurizers={n: (lambda f=f: dict(f)) for n, f in sweep["pool"].items()},
        settings=settings or ReduceSettings(ablation_draws=3, max_pairs=6),
        predict=predict or predict_logits,
    )


def fingerprint(state: State) -> str:
    """Hash of a state's tensors: identifies which weights a forward pass used."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
