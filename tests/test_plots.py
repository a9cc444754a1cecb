"""Figures: what each one draws, checked on hand-made results (no reducer run needed)."""

from __future__ import annotations

import numpy as np
import pandas
import pytest
from matplotlib.collections import PolyCollection

from ratatouille.reducer.curves import CurveResult
from ratatouille.reducer.plots import (
    cross_cell_figures,
    plot_ablation_runs,
    plot_ablation_sources,
    plot_curves,
    plot_diversity_gain,
    plot_lmc_pairs,
    plot_mixing,
    plot_strategies,
    plot_strategies_over_cells,
    save_figures,
)
from ratatouille.reducer.reduce import ReduceResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _curve(name: str = "hypothesis_2") -> CurveResult:
    lambdas = tuple(i / 10 for i in range(11))
    accs = tuple(0.6 + 0.1 * lam + 0.2 * lam * (1 - lam) for lam in lambdas)
    linear = tuple((1 - lam) * accs[0] + lam * accs[-1] for lam in lambdas)
    return CurveResult(
        name,
        lambdas,
        accs,
        linear,
        True,
        0.0,
        0.0,
        0.01,
        "aux_a to aux_b",
        {"theta_a": "r1", "theta_b": "r2"},
    )


def _result() -> ReduceResult:
    table = pandas.DataFrame(
        {
            "strategy": ["erm", "soup_uniform", "ratatouille_uniform"],
            "ood_acc": [0.6, 0.65, 0.7],
            "id_val_acc": [0.9, 0.91, 0.92],
            "n_models": [1, 3, 3],
            "members": [["a"], ["a", "b", "c"], ["d", "e", "f"]],
        }
    )
    gains = pandas.DataFrame(
        {
            "arm": ["soups", "ratatouille", "ratatouille"],
            "q_diversity": [0.1, 0.3, 0.5],
            "ratio_error": [1.0, 2.0, 3.0],
            "gain": [0.0, 0.01, 0.03],
        }
    )
    ablation = pandas.DataFrame(
        {
            "arm": ["soups"] * 3,
            "n_runs": [1, 2, 3],
            "ood_acc_mean": [0.6, 0.63, 0.65],
            "ood_acc_std": [0.02, 0.01, 0.0],
            "n_draws": [3, 3, 1],
        }
    )
    sources = pandas.DataFrame(
        {
            "arm": ["ratatouille"] * 2,
            "n_sources": [1, 2],
            "ood_acc_mean": [0.6, 0.7],
            "ood_acc_std": [0.0, 0.01],
            "n_draws": [1, 2],
            "n_models_mean": [1.0, 2.0],
        }
    )
    source_div = pandas.DataFrame(
        {
            "arm": ["ratatouille"] * 2,
            "pairs": ["same_source", "different_source"],
            "q_diversity": [0.2, 0.4],
            "ratio_error": [1.0, 1.5],
            "n_pairs": [1, 2],
        }
    )
    return ReduceResult(
        table=table,
        diversity=pandas.DataFrame(),
        source_diversity=source_div,
        gain_points=gains,
        curves={"hypothesis_2": _curve()},
        ablation_runs=ablation,
        ablation_sources=sources,
        final_model_state={},
        final_strategy="ratatouille_uniform",
        test_domain="art",
        split_seed=0,
    )


def test_interpolation_plot_draws_the_straight_line_between_endpoints_dashed():
    curve = _curve()
    ax = plot_curves({"hypothesis_2": curve, "hypothesis_1": _curve("hypothesis_1")}).axes[0]
    solid, dashed = ax.get_lines()
    assert dashed.get_linestyle() == "--" and solid.get_linestyle() == "-"
    ys = dashed.get_ydata()
    assert ys[0] == pytest.approx(curve.accuracies[0])
    assert ys[-1] == pytest.approx(curve.accuracies[-1])
    assert np.allclose(np.diff(ys), ys[1] - ys[0])  # a straight line
    assert list(solid.get_ydata()) == list(curve.accuracies)
    assert "LMC holds" in ax.get_title() and ax.get_xlabel() == "lambda" and ax.get_ylabel()


def test_ablation_plot_shades_mean_plus_minus_std():
    frame = _result().ablation_runs
    ax = plot_ablation_runs(frame).axes[0]
    band = next(c for c in ax.collections if isinstance(c, PolyCollection))
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.max() == pytest.approx(max(frame.ood_acc_mean + frame.ood_acc_std))
    assert ys.min() == pytest.approx(min(frame.ood_acc_mean - frame.ood_acc_std))
    assert ax.get_xlabel().startswith("number of averaged runs")


def test_strategies_plot_has_an_ood_and_an_id_val_bar_per_strategy():
    table = _result().table
    ax = plot_strategies(table).axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == sorted([*table.ood_acc, *table.id_val_acc])
    # the registry's labels (paper Table 1's row names), not the metric keys
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "Vanilla fine-tuning (ID val)",
        "Model soups (uniform)",
        "Model ratatouille (uniform)",
    ]


