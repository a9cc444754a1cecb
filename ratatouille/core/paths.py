"""Where default and relative local stores go: somewhere that outlives the run.

On a laptop that is the working directory (`./mlflow.db`, `./ray_results` beside the checkout).
Under Ray Jobs (`ray job submit --working-dir .`) the driver's working directory is an ephemeral
runtime-env folder under Ray's temp dir, which Ray deletes when it evicts the package or starts a
new session: results, the pool and what `--resume` needs would go with it. There, and anywhere
else inside Ray's temp dir, stores go under the user's home instead (as Tune's own default,
`~/ray_results`), so a later run, or its `--resume`, finds them again.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: Under the home directory when the working directory belongs to Ray.
HOME_STORE = Path("~/ratatouille")


def ray_temp_dir() -> Path:
    """Ray's temp dir: RAY_TMPDIR when set, else `<system temp>/ray`, as Ray chooses it."""
    return Path(os.environ.get("RAY_TMPDIR") or Path(tempfile.gettempdir(), "ray")).resolve()


def owned_by_ray(path: Path) -> bool:
    """Whether ``path`` lies in a folder Ray creates and deletes (its temp dir, or a
    runtime-env folder wherever Ray was told to keep them)."""
    path = path.resolve()
    return "runtime_resources" in path.parts or path.is_relative_to(ray_temp_dir())


def stable_base() -> Path:
    """The folder default and relative local stores resolve against."""
    cwd = Path.cwd()
    return HOME_STORE.expanduser().resolve() if owned_by_ray(cwd) else cwd.resolve()


def stable_path(configured: str | None, default: str) -> Path:
    """A configured local path (or ``default``), absolute; relative ones resolve against
    :func:`stable_base`, never inside a folder Ray owns."""
    path = Path(configured or default).expanduser()
    return (path if path.is_absolute() else stable_base() / path).resolve()
