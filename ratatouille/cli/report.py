"""What the CLI prints after a run, a reduce or a report: the table and where to look next."""

from __future__ import annotations

import sys
from pathlib import Path

from ratatouille.orchestration.reporting import Outcome
from ratatouille.reducer.claims import format_claims
from ratatouille.reducer.summary import format_table, summarize_long
from ratatouille.tracking.store import RUNS_PAGE_QUERY, latest_parent, read_claims, read_comparison


def print_outcome(outcome: Outcome) -> None:
    print(f"\n{outcome.experiment}: OOD test accuracy (%)\n")
    print(outcome.table_markdown)
    if outcome.claims_markdown:
        print(f"\nThe paper's claims on this sweep (computed)\n\n{outcome.claims_markdown}")
    for line in outcome.excluded:
        print(f"excluded {line}")
    print(f"\nfinal model: {outcome.final_strategies}")
    print(f"MLflow: {outcome.tracking_uri}, parent run {outcome.parent_run_id}")
    if outcome.model_versions:
        print(f"registered model versions: {outcome.model_versions}")
    print(_mlflow_hint(outcome.tracking_uri, outcome.experiment_id))


def _mlflow_hint(uri: str, experiment_id: str = "") -> str:
    """How to open the store on the experiment's training runs: MLflow 3's UI lands on its
    GenAI pages unless the link asks for the runs."""
    page = f"#/experiments/{experiment_id}/runs?{RUNS_PAGE_QUERY}" if experiment_id else ""
    if uri.startswith("sqlite:"):
        beside = Path(sys.executable).with_name("mlflow")  # the venv's mlflow, maybe not on PATH
        command = str(beside) if beside.exists() else "mlflow"
        return (
            f"open it with: {command} ui --backend-store-uri {uri}  "
            f"(then http://127.0.0.1:5000/{page})"
        )
    return f"open {uri.rstrip('/')}/{page} in a browser"


def write_report(experiment: str | None, tracking_uri: str | None, out: str) -> Path:
    """`ratatouille report`: print the comparison table, write Markdown and CSV."""
    tracker, parent = latest_parent(experiment, tracking_uri)
    long = read_comparison(tracker)
    table = format_table(summarize_long(long))
    claims = read_claims(tracker)
    claims_md = "" if claims is None else format_claims(claims)
    folder = Path(out) / tracker.experiment_name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(
        f"# {tracker.experiment_name}: OOD test accuracy (%)\n\n"
        f"run {parent.info.run_id}\n\n{table}\n"
        + (f"\n## The paper's claims (computed)\n\n{claims_md}\n" if claims_md else "")
    )
    long.to_csv(folder / "report.csv", index=False)
    print(f"{tracker.experiment_name}: OOD test accuracy (%), mean ± std over split seeds\n")
    print(table)
    if claims_md:
        print(f"\nThe paper's claims on this sweep (computed)\n\n{claims_md}")
    print(f"\nwrote {folder / 'report.md'} and {folder / 'report.csv'}")
    print(_mlflow_hint(tracker.uri, tracker.experiment_id))
    return folder