def test_diversity_gain_scatter_has_one_series_per_arm_and_a_least_squares_fit():
    ax = plot_diversity_gain(_result().gain_points).axes[0]
    assert len(ax.collections) == 2  # soups, ratatouille
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["soups", "ratatouille"] and labels[2].startswith("fit")
    fit = next(line for line in ax.get_lines() if line.get_linestyle() == ":")
    xs, ys = fit.get_xdata(), fit.get_ydata()
    # least squares by hand: cov(x, gain) / var(x) = 0.006 / 0.08 over the three points
    assert (ys[1] - ys[0]) / (xs[1] - xs[0]) == pytest.approx(0.075)
    assert ax.get_xlabel() == "q-diversity" and "gain" in ax.get_title().lower()


def test_save_figures_writes_one_png_per_figure_even_for_empty_frames(tmp_path):
    result = _result()
    result.curves = {}
    result.gain_points = result.gain_points.iloc[0:0]
    paths = save_figures(result, tmp_path / "figs")
    assert set(paths) == {
        "strategies",
        "interpolation",
        "diversity_gain",
        "source_diversity",
        "ablation_runs",
        "ablation_sources",
        "mixing",
        "lmc_pairs",
    }
    for path in paths.values():
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def _lmc() -> pandas.DataFrame:
    lambdas = (0.0, 0.5, 1.0)
    rows = []
    for split, mids in (("ood_test", (0.02, -0.04)), ("id_val", (0.01, 0.03))):
        for pair, mid in enumerate(mids):
            rows.append(
                {
                    "hypothesis": "hypothesis_2",
                    "split": split,
                    "pair": pair,
                    "lmc_holds": mid >= -0.01,
                    "worst_gap": min(mid, 0.0),
                    "tolerance": 0.01,
                    "lambdas": lambdas,
                    "gaps": (0.0, mid, 0.0),
                }
            )
    return pandas.DataFrame(rows)


def test_lmc_pairs_plot_draws_the_mean_gap_over_pairs_per_split_with_verdict_counts():
    ax = plot_lmc_pairs(_lmc()).axes[0]
    thick = {line.get_label(): line for line in ax.get_lines() if line.get_linewidth() == 2}
    assert set(thick) == {"ood_test (1/2 hold)", "id_val (2/2 hold)"}
    assert thick["ood_test (1/2 hold)"].get_ydata()[1] == pytest.approx((0.02 - 0.04) / 2)
    assert thick["id_val (2/2 hold)"].get_ydata()[1] == pytest.approx(0.02)
    assert thick["id_val (2/2 hold)"].get_linestyle() == "--"


def test_mixing_plot_errorbars_are_standard_errors_over_draws():
    frame = pandas.DataFrame(
        {
            "mu": [0.0, 0.5, 0.5, 1.0],
            "ood_acc": [0.6, 0.62, 0.66, 0.63],
            "id_val_acc": [0.9, 0.9, 0.92, 0.91],
            "n_models": [2, 2, 2, 2],
        }
    )
    fig = plot_mixing(frame)
    left = fig.axes[0]
    line = left.get_lines()[0]
    assert list(line.get_xdata()) == [0.0, 0.5, 1.0]
    assert line.get_ydata()[1] == pytest.approx(0.64)
    # the error bar at mu = 0.5: std(ddof=1) / sqrt(2) of (0.62, 0.66) = 0.02
    segments = left.collections[0].get_segments()
    low, high = segments[1][:, 1]
    assert (high - low) / 2 == pytest.approx(0.02)
    assert "M = 2" in left.get_title()


def test_sources_plot_says_which_fixed_m_it_averages():
    frame = _result().ablation_sources.assign(n_models=[4, 4])
    title = plot_ablation_sources(frame).axes[0].get_title()
    assert "M = 4 runs at every point" in title


def test_strategies_over_cells_have_standard_error_bars():
    first, second = _result(), _result()
    second.table = second.table.assign(ood_acc=[0.5, 0.75, 0.8])
    ax = plot_strategies_over_cells({("art", 0): first, ("art", 1): second}).axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([0.55, 0.7, 0.75])
    low, high = ax.collections[0].get_segments()[0][:, 1]  # erm: 0.6 and 0.5
    assert (high - low) / 2 == pytest.approx(np.std([0.6, 0.5], ddof=1) / np.sqrt(2))
    assert "s.e." in ax.get_ylabel() and "n = 2" in ax.get_ylabel()


def test_cross_cell_figures_count_lmc_verdicts_and_pool_every_cells_pairs():
    first, second = _result(), _result()
    first.lmc, second.lmc = _lmc(), _lmc()
    figures = cross_cell_figures({("art", 0): first, ("art", 1): second})
    assert set(figures) == {
        "all_cells_strategies",
        "all_cells_diversity_gain",
        "all_cells_lmc_verdicts",
    }
    verdicts = figures["all_cells_lmc_verdicts"].axes[0]
    labels = [t.get_text() for t in verdicts.get_xticklabels()]
    assert labels == ["hypothesis 2\nid val", "hypothesis 2\nood test"]
    held, broken = verdicts.patches[:2], verdicts.patches[2:]
    assert [p.get_height() for p in held] == [4, 2]  # over 2 cells x 2 pairs
    assert [p.get_height() for p in broken] == [0, 2]
    gain = figures["all_cells_diversity_gain"].axes[0]
    assert sum(len(c.get_offsets()) for c in gain.collections) == 6  # 3 pairs x 2 cells
