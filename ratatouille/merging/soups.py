"""Weight averaging: weighted / uniform / greedy soups, fusing weights, WiSE interpolation.

Pure torch: no Ray, no MLflow. A *state dict* here is any ``Mapping[str, Tensor]``
(``model.state_dict()``, a safetensors file loaded as a dict, ...).

Rules shared by every function (DESIGN.md, "Decisions"):

- every **floating** tensor is averaged; the running sum lives in a **float32** accumulator
  (or the input's dtype when wider: float64 stays float64) and the result is cast back to the
  tensor's own dtype once, at the end. A bf16 weight therefore stays bf16, but the sum of M
  bf16 tensors is not rounded to bf16's 8-bit mantissa M times;
- every **non-floating** tensor (``num_batches_tracked``, masks, index buffers) is taken
  from the first state dict: with frozen BN these are equal across runs anyway, and
  averaging an integer counter has no meaning;
- all state dicts must have the same keys, and each key the same shape and dtype; the
  first mismatch raises :class:`StateDictMismatchError` naming the tensor.

Memory: :func:`average` and :func:`greedy_soup` stream. They hold one accumulator and the
state dict being read (greedy: plus the trial soup it evaluates), never all M inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]


class StateDictMismatchError(ValueError):
    """Two state dicts cannot be averaged: different keys, shapes or dtypes."""


def _accumulator_dtype(tensor: Tensor) -> torch.dtype:
    """float32, or the input's dtype when wider: the sum of M float32 tensors in float32 errs by
    about M * 6e-8 relative, far below what separates two runs; a float64 accumulator moved
    twice the bytes per add and made the soup ~3x slower than reading its files (bench P4)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _check_tensors(state_dict: StateDict, where: str) -> None:
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise StateDictMismatchError(
                f"{key!r} in {where} is a {type(value).__name__}, not a tensor; pass "
                "model.state_dict() or a dict of tensors (e.g. safetensors.torch.load_file)"
            )


def _check_compatible(reference: StateDict, state_dict: StateDict, where: str) -> None:
    """Raise one error naming the first key, shape or dtype that differs from ``reference``."""
    missing = [k for k in reference if k not in state_dict]
    extra = [k for k in state_dict if k not in reference]
    if missing or extra:
        raise StateDictMismatchError(
            f"{where} has different keys than the first state dict: missing {missing[:5]}, "
            f"unexpected {extra[:5]}; average only checkpoints of the same architecture"
        )
    _check_tensors(state_dict, where)
    for key, ref in reference.items():
        tensor = state_dict[key]
        if tensor.shape != ref.shape:
            raise StateDictMismatchError(
                f"tensor {key!r} has shape {tuple(tensor.shape)} in {where} but "
                f"{tuple(ref.shape)} in the first state dict; average only checkpoints of "
                "the same architecture"
            )
        if tensor.dtype != ref.dtype:
            raise StateDictMismatchError(
                f"tensor {key!r} has dtype {tensor.dtype} in {where} but {ref.dtype} in the "
                "first state dict; cast the checkpoints to one dtype before averaging"
            )


