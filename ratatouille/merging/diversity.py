"""Prediction diversity between classifiers (paper Sec. 4.2 and App. C.1). Pure numpy.

For two classifiers a and b on N samples, with oracle outputs "right" (1) / "wrong" (0),
``N^{ij}`` counts the samples where a is ``i`` and b is ``j`` (Kuncheva & Whitaker 2003):
``N11`` both right, ``N10`` only a right, ``N01`` only b right, ``N00`` both wrong.

- Yule's Q statistic: ``Q = (N11 N00 - N01 N10) / (N11 N00 + N01 N10)`` in [-1, 1]; the
  paper's **q-diversity** is ``1 - Q`` in [0, 2] (higher = more diverse).
- Aksela's **ratio-error**: ``(N01 + N10) / N00`` (higher = fewer shared errors).

Degenerate cases, defined so every pair gets a finite number:

- Q when ``N11 N00 + N01 N10 = 0``. This happens only when at least one model is right on
  every sample or wrong on every sample, and then the numerator (``N^2`` times the
  covariance of the two correctness indicators) is 0 too. We return **Q = 1** when the two
  models are right on exactly the same samples (``N01 = N10 = 0``): identical correctness
  is perfect agreement, which is what Q = 1 means in the non-degenerate case, so a model
  compared with itself always gets Q = 1 (q-diversity 0). Otherwise we return **Q = 0**:
  a constant correctness vector has zero covariance with any other, which is what Q = 0
  means elsewhere (independent errors).
- ratio-error when ``N00 = 0`` (no joint error). The reference code returns
  ``2 (N01 + N10)``; we read it on **counts**, i.e. ``N00`` is replaced by 1/2 (a
  continuity correction), so the value stays finite and keeps growing as joint errors
  vanish (``N00 = 1`` gives ``N01 + N10``, ``N00 = 0`` gives twice that). Identical models
  get 0 either way.
- Diagonal of the pairwise matrices: Q = 1, q-diversity = 0, ratio-error = 0, following
  the rules above for a model compared with itself.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Measure = Literal["q_diversity", "q", "ratio_error"]
MEASURES: tuple[str, ...] = ("q_diversity", "q", "ratio_error")


def _as_labels(name: str, values: object) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array of class labels, got shape {array.shape}; "
            "pass predicted labels (argmax of the logits), not logits"
        )
    return array


def _pair_counts(y_true: object, pred_a: object, pred_b: object) -> tuple[int, int, int, int]:
    """``(N11, N10, N01, N00)`` as Python ints, by boolean counting (no matmul)."""
    y = _as_labels("y_true", y_true)
    a, b = _as_labels("pred_a", pred_a), _as_labels("pred_b", pred_b)
    if not len(y) == len(a) == len(b) or len(y) == 0:
        raise ValueError(
            "y_true, pred_a and pred_b must be non-empty and of equal length, got "
            f"{len(y)}, {len(a)}, {len(b)}"
        )
    right_a, right_b = a == y, b == y
    return (
        int(np.sum(right_a & right_b)),
        int(np.sum(right_a & ~right_b)),
        int(np.sum(~right_a & right_b)),
        int(np.sum(~right_a & ~right_b)),
    )


def q_statistic(y_true: object, pred_a: object, pred_b: object) -> float:
    """Yule's Q between two classifiers' correctness (Kuncheva & Whitaker 2003).

    q-diversity is ``1 - q_statistic(...)``. Degenerate cases: see the module docstring.
    """
    n11, n10, n01, n00 = _pair_counts(y_true, pred_a, pred_b)
    denominator = n11 * n00 + n01 * n10
    if denominator == 0:
        return 1.0 if n01 == 0 and n10 == 0 else 0.0
    return (n11 * n00 - n01 * n10) / denominator


def ratio_errors(y_true: object, pred_a: object, pred_b: object) -> float:
    """Aksela's ratio-error ``(N01 + N10) / N00``; ``2 (N01 + N10)`` when ``N00 = 0``.

    See the module docstring for why the no-joint-error case is read on counts.
    """
    _, n10, n01, n00 = _pair_counts(y_true, pred_a, pred_b)
    if n00 == 0:
        return 2.0 * (n01 + n10)
    return (n01 + n10) / n00


def correctness(y_true: object, preds: object) -> np.ndarray:
    """Boolean matrix ``C[m, n] = preds[m, n] == y_true[n]`` of shape ``(M, N)``."""
    y = _as_labels("y_true", y_true)
    p = np.asarray(preds)
    if p.ndim != 2 or p.shape[1] != len(y) or p.shape[0] == 0 or len(y) == 0:
        raise ValueError(
            f"preds must be an (M, N) array of predicted labels with M >= 1 and N = "
            f"len(y_true) = {len(y)} >= 1, got shape {p.shape}"
        )
    return p == y[None, :]


#: Samples per float64 block of :func:`pairwise_counts`.
PAIR_COUNT_CHUNK = 1 << 16


def pairwise_counts(correct: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(N11, N10, N01, N00)`` for all pairs, each ``(M, M)`` float64, from one matmul.

    ``N11 = C C^T``; the others follow from the per-model right counts ``r``:
    ``N10[i, j] = r_i - N11``, ``N01 = r_j - N11``, ``N00 = N - r_i - r_j + N11``.
    float64 keeps the counts exact up to 2**53 samples; the samples are taken
    ``PAIR_COUNT_CHUNK`` at a time, so the float64 copy is bounded whatever N (a reducer task
    on DomainNet's 172k OOD images would otherwise hold 8 bytes per run and image more).
    """
    correct = np.asarray(correct)
    m, n = correct.shape
    n11, right = np.zeros((m, m)), np.zeros(m)
    for start in range(0, n, PAIR_COUNT_CHUNK):
        c = correct[:, start : start + PAIR_COUNT_CHUNK].astype(np.float64)
        n11 += c @ c.T
        right += c.sum(axis=1)
    n10 = right[:, None] - n11
    n01 = right[None, :] - n11
    n00 = n - right[:, None] - right[None, :] + n11
    return n11, n10, n01, n00


