"""Merge methods beyond averaging (ratatouille.merging.merges) against hand-computed oracles."""

from __future__ import annotations

import math

import pytest
import torch

from ratatouille.merging.merges import (
    MagnitudeTrim,
    RandomDrop,
    dare,
    elect_signs,
    fisher_average,
    model_stock,
    model_stock_ratio,
    task_arithmetic,
    ties_merging,
)
from ratatouille.merging.soups import StateDictMismatchError


def _counted(states):
    """Loaders over ``states`` and the number of calls of each."""
    calls = [0] * len(states)

    def make(i):
        def load():
            calls[i] += 1
            return {k: v.clone() for k, v in states[i].items()}

        return load

    return [make(i) for i in range(len(states))], calls


def _runs(base, taus, extra=None):
    """States ``theta_0 + tau`` (key ``w``), with a non-floating buffer ``n``."""
    return [
        {"w": base["w"] + torch.tensor(t), "n": torch.tensor(i + 7)} for i, t in enumerate(taus)
    ]


BASE = {"w": torch.tensor([10.0, 20.0, 30.0, 40.0]), "n": torch.tensor(0)}


def test_task_arithmetic_is_theta_0_plus_lambda_times_the_summed_task_vectors():
    loaders, calls = _counted(_runs(BASE, [[1.0, 2.0, 0.0, -1.0], [3.0, -2.0, 1.0, 1.0]]))
    sums = task_arithmetic(BASE, loaders)
    merged = sums.task_arithmetic(0.5)
    torch.testing.assert_close(merged["w"], torch.tensor([12.0, 20.0, 30.5, 40.0]))
    assert merged["n"].item() == 7  # the first run's non-floating tensor
    # lambda = 1/M is the uniform soup
    torch.testing.assert_close(sums.mean(1.0)["w"], torch.tensor([12.0, 20.0, 30.5, 40.0]))
    assert calls == [1, 1]


def test_magnitude_trim_keeps_every_entry_tied_with_the_kth_largest():
    tau = torch.tensor([4.0, -1.0, 2.0, -2.0])
    # density 0.5 of 4 entries: k = 2; the 2nd largest magnitude is 2, shared by two entries
    assert MagnitudeTrim(0.5)(0, "w", tau).tolist() == [4.0, 0.0, 2.0, -2.0]
    # ceil: 0.1 of 4 entries keeps one
    assert MagnitudeTrim(0.1)(0, "w", tau).tolist() == [4.0, 0.0, 0.0, 0.0]
    assert MagnitudeTrim(1.0)(0, "w", tau).tolist() == tau.tolist()
    with pytest.raises(ValueError, match="density"):
        MagnitudeTrim(0.0)


def test_ties_trims_elects_signs_and_averages_only_the_agreeing_entries():
    taus = [[4.0, -1.0, 2.0, 2.0], [-4.0, 3.0, -1.0, 1.0], [1.0, 1.0, -3.0, 0.0]]
    loaders, calls = _counted(_runs(BASE, taus))
    merge = ties_merging(BASE, loaders, {0.5: MagnitudeTrim(0.5)})
    # by hand, density 0.5 (k = 2 of 4, ties kept):
    #   trimmed run 0 [4, 0, 2, 2] (2 tied with 2), run 1 [-4, 3, 0, 0], run 2 [1, 1, -3, 0]
    #   sums [1, 4, -1, 2] -> signs [+, +, -, +]
    #   agreeing means [(4 + 1)/2, (3 + 1)/2, -3/1, 2/1]
    expected = torch.tensor([2.5, 2.0, -3.0, 2.0])
    torch.testing.assert_close(merge.merge(0.5, 1.0)["w"], BASE["w"] + expected)
    torch.testing.assert_close(merge.merge(0.5, 0.4)["w"], BASE["w"] + 0.4 * expected)
    assert calls == [2, 2, 2]  # two passes, each run read twice


