"""The layout's rules: which part may import which, no import cycle, Ray and MLflow each in one
part.

Parts are the subpackages of `ratatouille` (docs/architecture.md draws the same arrows). Every
`import` counts, at module level, inside functions and under TYPE_CHECKING alike: a lazy import
is still a dependency, and a type-only cycle is still a cycle for a reader.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ratatouille"

#: part -> the parts it may import (besides itself). Read bottom-up: merging is pure math, core
#: the shared vocabulary, cli may use everything.
ALLOWED: dict[str, set[str]] = {
    "merging": set(),
    "core": {"merging"},
    "data": {"core"},
    "engine": {"core", "data"},
    "pool": {"core"},
    "recipe": {"core", "data", "engine", "merging"},
    "reducer": {"core", "engine", "merging"},
    "tracking": {"core"},
    "orchestration": {"core", "data", "engine", "merging", "pool", "recipe", "reducer", "tracking"},
    "cli": {"core", "orchestration", "pool", "recipe", "reducer", "tracking"},
}
PURE_MODULES = (
    "ratatouille.merging.soups",
    "ratatouille.merging.diversity",
    "ratatouille.merging.interpolation",
    "ratatouille.merging.merges",
)
#: Everything but orchestration (Ray) and tracking (MLflow), and the cli that wires them.
RAY_AND_MLFLOW_FREE = tuple(
    f"ratatouille.{part}" for part in ALLOWED if part not in ("orchestration", "tracking", "cli")
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ratatouille module that ``path`` imports (``from X import name`` counts X.name
    when X.name is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ratatouille"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ratatouille"):
            assert node.module is not None
            found.add(node.module)
            found.update(
                f"{node.module}.{a.name}"
                for a in node.names
                if f"{node.module}.{a.name}" in MODULES
            )
    return found


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path) & set(MODULES) - {name} for name, path in MODULES.items()}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def test_every_module_sits_in_a_known_part():
    loose = sorted(m for m in MODULES if m != "ratatouille" and _part(m) not in ALLOWED)
    assert loose == [], f"modules outside the parts of docs/architecture.md: {loose}"


def test_imports_follow_the_allowed_arrows():
    crossing = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if _part(target) != _part(module) and _part(target) not in ALLOWED.get(_part(module), set())
    )
    assert crossing == [], "imports across parts that docs/architecture.md does not allow"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_modules_or_parts():
    assert _cycle(GRAPH) is None, f"import cycle: {' -> '.join(_cycle(GRAPH) or [])}"
    parts = {p: set() for p in ALLOWED}
    for module, targets in GRAPH.items():
        parts.setdefault(_part(module), set()).update(
            _part(t) for t in targets if _part(t) != _part(module)
        )
    assert _cycle(parts) is None


def test_the_rules_themselves_are_acyclic():
    assert _cycle(ALLOWED) is None


def test_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_only_orchestration_imports_ray_and_only_tracking_imports_mlflow():
    # the static check, so a lazy `import ray` inside a function is caught too
    names = {module: _imports_any(path) for module, path in MODULES.items()}
    ray_users = sorted(m for m, found in names.items() if "ray" in found)
    mlflow_users = sorted(m for m, found in names.items() if "mlflow" in found)
    assert ray_users and all(_part(m) == "orchestration" for m in ray_users), ray_users
    assert mlflow_users and all(_part(m) == "tracking" for m in mlflow_users), mlflow_users


def _imports_any(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


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


def test_parts_outside_orchestration_and_tracking_load_neither_ray_nor_mlflow():
    modules = tuple(
        m for m in MODULES if _part(m) in {p.split(".")[1] for p in RAY_AND_MLFLOW_FREE}
    )
    assert _imported_by(modules) == "[]"