def _q_matrix(n11: np.ndarray, n10: np.ndarray, n01: np.ndarray, n00: np.ndarray) -> np.ndarray:
    numerator = n11 * n00 - n01 * n10
    denominator = n11 * n00 + n01 * n10
    identical = (n01 == 0) & (n10 == 0)
    fallback = np.where(identical, 1.0, 0.0)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, fallback)


def _ratio_matrix(n10: np.ndarray, n01: np.ndarray, n00: np.ndarray) -> np.ndarray:
    disagree = n01 + n10
    return np.where(n00 > 0, disagree / np.where(n00 > 0, n00, 1.0), 2.0 * disagree)


def pairwise_diversity(
    y_true: object, preds: object, measure: Measure = "q_diversity"
) -> np.ndarray:
    """Matrix ``D[i, j]`` of ``measure`` between models i and j, shape ``(M, M)``, symmetric.

    ``preds`` is ``(M, N)`` predicted labels. ``measure``: ``"q_diversity"`` (1 - Q),
    ``"q"`` (Yule's Q) or ``"ratio_error"``. Vectorised: one ``(M, N) @ (N, M)`` matmul,
    no loop over pairs. Diagonal and degenerate pairs: see the module docstring.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown diversity measure {measure!r}; choose one of {MEASURES}")
    n11, n10, n01, n00 = pairwise_counts(correctness(y_true, preds))
    if measure == "ratio_error":
        return _ratio_matrix(n10, n01, n00)
    q = _q_matrix(n11, n10, n01, n00)
    return q if measure == "q" else 1.0 - q


def pair_mask(groups: object, same: bool) -> np.ndarray:
    """``(M, M)`` bool mask of pairs whose ``groups`` labels are equal (``same=True``) or differ.

    E.g. ``groups`` = the auxiliary source of each run, for same-source vs
    different-source mean diversity with :func:`mean_pairwise`.
    """
    g = np.asarray(groups)
    if g.ndim != 1:
        raise ValueError(f"groups must be 1-D, one label per model; got shape {g.shape}")
    equal = g[:, None] == g[None, :]
    return equal if same else ~equal


def mean_pairwise(matrix: object, mask: object | None = None) -> float:
    """Mean of ``matrix[i, j]`` over pairs ``i < j`` (and ``mask[i, j]`` when given).

    The diagonal is never included. Raises ValueError when no pair is selected (fewer
    than two models, or an empty mask): a mean over nothing has no value.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"matrix must be square (M, M), got shape {m.shape}")
    upper = np.triu(np.ones(m.shape, dtype=bool), k=1)
    if mask is not None:
        mask_array = np.asarray(mask)
        if mask_array.shape != m.shape or mask_array.dtype != bool:
            raise ValueError(
                f"mask must be a bool array of shape {m.shape}, "
                f"got {mask_array.dtype} {mask_array.shape}"
            )
        upper &= mask_array
    if not upper.any():
        raise ValueError(
            f"no pair i < j selected in a {m.shape[0]}x{m.shape[0]} matrix; "
            "a mean pairwise value needs at least two models (and a mask with a pair in it)"
        )
    return float(m[upper].mean())
