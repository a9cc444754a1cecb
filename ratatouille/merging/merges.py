"""Merge methods on task vectors: task arithmetic, TIES, DARE, Model Stock, Fisher averaging.

Pure torch: no Ray, no MLflow, no data. Every method starts from a shared ancestor
``theta_0`` (here ``(phi_pt, w_lp)``) and the fine-tuned ``theta_i``; the *task vector* of run
``i`` is ``tau_i = theta_i - theta_0``, tensor by tensor. The runs come as **loaders**
(callables returning a state dict, e.g. a checkpoint read from disk) and are streamed: a method
holds ``theta_0``, its accumulators and the run being read, never the M runs, so its peak
memory does not grow with M (bench P17). Each loader is called once, twice for TIES (one
pass for the sign election, one for the agreeing mean).

Rules shared with :mod:`ratatouille.merging.soups`: floating tensors are combined in float32
(or wider) and cast back to their dtype at the end; non-floating tensors (``num_batches_tracked``)
come from the first run; every run must match ``theta_0``'s keys, shapes and dtypes (one
:class:`StateDictMismatchError` naming the tensor otherwise).

Methods, with what each computes per floating tensor:

- task arithmetic (Ilharco et al., ICLR 2023): ``theta_0 + lambda * sum_i tau_i``
  (``lambda = 1/M`` is the uniform soup);
- TIES (Yadav et al., NeurIPS 2023): trim each ``tau_i`` to its largest ``density`` fraction
  of magnitudes, elect a sign per entry from the sum of the trimmed vectors, average the
  entries that agree with it, ``theta_0 + lambda * that mean``;
- DARE (Yu et al., ICML 2024): drop each entry of ``tau_i`` with probability ``p`` (seeded),
  rescale the rest by ``1 / (1 - p)``; then average (``theta_0 + lambda * mean``) or TIES;
- Model Stock (Jang et al., ECCV 2024): ``theta_0 + t * mean_i tau_i`` with
  ``t = k cos / (1 + (k - 1) cos)``, ``cos`` the mean pairwise cosine of the task vectors;
- Fisher averaging (Matena & Raffel, NeurIPS 2022): ``sum_i F_i theta_i / sum_i F_i`` with the
  runs' diagonal Fishers ``F_i`` (estimated elsewhere: they need the model and data).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ratatouille.merging.soups import (
    StateDict,
    StateDictMismatchError,
    _accumulator_dtype,
    _check_compatible,
    _check_tensors,
)

Loader = Callable[[], StateDict]


class _Ancestor:
    """``theta_0`` in accumulator precision, the dtypes to cast back to, and the non-floating
    tensors of the first run."""

    def __init__(self, base: StateDict) -> None:
        if not base:
            raise StateDictMismatchError("theta_0 is empty; pass the shared ancestor's state dict")
        _check_tensors(base, "theta_0")
        self.meta = {k: torch.empty_like(t, device="meta") for k, t in base.items()}
        self.floats = {
            k: t.detach().to(_accumulator_dtype(t))
            for k, t in base.items()
            if t.is_floating_point()
        }
        self.fixed: dict[str, Tensor] = {}
        # one buffer per tensor, reused by every run: a fresh tau per tensor and run would be
        # a new allocation, i.e. page faults and zeroing for each of the M models (bench P17)
        self._scratch: dict[str, Tensor] = {}

    def check(self, state: StateDict, index: int) -> None:
        """Refuse a run unlike ``theta_0``; keep the first run's non-floating tensors."""
        _check_compatible(self.meta, state, f"run {index}")
        if index == 0:
            self.fixed = {k: t.detach().clone() for k, t in state.items() if k not in self.floats}

    @torch.no_grad()
    def task_vectors(self, state: StateDict, index: int) -> Iterator[tuple[str, Tensor]]:
        """``(key, tau_i)`` of each floating tensor (after :meth:`check`). Each ``tau_i`` is
        written into the tensor's reused buffer: it is valid until the next run's, so a caller
        that keeps it copies it."""
        self.check(state, index)
        for key, base in self.floats.items():
            if key not in self._scratch:
                self._scratch[key] = torch.empty_like(base)
            yield key, torch.sub(state[key].detach(), base, out=self._scratch[key])

    @torch.no_grad()
    def plus(self, deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``theta_0 + delta`` per floating tensor, cast back; non-floating tensors copied."""
        out: dict[str, Tensor] = {}
        for key, ref in self.meta.items():
            if key in self.floats:
                out[key] = (self.floats[key] + deltas[key]).to(ref.dtype)
            else:
                out[key] = self.fixed[key].clone()
        return out


def _check_loaders(loaders: Sequence[Loader]) -> None:
    if not loaders:
        raise ValueError("a merge needs at least one run; pass one loader per run")


# -- sparsifiers: how a task vector is thinned before it is merged ----------------------------


@dataclass
class MagnitudeTrim:
    """TIES's trim: keep the ``k = ceil(density * n)`` largest magnitudes of each tensor's
    ``tau``; entries tied with the k-th largest magnitude are all kept (so ties may keep more
    than k), as the reference code's ``|tau| >= kth value``. Per tensor, as mergekit (the
    reference thresholds the whole flattened model). The thresholds of the first pass are
    remembered, so the second pass trims identically without selecting again."""

    density: float
    thresholds: dict[tuple[int, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"a TIES density is a fraction in (0, 1], got {self.density!r}")

    def __call__(self, index: int, key: str, tau: Tensor) -> Tensor:
        if self.density >= 1.0 or tau.numel() == 0:
            return tau
        # |tau| >= kth as hardshrink's |tau| > (the float just below kth): one fused kernel,
        # several times faster than where(abs >= kth) on the CPU
        return F.hardshrink(tau, self.below_threshold(index, key, tau))

    def below_threshold(self, index: int, key: str, tau: Tensor) -> float:
        """The float of ``tau``'s dtype just below its k-th largest magnitude (selected on the
        first call for ``(index, key)``): ``|x| > it`` is ``|x| >= kth`` in that dtype."""
        if (index, key) not in self.thresholds:
            self.thresholds[(index, key)] = kth_largest_magnitude(tau, self.density)
        kth = np.array(self.thresholds[(index, key)], _numpy_dtype(tau))
        return float(np.nextafter(kth, kth.dtype.type(0)))


def _numpy_dtype(tensor: Tensor) -> np.dtype:
    return torch.empty(0, dtype=tensor.dtype).numpy().dtype


def kth_largest_magnitude(tau: Tensor, density: float) -> float:
    """The ``k = ceil(density * n)``-th largest ``|tau|``, by numpy's introselect (a partial
    partition; several times faster on the CPU than torch's top-k or kthvalue)."""
    magnitudes = tau.detach().abs().reshape(-1).cpu().numpy()
    at = magnitudes.size - math.ceil(density * magnitudes.size)
    magnitudes.partition(at)
    return float(magnitudes[at])


