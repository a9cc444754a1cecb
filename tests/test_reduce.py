"""The reducer on a tiny real sweep (tests/reduce_sweep.py): every number is recomputed here by
an independent route (plain forward passes, plain loops over state dicts)."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch

from ratatouille.engine.models import join_state
from ratatouille.engine.train import predict_logits
from ratatouille.reducer.evaluate import Evaluator, OODSealedError
from ratatouille.reducer.reduce import (
    ReduceError,
    ReduceSettings,
    format_table,
    reduce_cell,
    summarize,
)
from reduce_sweep import (
    build_model,
    build_sweep,
    fingerprint,
    hand_acc,
    hand_average,
    hand_logits,
    make_inputs,
    runs_of,
)

torch.set_num_threads(1)

# Table 1's rows top to bottom (App. E's robust rows last), written out by hand.
TABLE_1_ORDER = (
    "erm",
    "wise_ft",
    "ensemble_soups",
    "soup_uniform",
    "soup_greedy",
    "inter_training",
    "ensemble_ratatouille",
    "fusing",
    "ratatouille_uniform",
    "ratatouille_greedy",
    "robust_inter_training",
    "robust_ratatouille_uniform",
    "robust_ratatouille_greedy",
)


@pytest.fixture(scope="module")
def sweep():
    return build_sweep()


@pytest.fixture(scope="module")
def reduced(sweep):
    log, loads, calls = [], {}, []

    def counting_predict(model, dataset, **kwargs):
        calls.append((fingerprint(model.state_dict()), id(dataset)))
        return predict_logits(model, dataset, **kwargs)

    inputs = make_inputs(sweep, log=log, loads=loads, predict=counting_predict)
    return dict(result=reduce_cell(inputs), inputs=inputs, log=log, loads=loads, calls=calls)


def _row(result, strategy):
    rows = result.table[result.table.strategy == strategy]
    assert len(rows) == 1, f"{strategy} appears {len(rows)} times"
    return rows.iloc[0]


def _ood(sweep):
    return [sweep["ood"]]


def test_table_lists_every_strategy_in_table1_order_with_accuracies_in_unit_interval(reduced):
    table = reduced["result"].table
    assert list(table.strategy) == list(TABLE_1_ORDER)
    assert table.ood_acc.between(0, 1).all() and table.id_val_acc.between(0, 1).all()
    assert (table.n_models == table.members.map(len)).all()
    assert reduced["result"].final_strategy in ("ratatouille_uniform", "ratatouille_greedy")


def test_erm_is_the_ood_accuracy_of_the_best_id_val_soups_run(sweep, reduced):
    runs = runs_of(sweep, "soups")
    scores = [hand_acc(state, sweep["val"]) for _, state, _ in runs]
    best = int(np.argmax(scores))  # argmax: the first of equal scores
    row = _row(reduced["result"], "erm")
    assert row.members == [runs[best][0]]
    assert row.ood_acc == pytest.approx(hand_acc(runs[best][1], _ood(sweep)), abs=1e-9)


def test_inter_training_picks_among_runs_not_started_from_the_pretrained_model(sweep, reduced):
    runs = [r for r in runs_of(sweep, "ratatouille") if r[2] != "pretrained"]
    scores = [hand_acc(state, sweep["val"]) for _, state, _ in runs]
    row = _row(reduced["result"], "inter_training")
    assert row.members == [runs[int(np.argmax(scores))][0]]


def test_ensemble_averages_logits_and_differs_from_the_soup_of_the_same_runs(sweep, reduced):
    states = [state for _, state, _ in runs_of(sweep, "soups")]
    result = reduced["result"]
    for split, domains in (("ood_acc", _ood(sweep)), ("id_val_acc", sweep["val"])):
        ensemble = float(
            np.mean(
                [
                    (torch.stack([hand_logits(s, x) for s in states]).mean(0).argmax(1) == y)
                    .double()
                    .mean()
                    for x, y in domains
                ]
            )
        )
        soup = hand_acc(hand_average(states), domains)
        assert _row(result, "ensemble_soups")[split] == pytest.approx(ensemble, abs=1e-9)
        assert _row(result, "soup_uniform")[split] == pytest.approx(soup, abs=1e-9)
        assert ensemble != soup


def _hand_greedy(runs, val):
    scores = [hand_acc(state, val) for _, state, _ in runs]
    order = sorted(range(len(runs)), key=lambda i: -scores[i])
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        trial = hand_acc(hand_average([runs[j][1] for j in [*chosen, i]]), val)
        if trial >= best:
            chosen, best = [*chosen, i], trial
    return [runs[i][0] for i in chosen], hand_average([runs[j][1] for j in chosen])


@pytest.mark.parametrize(
    "arm,strategy",
    [
        ("ratatouille", "ratatouille_greedy"),
        ("soups", "soup_greedy"),
        ("robust_ratatouille", "robust_ratatouille_greedy"),
    ],
)
def test_greedy_members_match_a_plain_loop_recomputation_on_id_val(sweep, reduced, arm, strategy):
    members, state = _hand_greedy(runs_of(sweep, arm), sweep["val"])
    row = _row(reduced["result"], strategy)
    assert row.members == members
    assert row.ood_acc == pytest.approx(hand_acc(state, _ood(sweep)), abs=1e-9)


def test_wise_ft_is_the_accuracy_of_hand_interpolated_weights(sweep, reduced):
    erm_id = _row(reduced["result"], "erm").members[0]
    alpha = reduced["inputs"].settings.wise_alpha
    wise = hand_average([sweep["states"][erm_id], sweep["pt_lp"]], [1 - alpha, alpha])
    expected = hand_acc(wise, _ood(sweep))
    assert _row(reduced["result"], "wise_ft").ood_acc == pytest.approx(expected, abs=1e-9)


def test_final_model_is_the_ratatouille_soup_with_higher_id_val(sweep, reduced):
    result = reduced["result"]
    uniform, greedy = _row(result, "ratatouille_uniform"), _row(result, "ratatouille_greedy")
    higher = greedy.id_val_acc > uniform.id_val_acc
    expected = "ratatouille_greedy" if higher else "ratatouille_uniform"
    assert result.final_strategy == expected
    members = _row(result, expected).members
    hand = hand_average([sweep["states"][m] for m in members])
    for key, value in hand.items():
        torch.testing.assert_close(result.final_model_state[key], value)


def test_at_most_four_of_the_thirteen_run_states_are_alive_at_once(reduced):
    loads = dict(reduced["loads"])
    peak = loads.pop("peak_alive")
    # the three-weight curve holds three runs while the returned final model (which may be one
    # run's state, as a one-model greedy soup) is alive; soups stream one run at a time
    assert 1 <= peak <= 4
    assert len(loads) == 13 and sum(loads.values()) > 13  # runs were reloaded, not kept


def test_evaluator_refuses_ood_reads_before_selection_is_final(sweep):
    inputs = make_inputs(sweep)
    ev = Evaluator(build_model, inputs.id_val, inputs.ood_test)
    run = inputs.runs[0]
    with pytest.raises(OODSealedError, match="before selection"):
        ev.run_logits(run.run_id, run.load_state, "ood_test")
    ev.open_ood()
    assert len(ev.run_logits(run.run_id, run.load_state, "ood_test")[0]) == len(sweep["ood"][1])


def test_ood_is_read_only_after_every_id_val_read(reduced):
    log = reduced["log"]
    assert "ood_test" in log and "id_val" in log
    first_ood = log.index("ood_test")
    # selection reads only ID val; the analysis phase (after every decision) reads ID val again
    # for Fig. 5 and 20-21, which the sealed evaluator allows
    assert first_ood > 0 and set(log[:first_ood]) == {"id_val"}


def test_selection_is_unchanged_when_ood_labels_are_shuffled(sweep, reduced):
    labels = sweep["ood"][1]
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(5))]
    settings = ReduceSettings(ablation_draws=1, max_pairs=0, ablation_points=2, n_lambdas=2)
    other = reduce_cell(make_inputs(sweep, ood_labels=shuffled, settings=settings))
    base = reduced["result"]
    assert other.final_strategy == base.final_strategy
    assert list(other.table.members) == list(base.table.members)
    assert list(other.table.id_val_acc) == list(base.table.id_val_acc)
    assert list(other.table.ood_acc) != list(base.table.ood_acc)  # the shuffle reached scoring


def test_each_run_is_predicted_once_per_dataset(sweep, reduced):
    calls = reduced["calls"]
    datasets = [id(d) for d in reduced["inputs"].id_val + reduced["inputs"].ood_test]
    for run_id, state in sweep["states"].items():
        run_print = fingerprint(state)
        for dataset in datasets:
            assert calls.count((run_print, dataset)) == 1, run_id


def test_arm_diversity_is_the_mean_over_pairs_of_hand_counted_q_and_ratio_error(sweep, reduced):
    x, y = sweep["ood"]
    runs = runs_of(sweep, "ratatouille")
    right = [(hand_logits(s, x).argmax(1) == y).numpy() for _, s, _ in runs]
    qs, ratios = [], []
    for a, b in itertools.combinations(right, 2):
        n11, n00 = int(np.sum(a & b)), int(np.sum(~a & ~b))
        n10, n01 = int(np.sum(a & ~b)), int(np.sum(~a & b))
        qs.append(1 - (n11 * n00 - n01 * n10) / (n11 * n00 + n01 * n10))
        ratios.append((n01 + n10) / n00)
    diversity = reduced["result"].diversity
    row = diversity[diversity.split == "ood_test"].set_index("arm").loc["ratatouille"]
    assert row.q_diversity == pytest.approx(np.mean(qs))
    assert row.ratio_error == pytest.approx(np.mean(ratios))
    assert row.n_models == 5


def test_gain_point_is_accuracy_of_pair_average_minus_mean_of_their_accuracies(sweep, reduced):
    points = reduced["result"].gain_points
    arms = {"soups", "ratatouille", "fusing", "robust_ratatouille"}
    assert len(points) == 6 and set(points.arm) == arms  # max_pairs=6, round-robin over arms
    for point in points.itertuples():
        a, b = sweep["states"][point.run_i], sweep["states"][point.run_j]
        singles = (hand_acc(a, _ood(sweep)) + hand_acc(b, _ood(sweep))) / 2
        expected = hand_acc(hand_average([a, b]), _ood(sweep)) - singles
        assert point.gain == pytest.approx(expected, abs=1e-9)


def test_hypothesis_2_curve_interpolates_best_runs_of_the_first_two_sources(sweep, reduced):
    curve = reduced["result"].curves["hypothesis_2"]
    runs = runs_of(sweep, "ratatouille")
    a = max((r for r in runs if r[2] == "aux_a"), key=lambda r: hand_acc(r[1], sweep["val"]))
    b = next(r for r in runs if r[2] == "aux_b")
    assert curve.endpoints == {"theta_a": a[0], "theta_b": b[0]}
    assert len(curve.lambdas) == 11 and curve.lambdas[3] == pytest.approx(0.3)
    for k in (0, 3, 10):
        lam = curve.lambdas[k]
        expected = hand_acc(hand_average([a[1], b[1]], [1 - lam, lam]), _ood(sweep))
        assert curve.accuracies[k] == pytest.approx(expected, abs=1e-9)
    start, end = curve.accuracies[0], curve.accuracies[-1]
    gaps = [
        acc - ((1 - lam) * start + lam * end) for lam, acc in zip(curve.lambdas, curve.accuracies)
    ]
    assert curve.lmc_holds == (min(gaps) >= -curve.tolerance)


def test_hypothesis_1_interpolates_pool_featurizers_under_the_linear_probe(sweep, reduced):
    curve = reduced["result"].curves["hypothesis_1"]
    assert curve.endpoints == {"phi_a": "aux_a", "phi_b": "aux_b"}
    phi = hand_average([sweep["pool"]["aux_a"], sweep["pool"]["aux_b"]], [0.5, 0.5])
    state = {**sweep["pt_lp"], **join_state(phi, sweep["w_lp"])}
    assert curve.accuracies[5] == pytest.approx(hand_acc(state, _ood(sweep)), abs=1e-9)


def test_three_weight_curve_starts_at_the_average_of_two_runs(sweep, reduced):
    curve = reduced["result"].curves["three_weights"]
    a, b, c = (sweep["states"][curve.endpoints[k]] for k in ("theta_a", "theta_b", "theta_c"))
    assert curve.accuracies[0] == pytest.approx(hand_acc(hand_average([a, b]), _ood(sweep)))
    assert curve.accuracies[-1] == pytest.approx(hand_acc(c, _ood(sweep)))


def test_curves_are_skipped_with_a_reason_when_the_pool_has_one_entry(sweep):
    settings = ReduceSettings(ablation_draws=1, max_pairs=0, ablation_points=2, n_lambdas=3)
    inputs = make_inputs(sweep, settings=settings)
    inputs.pool_featurizers = {"aux_a": inputs.pool_featurizers["aux_a"]}
    inputs.runs = [r for r in inputs.runs if r.arm == "soups"]
    result = reduce_cell(inputs)
    assert set(result.skipped) >= {"hypothesis_1", "hypothesis_2", "three_weights", "gain_points"}
    assert result.curves == {} and "pool" in result.skipped["hypothesis_1"]
    assert result.final_strategy in ("soup_uniform", "soup_greedy")
    assert set(result.table.strategy) == {
        "erm",
        "wise_ft",
        "ensemble_soups",
        "soup_uniform",
        "soup_greedy",
    }


def test_ablation_over_runs_spans_single_runs_to_the_full_uniform_soup(sweep, reduced):
    frame = reduced["result"].ablation_runs.set_index(["arm", "n_runs"])
    soups = [state for _, state, _ in runs_of(sweep, "soups")]
    singles = [hand_acc(s, _ood(sweep)) for s in soups]
    one = frame.loc[("soups", 1)]
    assert one.n_draws == 3 and one.ood_acc_mean == pytest.approx(np.mean(singles))
    assert one.ood_acc_std == pytest.approx(np.std(singles))
    full = frame.loc[("soups", 3)]
    assert full.n_draws == 1
    assert full.ood_acc_mean == pytest.approx(hand_acc(hand_average(soups), _ood(sweep)))
    assert sorted(frame.loc["ratatouille"].index) == [1, 2, 3, 4, 5]


def test_ablation_over_sources_holds_m_at_the_pretrained_runs_count(sweep, reduced):
    frame = reduced["result"].ablation_sources
    rat = frame[frame.arm == "ratatouille"].set_index("n_sources")
    # one run starts from the pre-trained model, which is in every subset: M = 1, so one
    # source is all a single run can come from (more sources would grow M: the confound)
    assert list(rat.index) == [1] and list(rat.n_models) == [1]
    pretrained = [s for _, s, src in runs_of(sweep, "ratatouille") if src == "pretrained"]
    assert rat.loc[1].ood_acc_mean == pytest.approx(hand_acc(pretrained[0], _ood(sweep)))


def test_source_diversity_splits_pairs_by_init_source(reduced):
    frame = reduced["result"].source_diversity
    assert set(frame.split) == {"ood_test", "id_val"}
    rat = frame[(frame.arm == "ratatouille") & (frame.split == "id_val")].set_index("pairs")
    assert rat.loc["same_source"].n_pairs == 1 and rat.loc["different_source"].n_pairs == 9


def test_summarize_gives_mean_and_std_over_split_seeds_in_table1_order(reduced):
    base = reduced["result"]
    cells = {}
    for domain, seed, shift in (("d2", 0, 0.0), ("d2", 1, 0.1), ("d0", 0, 0.05), ("d0", 1, -0.05)):
        result = copy.copy(base)
        result.table = base.table.assign(ood_acc=(base.table.ood_acc + shift).clip(0, 1))
        cells[(domain, seed)] = result
    summary = summarize(cells)
    assert list(summary.index) == list(TABLE_1_ORDER)
    erm = _row(base, "erm").ood_acc
    d2 = [min(max(erm + s, 0), 1) for s in (0.0, 0.1)]
    d0 = [min(max(erm + s, 0), 1) for s in (0.05, -0.05)]
    assert summary.loc["erm", ("d2", "mean")] == pytest.approx(np.mean(d2))
    assert summary.loc["erm", ("d2", "std")] == pytest.approx(np.std(d2, ddof=1))
    assert summary.loc["erm", ("avg", "mean")] == pytest.approx((np.mean(d2) + np.mean(d0)) / 2)
    per_seed = [(d2[0] + d0[0]) / 2, (d2[1] + d0[1]) / 2]
    assert summary.loc["erm", ("avg", "std")] == pytest.approx(np.std(per_seed, ddof=1))
    text = format_table(summary)
    assert text.splitlines()[0] == "| strategy | d2 | d0 | avg |"
    assert f"{100 * np.mean(d2):.1f} ± {100 * np.std(d2, ddof=1):.1f}" in text


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda i: setattr(i, "runs", []), "runs"),
        (lambda i: setattr(i.runs[0], "arm", "soup"), "arm"),
        (lambda i: setattr(i.runs[1], "run_id", i.runs[0].run_id), "appears twice"),
        (lambda i: setattr(i.settings, "wise_alpha", 1.5), "wise_alpha"),
        (lambda i: setattr(i.runs[0], "id_val_acc", math.nan), "id_val_acc"),
    ],
)
def test_bad_inputs_raise_one_error_naming_the_field(sweep, change, field):
    inputs = make_inputs(sweep)
    change(inputs)
    with pytest.raises(ReduceError, match=field):
        reduce_cell(inputs)
