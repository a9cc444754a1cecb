"""Merge methods beyond averaging (ratatouille.merging.merges) against hand-computed oracles."""

from __future__ import annotations

import math

import pytest
import torch

from ratatouille.merging.merges import (
    _BLOCK,
    MagnitudeTrim,
    RandomDrop,
    dare,
    elect_signs,
    fisher_average,
    kth_largest_magnitudes,
    model_stock,
    model_stock_ratio,
    task_arithmetic,
    task_vector_sums,
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


def test_kth_magnitudes_of_several_densities_come_from_one_selection():
    tau = torch.tensor([4.0, -1.0, 2.0, -2.0, 3.0, -3.0, 0.5, 3.0])
    # by hand: magnitudes sorted 4, 3, 3, 3, 2, 2, 1, 0.5; k = ceil(density * 8)
    densities = [0.1, 0.25, 0.5, 0.75, 1.0, 0.5]
    assert kth_largest_magnitudes(tau, densities) == [4.0, 3.0, 3.0, 2.0, 0.5, 3.0]
    # and against torch's top-k, an independent route, on a tensor with many ties
    g = torch.Generator().manual_seed(5)
    wide = torch.randint(-50, 51, (10_001,), generator=g).float() / 8
    grid = [0.01, 0.1, 0.2, 0.5, 0.9]
    expected = [float(wide.abs().topk(math.ceil(d * wide.numel())).values[-1]) for d in grid]
    assert kth_largest_magnitudes(wide, grid) == expected


def test_ties_over_a_grid_of_densities_equals_one_merge_per_density():
    g = torch.Generator().manual_seed(11)
    base = {"a": torch.randn(300, generator=g), "b": torch.randn(7, 5, generator=g)}
    runs = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(4)]
    grid = [0.1, 0.3, 0.5, 1.0]
    together = ties_merging(base, _counted(runs)[0], {d: MagnitudeTrim(d) for d in grid})
    for d in grid:
        alone = ties_merging(base, _counted(runs)[0], {d: MagnitudeTrim(d)})
        for key, merged in together.merge(d, 1.0).items():
            assert torch.equal(merged, alone.merge(d, 1.0)[key]), (d, key)


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
    assert calls == [1, 1, 1]  # one pass: each run read once


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
    # 16-bit draws: p = 0.7 drops below round(0.7 * 65536) = 45875, so it keeps 19661 / 65536
    torch.testing.assert_close(kept, torch.full_like(kept, 2.0 * 65536 / 19661))
    assert kept.numel() / tau.numel() == pytest.approx(0.3, abs=0.005)
    assert float(dropped.mean()) == pytest.approx(2.0, rel=0.02)
    # over many seeds every entry's mean tends to its own value, sign included
    small = torch.tensor([1.0, -3.0, 0.5])
    mean = torch.stack([RandomDrop(0.5, seed=s)(0, "w", small) for s in range(4000)]).mean(0)
    torch.testing.assert_close(mean, small, atol=0.15, rtol=0.05)


def test_dare_refuses_a_drop_rate_that_drops_everything_at_16_bits():
    assert RandomDrop(0.99).rescale == 65536 / (65536 - 64881)
    with pytest.raises(ValueError, match="DARE drop rate"):
        RandomDrop(0.999995)  # rounds to 65536 of 65536 levels


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


