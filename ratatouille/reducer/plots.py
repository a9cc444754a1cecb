"""Figures of the reducer's results (matplotlib, no display needed).

Figures are built with :class:`matplotlib.figure.Figure` directly, not ``pyplot``: nothing
global is created, so many figures in a long driver never leak, and no GUI backend is ever
touched (the Agg canvas renders PNGs). Every function returns the Figure; :func:`save_figures`
writes them all as PNG.

- :func:`plot_curves`: interpolation curves with Eq. (1)'s straight line dashed (Fig. 4, 17);
- :func:`plot_diversity_gain`: diversity vs gain of the pair average, per arm (Fig. 3c);
- :func:`plot_source_diversity`: same- vs different-source diversity, OOD and ID val (Fig. 3a,
  5d);
- :func:`plot_ablation_runs` / :func:`plot_ablation_sources`: accuracy vs M (Fig. 8) and vs
  the number of sources at fixed M (Fig. 6), with a +- std band over draws;
- :func:`plot_mixing`: accuracy vs the mixing ratio mu at fixed M (Fig. 3d) and ID-val vs OOD
  accuracy of the same mixes (Fig. 5b-c), mean +- s.e. over draws;
- :func:`plot_lmc_pairs`: every evaluated pair's gap to Eq. (1)'s line, OOD and ID val, with
  the mean over pairs +- s.e. (Fig. 4, 5a, 20, 21);
- :func:`plot_strategies`: OOD accuracy per strategy with its ID-val accuracy beside it.

Across cells (:func:`cross_cell_figures`): strategies with s.e. error bars over cells,
diversity vs gain of every cell's pairs, LMC verdicts counted over cells and pairs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ratatouille.core.arms import ARMS
from ratatouille.reducer.curves import CurveResult
from ratatouille.reducer.strategies import strategy_label

CURVE_TITLES = {
    "hypothesis_1": "Hypothesis 1 (auxiliary featurizers, shared w_lp)",
    "hypothesis_2": "Hypothesis 2 (target runs, two sources)",
    "three_weights": "Three weights (App. D.2)",
}


def _figure(width: float = 6.0, height: float = 4.0, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)  # an Agg canvas: savefig works without pyplot or a display
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _empty(fig: Figure, ax: Any, message: str) -> Figure:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return fig


def _color(arm: str) -> str:
    return ARMS[arm].color if arm in ARMS else "tab:gray"


_POOL_SUFFIX = re.compile(r"-[A-Za-z0-9_.]+-r\d+-[0-9a-f]{8}")


def short_label(text: str) -> str:
    """Pool entry names without their arch/run/hash suffix, so legends fit beside the axes."""
    return _POOL_SUFFIX.sub("", text)


def plot_curves(curves: Mapping[str, CurveResult], title: str = "") -> Figure:
    """One panel per curve: accuracy along lambda (solid) and Eq. (1)'s right side (dashed)."""
    fig, axes = _figure(4.5, 3.6, max(1, len(curves)))
    if not curves:
        return _empty(fig, axes[0], "no interpolation curve in this sweep")
    for ax, (name, curve) in zip(axes, curves.items()):
        ax.plot(
            curve.lambdas,
            curve.accuracies,
            "o-",
            color="tab:orange",
            label=short_label(curve.label),
        )
        ax.plot(
            curve.lambdas,
            curve.linear,
            "--",
            color="gray",
            label="linear interpolation of accuracies",
        )
        verdict = "holds" if curve.lmc_holds else f"breaks (gap {curve.worst_gap:+.3f})"
        ax.set_title(f"{CURVE_TITLES.get(name, name)}\nLMC {verdict}", fontsize=9)
        ax.set_xlabel("lambda")
        ax.set_ylabel("OOD test accuracy")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    if title:
        fig.suptitle(title)
    return fig


