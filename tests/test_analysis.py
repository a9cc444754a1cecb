"""The analyses of Figs. 3-8 and the claims table on small synthetic inputs, each number
computed by hand; then the same analyses on the tiny real sweep of tests/reduce_sweep.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from ratatouille.reducer.ablations import (
    ablation_sources,
    balanced_quota,
    fixed_m_for_sources,
    mixing_ratio,
)
from ratatouille.reducer.claims import (
    HELD,
    NOT_COMPUTABLE,
    NOT_HELD,
    claims_metrics,
    claims_table,
    format_claims,
    slope_and_se,
)
from ratatouille.reducer.curves import source_task
from ratatouille.reducer.inputs import TargetRun
from ratatouille.reducer.reduce import ReduceSettings, reduce_cell
from reduce_sweep import build_sweep, hand_acc, hand_average, make_inputs, runs_of

torch.set_num_threads(1)


def _run(run_id: str, arm: str, source: str) -> TargetRun:
    return TargetRun(run_id, arm, source, 0.5, load_state=dict)


class FakeSoup:
    """Accuracy of a set of runs = the mean of hand-set per-run values; records every call."""

    def __init__(self, values: dict[str, float], id_val: dict[str, float] | None = None):
        self.values, self.id_val = values, id_val or values
        self.calls: list[tuple[tuple[str, ...], str]] = []

    def __call__(self, ids, split="ood_test"):
        self.calls.append((tuple(ids), split))
        table = self.values if split == "ood_test" else self.id_val
        return float(np.mean([table[i] for i in ids]))


PACS_0, PACS_1 = "PACS-resnet50-r0-0123abcd", "PACS-resnet50-r1-89abcdef"
VLCS_0 = "VLCS-hf-hub_timm_x-r0-fedcba98"


def test_pool_entries_of_one_auxiliary_task_are_one_source():
    assert source_task(PACS_0) == source_task(PACS_1) == "PACS"
    assert source_task(VLCS_0) == "VLCS"  # an arch name with dashes
    assert source_task(PACS_0 + "-ma") == "PACS"
    assert source_task("pretrained") == "pretrained" and source_task("aux_a") == "aux_a"


@pytest.mark.parametrize(
    "capacity,total,expected",
    [([4, 4, 4], 4, [2, 1, 1]), ([1, 5], 4, [1, 3]), ([2, 2], 4, [2, 2]), ([3], 2, [2])],
)
def test_balanced_quota_spreads_evenly_within_each_sources_runs(capacity, total, expected):
    assert balanced_quota(capacity, total) == expected


def test_balanced_quota_refuses_more_runs_than_the_sources_hold():
    with pytest.raises(ValueError, match="5 runs asked"):
        balanced_quota([2, 2], 5)


def test_fixed_m_is_the_base_sources_count_or_the_smallest_one():
    assert fixed_m_for_sources({"pretrained": 4, "PACS": 8, "VLCS": 2}, "pretrained") == 4
    assert fixed_m_for_sources({"PACS": 8, "VLCS": 2}, None) == 2


def _recycling_arm() -> list[TargetRun]:
    sources = ["pretrained", "pretrained", PACS_0, PACS_0, PACS_1, VLCS_0, VLCS_0, VLCS_0]
    return [_run(f"r{k}", "ratatouille", s) for k, s in enumerate(sources)]


def test_fig6_averages_exactly_m_runs_at_every_source_count_balanced_over_sources():
    runs = _recycling_arm()
    values = {r.run_id: 0.1 * k for k, r in enumerate(runs)}
    soup, skipped = FakeSoup(values), {}
    frame = ablation_sources({"ratatouille": runs}, soup, draws=4, seed=0, skipped=skipped)
    frame = frame.set_index("n_sources")
    assert "M = 2" in skipped["ablation_sources/ratatouille"]
    # pretrained (2 runs) is in every subset -> M = 2; 3 sources but M = 2 runs reach 2 of them
    assert list(frame.index) == [1, 2] and set(frame.n_models) == {2}
    source = {r.run_id: source_task(r.init_source) for r in runs}
    assert all(len(ids) == 2 for ids, _ in soup.calls)
    one, two = soup.calls[0], soup.calls[1:]
    assert one[0] == ("r0", "r1")  # the only one-source mix: both pre-trained runs
    assert frame.loc[1].ood_acc_mean == pytest.approx((0.0 + 0.1) / 2)
    assert frame.loc[1].n_draws == 1 and frame.loc[1].ood_acc_se == 0.0
    # two sources: one pre-trained run + one run of PACS or VLCS, one draw per source subset
    assert frame.loc[2].n_draws == 2
    for ids, _ in two:
        assert sum(source[i] == "pretrained" for i in ids) == 1
        assert {source[i] for i in ids} - {"pretrained"} <= {"PACS", "VLCS"}
    assert {frozenset(source[i] for i in ids) for ids, _ in two} == {
        frozenset({"pretrained", "PACS"}),
        frozenset({"pretrained", "VLCS"}),
    }
    accs = [np.mean([values[i] for i in ids]) for ids, _ in two]
    assert frame.loc[2].ood_acc_mean == pytest.approx(np.mean(accs))
    assert frame.loc[2].ood_acc_se == pytest.approx(np.std(accs, ddof=1) / math.sqrt(2))


def test_mixing_ratio_keeps_m_fixed_and_mixes_mu_m_ratatouille_runs():
    rat = [_run(f"rat{k}", "ratatouille", "PACS") for k in range(3)]
    soups = [_run(f"soup{k}", "soups", "pretrained") for k in range(2)]
    values = {**{r.run_id: 0.8 for r in rat}, **{r.run_id: 0.5 for r in soups}}
    id_val = {**{r.run_id: 0.9 for r in rat}, **{r.run_id: 0.95 for r in soups}}
    soup = FakeSoup(values, id_val)
    frame = mixing_ratio({"ratatouille": rat, "soups": soups}, soup, draws=5, points=3, seed=0)
    assert set(frame.n_models) == {2} and sorted(set(frame.mu)) == [0.0, 0.5, 1.0]
    for row in frame.itertuples():
        assert row.n_first + row.n_second == 2
        # the hand-set values: each ratatouille run 0.8 / 0.9, each soups run 0.5 / 0.95
        assert row.ood_acc == pytest.approx((0.8 * row.n_first + 0.5 * row.n_second) / 2)
        assert row.id_val_acc == pytest.approx((0.9 * row.n_first + 0.95 * row.n_second) / 2)
    # mu = 0: the two soups runs are the only mix, evaluated once
    assert len(frame[frame.mu == 0.0]) == 1
    assert len(frame[frame.mu == 1.0]) == 3  # C(3, 2) distinct pairs of ratatouille runs
    assert len(frame[frame.mu == 0.5]) == 5  # 5 draws among 3 x 2 distinct mixes
    for ids, _ in soup.calls:
        assert len(ids) == 2


def _cell(rat_q, soups_q, gains, lmc_holds, rat_acc, soups_acc):
    diversity = pd.DataFrame(
        {
            "arm": ["ratatouille", "soups", "ratatouille"],
            "q_diversity": [rat_q, soups_q, 9.0],  # the ID-val row must not be read
            "split": ["ood_test", "ood_test", "id_val"],
        }
    )
    gain_points = pd.DataFrame(gains, columns=["q_diversity", "gain"])
    lmc = pd.DataFrame(
        [
            {
                "hypothesis": h,
                "split": s,
                "lmc_holds": holds,
                "worst_gap": 0.0 if holds else -0.05,
                "tolerance": 0.01,
            }
            for h, s, holds in lmc_holds
        ]
    )
    table = pd.DataFrame(
        {"strategy": ["soup_uniform", "ratatouille_uniform"], "ood_acc": [soups_acc, rat_acc]}
    )
    return SimpleNamespace(diversity=diversity, gain_points=gain_points, lmc=lmc, table=table)


def _cells(flip: bool = False):
    sign = -1 if flip else 1
    holds = [("hypothesis_1", "ood_test", True), ("hypothesis_2", "id_val", True)]
    return {
        ("art", 0): _cell(
            0.5, 0.5 - sign * 0.2, [(0.0, 0.0), (1.0, sign * 1.0)], holds, 0.62, 0.60
        ),
        ("art", 1): _cell(
            0.4,
            0.4 - sign * 0.1,
            [(2.0, sign * 1.0)],
            [("hypothesis_1", "id_val", not flip), ("hypothesis_2", "ood_test", True)],
            0.60 + sign * 0.04 - 0.02,
            0.60,
        ),
    }


def test_claims_are_computed_with_hand_checked_numbers():
    table = claims_table(_cells()).set_index("claim")
    a = table.loc["a_diversity"]
    assert a.verdict == HELD and a.value == pytest.approx(0.15) and a.n == 2
    assert a.se == pytest.approx(np.std([0.2, 0.1], ddof=1) / math.sqrt(2))
    # points (0, 0), (1, 1), (2, 1): slope 1 / 2, residuals -1/6, 1/3, -1/6 -> s.e. sqrt(1/12)
    b = table.loc["b_diversity_gain"]
    assert b.verdict == HELD and b.value == pytest.approx(0.5) and b.n == 3
    assert b.se == pytest.approx(math.sqrt(1 / 12))
    assert table.loc["c_lmc_hypothesis_1"].verdict == HELD
    assert table.loc["c_lmc_hypothesis_1"].detail.startswith("2/2 curves hold")
    d = table.loc["d_ratatouille_vs_soups"]
    assert d.verdict == HELD and d.value == pytest.approx(0.02) and d.n == 2
    assert d.se == pytest.approx(0.0)  # both cells differ by exactly 0.02


def test_every_claims_verdict_flips_when_its_inputs_flip():
    table = claims_table(_cells(flip=True)).set_index("claim")
    assert table.loc["a_diversity"].verdict == NOT_HELD
    assert table.loc["a_diversity"].value == pytest.approx(-0.15)
    assert table.loc["b_diversity_gain"].verdict == NOT_HELD
    assert table.loc["b_diversity_gain"].value == pytest.approx(-0.5)
    c1 = table.loc["c_lmc_hypothesis_1"]
    assert c1.verdict == NOT_HELD and c1.value == pytest.approx(0.5)
    assert table.loc["c_lmc_hypothesis_2"].verdict == HELD
    d = table.loc["d_ratatouille_vs_soups"]
    assert d.verdict == NOT_HELD
    assert d.value == pytest.approx(np.mean([0.02, -0.06]))
    assert d.se == pytest.approx(np.std([0.02, -0.06], ddof=1) / math.sqrt(2))


def test_claims_without_their_inputs_say_not_computable_and_log_no_verdict():
    cells = _cells()
    for cell in cells.values():
        cell.table = cell.table[cell.table.strategy != "soup_uniform"]
        cell.lmc = pd.DataFrame()
    table = claims_table(cells).set_index("claim")
    assert table.loc["d_ratatouille_vs_soups"].verdict == NOT_COMPUTABLE
    assert table.loc["c_lmc_hypothesis_2"].verdict == NOT_COMPUTABLE
    metrics = claims_metrics(table.reset_index())
    assert "claims/d_ratatouille_vs_soups/held" not in metrics
    assert metrics["claims/d_ratatouille_vs_soups/n"] == 0
    assert metrics["claims/a_diversity/held"] == 1.0
    assert metrics["claims/b_diversity_gain/value"] == pytest.approx(0.5)
    text = format_claims(table.reset_index())
    assert "| not computable |" in text and text.count("\n") == 6


def test_slope_and_se_match_numpy_polyfit_with_covariance():
    rng = np.random.default_rng(3)
    x = rng.normal(size=12)
    y = 0.3 * x + rng.normal(scale=0.1, size=12)
    slope, se = slope_and_se(x, y)
    coef, cov = np.polyfit(x, y, 1, cov="unscaled")
    residuals = y - np.polyval(coef, x)
    assert slope == pytest.approx(coef[0])
    assert se == pytest.approx(math.sqrt(cov[0, 0] * np.sum(residuals**2) / (12 - 2)))


# -- the tiny real sweep ------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept():
    sweep = build_sweep()
    settings = ReduceSettings(ablation_draws=3, max_pairs=2, ablation_points=4, n_lambdas=3)
    return sweep, reduce_cell(make_inputs(sweep, settings=settings))


def test_mixing_at_mu_zero_is_the_uniform_soup_of_the_soups_arm(swept):
    sweep, result = swept
    soups = [state for _, state, _ in runs_of(sweep, "soups")]
    row = result.mixing[result.mixing.mu == 0.0].iloc[0]
    assert row.n_models == 3  # min(5 ratatouille runs, 3 soups runs)
    soup = hand_average(soups)
    assert row.ood_acc == pytest.approx(hand_acc(soup, [sweep["ood"]]))
    assert row.id_val_acc == pytest.approx(hand_acc(soup, sweep["val"]))


def test_lmc_pairs_run_on_both_splits_with_hand_checked_midpoints(swept):
    sweep, result = swept
    lmc = result.lmc
    assert set(lmc.split) == {"ood_test", "id_val"}
    h2 = lmc[lmc.hypothesis == "hypothesis_2"]
    assert h2.pair.nunique() >= 2  # several pairs, not one
    sources = {run_id: src for run_id, _, src in runs_of(sweep, "ratatouille")}
    for row in h2[h2.split == "id_val"].itertuples():
        assert sources[row.endpoint_a] != sources[row.endpoint_b]
        a, b = sweep["states"][row.endpoint_a], sweep["states"][row.endpoint_b]
        ends = [hand_acc(s, sweep["val"]) for s in (a, b)]
        middle = hand_acc(hand_average([a, b]), sweep["val"])
        assert row.gaps[1] == pytest.approx(middle - (ends[0] + ends[1]) / 2)
        assert row.gaps[0] == row.gaps[-1] == pytest.approx(0.0)
        assert row.lmc_holds == (min(row.gaps) >= -row.tolerance)


def test_diversity_is_reported_on_both_splits(swept):
    _, result = swept
    splits = result.diversity.groupby("arm").split.apply(set)
    assert all(s == {"ood_test", "id_val"} for s in splits)
