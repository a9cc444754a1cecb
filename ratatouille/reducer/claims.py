"""The paper's four qualitative claims, computed from reduced cells, never written by hand.

One row per claim, each with a verdict (``held`` / ``not held`` / ``not computable``), its
number, the standard error of that number (``std(ddof=1) / sqrt(n)``, or the slope's s.e. for
(b)) and the count it rests on:

- ``a_diversity``: different inits give more diverse runs (Sec. 4.2, Fig. 3a) -- per cell, the
  mean pairwise OOD q-diversity of the ``ratatouille`` arm minus the ``soups`` arm's; held iff
  the mean over cells is > 0;
- ``b_diversity_gain``: diversity predicts the gain of averaging (Fig. 3c) -- the least-squares
  slope of ``gain`` on q-diversity over every evaluated pair of every cell; held iff > 0;
- ``c_lmc_hypothesis_1`` / ``c_lmc_hypothesis_2``: the LMC of Eq. (1) holds (Sec. 4.3, Fig. 4,
  20, 21) -- held iff every evaluated pair holds, on OOD test and ID val, in every cell;
  the number is the fraction of curves that hold;
- ``d_ratatouille_vs_soups``: ratatouille (uniform) beats model soups (uniform) OOD (Table 1)
  -- per cell difference of OOD accuracy; held iff the mean over cells is > 0.

Pure pandas/numpy: a cell is anything with the :class:`ReduceResult` frames it reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas

HELD, NOT_HELD, NOT_COMPUTABLE = "held", "not held", "not computable"
COLUMNS = ["claim", "statement", "verdict", "value", "se", "n", "detail"]
STATEMENTS = {
    "a_diversity": "different inits give more diverse runs (q-diversity ratatouille - soups)",
    "b_diversity_gain": "diversity predicts the gain of averaging (slope of gain on q-diversity)",
    "c_lmc_hypothesis_1": "LMC holds for Hypothesis 1 (auxiliary featurizers, shared w_lp)",
    "c_lmc_hypothesis_2": "LMC holds for Hypothesis 2 (target runs from different sources)",
    "d_ratatouille_vs_soups": "ratatouille (uniform) beats model soups (uniform) OOD",
}
OOD = "ood_test"


def standard_error(values: Any) -> float:
    """``std(ddof=1) / sqrt(n)``; nan below two values (no spread to estimate)."""
    array = np.asarray(values, dtype=float)
    if len(array) < 2:
        return math.nan
    return float(np.std(array, ddof=1) / math.sqrt(len(array)))


def _row(claim: str, holds: bool | None, value: float, se: float, n: int, detail: str) -> dict:
    verdict = NOT_COMPUTABLE if holds is None else (HELD if holds else NOT_HELD)
    return {
        "claim": claim,
        "statement": STATEMENTS[claim],
        "verdict": verdict,
        "value": value,
        "se": se,
        "n": n,
        "detail": detail,
    }


def _mean_claim(claim: str, diffs: list[float], what: str) -> dict:
    if not diffs:
        return _row(claim, None, math.nan, math.nan, 0, f"no cell has {what}")
    mean, se = float(np.mean(diffs)), standard_error(diffs)
    spread = f"s.e. {se:.4f}" if math.isfinite(se) else "no s.e. from one cell"
    detail = f"mean {mean:+.4f} ({spread}) over {len(diffs)} cells"
    return _row(claim, mean > 0, mean, se, len(diffs), detail)


def _arm_diversity(result: Any, arm: str) -> float | None:
    frame = result.diversity
    if frame.empty:
        return None
    rows = frame[(frame.arm == arm) & (frame.get("split", OOD) == OOD)]
    return float(rows.q_diversity.iloc[0]) if len(rows) else None


def claim_diversity(results: Mapping[Any, Any]) -> dict:
    diffs = []
    for result in results.values():
        rat, soups = _arm_diversity(result, "ratatouille"), _arm_diversity(result, "soups")
        if rat is not None and soups is not None:
            diffs.append(rat - soups)
    return _mean_claim("a_diversity", diffs, "both a ratatouille and a soups arm with 2+ runs")


def slope_and_se(x: Any, y: Any) -> tuple[float, float]:
    """Least-squares slope of y on x and its standard error (nan with fewer than 3 points)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    dx = xs - xs.mean()
    slope = float(np.sum(dx * (ys - ys.mean())) / np.sum(dx**2))
    if len(xs) < 3:
        return slope, math.nan
    residuals = ys - ys.mean() - slope * dx
    return slope, float(math.sqrt(np.sum(residuals**2) / (len(xs) - 2) / np.sum(dx**2)))


