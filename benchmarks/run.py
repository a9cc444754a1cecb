"""`make bench`: run every benchmark script, print the machine and one line per figure.

Convention (a new script joins by following it, nothing to register here): a file
``benchmarks/bench_*.py`` that declares a module-level ``FIGURES = {"P2": "cpu", "P10": "cuda"}``
and whose command line accepts ``--quick`` (sizes that keep the whole run under 15 minutes on
2 cores) and, if it declares a CUDA figure, ``--cuda-only`` (print only its CUDA figures;
``--cuda-only`` runs only such scripts). It prints each figure on one line,
``P<k> <what>: <value> <details>``, both sides measured in that same run. Each script runs in
its own process, so that one crash, one leaked thread pool or one peak of memory does not touch
the others; a script that fails or omits a figure it declared gets ``P<k> FAILED: <reason>``
and the runner exits 1 once every script has run. Without a CUDA device, a CUDA figure the script
did not print is ``P<k> not measured: no CUDA device`` (never estimated), not a failure.

``--docs docs/performance.md`` also rewrites the part of that file between
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` (``bench-cuda`` markers with
``--cuda-only``) with this run's header and lines, so the page is regenerated, not hand-copied.

    python benchmarks/run.py [--full] [--cuda-only] [--out benchmarks/results.txt] [--docs FILE]
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIGURE_LINE = re.compile(r"^(P\d+) ")
SCRIPT_TIMEOUT_S = 600


def declared_figures(script: Path) -> dict[str, str]:
    """The script's ``FIGURES`` literal, read without importing it (imports cost seconds)."""
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "FIGURES" for t in node.targets
        ):
            return dict(ast.literal_eval(node.value))
    return {}


def discover(cuda_only: bool) -> list[tuple[Path, dict[str, str]]]:
    found = []
    for script in sorted(HERE.glob("bench_*.py")):
        figures = declared_figures(script)
        if cuda_only:
            figures = {k: v for k, v in figures.items() if v == "cuda"}
        if figures:
            found.append((script, figures))
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> str:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return f"{pages * size / 2**30:.0f} GiB"
    except (ValueError, OSError):
        return "unknown"


def header() -> list[str]:
    import torch  # here, not at the top: `--help` stays instant

    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return [
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
        f"machine: {_cpu_model()}, {os.cpu_count()} cores, {_ram_gib()} RAM, "
        f"{platform.system()} {platform.release()}",
        f"python {platform.python_version()}, torch {torch.__version__}, CUDA device: {cuda}",
    ]


def run_script(
    script: Path, figures: dict[str, str], args: list[str], cuda: bool
) -> tuple[list[str], bool]:
    """The script's P-lines in the order printed, plus a FAILED (or, for a CUDA figure on a
    machine without CUDA, a not measured) line per missing figure."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, str(script), *args],
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_S,
        )
        output, code = done.stdout, done.returncode
        reason = _last_error(done.stderr) or f"exit code {code}"
    except subprocess.TimeoutExpired as timeout:
        output = timeout.stdout.decode() if isinstance(timeout.stdout, bytes) else ""
        code, reason = -1, f"timed out after {SCRIPT_TIMEOUT_S} s"
    lines = [line for line in output.splitlines() if FIGURE_LINE.match(line)]
    printed = {FIGURE_LINE.match(line).group(1) for line in lines}  # type: ignore[union-attr]
    unmeasurable = [k for k, kind in figures.items() if kind == "cuda" and not cuda]
    lines += [f"{k} not measured: no CUDA device" for k in unmeasurable if k not in printed]
    missing = [k for k in figures if k not in printed and k not in unmeasurable]
    if code == 0 and missing:
        reason = "the script ended without printing it"
    lines += [f"{k} FAILED: {script.name}: {reason}" for k in missing]
    took = time.perf_counter() - start
    print(f"# {script.name}: {took:.0f} s", file=sys.stderr)
    failed = any(FIGURE_LINE.match(x) and x.split(" ", 1)[1].startswith("FAILED") for x in lines)
    return lines, code == 0 and not missing and not failed


def figure_number(line: str) -> int:
    match = FIGURE_LINE.match(line)
    return int(match.group(1)[1:]) if match else 0


def _last_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def update_docs(path: Path, lines: list[str], marker: str) -> None:
    """Replace the text between the page's ``marker`` comments with ``lines`` (a code block)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    page = path.read_text()
    if begin not in page or end not in page:
        raise SystemExit(f"{path} has no {begin} ... {end} section to regenerate; add one")
    head, rest = page.split(begin, 1)
    body = "\n".join(["", "```", *lines, "```", ""])
    path.write_text(head + begin + body + end + rest.split(end, 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="paper-sized runs (not --quick)")
    parser.add_argument("--cuda-only", action="store_true", help="only the CUDA figures")
    parser.add_argument("--out", default=str(HERE / "results.txt"), help="copy of the output")
    parser.add_argument("--docs", help="page whose bench section this run rewrites")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    script_args = ([] if args.full else ["--quick"]) + (["--cuda-only"] if args.cuda_only else [])
    lines = header()
    print("\n".join(lines), flush=True)
    ok, figures_lines = True, []
    for script, figures in discover(args.cuda_only):
        got, script_ok = run_script(script, figures, script_args, cuda)
        print("\n".join(got), flush=True)
        figures_lines += got
        ok = ok and script_ok
    lines += sorted(figures_lines, key=figure_number)  # the file and the page read P1, P2, ...
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"# written to {args.out}", file=sys.stderr)
    if args.docs:
        update_docs(Path(args.docs), lines, "bench-cuda" if args.cuda_only else "bench")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
