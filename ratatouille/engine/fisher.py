"""The diagonal Fisher of a classifier on a bounded sample of its ID-train data.

For Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022; the weighting itself is pure math
in :func:`ratatouille.merging.merges.fisher_average`). Their Fisher is
``F = E_x E_{y ~ p(y|x)} [(d log p(y|x) / d theta)^2]``, the per-example squared gradient, not
the square of a batch gradient. Here ``E_x`` is the mean over the first ``n_batches`` batches
of each training domain's ID-train split (in the split's seeded order), and ``E_y`` is one label
per example sampled from the model's own prediction with a seeded generator: an unbiased
one-sample estimate of their expectation over labels, at the cost of one gradient per example
instead of one per class. The model is in eval mode (frozen BN, no dropout) and the gradients
are per example (``torch.func``: ``vmap`` of ``grad``, in chunks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset

from ratatouille.data.pipeline import eval_batches

#: Per-example gradients computed at once: bounds the memory to this many copies of the
#: parameters (a ResNet-50: 16 x 100 MB).
CHUNK = 16


def _log_likelihood(model: nn.Module, buffers: dict[str, Tensor]):
    def log_p(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, (params, buffers), (x.unsqueeze(0),))
        log_probs = torch.log_softmax(logits.float(), dim=-1)[0]
        return log_probs.gather(0, y.unsqueeze(0)).squeeze(0)

    return log_p


def diagonal_fisher(
    model: nn.Module,
    state: Mapping[str, Tensor],
    datasets: Sequence[Dataset],
    *,
    n_batches: int,
    batch_size: int = 64,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Tensor]:
    """Diagonal Fisher of ``model`` with weights ``state``, one CPU tensor per parameter.

    Reads at most ``n_batches`` batches of ``batch_size`` from each of ``datasets`` (the
    training domains' ID-train splits). ``model`` is reused (its weights are replaced)."""
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    model.load_state_dict(dict(state), strict=True)
    model.to(device).eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    per_example = vmap(
        grad(_log_likelihood(model, buffers)), in_dims=(None, 0, 0), chunk_size=CHUNK
    )
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    seen = 0
    for dataset in datasets:
        batches = eval_batches(dataset, batch_size, device=device)
        for _, (x, _labels) in zip(range(n_batches), batches):
            with torch.no_grad():
                probs = torch.softmax(model(x).float(), dim=-1).cpu()
            y = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(x.device)
            for key, g in per_example(params, x, y).items():
                fisher[key].add_(g.pow(2).sum(0))
            seen += len(x)
    if seen == 0:
        raise ValueError("the ID-train datasets are empty; the Fisher needs examples")
    return {k: (f / seen).cpu() for k, f in fisher.items()}