def test_sign_election_resolves_a_zero_sum_to_the_tensors_majority_sign():
    assert elect_signs(torch.tensor([0.0, 2.0, 5.0, -1.0])).tolist() == [1, 1, 1, -1]
    assert elect_signs(torch.tensor([0.0, -2.0, -5.0, 1.0])).tolist() == [-1, -1, -1, 1]
    assert elect_signs(torch.tensor([0.0, 2.0, -5.0])).tolist() == [0, 1, -1]  # majority 0
    # in a merge: entry 0 sums to 0, the others to +2: entry 0 takes +, so only run 0 agrees
    taus = [[2.0, 1.0, 1.0, 1.0], [-2.0, 1.0, 1.0, 1.0]]
    merge = ties_merging(BASE, _counted(_runs(BASE, taus))[0], {1: MagnitudeTrim(1.0)})
    torch.testing.assert_close(merge.merge(1, 1.0)["w"], BASE["w"] + torch.tensor([2.0, 1, 1, 1]))


def test_dare_rescales_kept_entries_so_the_expectation_is_the_task_vector():
    tau = torch.full((200_000,), 2.0)
    dropped = RandomDrop(0.7, seed=3)(0, "w", tau)
    kept = dropped[dropped != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 2.0 / 0.3))  # 1 / (1 - p)
    assert kept.numel() / tau.numel() == pytest.approx(0.3, abs=0.005)
    assert float(dropped.mean()) == pytest.approx(2.0, rel=0.02)
    # over many seeds every entry's mean tends to its own value, sign included
    small = torch.tensor([1.0, -3.0, 0.5])
    mean = torch.stack([RandomDrop(0.5, seed=s)(0, "w", small) for s in range(4000)]).mean(0)
    torch.testing.assert_close(mean, small, atol=0.15, rtol=0.05)


def test_dare_draws_are_seeded_per_run_and_tensor_and_nested_across_rates():
    tau = torch.arange(1.0, 1001.0)
    first = RandomDrop(0.5, seed=1)(2, "w", tau)
    assert torch.equal(first, RandomDrop(0.5, seed=1)(2, "w", tau))
    assert not torch.equal(first, RandomDrop(0.5, seed=2)(2, "w", tau))
    assert not torch.equal(first, RandomDrop(0.5, seed=1)(3, "w", tau))
    assert not torch.equal(first, RandomDrop(0.5, seed=1)(2, "v", tau))
    wider = RandomDrop(0.8, seed=1)(2, "w", tau)
    assert torch.all((wider == 0) | (first != 0))  # kept at p = 0.8 implies kept at p = 0.5


def test_dare_average_is_theta_0_plus_the_mean_of_the_rescaled_task_vectors():
    runs = _runs(BASE, [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 2.0, 2.0]])
    loaders, calls = _counted(runs)
    merged = dare(BASE, loaders, [0.5], seed=0).mean(1.0, 0.5)
    drop = RandomDrop(0.5, seed=0)
    hand = (drop(0, "w", runs[0]["w"] - BASE["w"]) + drop(1, "w", runs[1]["w"] - BASE["w"])) / 2
    torch.testing.assert_close(merged["w"], BASE["w"] + hand)
    assert calls == [1, 1]


def test_dare_ties_keeps_the_same_random_mask_in_both_passes():
    runs = _runs(BASE, [[1.0, 2.0, 3.0, 4.0], [-1.0, 5.0, -2.0, 2.0], [2.0, -1.0, 1.0, -3.0]])
    drop = RandomDrop(0.5, seed=4)
    kept = [drop(i, "w", r["w"] - BASE["w"]) for i, r in enumerate(runs)]
    signs = torch.sign(sum(kept))
    agree = [torch.where((torch.sign(k) == signs) & (k != 0), k, 0.0) for k in kept]
    count = sum((a != 0).double() for a in agree).clamp(min=1)
    expected = sum(agree) / count
    merge = ties_merging(BASE, _counted(runs)[0], {"dare": drop})
    torch.testing.assert_close(merge.merge("dare", 1.0)["w"], BASE["w"] + expected.float())


