"""Diversity: Q statistic and ratio-error on hand-made 2x2 tables; matrices vs the scalar route."""

from __future__ import annotations

import numpy as np
import pytest

from ratatouille.merging.diversity import (
    mean_pairwise,
    pair_mask,
    pairwise_diversity,
    q_statistic,
    ratio_errors,
)


def from_counts(n11: int, n10: int, n01: int, n00: int) -> tuple[np.ndarray, ...]:
    """Labels and two prediction vectors whose 2x2 oracle table is exactly the given counts.

    Wrong predictions use different wrong labels for a (1) and b (2): a shared error is an
    error of both, whatever label each predicted.
    """
    right_a = [1] * n11 + [1] * n10 + [0] * n01 + [0] * n00
    right_b = [1] * n11 + [0] * n10 + [1] * n01 + [0] * n00
    y = np.zeros(len(right_a), dtype=np.int64)
    pred_a = np.where(np.array(right_a) == 1, 0, 1)
    pred_b = np.where(np.array(right_b) == 1, 0, 2)
    return y, pred_a, pred_b


# (n11, n10, n01, n00) -> Q and ratio-error by hand
HAND_TABLES = [
    # Q = (5*4 - 3*2) / (5*4 + 3*2) = 14/26; ratio = (3 + 2) / 4
    ((5, 2, 3, 4), 14 / 26, 5 / 4),
    # Q = (1*2 - 3*4) / (1*2 + 3*4) = -10/14; ratio = 7 / 2
    ((1, 4, 3, 2), -10 / 14, 7 / 2),
    # no joint error: Q = (0 - 6) / (0 + 6) = -1; ratio = 2 * (3 + 2) (N00 read as 1/2)
    ((5, 2, 3, 0), -1.0, 10.0),
    # identical, non-constant: Q = 24 / 24 = 1; ratio = 0 / 4
    ((6, 0, 0, 4), 1.0, 0.0),
]

# degenerate tables: N11*N00 + N01*N10 == 0
DEGENERATE_TABLES = [
    ((10, 0, 0, 0), 1.0, 0.0),  # both always right: identical -> Q = 1; ratio 2 * 0
    ((0, 0, 0, 10), 1.0, 0.0),  # both always wrong: identical -> Q = 1; ratio 0 / 10
    ((6, 4, 0, 0), 0.0, 8.0),  # a always right, b not: Q = 0; ratio 2 * 4
    ((0, 0, 3, 7), 0.0, 3 / 7),  # a always wrong, b not: Q = 0; ratio 3 / 7
    ((0, 10, 0, 0), 0.0, 20.0),  # a always right, b always wrong: Q = 0; ratio 2 * 10
]


@pytest.mark.parametrize(("counts", "q", "ratio"), HAND_TABLES + DEGENERATE_TABLES)
def test_q_statistic_and_ratio_error_match_hand_computed_tables(counts, q, ratio):
    y, a, b = from_counts(*counts)
    assert q_statistic(y, a, b) == pytest.approx(q, abs=1e-15)
    assert ratio_errors(y, a, b) == pytest.approx(ratio, abs=1e-15)


def test_q_statistic_is_symmetric_and_ratio_error_too():
    y, a, b = from_counts(5, 2, 3, 4)
    assert q_statistic(y, b, a) == q_statistic(y, a, b)
    assert ratio_errors(y, b, a) == ratio_errors(y, a, b)


def test_shared_errors_with_different_wrong_labels_count_as_joint_errors():
    y = np.array([0, 0, 1, 1])
    a = np.array([1, 0, 1, 0])  # right on samples 1, 2
    b = np.array([2, 0, 0, 1])  # right on samples 1, 3; sample 0 wrong for both (labels 1 vs 2)
    # N11 = 1 (sample 1), N10 = 1 (2), N01 = 1 (3), N00 = 1 (0): Q = (1 - 1) / 2 = 0; ratio 2 / 1
    assert q_statistic(y, a, b) == 0.0
    assert ratio_errors(y, a, b) == 2.0


def test_a_model_compared_with_itself_has_zero_diversity():
    y = np.array([0, 1, 2, 0, 1])
    # mixed, always right, always wrong
    for pred in (np.array([0, 1, 1, 2, 1]), y.copy(), (y + 1) % 3):
        assert q_statistic(y, pred, pred) == 1.0
        assert ratio_errors(y, pred, pred) == 0.0


