"""The README's MLflow screenshots, taken from `mlflow server` with a real headless Chromium.

It serves a ratatouille store on loopback, opens the experiment's training runs (checking that
every row shown fills Source and Dataset, and the parent row, which logged the final model,
Models), then the reducer's comparison table, and saves both pages under docs/figures/.

    .venv/bin/pip install -e ".[docs]"      # playwright's Python client, no browser download
    apt-get install -y chromium             # the browser it drives (Debian's package)
    .venv/bin/python docs/mlflow_screenshots.py --tracking-uri sqlite:///$PWD/mlflow.db
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from ratatouille.tracking.server import mlflow_server
from ratatouille.tracking.store import ROLE, RUNS_PAGE_QUERY, latest_parent

FIGURES = Path(__file__).resolve().parent / "figures"
VIEWPORT = {"width": 1600, "height": 900}
CELL = "div.ag-cell[col-id='attributes.`{}`']"


def _close_assistant(page: Page) -> None:
    """MLflow 3.17 opens its assistant panel beside every page; it hides the table."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def _row_cells(page: Page, column: str) -> list[str]:
    """The shown rows' texts in ``column`` (a run name cell starts with its colour's label)."""
    texts = page.locator(CELL.format(column)).all_inner_texts()
    return [text.strip().splitlines()[-1] if text.strip() else "" for text in texts]


def runs_page(page: Page, url: str, experiment_id: str, out: Path) -> None:
    page.goto(f"{url}/#/experiments/{experiment_id}/runs?{RUNS_PAGE_QUERY}")
    page.wait_for_selector(CELL.format("Source"), timeout=60_000)
    _close_assistant(page)
    page.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # expand
    page.wait_for_timeout(2000)
    names = _row_cells(page, "Run Name")
    for column in ("Source", "Dataset"):
        empty = [name for name, text in zip(names, _row_cells(page, column)) if text == "-"]
        if empty:
            raise SystemExit(f"{column} shows '-' for {empty}")
    parent_models = _row_cells(page, "Models")[0]  # the parent row comes first
    if parent_models == "-":
        raise SystemExit(f"Models shows '-' for the parent run {names[0]}")
    page.screenshot(path=str(out))


def comparison_page(page: Page, url: str, experiment_id: str, run_id: str, out: Path) -> None:
    page.goto(
        f"{url}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/comparison.json"
        f"?{RUNS_PAGE_QUERY}"
    )
    page.get_by_text("ratatouille_uniform").first.wait_for(timeout=60_000)
    _close_assistant(page)
    page.screenshot(path=str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="the store (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--experiment", help="experiment name (default: the newest)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--out", type=Path, default=FIGURES)
    args = parser.parse_args()
    tracker, parent = latest_parent(args.experiment, args.tracking_uri)
    (reducer,) = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`{ROLE}` = 'reducer'",
    )
    outputs = (args.out / "mlflow-runs.png", args.out / "mlflow-comparison.png")
    with (
        tempfile.TemporaryDirectory() as folder,
        mlflow_server(tracker.uri, Path(folder)) as url,
        sync_playwright() as playwright,
    ):
        # --no-sandbox: Chromium refuses to sandbox itself when run as root (containers, CI)
        browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        runs_page(page, url, tracker.experiment_id, outputs[0])
        comparison_page(page, url, tracker.experiment_id, reducer.info.run_id, outputs[1])
        browser.close()
    print("\n".join(str(path) for path in outputs))


if __name__ == "__main__":
    main()
