"""Merge methods on task vectors: task arithmetic, TIES, DARE, Model Stock, Fisher averaging.

Pure torch: no Ray, no MLflow, no data. Every method starts from a shared ancestor
``theta_0`` (here ``(phi_pt, w_lp)``) and the fine-tuned ``theta_i``; the *task vector* of run
``i`` is ``tau_i = theta_i - theta_0``, tensor by tensor. The runs come as **loaders**
(callables returning a state dict, e.g. a checkpoint read from disk) and are streamed: a method
holds ``theta_0``, its accumulators and the run being read, never the M runs, so its peak
memory does not grow with M (bench P17). Each loader is called once.

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
- DARE (Yu et al., ICML 2024): drop each entry of ``tau_i`` with probability ``p`` (seeded,
  16-bit draws), rescale the rest by ``1 / (1 - p)``; then average (``theta_0 + lambda *
  mean``) or TIES;
- Model Stock (Jang et al., ECCV 2024): ``theta_0 + t * mean_i tau_i`` with
  ``t = k cos / (1 + (k - 1) cos)``, ``cos`` the mean pairwise cosine of the task vectors;
- Fisher averaging (Matena & Raffel, NeurIPS 2022): ``sum_i F_i theta_i / sum_i F_i`` with the
  runs' diagonal Fishers ``F_i`` (estimated elsewhere: they need the model and data).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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


_pools: dict[int, ThreadPoolExecutor] = {}  # by thread count, which torch's setting may change


def _thread_pool() -> ThreadPoolExecutor:
    """Threads for TIES's selections and DARE's fused steps, as many as torch's: numpy
    releases the GIL, but runs each call on one core."""
    threads = torch.get_num_threads()
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, "merges")
    return _pools[threads]


def _check_loaders(loaders: Sequence[Loader]) -> None:
    if not loaders:
        raise ValueError("a merge needs at least one run; pass one loader per run")


# -- sparsifiers: how a task vector is thinned before it is merged ----------------------------


@dataclass
class MagnitudeTrim:
    """TIES's trim: keep the ``k = ceil(density * n)`` largest magnitudes of each tensor's
    ``tau``; entries tied with the k-th largest magnitude are all kept (so ties may keep more
    than k), as the reference code's ``|tau| >= kth value``. Per tensor, as mergekit (the
    reference thresholds the whole flattened model). The current run's k-th magnitudes are
    kept, selected on demand or all at once by :meth:`prepare`."""

    density: float
    _run: int = field(default=-1, repr=False)
    _kth: dict[str, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"a TIES density is a fraction in (0, 1], got {self.density!r}")

    def __call__(self, index: int, key: str, tau: Tensor) -> Tensor:
        if self.density >= 1.0 or tau.numel() == 0:
            return tau
        # |tau| >= kth as hardshrink's |tau| > (the float just below kth): one fused kernel,
        # several times faster than where(abs >= kth) on the CPU
        return F.hardshrink(tau, self.below_threshold(index, key, tau))

    def prepare(self, index: int, taus: Sequence[tuple[str, Tensor]]) -> None:
        """Select the k-th magnitudes of every tensor of run ``index`` at once."""
        MagnitudeTrim.prepare_all([self], index, taus)

    @staticmethod
    def prepare_all(
        trims: Sequence[MagnitudeTrim], index: int, taus: Sequence[tuple[str, Tensor]]
    ) -> None:
        """Select the k-th magnitudes of every tensor of run ``index`` for all ``trims``, with
        one :func:`kth_largest_magnitudes` per tensor for all their densities (TIES over the
        DomainBed configs' three densities: half the selection time of one per density), on
        torch's number of threads: the selection is numpy's, one thread per call (bench P17)."""
        active = [trim for trim in trims if trim.density < 1.0]
        if not active:
            return
        densities = [trim.density for trim in active]
        pending = [(key, tau) for key, tau in taus if tau.numel()]
        per_tensor = _thread_pool().map(
            lambda item: kth_largest_magnitudes(item[1], densities), pending
        )
        selected = {key: kths for (key, _), kths in zip(pending, per_tensor)}
        for position, trim in enumerate(active):
            trim._run = index
            trim._kth = {key: kths[position] for key, kths in selected.items()}

    def below_threshold(self, index: int, key: str, tau: Tensor) -> float:
        """The float of ``tau``'s dtype just below its k-th largest magnitude: ``|x| > it``
        is ``|x| >= kth`` in that dtype."""
        if index != self._run:
            self._run, self._kth = index, {}
        if key not in self._kth:
            self._kth[key] = kth_largest_magnitude(tau, self.density)
        kth = np.array(self._kth[key], _numpy_dtype(tau))
        return float(np.nextafter(kth, kth.dtype.type(0)))


def _numpy_dtype(tensor: Tensor) -> np.dtype:
    return torch.empty(0, dtype=tensor.dtype).numpy().dtype


def kth_largest_magnitude(tau: Tensor, density: float) -> float:
    """The ``k = ceil(density * n)``-th largest ``|tau|``, by numpy's introselect (a partial
    partition; several times faster on the CPU than torch's top-k or kthvalue)."""
    return kth_largest_magnitudes(tau, [density])[0]


def kth_largest_magnitudes(tau: Tensor, densities: Sequence[float]) -> list[float]:
    """:func:`kth_largest_magnitude` for each of ``densities``, from one copy of ``|tau|``:
    ranks in increasing order, each selected within the part above the previous one (for the
    grid 0.1, 0.2, 0.5, partitions of n, n / 2 and n / 5 entries instead of three of n). One
    rank per call to numpy's partition: given several, it takes a path several times
    slower."""
    magnitudes = np.abs(tau.detach().reshape(-1).cpu().numpy())  # numpy's: no torch threads
    ranks = [magnitudes.size - math.ceil(density * magnitudes.size) for density in densities]
    start = 0
    for rank in sorted(set(ranks)):
        magnitudes[start:].partition(rank - start)  # in place: a view of the part above
        start = rank
    return [float(magnitudes[rank]) for rank in ranks]


#: DARE's draws are 16-bit uniforms: a drop rate p is used as ``round(p * 2**16) / 2**16``
#: (within 8e-6 of it) and the kept entries are rescaled by that rate's exact ``1 / (1 - p)``.
DRAW_LEVELS = 2**16


def drop_level(p: float) -> int:
    """The 16-bit draws below which an entry is dropped at rate ``p``."""
    return round(p * DRAW_LEVELS)


def _draw_stream(seed: int, index: int, key: str) -> np.random.SFC64:
    """The bit stream of run ``index``'s tensor ``key``: numpy's SFC64 gives 64 random bits per
    step several times faster than torch's CPU generator gives one float (bench P17)."""
    digest = hashlib.sha256(f"dare/{seed}/{index}/{key}".encode()).digest()
    return np.random.SFC64(np.random.SeedSequence(np.frombuffer(digest, np.uint32)))


def _next_uniforms(stream: np.random.SFC64, n: int) -> np.ndarray:
    """The stream's next ``n`` 16-bit uniforms (four per 64-bit word; ``n`` a multiple of 4
    except at a tensor's end, so blocks of a tensor draw what one call would)."""
    return stream.random_raw((n + 3) // 4).view(np.uint16)[:n]


@dataclass(frozen=True)
class RandomDrop:
    """DARE: drop each entry of ``tau`` with probability ``p``, rescale the kept ones by
    ``1 / (1 - p)`` (so the expectation is ``tau``); ``p`` at 16-bit resolution
    (:data:`DRAW_LEVELS`). The draw of run ``index``'s tensor ``key`` is a pure function of
    ``(seed, index, key)``: a second pass draws the same mask, and masks for two ``p`` are
    nested (one uniform draw per entry, dropped where it is below ``p``)."""

    p: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0.0 <= self.p < 1.0 and drop_level(self.p) < DRAW_LEVELS):
            raise ValueError(
                f"a DARE drop rate is in [0, 1 - 2**-17) (16-bit draws), got {self.p!r}"
            )

    @property
    def level(self) -> int:
        return drop_level(self.p)

    @property
    def rescale(self) -> float:
        """``1 / (1 - p)`` for the ``p`` the draws realize."""
        return DRAW_LEVELS / (DRAW_LEVELS - self.level)

    def keep(self, index: int, key: str, n: int) -> np.ndarray:
        """The kept entries of run ``index``'s ``key`` (``n`` of them, flattened), bool."""
        return _next_uniforms(_draw_stream(self.seed, index, key), n) >= self.level

    def __call__(self, index: int, key: str, tau: Tensor) -> Tensor:
        if self.level == 0:
            return tau
        flat = tau.detach().reshape(-1).cpu().numpy()
        kept = np.multiply(flat, self.keep(index, key, flat.size))
        kept *= kept.dtype.type(self.rescale)
        return torch.from_numpy(kept).reshape(tau.shape).to(tau.device)


Sparsifier = Callable[[int, str, Tensor], Tensor]


def _identity(index: int, key: str, tau: Tensor) -> Tensor:
    return tau


# -- task arithmetic and DARE-average: one pass of summed task vectors ------------------------


@dataclass
class TaskVectorSums:
    """``sum_i sparsify(tau_i)`` per sparsifier, from one read of each run; a sum in
    ``scales`` is still to be multiplied by its scale (DARE's ``1 / (1 - p)``, applied once
    here rather than to every entry of every run)."""

    ancestor: _Ancestor
    sums: dict[Hashable, dict[str, Tensor]]
    n_models: int
    scales: Mapping[Hashable, float] = field(default_factory=dict)

    def task_arithmetic(self, lam: float, name: Hashable = None) -> dict[str, Tensor]:
        """``theta_0 + lam * sum_i tau_i`` (Ilharco et al.)."""
        scale = lam * self.scales.get(name, 1.0)
        return self.ancestor.plus({k: scale * s for k, s in self.sums[name].items()})

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
    """DARE then averaging (Yu et al., 2024): ``.mean(lam, p)`` for each ``p`` of ``rates``.

    The sums of :func:`task_vector_sums` with ``RandomDrop(p, seed)`` sparsifiers, computed
    in one fused step per cache-sized block of each tensor (task vector, draw, mask, add) on
    torch's number of threads, a tensor per thread at a time, without a mask or a rescaled
    copy per tensor. The masks are ``RandomDrop``'s; the rescale is applied once, to the sums.
    With numpy's bits instead of torch's generator, DARE at M = 40 took 3.4 s, now 1.2 s
    (bench P17)."""
    _check_loaders(loaders)
    drops: dict[Hashable, RandomDrop] = {p: RandomDrop(p, seed) for p in rates}
    ancestor = _Ancestor(base)
    sums: dict[Hashable, dict[str, Tensor]] = {
        p: {k: torch.zeros_like(t) for k, t in ancestor.floats.items()} for p in drops
    }
    shares = _balanced_shares({k: t.numel() for k, t in ancestor.floats.items()})
    for index, load in enumerate(loaders):
        state = load()
        ancestor.check(state, index)
        step = _DropAndAdd(index, seed, state, ancestor.floats, drops, sums)
        for _ in _thread_pool().map(step, shares):  # re-raises a worker's error
            pass
        del state, step
    return TaskVectorSums(ancestor, sums, len(loaders), {p: d.rescale for p, d in drops.items()})


#: entries per block of the fused DARE step: a few blocks of float32 stay in a core's cache.
#: A multiple of 4, so that a tensor's blocks draw what one draw of the tensor would.
_BLOCK = 1 << 16


def _balanced_shares(sizes: Mapping[str, int]) -> list[list[str]]:
    """The keys split into torch's number of threads shares of about equal total size
    (largest first, each to the lightest share)."""
    count = max(1, torch.get_num_threads())
    shares: list[list[str]] = [[] for _ in range(count)]
    loads = [0] * count
    for key in sorted(sizes, key=lambda k: -sizes[k]):
        lightest = loads.index(min(loads))
        shares[lightest].append(key)
        loads[lightest] += sizes[key]
    return [share for share in shares if share]


@dataclass(frozen=True)
class _DropAndAdd:
    """One run's DARE step over a share of its tensors: per block, ``sum_p += (x - theta_0) *
    kept_p``, in numpy (which releases the GIL) so that shares run in parallel."""

    index: int
    seed: int
    state: StateDict
    floats: Mapping[str, Tensor]
    drops: Mapping[Hashable, RandomDrop]
    sums: Mapping[Hashable, Mapping[str, Tensor]]

    def __call__(self, keys: Sequence[str]) -> None:
        for key in keys:
            base = self.floats[key].reshape(-1).numpy()
            run = self.state[key].detach().reshape(-1).to(self.floats[key].dtype).cpu().numpy()
            totals = [(d.level, self.sums[p][key].view(-1).numpy()) for p, d in self.drops.items()]
            stream = _draw_stream(self.seed, self.index, key)
            tau, kept = (np.empty(min(_BLOCK, base.size), base.dtype) for _ in range(2))
            keep = np.empty(tau.size, bool)
            for lo in range(0, base.size, _BLOCK):
                hi = min(lo + _BLOCK, base.size)
                block = np.subtract(run[lo:hi], base[lo:hi], out=tau[: hi - lo])
                uniforms = _next_uniforms(stream, hi - lo)
                for level, total in totals:
                    if level == 0:
                        total[lo:hi] += block
                        continue
                    mask = np.greater_equal(uniforms, level, out=keep[: hi - lo])
                    total[lo:hi] += np.multiply(block, mask, out=kept[: hi - lo])


# -- TIES: one pass ----------------------------------------------------------------------------


def elect_signs(total: Tensor) -> Tensor:
    """TIES's sign election from ``sum_i trimmed tau_i`` (the sign of the larger summed
    magnitude); an entry whose sum is exactly 0 takes the tensor's majority sign (the sign of
    the sum of the elected signs), as the reference's ``resolve_zero_signs``; 0 if that is 0
    too (then no run agrees there and the merged entry is 0). int8."""
    signs = torch.sign(total).to(torch.int8)
    majority = torch.sign(signs.sum()).to(torch.int8)
    return torch.where(signs == 0, majority, signs)


@dataclass
class _SignedSums:
    """Over the runs so far, per entry: the sum of the kept entries, of their magnitudes, of
    their signs and their count. The sums of the positive and of the negative entries follow
    (``(magnitude +- total) / 2``), so TIES needs one read per run, not a second pass."""

    total: Tensor
    magnitude: Tensor
    sign_total: Tensor
    nonzero: Tensor

    @classmethod
    def like(cls, tensor: Tensor) -> _SignedSums:
        return cls(*(torch.zeros_like(tensor) for _ in range(4)))

    def add(self, kept: Tensor, signs: Tensor) -> None:
        """Add one run's kept entries; ``signs`` is a scratch buffer of their shape."""
        torch.sign(kept, out=signs)
        self.total.add_(kept)
        self.magnitude.addcmul_(kept, signs)  # |kept|
        self.sign_total.add_(signs)
        self.nonzero.addcmul_(signs, signs)  # 1 where kept

    def agreeing_mean(self) -> Tensor:
        """TIES step 3: per entry, the mean of the kept entries whose sign is the elected one
        (:func:`elect_signs` of the total), 0 where none is. Consumes the sums."""
        elected = elect_signs(self.total)
        positive = torch.add(self.magnitude, self.total).div_(2)
        negative = self.magnitude.sub_(self.total).div_(2)  # |sum of the negative entries|
        n_positive = torch.add(self.nonzero, self.sign_total).div_(2)
        n_negative = self.nonzero.sub_(self.sign_total).div_(2)
        mean = torch.where(elected > 0, positive.div_(n_positive.clamp_(min=1)), 0.0)
        return torch.where(elected < 0, negative.div_(n_negative.clamp_(min=1)).neg_(), mean)


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
    """TIES-merging (Yadav et al., 2023), streamed in one pass over the runs.

    Per sparsifier (``MagnitudeTrim(density)`` is TIES; ``RandomDrop(p)`` is DARE-TIES) and
    entry: the sign elected from ``S = sum_i sparsify(tau_i)`` (:func:`elect_signs`), and the
    mean of the sparsified entries with that sign (0 where none has it). Both come from four
    running sums (:class:`_SignedSums`): the entries agreeing with a positive sign are the
    positive ones, whose sum and count are known without a second read. Each loader is called
    once. Memory: ``theta_0``, two buffers per tensor, the current run and four float sums
    per sparsifier (counts exact below 2**24 runs)."""
    _check_loaders(loaders)
    if not sparsifiers:
        raise ValueError("ties_merging needs at least one sparsifier (e.g. MagnitudeTrim(0.2))")
    ancestor = _Ancestor(base)
    sums = {
        name: {k: _SignedSums.like(t) for k, t in ancestor.floats.items()} for name in sparsifiers
    }
    signs = {k: torch.empty_like(t) for k, t in ancestor.floats.items()}
    trims = [sparsify for sparsify in sparsifiers.values() if isinstance(sparsify, MagnitudeTrim)]
    for index, load in enumerate(loaders):
        taus = list(ancestor.task_vectors(load(), index))
        MagnitudeTrim.prepare_all(trims, index, taus)
        for key, tau in taus:
            for name, sparsify in sparsifiers.items():
                sums[name][key].add(sparsify(index, key, tau), signs[key])
    del signs
    means = {
        name: {key: by_key.pop(key).agreeing_mean() for key in list(by_key)}
        for name, by_key in sums.items()
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
    clamped: dict[str, Tensor] = {}
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
        _add_fisher_weighted(numerators, denominators, clamped, state, fisher, floor, where)
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
    clamped: dict[str, Tensor],
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
            if key not in clamped:  # one buffer per tensor for the clamped Fisher, reused
                clamped[key] = torch.empty_like(value)
            weight: Tensor | float = torch.clamp(
                fisher[key].detach().to(value), min=floor, out=clamped[key]
            )
        else:
            weight = 1.0
        if key not in numerators:
            numerators[key] = value * weight
            denominators[key] = weight if isinstance(weight, float) else weight.clone()
        elif isinstance(weight, float):
            numerators[key].add_(value)
            denominators[key] = denominators[key] + weight
        else:  # in place: numerator += value * weight in one kernel, no allocation per run
            numerators[key].addcmul_(value, weight)
            denominators[key].add_(weight)  # type: ignore[union-attr]