def claim_diversity_gain(results: Mapping[Any, Any]) -> dict:
    frames = [r.gain_points for r in results.values() if not r.gain_points.empty]
    points = pandas.concat(frames, ignore_index=True) if frames else pandas.DataFrame()
    if len(points) < 2 or points.q_diversity.nunique() < 2:
        return _row(
            "b_diversity_gain",
            None,
            math.nan,
            math.nan,
            len(points),
            "needs two pairs of different q-diversity",
        )
    slope, se = slope_and_se(points.q_diversity, points.gain)
    detail = f"slope {slope:+.4f} (s.e. {se:.4f}) over {len(points)} pairs"
    return _row("b_diversity_gain", slope > 0, slope, se, len(points), detail)


def claim_lmc(results: Mapping[Any, Any], hypothesis: str) -> dict:
    frames = [r.lmc for r in results.values() if not r.lmc.empty]
    lmc = pandas.concat(frames, ignore_index=True) if frames else pandas.DataFrame()
    rows = lmc[lmc.hypothesis == hypothesis] if not lmc.empty else lmc
    claim = f"c_lmc_{hypothesis}"
    if rows.empty:
        return _row(claim, None, math.nan, math.nan, 0, "no pair of this hypothesis evaluated")
    held = int(rows.lmc_holds.sum())
    parts = [
        f"{split}: {int(g.lmc_holds.sum())}/{len(g)} hold, worst gap mean {g.worst_gap.mean():+.4f}"
        for split, g in rows.groupby("split", sort=True)
    ]
    detail = f"{held}/{len(rows)} curves hold (tolerance {rows.tolerance.iloc[0]}); " + "; ".join(
        parts
    )
    fraction = held / len(rows)
    return _row(
        claim, held == len(rows), fraction, standard_error(rows.lmc_holds), len(rows), detail
    )


def claim_ratatouille_vs_soups(results: Mapping[Any, Any]) -> dict:
    diffs = []
    for result in results.values():
        ood = result.table.set_index("strategy").ood_acc
        if "ratatouille_uniform" in ood and "soup_uniform" in ood:
            diffs.append(float(ood["ratatouille_uniform"] - ood["soup_uniform"]))
    return _mean_claim("d_ratatouille_vs_soups", diffs, "both ratatouille_uniform and soup_uniform")


def claims_table(results: Mapping[Any, Any]) -> pandas.DataFrame:
    """The five rows of the module docstring from reduced cells ``(domain, seed) -> result``."""
    rows = [
        claim_diversity(results),
        claim_diversity_gain(results),
        claim_lmc(results, "hypothesis_1"),
        claim_lmc(results, "hypothesis_2"),
        claim_ratatouille_vs_soups(results),
    ]
    return pandas.DataFrame(rows, columns=COLUMNS)


def claims_metrics(table: pandas.DataFrame) -> dict[str, float]:
    """MLflow metrics ``claims/<claim>/{held,value,se,n}``; held is 1 or 0, absent (with the
    other non-numbers) when the claim is not computable."""
    metrics: dict[str, float] = {}
    for row in table.itertuples():
        if row.verdict != NOT_COMPUTABLE:
            metrics[f"claims/{row.claim}/held"] = float(row.verdict == HELD)
        for name in ("value", "se", "n"):
            value = float(getattr(row, name))
            if math.isfinite(value):
                metrics[f"claims/{row.claim}/{name}"] = value
    return metrics


def format_claims(table: pandas.DataFrame) -> str:
    """Markdown: claim, verdict and the numbers behind it."""
    lines = ["| claim | verdict | numbers |", "|---|---|---|"]
    for row in table.itertuples():
        lines.append(f"| {row.claim}: {row.statement} | {row.verdict} | {row.detail} |")
    return "\n".join(lines)
