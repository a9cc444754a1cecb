"""Soups: weighted/uniform/greedy averaging, fusing weights, interpolation, against hand values."""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch

from ratatouille.merging.soups import (
    GreedySoup,
    StateDictMismatchError,
    average,
    fusing_weights,
    greedy_soup,
    interpolate,
    uniform_soup,
)


def scalar_model(value: float, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A one-tensor "model" whose only weight is ``value``."""
    return {"w": torch.tensor([value], dtype=dtype)}


def weight(state_dict) -> float:
    return float(state_dict["w"].item())


# --- average / uniform_soup -------------------------------------------------------------


def test_average_of_two_state_dicts_is_the_elementwise_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([1.0])}
    out = average([a, b])
    assert out["w"].tolist() == [2.0, 4.0]
    assert out["b"].tolist() == [0.5]


def test_weighted_average_normalises_weights_by_their_sum():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([3.0, 6.0])}
    # weights [1, 3] mean 0.25 * a + 0.75 * b = [0.25 + 2.25, 0.5 + 4.5]
    assert average([a, b], weights=[1.0, 3.0])["w"].tolist() == [2.5, 5.0]


def test_weighted_average_ignores_a_zero_weight_model():
    out = average([scalar_model(100.0), scalar_model(2.0), scalar_model(4.0)], weights=[0, 1, 1])
    assert weight(out) == 3.0


def test_uniform_soup_is_the_mean_of_all_models():
    assert weight(uniform_soup([scalar_model(1.0), scalar_model(2.0), scalar_model(6.0)])) == 3.0


def test_average_streams_a_generator_holding_at_most_two_inputs():
    live, peak = [0], [0]

    def release() -> None:
        live[0] -= 1

    def make(i: int) -> dict[str, torch.Tensor]:
        state = scalar_model(float(i))
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(state["w"], release)
        return state

    out = average(make(i) for i in range(50))  # the generator keeps no reference itself
    assert weight(out) == pytest.approx(24.5, abs=1e-12)  # mean of 0..49
    # the consumer's loop variable still holds input k-1 while input k is produced
    assert peak[0] <= 2
    assert live[0] == 0


def test_average_accumulates_bf16_wider_than_bf16_and_returns_bf16():
    values = [256.0, 1.0, 1.0, 1.0, 1.0]  # exact mean 260 / 5 = 52, representable in bf16
    naive = torch.tensor(0.0, dtype=torch.bfloat16)
    for v in values:  # a bf16 running sum: 256 + 1 rounds back to 256 (8-bit mantissa)
        naive = naive + torch.tensor(v, dtype=torch.bfloat16)
    assert float(naive / 5) != 52.0  # the case really loses precision in bf16

    out = average([scalar_model(v, torch.bfloat16) for v in values])
    assert out["w"].dtype == torch.bfloat16
    assert weight(out) == 52.0


def test_average_keeps_float64_precision_beyond_float32():
    # mean of 1 and 1 + 2**-50 is 1 + 2**-51: exact in float64, rounds to 1.0 in float32
    out = average([scalar_model(1.0), scalar_model(1.0 + 2.0**-50)])
    assert out["w"].dtype == torch.float64
    assert weight(out) == 1.0 + 2.0**-51


def test_average_keeps_each_dtype_of_a_mixed_state_dict():
    def state(x: float, batches: int, mask: list[bool]) -> dict[str, torch.Tensor]:
        return {
            "conv.weight": torch.tensor([x], dtype=torch.bfloat16),
            "fc.weight": torch.tensor([x], dtype=torch.float16),
            "fc.bias": torch.tensor([x], dtype=torch.float32),
            "bn.num_batches_tracked": torch.tensor(batches, dtype=torch.int64),
            "mask": torch.tensor(mask),
        }

    out = average([state(1.0, 5, [True, False]), state(2.0, 7, [False, True])])
    assert out["conv.weight"].dtype == torch.bfloat16 and out["conv.weight"].item() == 1.5
    assert out["fc.weight"].dtype == torch.float16 and out["fc.weight"].item() == 1.5
    assert out["fc.bias"].dtype == torch.float32 and out["fc.bias"].item() == 1.5
    # non-floating buffers come from the first state dict, unchanged
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert out["bn.num_batches_tracked"].item() == 5
    assert out["mask"].tolist() == [True, False]


def test_average_leaves_inputs_unchanged_and_unaliased():
    a, b = scalar_model(1.0), scalar_model(3.0)
    out = average([a, b])
    out["w"].add_(100.0)
    assert weight(a) == 1.0 and weight(b) == 3.0
    single = average([a])
    single["w"].add_(100.0)
    assert weight(a) == 1.0


def test_average_names_a_missing_key():
    a = {"w": torch.zeros(2), "layer4.bias": torch.zeros(2)}
    b = {"w": torch.zeros(2)}
    with pytest.raises(StateDictMismatchError, match=r"layer4\.bias"):
        average([a, b])


def test_average_names_the_tensor_whose_shape_differs():
    a = {"w": torch.zeros(2), "head.weight": torch.zeros(3, 4)}
    b = {"w": torch.zeros(2), "head.weight": torch.zeros(5, 4)}
    with pytest.raises(StateDictMismatchError, match=r"head\.weight.*\(5, 4\).*\(3, 4\)"):
        average([a, b])


def test_average_names_the_tensor_whose_dtype_differs():
    with pytest.raises(StateDictMismatchError, match=r"'w'.*float16"):
        average([scalar_model(1.0, torch.float32), scalar_model(1.0, torch.float16)])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, -1.0], "non-negative"),
        ([0.0, 0.0], "sum to 0"),
        ([1.0, float("nan")], "finite"),
        ([1.0], "more state dicts than the 1 weights"),
        ([1.0, 1.0, 1.0], "got 2 state dicts but 3 weights"),
    ],
)
def test_average_rejects_bad_weights(weights, message):
    states = (scalar_model(v) for v in (1.0, 2.0))  # a generator: the length is unknown
    with pytest.raises(ValueError, match=message):
        average(states, weights=weights)


def test_average_names_a_value_that_is_not_a_tensor():
    first = {"w": torch.zeros(1), "step": torch.tensor(3)}
    with pytest.raises(StateDictMismatchError, match=r"'step'.*int, not a tensor"):
        average([first, {"w": torch.zeros(1), "step": 3}])
    with pytest.raises(StateDictMismatchError, match=r"'step'.*int, not a tensor"):
        average([{"w": torch.zeros(1), "step": 3}])


def test_average_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no state dicts"):
        average(iter([]))


# --- greedy_soup --------------------------------------------------------------------------


def run_greedy(values: list[float], val_scores: list[float], score_of):
    """Greedy soup of scalar models; returns the result and the soup weights evaluated."""
    seen: list[float] = []

    def evaluate(state_dict) -> float:
        seen.append(weight(state_dict))
        return score_of(weight(state_dict))

    loaders = [lambda v=v: scalar_model(v) for v in values]
    return greedy_soup(loaders, val_scores, evaluate), seen


def test_greedy_soup_orders_by_val_score_and_keeps_only_improving_candidates():
    score = lambda w: -abs(w - 2.0)  # noqa: E731 - the "ID-val accuracy" of a soup of weight w
    values = [10.0, 3.0, 1.0, 2.5, 3.7]
    val_scores = [score(v) for v in values]  # -8, -1, -1, -0.5, -1.7
    result, seen = run_greedy(values, val_scores, score)
    # order: 3 (-0.5), 1 and 2 (tie -1, list order), 4 (-1.7), 0 (-8); soup {3}, best -0.5
    # +1: (2.5+3)/2 = 2.75 -> -0.75 < -0.5 rejected
    # +2: (2.5+1)/2 = 1.75 -> -0.25 >= -0.5 kept, best -0.25
    # +4: (3.5+3.7)/3 = 2.4 -> -0.4 < -0.25 rejected (it beats the initial best, not the current)
    # +0: (3.5+10)/3 = 4.5 -> -2.5 rejected
    assert seen == pytest.approx([2.75, 1.75, 2.4, 4.5])
    assert isinstance(result, GreedySoup)
    assert result.selected == (3, 2)
    assert result.score == pytest.approx(-0.25)
    assert weight(result.state_dict) == pytest.approx(1.75)


def test_greedy_soup_accepts_ties():
    result, seen = run_greedy([1.0, 3.0, 8.0], [0.5, 0.5, 0.5], lambda w: 0.5)
    assert seen == [2.0, 4.0]  # (1+3)/2, (1+3+8)/3
    assert result.selected == (0, 1, 2)
    assert result.score == 0.5
    assert weight(result.state_dict) == 4.0


def test_greedy_soup_rejects_a_candidate_just_below_the_best():
    result, _ = run_greedy([1.0, 3.0], [0.5, 0.4], lambda w: 0.5 - 1e-12)
    assert result.selected == (0,)
    assert result.score == 0.5
    assert weight(result.state_dict) == 1.0


def test_greedy_soup_of_one_model_returns_it_with_its_stored_score_unevaluated():
    result, seen = run_greedy([7.0], [0.9], lambda w: pytest.fail("evaluate must not be called"))
    assert seen == []
    assert result.selected == (0,) and result.score == 0.9 and weight(result.state_dict) == 7.0


def test_greedy_soup_calls_each_loader_once_and_evaluate_m_minus_1_times():
    calls = [0] * 6
    evaluations = [0]

    def make_loader(i: int):
        def load():
            calls[i] += 1
            return scalar_model(float(i))

        return load

    def evaluate(state_dict) -> float:
        evaluations[0] += 1
        return float(evaluations[0] % 2)  # alternate reject/accept

    greedy_soup([make_loader(i) for i in range(6)], [0.1 * i for i in range(6)], evaluate)
    assert calls == [1] * 6
    assert evaluations[0] == 5


def test_greedy_soup_never_holds_more_than_three_state_dicts():
    shape = (5, 7)  # distinctive: only this test's model tensors have it

    def live_model_tensors() -> int:
        return sum(
            1
            for o in gc.get_objects()
            if type(o) is torch.Tensor and tuple(o.shape) == shape and o.device.type != "meta"
        )

    counts: list[int] = []

    def make_loader(i: int):
        def load():
            counts.append(live_model_tensors())
            return {"w": torch.full(shape, float(i), dtype=torch.float64)}

        return load

    def evaluate(state_dict) -> float:
        counts.append(live_model_tensors())  # running sum + candidate + trial soup
        return 1.0  # accept everything: the soup keeps growing

    result = greedy_soup([make_loader(i) for i in range(8)], [1.0] * 8, evaluate)
    assert result.selected == tuple(range(8))
    assert torch.all(result.state_dict["w"] == 3.5)  # mean of 0..7
    assert len(counts) == 8 + 7
    assert max(counts) <= 3


def test_greedy_soup_takes_integer_buffers_from_the_best_model():
    def load(value: float, batches: int):
        return lambda: {"w": torch.tensor([value]), "n": torch.tensor(batches)}

    result = greedy_soup([load(1.0, 11), load(3.0, 22)], [0.2, 0.9], lambda sd: 1.0)
    assert result.selected == (1, 0)
    assert result.state_dict["n"].item() == 22
    assert result.state_dict["w"].item() == 2.0


def test_greedy_soup_names_the_mismatched_tensor_and_loader():
    loaders = [
        lambda: {"w": torch.zeros(2), "fc.weight": torch.zeros(3)},
        lambda: {"w": torch.zeros(2), "fc.weight": torch.zeros(4)},
    ]
    with pytest.raises(StateDictMismatchError, match=r"fc\.weight.*loader 1"):
        greedy_soup(loaders, [0.9, 0.8], lambda sd: 1.0)


@pytest.mark.parametrize(
    ("n_loaders", "scores", "message"),
    [
        (2, [0.5], "2 loaders but 1 val_scores"),
        (0, [], "at least one"),
        (2, [0.5, math.nan], "nan"),
    ],
)
def test_greedy_soup_rejects_bad_arguments(n_loaders, scores, message):
    with pytest.raises(ValueError, match=message):
        greedy_soup([lambda: scalar_model(1.0)] * n_loaders, scores, lambda sd: 1.0)


def test_greedy_soup_rejects_a_nan_score_from_evaluate():
    with pytest.raises(ValueError, match="evaluate returned nan"):
        run_greedy([1.0, 2.0], [0.9, 0.8], lambda w: math.nan)


# --- fusing_weights / interpolate ------------------------------------------------------------


def test_fusing_weights_are_softmax_of_uniform_kappa():
    kappa = np.random.default_rng(123).uniform(0.0, 4.0, size=5)  # the same draws, by hand
    expected = [math.exp(k) / sum(math.exp(j) for j in kappa) for k in kappa]
    got = fusing_weights(5, 4.0, np.random.default_rng(123))
    assert got.shape == (5,)
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_fusing_weights_ratios_stay_within_exp_spread():
    got = fusing_weights(1000, 4.0, np.random.default_rng(0))
    assert got.sum() == pytest.approx(1.0)
    # lambda_i / lambda_j = exp(kappa_i - kappa_j) with kappa in [0, 4)
    assert got.max() / got.min() <= math.exp(4.0)
    assert got.max() / got.min() > math.exp(3.5)  # 1000 draws cover most of U(0, 4)


def test_fusing_weights_with_zero_spread_are_uniform():
    assert fusing_weights(4, 0.0, np.random.default_rng(0)).tolist() == [0.25] * 4


@pytest.mark.parametrize(
    ("n", "spread", "rng", "message"),
    [
        (0, 4.0, np.random.default_rng(0), "positive integer"),
        (3, -1.0, np.random.default_rng(0), "spread"),
        (3, 4.0, 42, "numpy.random.Generator"),
    ],
)
def test_fusing_weights_reject_bad_input(n, spread, rng, message):
    with pytest.raises(ValueError, match=message):
        fusing_weights(n, spread, rng)


def test_fusing_weights_drive_a_weighted_average():
    lam = fusing_weights(3, 4.0, np.random.default_rng(7))
    out = average([scalar_model(1.0), scalar_model(10.0), scalar_model(100.0)], weights=lam)
    assert weight(out) == pytest.approx(lam[0] * 1.0 + lam[1] * 10.0 + lam[2] * 100.0, rel=1e-12)


def test_interpolate_mixes_floating_tensors_and_keeps_integers_from_a():
    a = {"w": torch.tensor([0.0, 10.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 20.0]), "n": torch.tensor(9)}
    out = interpolate(a, b, 0.25)  # 0.75 * a + 0.25 * b
    assert out["w"].tolist() == [1.0, 12.5]
    assert out["n"].item() == 3


def test_interpolate_hits_both_endpoints_exactly_in_bf16():
    a = {"w": torch.tensor([0.1, -3.3], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([7.7, 2.9], dtype=torch.bfloat16)}
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    assert interpolate(a, b, 0.5)["w"].dtype == torch.bfloat16


def test_interpolate_rejects_nan_lambda_and_mismatched_shapes():
    with pytest.raises(ValueError, match="finite"):
        interpolate(scalar_model(0.0), scalar_model(1.0), math.nan)
    with pytest.raises(StateDictMismatchError, match="'w'"):
        interpolate(scalar_model(0.0), {"w": torch.zeros(2, dtype=torch.float64)}, 0.5)