def test_model_stock_ratio_for_known_angles():
    assert model_stock_ratio(2, 0.5) == pytest.approx(2 / 3)  # 60 degrees, two runs
    assert model_stock_ratio(3, 0.5) == pytest.approx(0.75)
    assert model_stock_ratio(5, 1.0) == 1.0  # parallel task vectors: the plain average
    assert model_stock_ratio(5, 0.0) == 0.0 and model_stock_ratio(5, -0.3) == 0.0  # theta_0


def test_model_stock_reads_the_angle_between_task_vectors_per_tensor():
    base = {"w": torch.zeros(3), "b": torch.ones(2), "bn": torch.full((2,), 5.0)}
    # task vectors of "w" at 60 degrees pairwise (unit vectors (e1+e2), (e1+e3), (e2+e3) / sqrt 2)
    # with lengths 1, 2 and 4: the angle, not the length, sets t
    w = [torch.tensor([1.0, 1, 0]), torch.tensor([1.0, 0, 1]), torch.tensor([0.0, 1, 1])]
    w = [v / math.sqrt(2) * s for v, s in zip(w, (1.0, 2.0, 4.0))]
    b = [torch.tensor([1.0, 0]), torch.tensor([0.0, 2.0]), torch.tensor([3.0, 0])]  # cos 1, 0, 0
    runs = [{"w": w[i], "b": 1 + b[i], "bn": torch.full((2,), 5.0)} for i in range(3)]
    loaders, calls = _counted(runs)
    stock = model_stock(base, loaders)
    assert stock.cosines["w"] == pytest.approx(0.5)
    assert stock.ratios["w"] == pytest.approx(0.75)
    assert stock.cosines["b"] == pytest.approx(1 / 3)
    t_b = 3 * (1 / 3) / (1 + 2 * (1 / 3))
    assert stock.ratios["b"] == pytest.approx(t_b)
    torch.testing.assert_close(stock.state_dict["w"], 0.75 * sum(w) / 3)
    torch.testing.assert_close(stock.state_dict["b"], 1 + t_b * sum(b) / 3)
    # a tensor equal in every run (a frozen BN statistic) has no angle and stays theta_0's
    torch.testing.assert_close(stock.state_dict["bn"], base["bn"])
    assert math.isnan(stock.cosines["bn"]) and calls == [1, 1, 1]


def test_fisher_weights_reduce_to_the_uniform_average_for_equal_fishers():
    states = [{"w": torch.tensor([1.0, 4.0]), "rm": torch.tensor([2.0]), "n": torch.tensor(3)}]
    states.append({"w": torch.tensor([3.0, 0.0]), "rm": torch.tensor([6.0]), "n": torch.tensor(9)})
    same = {"w": torch.tensor([0.7, 2.0])}
    merged = fisher_average((s, same) for s in states)
    torch.testing.assert_close(merged["w"], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(merged["rm"], torch.tensor([4.0]))  # no Fisher: uniform
    assert merged["n"].item() == 3  # non-floating: the first run's
    # unequal Fishers: (3 * 1 + 1 * 3) / 4 and (0 * 4 + 2 * 0) floored -> uniform of 4 and 0
    fishers = [{"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([1.0, 0.0])}]
    merged = fisher_average(zip(states, fishers))
    torch.testing.assert_close(merged["w"], torch.tensor([1.5, 2.0]))


def test_merges_refuse_a_run_of_another_architecture_naming_the_tensor():
    other = {"w": torch.zeros(5), "n": torch.tensor(0)}
    with pytest.raises(StateDictMismatchError, match="'w' has shape"):
        task_arithmetic(BASE, [lambda: other])
    with pytest.raises(StateDictMismatchError, match="Fisher of 'w'"):
        fisher_average([(BASE, {"w": torch.ones(2)})])
    with pytest.raises(ValueError, match="at least one run"):
        model_stock(BASE, [])