def plot_diversity_gain(
    points: pandas.DataFrame, measure: str = "q_diversity", title: str = ""
) -> Figure:
    """Fig. 3c: per pair, ``measure`` vs OOD gain of the weight average over the mean accuracy."""
    fig, (ax,) = _figure()
    if points.empty:
        return _empty(fig, ax, "no diversity-vs-gain pair evaluated")
    for arm, group in points.groupby("arm", sort=False):
        ax.scatter(group[measure], group["gain"], color=_color(str(arm)), label=str(arm), alpha=0.8)
    if len(points) >= 2 and points[measure].nunique() > 1:
        slope, intercept = np.polyfit(points[measure], points["gain"], 1)
        xs = np.linspace(points[measure].min(), points[measure].max(), 2)
        ax.plot(xs, slope * xs + intercept, ":", color="black", label=f"fit (slope {slope:.2f})")
    ax.axhline(0.0, color="gray", linewidth=0.5)
    ax.set_xlabel(measure.replace("_", "-"))
    ax.set_ylabel("acc(average of the pair) - mean acc (OOD)")
    ax.set_title(title or f"Diversity vs gain of weight averaging ({measure})")
    ax.legend(fontsize=8)
    return fig


def plot_source_diversity(
    frame: pandas.DataFrame, measure: str = "q_diversity", title: str = ""
) -> Figure:
    """Fig. 3a: mean pairwise diversity of same-source vs different-source pairs."""
    fig, (ax,) = _figure()
    if frame.empty:
        return _empty(fig, ax, "no recycling arm with pairs")
    split = frame["split"] if "split" in frame else pandas.Series(["ood_test"] * len(frame))
    labels = [
        f"{row.arm}\n{row.pairs.replace('_', ' ')}\n{where.replace('_', ' ')}"
        for row, where in zip(frame.itertuples(), split)
    ]
    colors = ["tab:blue" if p == "same_source" else "tab:orange" for p in frame.pairs]
    alphas = [1.0 if where == "ood_test" else 0.5 for where in split]
    bars = ax.bar(range(len(frame)), frame[measure], color=colors)
    for bar, alpha in zip(bars, alphas):
        bar.set_alpha(alpha)
    ax.set_xticks(range(len(frame)), labels, fontsize=7)
    ax.set_ylabel(f"mean pairwise {measure.replace('_', '-')}")
    ax.set_title(title or "Diversity: same vs different initialisation source")
    return fig


