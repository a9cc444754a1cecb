"""`ratatouille pool list|verify|import`: the pool's command-line handlers.

Each prints for a person and returns an exit code: 0 ok, 1 a broken pool. Bad input raises
`PoolError` (a `UserError`), which `ratatouille.cli.main` prints on one line with exit code 2,
as for every other command.
"""

from __future__ import annotations

from ratatouille.pool.store import MANIFEST, Pool, PoolError, import_weights


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows])
    return "\n".join(lines)


def _existing_pool(pool_dir: str) -> Pool:
    """The pool at ``pool_dir`` (a folder or a URI such as s3://bucket/pool); PoolError when
    there is none."""
    pool = Pool(pool_dir)
    if not pool.exists():
        raise PoolError(
            f"no pool at {pool.root} (no {MANIFEST}); add entries with "
            "`ratatouille pool import` or a `ratatouille run`"
        )
    return pool


def cli_list(pool_dir: str) -> int:
    """``ratatouille pool list --pool DIR``: one row per entry."""
    pool = _existing_pool(pool_dir)
    entries = pool.entries()
    header = ["name", "source_task", "arch", "id_val_acc", "robust", "created", "sha256"]
    rows = [
        [
            e.name,
            e.source_task,
            e.arch,
            "-" if e.id_val_acc is None else f"{e.id_val_acc:.4f}",
            "yes" if e.robust else "no",
            e.created,
            e.sha256[:12],
        ]
        for e in entries
    ]
    print(_format_table(header, rows))
    print(f"{len(entries)} entries in {pool.root}")
    return 0


def cli_verify(pool_dir: str) -> int:
    """``ratatouille pool verify --pool DIR``: 0 when every entry is intact, 1 otherwise."""
    pool = _existing_pool(pool_dir)
    try:
        report = pool.verify()
    except PoolError as err:  # an unreadable manifest is a broken pool, not bad input
        print(f"FAIL  manifest: {err}")
        return 1
    for name, problem in report:
        print(f"ok    {name}" if problem is None else f"FAIL  {name}: {problem}")
    n_bad = sum(problem is not None for _, problem in report)
    print(f"{len(report) - n_bad}/{len(report)} entries ok in {pool.root}")
    return 1 if n_bad else 0


def cli_import(
    file: str,
    pool_dir: str,
    name: str,
    arch: str,
    trust_pickle: bool,
    source_task: str = "imported",
) -> int:
    """``ratatouille pool import SOURCE --pool DIR --name NAME --arch ARCH [--trust-pickle]``;
    SOURCE is a weights file, ``local-dir:/path`` or ``hf-hub:timm/NAME``."""
    pool = Pool(pool_dir)
    entry = import_weights(
        file, pool, name=name, arch=arch, source_task=source_task, trust_pickle=trust_pickle
    )
    print(
        f"imported {file} as {entry.name!r} ({entry.arch}, sha256 {entry.sha256[:12]}) "
        f"into {pool.root}"
    )
    return 0