class _Accumulator:
    """Running weighted sum ``S = sum_i w_i * theta_i`` of floating tensors; ``W = sum_i w_i``.

    Non-floating tensors are copied once from the first state dict added.
    """

    def __init__(self) -> None:
        self.reference: dict[str, Tensor] = {}  # metadata only: shapes/dtypes of the first
        self.sums: dict[str, Tensor] = {}
        self.fixed: dict[str, Tensor] = {}
        self.total_weight = 0.0
        self.count = 0

    @torch.no_grad()
    def add(self, state_dict: StateDict, weight: float, where: str) -> None:
        if self.count == 0:
            if not state_dict:
                raise StateDictMismatchError(f"{where} is empty; nothing to average")
            _check_tensors(state_dict, where)
            # Keep only meta tensors as the reference, so the first input can be freed.
            self.reference = {k: torch.empty_like(t, device="meta") for k, t in state_dict.items()}
            for key, tensor in state_dict.items():
                if tensor.is_floating_point():
                    acc = tensor.detach().to(_accumulator_dtype(tensor))
                    self.sums[key] = acc * weight
                else:
                    self.fixed[key] = tensor.detach().clone()
        else:
            _check_compatible(self.reference, state_dict, where)
            for key, acc in self.sums.items():
                # mixed-dtype in-place add: no widened copy of each input
                acc.add_(state_dict[key].detach().to(acc.device), alpha=weight)
        self.total_weight += weight
        self.count += 1

    @torch.no_grad()
    def mean(self, extra: StateDict | None = None, extra_weight: float = 0.0) -> dict[str, Tensor]:
        """``(S + extra_weight * extra) / (W + extra_weight)``, cast back; ``S`` is not modified."""
        total = self.total_weight + extra_weight
        if not total > 0.0:
            raise ValueError(f"the weights sum to {total}; give at least one positive weight")
        out: dict[str, Tensor] = {}
        for key, ref in self.reference.items():
            if key in self.fixed:
                out[key] = self.fixed[key].clone()
                continue
            acc = self.sums[key]
            if extra is not None:
                acc = acc + extra[key].detach().to(acc.device, acc.dtype) * extra_weight
            out[key] = (acc / total).to(ref.dtype)
        return out


def _validated_weights(weights: Sequence[float]) -> list[float]:
    values = [float(w) for w in weights]
    bad = [w for w in values if not math.isfinite(w) or w < 0.0]
    if bad:
        raise ValueError(f"weights must be finite and non-negative, got {bad[:5]} in {values[:10]}")
    if not sum(values) > 0.0:
        raise ValueError(f"weights sum to {sum(values)}; give at least one positive weight")
    return values


def average(
    state_dicts: Iterable[StateDict], weights: Sequence[float] | None = None
) -> dict[str, Tensor]:
    """Weighted average ``sum_i lambda_i * theta_i`` of state dicts, streamed.

    ``state_dicts`` may be a list or any iterator/generator (e.g. one that loads each
    checkpoint from disk): only the accumulator and the current input are held.
    ``weights`` (default: uniform, ``lambda_i = 1/M``) must be finite and non-negative
    with a positive sum; they are **normalised** to ``lambda_i = w_i / sum_j w_j``, so
    ``[1, 3]`` means ``[0.25, 0.75]``. Their count must equal the number of state dicts.
    Floating tensors are summed in float32 or wider and cast back; non-floating ones come from
    the first state dict (see the module docstring).
    """
    values = None if weights is None else _validated_weights(weights)
    acc = _Accumulator()
    for index, state_dict in enumerate(state_dicts):
        if values is not None and index >= len(values):
            raise ValueError(f"got more state dicts than the {len(values)} weights given")
        weight = 1.0 if values is None else values[index]
        acc.add(state_dict, weight, where=f"state dict {index}")
    if acc.count == 0:
        raise ValueError("no state dicts to average; pass at least one")
    if values is not None and acc.count != len(values):
        raise ValueError(
            f"got {acc.count} state dicts but {len(values)} weights; give one weight each"
        )
    return acc.mean()


def uniform_soup(state_dicts: Iterable[StateDict]) -> dict[str, Tensor]:
    """The uniform soup ``(1/M) sum_i theta_i`` (paper Sec. 3, step 5, "uniform")."""
    return average(state_dicts)


@dataclass(frozen=True)
class GreedySoup:
    """Result of :func:`greedy_soup`.

    ``selected``: indices into the original ``loaders`` list, in the order they were added
    (best ID-val score first). ``score``: ID-val score of the returned soup (for a single
    model, its stored ``val_scores`` entry, or its measured score with
    ``threshold="measured"``). ``state_dict``: the uniform average of the selected models.
    """

    selected: tuple[int, ...]
    score: float
    state_dict: dict[str, Tensor]


def _greedy_step(
    acc: _Accumulator,
    loader: Callable[[], StateDict],
    evaluate: Callable[[StateDict], float],
    where: str,
) -> tuple[StateDict, float]:
    """Load one candidate and score the soup with it; locals die on return (memory bound)."""
    candidate = loader()
    _check_compatible(acc.reference, candidate, where)
    score = float(evaluate(acc.mean(extra=candidate, extra_weight=1.0)))
    if math.isnan(score):
        raise ValueError(f"evaluate returned nan for the soup with {where}; it must return a score")
    return candidate, score