def random_pool(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """7 models on 300 samples: random, one duplicate, one always right, one always wrong."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=300)
    error_rates = np.array([[0.2], [0.4], [0.5], [0.7]])
    noisy = np.where(rng.random((4, 300)) < error_rates, rng.integers(0, 4, (4, 300)), y)
    preds = np.vstack([noisy, noisy[1], y, (y + 1) % 4])
    return y, preds


@pytest.mark.parametrize(
    ("measure", "scalar"),
    [
        ("q", q_statistic),
        ("q_diversity", lambda y, a, b: 1.0 - q_statistic(y, a, b)),
        ("ratio_error", ratio_errors),
    ],
)
def test_pairwise_diversity_agrees_with_the_scalar_measure_for_every_pair(measure, scalar):
    y, preds = random_pool()
    matrix = pairwise_diversity(y, preds, measure=measure)
    m = len(preds)
    assert matrix.shape == (m, m)
    expected = np.array([[scalar(y, preds[i], preds[j]) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(matrix, expected, rtol=1e-12, atol=1e-15)


def test_pairwise_counts_in_blocks_equal_the_scalar_route(monkeypatch):
    from ratatouille.merging import diversity

    y, preds = random_pool()
    assert len(y) > 7  # several blocks of 7 samples, the last one partial
    monkeypatch.setattr(diversity, "PAIR_COUNT_CHUNK", 7)
    matrix = pairwise_diversity(y, preds, measure="q")
    m = len(preds)
    expected = np.array([[q_statistic(y, preds[i], preds[j]) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(matrix, expected, rtol=1e-12, atol=1e-15)


def test_pairwise_diversity_diagonal_is_zero_diversity():
    y, preds = random_pool(seed=3)
    np.testing.assert_array_equal(np.diag(pairwise_diversity(y, preds, "q")), 1.0)
    np.testing.assert_array_equal(np.diag(pairwise_diversity(y, preds, "q_diversity")), 0.0)
    np.testing.assert_array_equal(np.diag(pairwise_diversity(y, preds, "ratio_error")), 0.0)


def test_pairwise_diversity_matches_a_hand_table():
    y, a, b = from_counts(5, 2, 3, 4)
    matrix = pairwise_diversity(y, np.vstack([a, b]), "q_diversity")
    np.testing.assert_allclose(matrix, [[0.0, 1 - 14 / 26], [1 - 14 / 26, 0.0]], atol=1e-15)


@pytest.mark.parametrize(
    ("preds", "measure", "message"),
    [
        (np.zeros((2, 4), dtype=int), "kappa", "unknown diversity measure"),
        (np.zeros((2, 3), dtype=int), "q", r"N = len\(y_true\) = 4"),
        (np.zeros((2, 4, 3)), "q", r"\(M, N\)"),
        (np.zeros((0, 4), dtype=int), "q", "M >= 1"),
    ],
)
def test_pairwise_diversity_rejects_bad_input(preds, measure, message):
    with pytest.raises(ValueError, match=message):
        pairwise_diversity(np.zeros(4, dtype=int), preds, measure=measure)


def test_scalar_measures_reject_unequal_lengths_and_logits():
    with pytest.raises(ValueError, match="equal length"):
        q_statistic([0, 1, 1], [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="not logits"):
        ratio_errors([0, 1], np.zeros((2, 3)), [0, 1])


# --- mean_pairwise / pair_mask -------------------------------------------------------------

MATRIX = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]])


def test_mean_pairwise_averages_over_i_below_j_only():
    assert mean_pairwise(MATRIX) == 2.0  # (1 + 2 + 3) / 3; the zero diagonal is not counted
    lower_junk = np.triu(MATRIX) + np.tril(np.full((3, 3), 100.0), k=-1)
    assert mean_pairwise(lower_junk) == 2.0


def test_mean_pairwise_with_same_and_different_source_masks():
    sources = ["imagenet", "imagenet", "domainnet"]
    assert mean_pairwise(MATRIX, pair_mask(sources, same=True)) == 1.0  # pair (0, 1)
    assert mean_pairwise(MATRIX, pair_mask(sources, same=False)) == 2.5  # (0, 2), (1, 2)


def test_mean_pairwise_needs_a_pair():
    with pytest.raises(ValueError, match="no pair"):
        mean_pairwise(np.zeros((1, 1)))
    with pytest.raises(ValueError, match="no pair"):
        mean_pairwise(MATRIX, pair_mask(["a", "b", "c"], same=True))


def test_mean_pairwise_rejects_non_square_matrix_and_bad_mask():
    with pytest.raises(ValueError, match="square"):
        mean_pairwise(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="bool array of shape"):
        mean_pairwise(MATRIX, np.ones((2, 2), dtype=bool))