def _band_plot(frame: pandas.DataFrame, x: str, xlabel: str, title: str) -> Figure:
    fig, (ax,) = _figure()
    if frame.empty:
        return _empty(fig, ax, "no ablation in this sweep")
    for arm, group in frame.groupby("arm", sort=False):
        group = group.sort_values(x)
        mean, std = group["ood_acc_mean"].to_numpy(), group["ood_acc_std"].to_numpy()
        ax.plot(group[x], mean, "o-", color=_color(str(arm)), label=str(arm))
        ax.fill_between(group[x], mean - std, mean + std, color=_color(str(arm)), alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("OOD test accuracy (uniform average)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def plot_ablation_runs(frame: pandas.DataFrame, title: str = "") -> Figure:
    """Fig. 8: OOD accuracy of the uniform average vs the number of runs M (+- std over draws)."""
    return _band_plot(
        frame,
        "n_runs",
        "number of averaged runs M",
        title or "Uniform average of random subsets of runs",
    )


def plot_ablation_sources(frame: pandas.DataFrame, title: str = "") -> Figure:
    """Fig. 6: OOD accuracy vs the number of initialisation sources (pre-trained included), at
    a fixed number of averaged runs M, which the title states."""
    sizes = sorted({int(m) for m in frame["n_models"]}) if "n_models" in frame else []
    fixed = f"M = {', '.join(map(str, sizes))} runs at every point" if sizes else ""
    return _band_plot(
        frame,
        "n_sources",
        "number of sources (pre-trained included)",
        title
        or "Uniform average of M runs balanced over random subsets of sources\n"
        f"({fixed}: the run count of the one-source point)",
    )


def _mean_se(values: pandas.Series) -> tuple[float, float]:
    n = len(values)
    se = float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return float(values.mean()), se


def plot_mixing(frame: pandas.DataFrame, title: str = "") -> Figure:
    """Fig. 3d (OOD accuracy vs mu, +- s.e. over draws) and Fig. 5b-c (ID val vs OOD)."""
    fig, (left, right) = _figure(5.0, 3.8, 2)
    if frame.empty:
        return _empty(fig, left, "no ratatouille and soups arms to mix")
    stats = []
    for mu, group in frame.groupby("mu", sort=True):
        stats.append((float(mu), *_mean_se(group.ood_acc), *_mean_se(group.id_val_acc)))
    mus, ood, ood_se, idv, idv_se = (np.array(col) for col in zip(*stats))
    m = int(frame.n_models.iloc[0])
    left.errorbar(mus, ood, yerr=ood_se, fmt="o-", color=_color("ratatouille"), capsize=3)
    left.set_xlabel("mu (share of ratatouille runs among M)")
    left.set_ylabel("OOD test accuracy (uniform average)")
    left.set_title(f"Mixing ratatouille and soups runs, M = {m} (+- s.e.)", fontsize=9)
    points = right.scatter(idv, ood, c=mus, cmap="viridis")
    right.errorbar(idv, ood, xerr=idv_se, yerr=ood_se, fmt="none", ecolor="gray", alpha=0.5)
    fig.colorbar(points, ax=right, label="mu")
    right.set_xlabel("ID val accuracy")
    right.set_ylabel("OOD test accuracy")
    right.set_title("ID vs OOD accuracy of the same mixes", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


SPLIT_STYLE = {"ood_test": ("-", "tab:orange"), "id_val": ("--", "tab:blue")}


def plot_lmc_pairs(lmc: pandas.DataFrame, title: str = "") -> Figure:
    """Per hypothesis: each pair's gap ``acc(theta(l)) - linear(l)`` (thin), the mean over
    pairs (thick) +- s.e., on OOD test and ID val; >= -tolerance everywhere is Eq. (1)."""
    hypotheses = list(dict.fromkeys(lmc.hypothesis)) if not lmc.empty else []
    fig, axes = _figure(4.5, 3.6, max(1, len(hypotheses)))
    if not hypotheses:
        return _empty(fig, axes[0], "no LMC pair evaluated")
    for ax, hypothesis in zip(axes, hypotheses):
        rows = lmc[lmc.hypothesis == hypothesis]
        for split, group in rows.groupby("split", sort=False):
            style, color = SPLIT_STYLE.get(str(split), ("-", "gray"))
            gaps = np.array([list(g) for g in group.gaps])
            lambdas = np.array(group.lambdas.iloc[0])
            for line in gaps:
                ax.plot(lambdas, line, style, color=color, alpha=0.25, linewidth=0.8)
            mean = gaps.mean(axis=0)
            se = gaps.std(axis=0, ddof=1) / np.sqrt(len(gaps)) if len(gaps) > 1 else 0 * mean
            held = int(group.lmc_holds.sum())
            label = f"{split} ({held}/{len(group)} hold)"
            ax.plot(lambdas, mean, style, color=color, linewidth=2, label=label)
            ax.fill_between(lambdas, mean - se, mean + se, color=color, alpha=0.15)
        ax.axhline(-float(rows.tolerance.iloc[0]), color="red", linewidth=0.6, linestyle=":")
        ax.axhline(0.0, color="gray", linewidth=0.5)
        ax.set_title(CURVE_TITLES.get(hypothesis, hypothesis), fontsize=9)
        ax.set_xlabel("lambda")
        ax.set_ylabel("accuracy - linear interpolation")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def plot_strategies(table: pandas.DataFrame, title: str = "") -> Figure:
    """Bars of OOD accuracy per strategy, with the ID-val accuracy as a second, lighter bar."""
    fig, (ax,) = _figure(max(6.0, 0.7 * len(table)), 4.2)
    if table.empty:
        return _empty(fig, ax, "no strategy")
    xs = np.arange(len(table))
    ax.bar(xs - 0.2, table["ood_acc"], width=0.4, label="OOD test", color="tab:orange")
    ax.bar(xs + 0.2, table["id_val_acc"], width=0.4, label="ID val", color="tab:blue", alpha=0.5)
    ax.set_xticks(
        xs,
        [strategy_label(name) for name in table["strategy"]],
        rotation=45,
        ha="right",
        fontsize=8,
    )
    low = float(min(table["ood_acc"].min(), table["id_val_acc"].min()))
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.set_ylabel("accuracy")
    ax.set_title(title or "Strategies: OOD test and ID validation accuracy")
    ax.legend(fontsize=8)
    return fig


def figures(result: Any) -> dict[str, Figure]:
    """Every figure of one ``ReduceResult``, by file stem."""
    where = f" ({result.test_domain}, split {result.split_seed})" if result.test_domain else ""
    return {
        "strategies": plot_strategies(result.table, f"Strategies{where}"),
        "interpolation": plot_curves(result.curves, f"Linear mode connectivity{where}"),
        "diversity_gain": plot_diversity_gain(result.gain_points),
        "source_diversity": plot_source_diversity(result.source_diversity),
        "ablation_runs": plot_ablation_runs(result.ablation_runs),
        "ablation_sources": plot_ablation_sources(result.ablation_sources),
        "mixing": plot_mixing(getattr(result, "mixing", pandas.DataFrame())),
        "lmc_pairs": plot_lmc_pairs(getattr(result, "lmc", pandas.DataFrame())),
    }


def _concat(frames: list[pandas.DataFrame]) -> pandas.DataFrame:
    frames = [f for f in frames if not f.empty]
    return pandas.concat(frames, ignore_index=True) if frames else pandas.DataFrame()


def plot_strategies_over_cells(results: Mapping[Any, Any], title: str = "") -> Figure:
    """Mean OOD accuracy per strategy over cells, error bars = standard error over cells."""
    long = _concat([r.table[["strategy", "ood_acc"]] for r in results.values()])
    fig, (ax,) = _figure(max(6.0, 0.7 * long.strategy.nunique() if not long.empty else 6), 4.2)
    if long.empty:
        return _empty(fig, ax, "no strategy")
    names = list(dict.fromkeys(long.strategy))
    stats = [_mean_se(long[long.strategy == name].ood_acc) for name in names]
    counts = [int((long.strategy == name).sum()) for name in names]
    xs = np.arange(len(names))
    means, ses = (np.array(col) for col in zip(*stats))
    ax.bar(xs, means, yerr=ses, capsize=4, color="tab:orange")
    ax.set_xticks(xs, [strategy_label(n) for n in names], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(max(0.0, float((means - ses).min()) - 0.1), 1.0)
    ax.set_ylabel(f"OOD test accuracy, mean +- s.e. over cells (n = {max(counts)})")
    ax.set_title(title or f"Strategies over {len(results)} cells")
    return fig


def plot_lmc_verdicts(results: Mapping[Any, Any], title: str = "") -> Figure:
    """Stacked bars per (hypothesis, split): how many curves hold / break over cells and pairs."""
    lmc = _concat([getattr(r, "lmc", pandas.DataFrame()) for r in results.values()])
    fig, (ax,) = _figure()
    if lmc.empty:
        return _empty(fig, ax, "no LMC pair evaluated")
    counts = lmc.groupby(["hypothesis", "split"], sort=True).lmc_holds.agg(["sum", "count"])
    labels = [f"{h.replace('_', ' ')}\n{s.replace('_', ' ')}" for h, s in counts.index]
    held = counts["sum"].to_numpy(dtype=float)
    broken = counts["count"].to_numpy(dtype=float) - held
    xs = np.arange(len(counts))
    ax.bar(xs, held, color="tab:green", label="LMC holds")
    ax.bar(xs, broken, bottom=held, color="tab:red", label="LMC breaks")
    ax.set_xticks(xs, labels, fontsize=8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("curves (cells x pairs)")
    ax.set_title(title or f"LMC verdicts over {len(results)} cells")
    ax.legend(fontsize=8)
    return fig


def cross_cell_figures(results: Mapping[Any, Any]) -> dict[str, Figure]:
    """The figures across cells, by file stem (prefix ``all_cells_``)."""
    points = _concat([r.gain_points for r in results.values()])
    n = len(results)
    return {
        "all_cells_strategies": plot_strategies_over_cells(results),
        "all_cells_diversity_gain": plot_diversity_gain(
            points, title=f"Diversity vs gain of weight averaging, {n} cells"
        ),
        "all_cells_lmc_verdicts": plot_lmc_verdicts(results),
    }


def save_figures(result: Any, out_dir: str | Path, dpi: int = 100) -> dict[str, Path]:
    """Write :func:`figures` as ``<out_dir>/<name>.png``; returns the paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figures(result).items():
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=dpi)
    return paths