def greedy_soup(
    loaders: Sequence[Callable[[], StateDict]],
    val_scores: Sequence[float],
    evaluate: Callable[[StateDict], float],
    *,
    threshold: Literal["logged", "measured"] = "logged",
) -> GreedySoup:
    """Greedy soup (paper Sec. 3, step 5, "greedy"; Wortsman et al. 2022a).

    Sort the M models by ``val_scores`` descending (stable: equal scores keep their list
    order); start the soup with the best, whose stored score is the current best (it is not
    re-evaluated; with ``threshold="measured"`` it is, by ``evaluate``, as the reference
    does, and that score is the first threshold); then for each next candidate, score the
    uniform average of the soup WITH it by ``evaluate`` and keep the candidate iff that score
    is ``>=`` the current best (ties accepted, as in the reference code; the paper's "lowers"
    means "does not lower").
    ``val_scores`` and ``evaluate`` must therefore be on the same scale (ID-val accuracy).

    Streaming: each loader is called exactly once and ``evaluate`` exactly M-1 times (M with
    ``measured``); at most three state dicts are alive at once (the running sum, the
    candidate, the trial soup). Non-floating tensors come from the best model.
    """
    if len(loaders) != len(val_scores):
        raise ValueError(
            f"got {len(loaders)} loaders but {len(val_scores)} val_scores; give one score each"
        )
    if not loaders:
        raise ValueError("greedy_soup needs at least one model")
    scores = [float(s) for s in val_scores]
    if any(math.isnan(s) for s in scores):
        raise ValueError(f"val_scores contain nan: {scores}")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if threshold not in ("logged", "measured"):
        raise ValueError(f"threshold must be 'logged' or 'measured', got {threshold!r}")
    acc = _Accumulator()
    acc.add(loaders[order[0]](), 1.0, where=f"loader {order[0]}")
    selected, best = [order[0]], scores[order[0]]
    if threshold == "measured":
        best = float(evaluate(acc.mean()))
    for index in order[1:]:
        candidate, score = _greedy_step(acc, loaders[index], evaluate, where=f"loader {index}")
        if score >= best:
            acc.add(candidate, 1.0, where=f"loader {index}")
            selected.append(index)
            best = score
        del candidate  # the next loader call must not find this one still alive
    return GreedySoup(selected=tuple(selected), score=best, state_dict=acc.mean())


def fusing_weights(n: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Fusing coefficients (App. F.1): ``kappa_i ~ U(0, spread)``, ``lambda = softmax(kappa)``.

    The paper uses ``spread = 4`` over the K+1 sources (T0 included). The featurizer init is
    then ``sum_i lambda_i * phi_i_aux``, e.g. ``average(phis, weights=fusing_weights(...))``.
    ``rng`` is a ``numpy.random.Generator`` (seed it from the run's identity). Returns
    float64 of shape ``(n,)``, positive, summing to 1.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            "rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer (the number of sources), got {n!r}")
    if not (math.isfinite(spread) and spread >= 0.0):
        raise ValueError(f"spread must be finite and >= 0 (the paper uses 4), got {spread!r}")
    kappa = rng.uniform(0.0, spread, size=int(n))
    exp = np.exp(kappa - kappa.max())  # shift for overflow safety; softmax is shift-invariant
    return exp / exp.sum()


def interpolate(theta_a: StateDict, theta_b: StateDict, lam: float) -> dict[str, Tensor]:
    """WiSE-style interpolation ``(1 - lam) * theta_a + lam * theta_b``.

    Floating tensors are combined in float32 or wider and cast back; non-floating ones come
    from ``theta_a``. ``lam`` may be any finite real (outside [0, 1] extrapolates).
    """
    lam = float(lam)
    if not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number, got {lam}")
    acc = _Accumulator()
    acc.add(theta_a, 1.0 - lam, where="theta_a")
    acc.add(theta_b, lam, where="theta_b")
    acc.total_weight = 1.0  # (1 - lam) + lam is 1 exactly; its float sum may not be
    return acc.mean()
