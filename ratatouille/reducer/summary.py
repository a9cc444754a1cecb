"""The comparison table over cells (test domain, split seed), as in the paper's Table 1.

:func:`summarize` gives one row per strategy (Table 1's order) and, per test domain, the mean
and the **standard error** (``std / sqrt(n)`` over split seeds, as DomainBed's tables) of the OOD
accuracy, plus an ``avg`` column (the mean over test domains, as Table 1's last column).
:func:`long_form` is the tidy frame for CSV; :func:`format_table` renders the summary as
Markdown, in percent, labelled "mean ± s.e.".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas

from ratatouille.reducer.strategies import TABLE_ORDER

AVG = "avg"
#: The error-bar statistic of the summary: standard error of the mean over split seeds.
SE = "se"
#: How tables and plots label the error bars.
SE_LABEL = "± s.e. over split seeds"
_COLUMNS = ["test_domain", "split_seed", "strategy", "ood_acc", "id_val_acc", "n_models"]


def long_form(
    results: Mapping[tuple[str, int], Any], dagger: pandas.DataFrame | None = None
) -> pandas.DataFrame:
    """One row per (test_domain, split_seed, strategy): ood_acc, id_val_acc, n_models.

    ``dagger``: the ``uniform†`` rows of :func:`ratatouille.reducer.reduce.reduce_domain_dagger`
    (split_seed -1: every split at once), appended as they are."""
    frames = []
    for (domain, seed), result in results.items():
        table = result.table[["strategy", "ood_acc", "id_val_acc", "n_models"]].copy()
        table.insert(0, "split_seed", int(seed))
        table.insert(0, "test_domain", str(domain))
        frames.append(table)
    if dagger is not None and not dagger.empty:
        frames.append(dagger[_COLUMNS])
    if not frames:
        return pandas.DataFrame(columns=_COLUMNS)
    return pandas.concat(frames, ignore_index=True)[_COLUMNS]


def _ordered(values: list[str], order: tuple[str, ...]) -> list[str]:
    rank = {name: i for i, name in enumerate(order)}
    return sorted(values, key=lambda v: (rank.get(v, len(rank)), v))


def standard_error(values: Any) -> float:
    """``std(ddof=1) / sqrt(n)``, nan for fewer than two values (DomainBed's error bars)."""
    array = np.asarray(values, dtype=float)
    if len(array) < 2:
        return float("nan")
    return float(array.std(ddof=1) / np.sqrt(len(array)))


def _avg_se(long: pandas.DataFrame, strategy: str, domains: list[str]) -> float:
    """S.e. over seeds of the per-seed domain average, when every domain has the same seeds
    (DomainBed averages the test domains within each trial seed, then over seeds)."""
    rows = long[long.strategy == strategy]
    seeds = {d: set(rows[rows.test_domain == d].split_seed) for d in domains}
    common = set.intersection(*seeds.values())
    if any(s != common for s in seeds.values()) or len(common) < 2:
        return float("nan")
    per_seed = rows.groupby("split_seed").ood_acc.mean()
    return standard_error(per_seed.to_numpy())


def summarize(
    results: Mapping[tuple[str, int], Any], dagger: pandas.DataFrame | None = None
) -> pandas.DataFrame:
    """Strategies x (test domain, stat) with stat in ("mean", "se"), OOD accuracy in [0, 1].

    ``results`` maps ``(test_domain, split_seed)`` to a ``ReduceResult``. ``se`` is the
    standard error over split seeds, ``std(ddof=1) / sqrt(n)``, nan with one seed. ``avg``
    averages the domain means (nan unless the strategy exists in every domain). Domains keep
    their first order of appearance in ``results``. ``dagger`` adds the ``uniform†`` rows: one
    value per test domain, so no error bar.
    """
    if not results:
        raise ValueError("summarize needs at least one reduced cell; run the reducer first")
    return summarize_long(long_form(results, dagger))


def summarize_long(long: pandas.DataFrame) -> pandas.DataFrame:
    """:func:`summarize` from its tidy :func:`long_form` (e.g. read back from a CSV)."""
    if long.empty:
        raise ValueError("summarize needs at least one reduced cell; run the reducer first")
    domains = list(dict.fromkeys(str(domain) for domain in long.test_domain))
    strategies = _ordered(list(dict.fromkeys(long.strategy)), TABLE_ORDER)
    grouped = long.groupby(["strategy", "test_domain"]).ood_acc
    means, errors = grouped.mean(), grouped.agg(standard_error)
    columns = pandas.MultiIndex.from_product([[*domains, AVG], ["mean", SE]])
    index = pandas.Index(strategies, name="strategy")
    frame = pandas.DataFrame(index=index, columns=columns, dtype=float)
    for strategy in strategies:
        for domain in domains:
            if (strategy, domain) in means.index:
                frame.loc[strategy, (domain, "mean")] = means[(strategy, domain)]
                frame.loc[strategy, (domain, SE)] = errors[(strategy, domain)]
        domain_means = frame.loc[strategy, [(d, "mean") for d in domains]].to_numpy(dtype=float)
        if not np.isnan(domain_means).any():
            frame.loc[strategy, (AVG, "mean")] = float(domain_means.mean())
            frame.loc[strategy, (AVG, SE)] = _avg_se(long, strategy, domains)
    return frame


def _cell(mean: float, error: float) -> str:
    if np.isnan(mean):
        return "-"
    text = f"{100 * mean:.1f}"
    return text if np.isnan(error) else f"{text} ± {100 * error:.1f}"


def format_table(summary: pandas.DataFrame) -> str:
    """Markdown table of :func:`summarize`'s frame, accuracies in percent (Table 1's style),
    under a caption naming the error bars."""
    domains = list(dict.fromkeys(summary.columns.get_level_values(0)))
    header = ["strategy", *domains]
    lines = [
        f"OOD accuracy (%), mean {SE_LABEL} (std / sqrt(n))",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * len(header)) + "|",
    ]
    for strategy, row in summary.iterrows():
        cells = [_cell(float(row[(d, "mean")]), float(row[(d, SE)])) for d in domains]
        lines.append("| " + " | ".join([str(strategy), *cells]) + " |")
    return "\n".join(lines)