def _seed_of(seed: int, index: int, key: str) -> int:
    digest = hashlib.sha256(f"dare/{seed}/{index}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class RandomDrop:
    """DARE: drop each entry of ``tau`` with probability ``p``, rescale the kept ones by
    ``1 / (1 - p)`` (so the expectation is ``tau``). The draw of run ``index``'s tensor ``key``
    is a pure function of ``(seed, index, key)``: a second pass draws the same mask, and masks
    for two ``p`` are nested (one uniform draw per entry, dropped where it is below ``p``)."""

    p: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"a DARE drop rate is in [0, 1), got {self.p!r}")

    def __call__(self, index: int, key: str, tau: Tensor) -> Tensor:
        if self.p == 0.0:
            return tau
        generator = torch.Generator().manual_seed(_seed_of(self.seed, index, key))
        draw = torch.rand(tau.shape, generator=generator).to(tau.device)
        # in place on the mask: 1 where kept, times tau / (1 - p), as where(kept, ...) would be
        return draw.ge_(self.p).to(tau.dtype).mul_(tau).div_(1.0 - self.p)


Sparsifier = Callable[[int, str, Tensor], Tensor]


def _identity(index: int, key: str, tau: Tensor) -> Tensor:
    return tau


# -- task arithmetic and DARE-average: one pass of summed task vectors ------------------------


@dataclass
class TaskVectorSums:
    """``sum_i sparsify(tau_i)`` per sparsifier, from one read of each run."""

    ancestor: _Ancestor
    sums: dict[Hashable, dict[str, Tensor]]
    n_models: int

    def task_arithmetic(self, lam: float, name: Hashable = None) -> dict[str, Tensor]:
        """``theta_0 + lam * sum_i tau_i`` (Ilharco et al.)."""
        return self.ancestor.plus({k: lam * s for k, s in self.sums[name].items()})

    def mean(self, lam: float, name: Hashable = None) -> dict[str, Tensor]:
        """``theta_0 + lam * mean_i tau_i``: with DARE sparsifiers, DARE then averaging."""
        return self.task_arithmetic(lam / self.n_models, name)