def test_fused_dare_sums_equal_the_sparsifier_route_across_blocks_keys_and_rates():
    """dare() fuses task vector, draw, mask and add per block of a tensor; the sums must be
    those of task_vector_sums with RandomDrop sparsifiers (one draw per whole tensor)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"big": (2 * _BLOCK + 7,), "conv": (3, 5, 2, 2), "bias": (1,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["half"] = torch.randn(5, generator=g).to(torch.bfloat16)  # float32 accumulators
    base["count"] = torch.tensor(3)
    runs = [
        {
            k: (v + torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for _ in range(3)
    ]
    fused = dare(base, _counted(runs)[0], [0.0, 0.3, 0.6], seed=5)
    route = task_vector_sums(
        base, _counted(runs)[0], {p: RandomDrop(p, 5) for p in (0.0, 0.3, 0.6)}
    )
    for p in (0.0, 0.3, 0.6):
        for key, merged in fused.mean(0.7, p).items():
            torch.testing.assert_close(merged, route.mean(0.7, p)[key])
    # p = 0 keeps every entry: the plain average of the task vectors
    plain = task_arithmetic(base, _counted(runs)[0]).mean(0.7)
    torch.testing.assert_close(fused.mean(0.7, 0.0)["big"], plain["big"])


def test_dare_ties_elects_signs_over_the_randomly_dropped_task_vectors():
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


# -- the diagonal Fisher (engine) and the strategies on the reducer's tiny sweep ----------------


def test_diagonal_fisher_is_the_mean_squared_per_example_gradient_of_a_plain_loop():
    from torch.utils.data import TensorDataset

    from ratatouille.engine.fisher import diagonal_fisher
    from reduce_sweep import DIM, build_model

    model = build_model()
    gen = torch.Generator().manual_seed(0)
    domains = [TensorDataset(torch.randn(10, DIM, generator=gen), torch.zeros(10).long())] * 2
    fisher = diagonal_fisher(model, model.state_dict(), domains, n_batches=2, batch_size=3, seed=5)
    # by hand: the first 2 batches of 3 of each domain, a label drawn from the model's softmax
    # with the same seeded generator, one backward pass per example
    plain, draw, seen = build_model().eval(), torch.Generator().manual_seed(5), 0
    hand = {k: torch.zeros_like(p) for k, p in plain.named_parameters()}
    for dataset in domains:
        for start in (0, 3):
            x = dataset.tensors[0][start : start + 3]
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(plain(x), -1), 1, generator=draw)[:, 0]
            for xi, yi in zip(x, y):
                plain.zero_grad()
                torch.log_softmax(plain(xi[None]), -1)[0, yi].backward()
                for k, p in plain.named_parameters():
                    hand[k] += p.grad**2
                seen += 1
    assert seen == 12 and set(fisher) == set(hand)
    for key, value in hand.items():
        torch.testing.assert_close(fisher[key], value / seen, rtol=1e-4, atol=1e-7)


MERGE_GRID = dict(
    task_arithmetic_lambdas=[0.2, 0.5],
    ties_densities=[0.3],
    ties_lambdas=[1.0],
    dare_drop_rates=[0.3],
    fisher_batches=1,
)


@pytest.fixture(scope="module")
def merged_cell():
    from torch.utils.data import TensorDataset

    from ratatouille.core.config import MergesConfig
    from ratatouille.reducer.reduce import ReduceSettings, reduce_cell
    from reduce_sweep import build_sweep, make_inputs

    sweep = build_sweep()
    settings = ReduceSettings(
        ablation_draws=1,
        max_pairs=0,
        ablation_points=2,
        n_lambdas=2,
        merges=MergesConfig(**MERGE_GRID),
    )
    inputs = make_inputs(sweep, settings=settings)
    inputs.id_train = [TensorDataset(x, y) for x, y in sweep["train"]]
    return sweep, inputs, reduce_cell(inputs)


def _row(result, strategy):
    rows = result.table[result.table.strategy == strategy]
    assert len(rows) == 1, f"{strategy} appears {len(rows)} times"
    return rows.iloc[0]


def _hand_theta(sweep, arm, delta):
    """theta_0 + delta(task vectors of the arm's runs), by plain loops over the state dict."""
    from reduce_sweep import runs_of

    base = sweep["pt_lp"]
    states = [state for _, state, _ in runs_of(sweep, arm)]
    out = {}
    for key, value in base.items():
        if value.is_floating_point():
            taus = [s[key].double() - value.double() for s in states]
            out[key] = (value.double() + delta(taus)).float()
        else:
            out[key] = states[0][key].clone()
    return out


def test_merge_rows_follow_each_arms_greedy_soup_for_every_averaging_arm(merged_cell):
    _, _, result = merged_cell
    names = list(result.table.strategy)
    for arm, greedy in (
        ("soups", "soup_greedy"),
        ("ratatouille", "ratatouille_greedy"),
        ("robust_ratatouille", "robust_ratatouille_greedy"),
    ):
        at = names.index(greedy)
        expected = [
            f"{m}_{arm}" for m in ("task_arithmetic", "ties", "dare", "model_stock", "fisher")
        ]
        assert names[at + 1 : at + 6] == expected
    assert not any(n.endswith("_fusing") for n in names)  # fusing is not an averaging arm


def test_task_arithmetic_lambda_is_chosen_on_id_val_and_scored_once_on_ood(merged_cell):
    from reduce_sweep import hand_acc

    sweep, _, result = merged_cell
    for arm in ("soups", "ratatouille"):
        by_lambda = {
            lam: _hand_theta(sweep, arm, lambda taus, lam=lam: lam * sum(taus))
            for lam in (0.2, 0.5)
        }
        val = {lam: hand_acc(state, sweep["val"]) for lam, state in by_lambda.items()}
        best = 0.2 if val[0.2] >= val[0.5] else 0.5  # the first of equal scores
        row = _row(result, f"task_arithmetic_{arm}")
        assert row.params == {"lambda": best} and "lambda=" in row.selection
        assert row.id_val_acc == pytest.approx(val[best], abs=1e-9)
        assert row.ood_acc == pytest.approx(hand_acc(by_lambda[best], [sweep["ood"]]), abs=1e-9)


def test_model_stock_row_is_the_ratio_of_hand_computed_pairwise_angles(merged_cell):
    import itertools

    from reduce_sweep import hand_acc

    sweep, _, result = merged_cell

    def stock(taus):
        norms = [float(t.norm()) for t in taus]
        if sum(n > 0 for n in norms) < 2:
            return sum(taus) / len(taus)
        cos = [
            float((a * b).sum()) / (float(a.norm()) * float(b.norm()))
            for a, b in itertools.combinations(taus, 2)
        ]
        c, k = max(sum(cos) / len(cos), 0.0), len(taus)
        return k * c / (1 + (k - 1) * c) * sum(taus) / k

    state = _hand_theta(sweep, "soups", stock)
    row = _row(result, "model_stock_soups")
    assert 0.0 < row.params["t_mean"] <= 1.0
    assert row.ood_acc == pytest.approx(hand_acc(state, [sweep["ood"]]), abs=1e-9)


def test_merge_rows_and_their_chosen_values_reach_the_table_the_metrics_and_mlflow(
    merged_cell, tmp_path
):
    from ratatouille.orchestration.reporting import reduce_metrics
    from ratatouille.reducer.merges import params_text
    from ratatouille.reducer.reduce import format_table, long_form, summarize
    from ratatouille.tracking.store import Tracker
    from tiny import tiny_config

    _, _, result = merged_cell
    results = {("d2", 0): result}
    table = format_table(summarize(results))
    assert "| ties_ratatouille |" in table and "| fisher_robust_ratatouille |" in table
    metrics = reduce_metrics(results)
    ties = _row(result, "ties_soups")
    assert ties.params == {"density": 0.3, "lambda": 1.0}
    assert metrics["ood_acc/ties_soups"] == pytest.approx(ties.ood_acc)
    assert metrics["id_val_acc/dare_ratatouille"] == _row(result, "dare_ratatouille").id_val_acc
    assert metrics["merge_param/dare_soups/p"] == 0.3
    assert metrics["merge_param/fisher_soups/fisher_batches"] == 1.0
    assert "- d2-split0 ties_soups: density=0.3, lambda=1" in params_text(results)

    config = tiny_config(tmp_path)
    tracker = Tracker("merges", config.tracking.mlflow_uri, entry_point="ratatouille run")
    tracker.start_parent(str(tmp_path / "run-1"), config.model_dump(mode="json"))
    run_id, wrote = tracker.log_reduction(metrics, long_form(results), {}, {"report.md": table})
    logged = tracker.client.get_run(run_id).data.metrics
    assert wrote and logged["ood_acc/model_stock_robust_ratatouille"] == pytest.approx(
        _row(result, "model_stock_robust_ratatouille").ood_acc
    )
    assert logged["merge_param/task_arithmetic_soups/lambda"] in (0.2, 0.5)
    comparison = tracker.client.load_table(tracker.experiment_id, "comparison.json", [run_id])
    assert {"task_arithmetic_soups", "fisher_ratatouille"} <= set(comparison.strategy)


def test_reduce_merges_is_off_by_default_and_its_grids_are_checked():
    from ratatouille.core.config import ConfigError, parse_config

    minimal = {"name": "exp", "data": {"dataset": "digits"}, "aux": {"tasks": ["digits_aux_a"]}}
    assert parse_config(minimal).reduce.merges is None
    on = parse_config({**minimal, "reduce": {"merges": {}}}).reduce.merges
    assert on is not None and on.methods == [
        "task_arithmetic",
        "ties",
        "dare",
        "model_stock",
        "fisher",
    ]
    for bad, field in (
        ({"ties_densities": [0.0]}, "ties_densities"),
        ({"dare_drop_rates": [1.0]}, "dare_drop_rates"),
        ({"dare_drop_rates": [0.999995]}, "dare_drop_rates"),  # 2**16 of 2**16 levels
        ({"methods": ["slerp"]}, "methods"),
        ({"lambdas": [1.0]}, "lambdas"),
    ):
        with pytest.raises(ConfigError, match=f"reduce.merges.{field}"):
            parse_config({**minimal, "reduce": {"merges": bad}})
