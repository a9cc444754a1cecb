"""The math modules import neither Ray nor MLflow (DESIGN.md: pure math apart)."""

from __future__ import annotations

import subprocess
import sys

PURE_MODULES = ("ratatouille.soups", "ratatouille.diversity", "ratatouille.interpolation")


def test_pure_math_modules_import_neither_ray_nor_mlflow():
    # A fresh interpreter: pytest's own process may already hold ray or mlflow from other tests.
    code = (
        f"import {', '.join(PURE_MODULES)}, sys; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"pure modules pulled in: {result.stdout.strip()}"