@torch.no_grad()
def task_vector_sums(
    base: StateDict,
    loaders: Sequence[Loader],
    sparsifiers: Mapping[Hashable, Sparsifier] | None = None,
) -> TaskVectorSums:
    """One pass over the runs: for each sparsifier (default: none, key ``None``) the sum of the
    sparsified task vectors. Memory: ``theta_0``, one sum per sparsifier and the current run."""
    _check_loaders(loaders)
    chosen: Mapping[Hashable, Sparsifier] = sparsifiers or {None: _identity}
    ancestor = _Ancestor(base)
    sums: dict[Hashable, dict[str, Tensor]] = {
        name: {k: torch.zeros_like(t) for k, t in ancestor.floats.items()} for name in chosen
    }
    if sparsifiers is None:  # sum_i tau_i = sum_i theta_i - M theta_0: no task vector to build
        plain = sums[None]
        for index, load in enumerate(loaders):
            state = load()
            ancestor.check(state, index)
            for key, total in plain.items():
                total.add_(state[key].detach())
            del state
        for key, total in plain.items():
            total.sub_(ancestor.floats[key], alpha=len(loaders))
        return TaskVectorSums(ancestor, sums, len(loaders))
    for index, load in enumerate(loaders):
        for key, tau in ancestor.task_vectors(load(), index):
            for name, sparsify in chosen.items():
                sums[name][key].add_(sparsify(index, key, tau))
    return TaskVectorSums(ancestor, sums, len(loaders))


def task_arithmetic(base: StateDict, loaders: Sequence[Loader]) -> TaskVectorSums:
    """Task arithmetic (Ilharco et al., 2023): ``.task_arithmetic(lam)`` for any ``lam``."""
    return task_vector_sums(base, loaders)


def dare(
    base: StateDict, loaders: Sequence[Loader], rates: Sequence[float], seed: int = 0
) -> TaskVectorSums:
    """DARE then averaging (Yu et al., 2024): ``.mean(lam, p)`` for each ``p`` of ``rates``."""
    return task_vector_sums(base, loaders, {p: RandomDrop(p, seed) for p in rates})


# -- TIES: two passes ------------------------------------------------------------------------


def elect_signs(total: Tensor) -> Tensor:
    """TIES's sign election from ``sum_i trimmed tau_i`` (the sign of the larger summed
    magnitude); an entry whose sum is exactly 0 takes the tensor's majority sign (the sign of
    the sum of the elected signs), as the reference's ``resolve_zero_signs``; 0 if that is 0
    too (then no run agrees there and the merged entry is 0). int8."""
    signs = torch.sign(total).to(torch.int8)
    majority = torch.sign(signs.sum()).to(torch.int8)
    return torch.where(signs == 0, majority, signs)


def _agreeing_magnitudes(
    sparsify: Sparsifier, index: int, key: str, tau: Tensor, signs: Tensor
) -> Tensor:
    """``|kept|`` where the sparsified ``tau`` agrees with the elected sign, else 0: ``kept *
    sign`` is ``|kept|`` where they agree, < 0 where they disagree, 0 where an entry was
    trimmed or dropped, so clipping it at 0 leaves the agreeing magnitudes. For a magnitude
    trim, clipping ``tau * sign`` below the trim's threshold trims and clips at once."""
    if isinstance(sparsify, MagnitudeTrim) and sparsify.density < 1.0 and tau.numel():
        below = sparsify.below_threshold(index, key, tau)
        return F.threshold(
            tau.mul(signs), below, 0.0, inplace=True
        )  # tau * sign > below: |tau| >= kth
    kept = sparsify(index, key, tau)
    # a RandomDrop's output is its own; any other may be tau (the run's buffer) or a view of it
    signed = kept.mul_(signs) if isinstance(sparsify, RandomDrop) else kept * signs
    return F.threshold(signed, 0.0, 0.0, inplace=True)


@dataclass
class TiesMerge:
    """Per sparsifier: the mean over runs of the entries agreeing with the elected sign."""

    ancestor: _Ancestor
    means: dict[Hashable, dict[str, Tensor]]
    n_models: int

    def merge(self, name: Hashable, lam: float) -> dict[str, Tensor]:
        """``theta_0 + lam * disjoint mean`` (TIES step 3, scaled)."""
        return self.ancestor.plus({k: lam * m for k, m in self.means[name].items()})


