"""The math modules import neither Ray nor MLflow (DESIGN.md: pure math apart)."""

from __future__ import annotations

import subprocess
import sys

PURE_MODULES = ("ratatouille.soups", "ratatouille.diversity", "ratatouille.interpolation")
# Everything but search (Ray), tracking (MLflow) and the modules wiring them together.
RAY_AND_MLFLOW_FREE = PURE_MODULES + (
    "ratatouille.config", "ratatouille.data", "ratatouille.models", "ratatouille.train",
    "ratatouille.probe", "ratatouille.hparams", "ratatouille.pool", "ratatouille.sweep",
    "ratatouille.stages", "ratatouille.reduce", "ratatouille.summary", "ratatouille.plots")


def _imported_by(modules: tuple[str, ...]) -> str:
    # A fresh interpreter: pytest's own process may already hold ray or mlflow from other tests.
    code = (
        f"import {', '.join(modules)}, sys; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_pure_math_modules_import_neither_ray_nor_mlflow():
    assert _imported_by(PURE_MODULES) == "[]"


def test_only_search_and_tracking_bring_ray_and_mlflow():
    assert _imported_by(RAY_AND_MLFLOW_FREE) == "[]"
