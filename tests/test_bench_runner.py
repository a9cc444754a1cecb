"""`make bench`'s runner: discovery by convention, one line per figure, failures kept apart."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("bench_runner", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(body)
    return path


def test_figures_are_read_without_running_the_script(runner, tmp_path):
    script = _script(
        tmp_path, "bench_x.py", 'raise SystemExit(1)\nFIGURES = {"P1": "cpu", "P10": "cuda"}\n'
    )
    assert runner.declared_figures(script) == {"P1": "cpu", "P10": "cuda"}
    assert runner.declared_figures(_script(tmp_path, "bench_y.py", "x = 1\n")) == {}


def test_a_crash_and_a_missing_figure_are_failures_the_others_are_kept(runner, tmp_path):
    figures = {"P1": "cpu", "P2": "cpu", "P10": "cuda"}
    crash = _script(
        tmp_path,
        "bench_a.py",
        "print('noise')\nprint('P1 a: 2.0x (1 s vs 2 s)')\nraise RuntimeError('disk full')\n",
    )
    lines, ok = runner.run_script(crash, figures, [], cuda=False)
    assert not ok
    assert lines == [
        "P1 a: 2.0x (1 s vs 2 s)",
        "P10 not measured: no CUDA device",
        "P2 FAILED: bench_a.py: RuntimeError: disk full",
    ]
    silent = _script(tmp_path, "bench_b.py", "print('P1 a: 1.0x')\n")
    lines, ok = runner.run_script(silent, figures, ["--quick"], cuda=True)
    assert not ok
    assert lines[1:] == [
        "P2 FAILED: bench_b.py: the script ended without printing it",
        "P10 FAILED: bench_b.py: the script ended without printing it",
    ]
    fine = _script(
        tmp_path,
        "bench_c.py",
        "import sys\nassert sys.argv[1:] == ['--quick']\nprint('P1 a: 1.0x')\n",
    )
    assert runner.run_script(fine, {"P1": "cpu"}, ["--quick"], cuda=False) == (["P1 a: 1.0x"], True)


def test_docs_section_is_rewritten_and_the_rest_kept(runner, tmp_path):
    page = tmp_path / "performance.md"
    page.write_text("# T\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n## End to end\nkept\n")
    runner.update_docs(page, ["date: d", "P1 a: 1.0x"], "bench")
    assert page.read_text() == (
        "# T\n<!-- bench:begin -->\n```\ndate: d\nP1 a: 1.0x\n```\n<!-- bench:end -->\n"
        "## End to end\nkept\n"
    )
    with pytest.raises(SystemExit, match="bench-cuda:begin"):
        runner.update_docs(page, [], "bench-cuda")


def test_figures_are_listed_by_number_whatever_the_script_order(runner):
    lines = ["P10 not measured: no CUDA device", "P8 b: 1", "P1 a: 2"]
    assert sorted(lines, key=runner.figure_number) == [lines[2], lines[1], lines[0]]