@torch.no_grad()
def ties_merging(
    base: StateDict, loaders: Sequence[Loader], sparsifiers: Mapping[Hashable, Sparsifier]
) -> TiesMerge:
    """TIES-merging (Yadav et al., 2023), streamed in two passes over the runs.

    Pass 1: ``S = sum_i sparsify(tau_i)`` per sparsifier (``MagnitudeTrim(density)`` is TIES;
    ``RandomDrop(p)`` is DARE-TIES), then the elected sign per entry (:func:`elect_signs`).
    Pass 2: for each run the sparsified entries whose sign equals the elected one are summed
    and counted; the merged vector is that sum over that count (0 where no run agrees).
    Each loader is called exactly twice. Memory: ``theta_0``, one buffer per tensor, the
    current run and, per sparsifier, one float sum (pass 1) or an int8 sign, a float sum of
    the agreeing magnitudes and a float count (exact below 2**24 runs)."""
    _check_loaders(loaders)
    if not sparsifiers:
        raise ValueError("ties_merging needs at least one sparsifier (e.g. MagnitudeTrim(0.2))")
    ancestor = _Ancestor(base)
    zeros = {k: torch.zeros_like(t) for k, t in ancestor.floats.items()}
    sums = {name: {k: z.clone() for k, z in zeros.items()} for name in sparsifiers}
    for index, load in enumerate(loaders):
        for key, tau in ancestor.task_vectors(load(), index):
            for name, sparsify in sparsifiers.items():
                sums[name][key].add_(sparsify(index, key, tau))
    signs = {name: {k: elect_signs(s) for k, s in by_key.items()} for name, by_key in sums.items()}
    del sums  # freed before the agreeing sums are allocated: one float per entry, not two
    magnitudes = {name: {k: z.clone() for k, z in zeros.items()} for name in sparsifiers}
    counts = {name: {k: z.clone() for k, z in zeros.items()} for name in sparsifiers}
    for index, load in enumerate(loaders):
        for key, tau in ancestor.task_vectors(load(), index):
            for name, sparsify in sparsifiers.items():
                agreeing = _agreeing_magnitudes(sparsify, index, key, tau, signs[name][key])
                magnitudes[name][key].add_(agreeing)
                counts[name][key].add_(agreeing.sign())
    means = {  # the agreeing entries' mean: their summed magnitude, signed, over their count
        name: {
            k: m.mul_(signs[name][k]).div_(counts[name][k].clamp_(min=1)) for k, m in by_key.items()
        }
        for name, by_key in magnitudes.items()
    }
    return TiesMerge(ancestor, means, len(loaders))


# -- Model Stock -----------------------------------------------------------------------------


def model_stock_ratio(k: int, cos: float) -> float:
    """Jang et al.'s interpolation ratio ``t = k cos / (1 + (k - 1) cos)`` for ``k`` runs whose
    task vectors meet at angle ``arccos(cos)``. ``cos`` is clamped to [0, 1]: the derivation
    assumes an acute angle, and at ``cos = 0`` the ratio is 0 (``theta_0``)."""
    if k < 1:
        raise ValueError(f"Model Stock needs k >= 1 runs, got {k}")
    c = min(max(float(cos), 0.0), 1.0)
    return k * c / (1.0 + (k - 1) * c)


def mean_pairwise_cosine(unit_sum: Tensor, k: int) -> float:
    """Mean of ``cos(tau_i, tau_j)`` over pairs ``i < j`` from ``U = sum_i tau_i / |tau_i|``:
    ``|U|^2 = k + 2 sum_{i<j} cos_ij``, so one accumulator replaces the M^2 pairs."""
    if k < 2:
        raise ValueError(f"a mean pairwise cosine needs k >= 2 vectors, got {k}")
    square = float(unit_sum.double().pow(2).sum())
    return (square - k) / (k * (k - 1))


@dataclass
class ModelStock:
    """The merged state, and per tensor the ratio ``t`` and the mean cosine it came from."""

    state_dict: dict[str, Tensor]
    ratios: dict[str, float]
    cosines: dict[str, float]


@torch.no_grad()
def model_stock(base: StateDict, loaders: Sequence[Loader]) -> ModelStock:
    """Model Stock (Jang et al., 2024), per tensor (their "layer-wise"):
    ``theta = t * theta_avg + (1 - t) * theta_0 = theta_0 + t * mean_i tau_i``, with ``k = M``
    and ``cos`` the mean over pairs of the cosine between the runs' task vectors
    (:func:`mean_pairwise_cosine`). A tensor with fewer than two nonzero task vectors (e.g. a
    frozen BN statistic, equal in every run) has no angle: it takes the plain average
    (``t = 1``), which is ``theta_0`` when every ``tau_i`` is 0. One read per run; memory:
    ``theta_0``, two sums and the current run."""
    _check_loaders(loaders)
    ancestor = _Ancestor(base)
    sums = {k: torch.zeros_like(t) for k, t in ancestor.floats.items()}
    units = {k: torch.zeros_like(t) for k, t in ancestor.floats.items()}
    nonzero = dict.fromkeys(ancestor.floats, 0)
    for index, load in enumerate(loaders):
        for key, tau in ancestor.task_vectors(load(), index):
            sums[key].add_(tau)
            norm = float(torch.linalg.vector_norm(tau))
            if norm > 0.0:
                units[key].add_(tau, alpha=1.0 / norm)
                nonzero[key] += 1
    m = len(loaders)
    ratios, cosines, deltas = {}, {}, {}
    for key, total in sums.items():
        if nonzero[key] >= 2:
            cosines[key] = mean_pairwise_cosine(units[key], nonzero[key])
            ratios[key] = model_stock_ratio(m, cosines[key])
        else:
            cosines[key], ratios[key] = math.nan, 1.0
        deltas[key] = total * (ratios[key] / m)
    return ModelStock(ancestor.plus(deltas), ratios, cosines)


# -- Fisher-weighted averaging ---------------------------------------------------------------

#: Matena & Raffel's floor on a Fisher entry, so that an entry no run is sensitive to still
#: gets a defined (uniform) average.
FISHER_FLOOR = 1e-6


@torch.no_grad()
def fisher_average(
    runs: Iterable[tuple[StateDict, Mapping[str, Tensor]]], floor: float = FISHER_FLOOR
) -> dict[str, Tensor]:
    """Fisher-weighted averaging (Matena & Raffel, 2022): per entry
    ``sum_i max(F_i, floor) theta_i / sum_i max(F_i, floor)``.

    ``runs`` yields ``(state_dict, fisher)`` pairs, streamed (one pair alive at a time);
    ``fisher`` maps parameter names to non-negative tensors of their shape. Floating tensors
    absent from ``fisher`` (BN statistics, which no gradient reaches) get weight 1: their
    uniform average. Equal Fishers give the uniform soup."""
    if not (math.isfinite(floor) and floor > 0.0):
        raise ValueError(f"the Fisher floor must be a finite number > 0, got {floor!r}")
    numerators: dict[str, Tensor] = {}
    denominators: dict[str, Tensor | float] = {}
    products: dict[str, Tensor] = {}
    meta: dict[str, Tensor] = {}
    fixed: dict[str, Tensor] = {}
    for index, (state, fisher) in enumerate(runs):
        where = f"run {index}"
        if index == 0:
            _check_tensors(state, where)
            meta = {k: torch.empty_like(t, device="meta") for k, t in state.items()}
            fixed = {k: t.detach().clone() for k, t in state.items() if not t.is_floating_point()}
        else:
            _check_compatible(meta, state, where)
        _add_fisher_weighted(numerators, denominators, products, state, fisher, floor, where)
    if not meta:
        raise ValueError("no runs to average; pass at least one (state_dict, fisher) pair")
    out = {}
    for key, ref in meta.items():
        out[key] = (
            fixed[key] if key in fixed else (numerators[key] / denominators[key]).to(ref.dtype)
        )
    return out


def _add_fisher_weighted(
    numerators: dict[str, Tensor],
    denominators: dict[str, Tensor | float],
    products: dict[str, Tensor],
    state: StateDict,
    fisher: Mapping[str, Tensor],
    floor: float,
    where: str,
) -> None:
    unknown = [k for k in fisher if k not in state or not state[k].is_floating_point()]
    if unknown:
        raise StateDictMismatchError(
            f"the Fisher of {where} has entries {unknown[:5]} that are not floating tensors of "
            "its state dict; estimate it on the same model"
        )
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        value = tensor.detach().to(_accumulator_dtype(tensor))
        if key in fisher:
            if fisher[key].shape != tensor.shape:
                raise StateDictMismatchError(
                    f"the Fisher of {key!r} in {where} has shape {tuple(fisher[key].shape)}, "
                    f"the tensor {tuple(tensor.shape)}"
                )
            weight: Tensor | float = fisher[key].detach().to(value).clamp(min=floor)
        else:
            weight = 1.0
        if key not in numerators:
            numerators[key] = value * weight
            denominators[key] = weight if isinstance(weight, float) else weight.clone()
        elif isinstance(weight, float):
            numerators[key].add_(value)
            denominators[key] = denominators[key] + weight
        else:  # in place, the product in the numerator's buffer: no allocation per run
            if key not in products:
                products[key] = torch.empty_like(numerators[key])
            product = products[key]
            numerators[key].add_(torch.mul(value, weight, out=product))
            denominators[key].add_(weight)  # type: ignore[union-attr]
