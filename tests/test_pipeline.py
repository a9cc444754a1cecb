"""End to end on the session's local Ray: a tiny sweep, its MLflow structure, pool, reducer."""

from __future__ import annotations

import contextlib
import getpass
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import torch
from mlflow import MlflowClient
from safetensors.torch import save_file

from no_pickle import PRELUDE
from ratatouille.cli.main import main
from ratatouille.core.config import parse_config
from ratatouille.core.names import FUSING, PRETRAINED
from ratatouille.data import get_dataset, target_splits
from ratatouille.engine.models import build_classifier
from ratatouille.engine.train import evaluate_accuracy
from ratatouille.orchestration.pipeline import pool_path, reduce_latest, run_pipeline
from ratatouille.pool.store import Pool
from ratatouille.recipe.sweep import aux_entry_name, robust_name
from ratatouille.tracking.server import mlflow_server
from ratatouille.tracking.store import weights_sha256
from tiny import tiny_config

pytestmark = pytest.mark.ray

STRATEGIES = (
    "erm",
    "ma",
    "ensemble_ma",
    "inter_training",
    "fusing",
    "ensemble_soups",
    "ensemble_ratatouille",
    "soup_uniform",
    "soup_greedy",
    "ratatouille_uniform",
    "ratatouille_greedy",
    "wise_ft",
    "robust_inter_training",
    "robust_ratatouille_uniform",
    "robust_ratatouille_greedy",
)
ARMS = ["soups", "ratatouille", "fusing", "robust_ratatouille"]
ROBUST = {"robust": True}
TARGET_STEPS = (0, 3, 6, 9, 11)  # every checkpoint_freq=3 steps of 12, and the last one


PRINTED: dict[str, str] = {}  # what the module's sweep printed on stdout (Tune's tables)


@pytest.fixture(scope="module")
def sweep(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    config = tiny_config(root, aux=ROBUST, target={"arms": ARMS, "moving_average": True})
    printed, progress = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(progress):
        outcome = run_pipeline(config)
    PRINTED["stdout"], PRINTED["stderr"] = printed.getvalue(), progress.getvalue()
    client = MlflowClient(config.tracking.mlflow_uri)
    return config, outcome, client


def test_tune_progress_table_shows_readable_trial_fields(sweep):
    tables = PRINTED["stdout"]
    # the target stage's last table: its trials' fields, then their progress
    header = [line for line in tables.splitlines() if "init source" in line][-1]
    columns = ("arm", "test domain", "run", "init source", "lr", "best ID-val acc")
    assert all(column in header for column in columns), header
    rows = [line for line in tables.splitlines() if "target_ratatouille_rot30_0" in line]
    assert "PENDING" in rows[0] and "TERMINATED" in rows[-1] and "rot30" in rows[-1]
    assert "{'" not in tables  # no spec printed as one dict blob


def test_the_run_says_where_its_mlflow_run_is_and_how_the_reducer_progresses(sweep):
    config, outcome, _ = sweep
    lines = PRINTED["stderr"].splitlines()
    (where,) = [line for line in lines if line.startswith("mlflow: ")]
    assert config.tracking.mlflow_uri in where and outcome.parent_run_id in where
    assert (
        "reducer: cell 1/1 (rot30-split0) reduced: 15 strategies, final model "
        in (PRINTED["stderr"])
    )
    assert lines.index(where) < next(i for i, line in enumerate(lines) if "reducer:" in line)


def test_tune_result_files_hold_each_spec_field_as_a_column(sweep):
    from ray.tune import ExperimentAnalysis

    _, outcome, client = sweep
    run_dir = client.get_run(outcome.parent_run_id).data.tags["ratatouille.run_dir"]
    frame = ExperimentAnalysis(str(Path(run_dir, "target"))).dataframe()
    expected = {"arm", "run", "init_source", "test_domain", "split_seed", "lr", "batch_size"}
    assert {f"config/spec/{field}" for field in expected} <= set(frame.columns)
    assert f"config/spec/fusing/{PRETRAINED}" in frame.columns  # the mixture, one per source
    fusing = frame[frame["config/spec/arm"] == "fusing"]
    assert set(fusing["config/spec/init_source"]) == {FUSING} and len(fusing) == 3
    (params,) = Path(run_dir, "target").glob("target_soups_rot30_0_*/params.json")
    assert json.loads(params.read_text())["spec"]["init_source"] == PRETRAINED


def _children(client, outcome, role):
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'",
        max_results=1000,
    )
    return [run for run in runs if run.data.tags.get("ratatouille.role") == role]


def _history(client, run, key="id_val_acc"):
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def test_every_trial_has_a_child_run_with_params_and_checkpoint_metrics(sweep):
    _config, outcome, client = sweep
    trials = _children(client, outcome, "trial")
    stages = Counter(run.data.tags["stage"] for run in trials)
    assert stages == {"pretrain": 1, "aux": 2, "probe": 1, "target": 12}
    for run in (r for r in trials if r.data.tags["stage"] == "target"):
        params = run.data.params
        for key in ("arm", "init_source", "lr", "weight_decay", "dropout", "batch_size", "seed"):
            assert key in params, key
        assert float(params["lr"]) in (1e-4, 3e-4)
        assert _history(client, run) == list(TARGET_STEPS)
        assert run.info.status == "FINISHED"
        best = max(m.value for m in client.get_metric_history(run.info.run_id, "id_val_acc"))
        assert run.data.metrics["best_id_val_acc"] == pytest.approx(best)


def test_init_sources_are_balanced_and_recorded(sweep):
    config, outcome, client = sweep
    target = [r for r in _children(client, outcome, "trial") if r.data.tags["stage"] == "target"]
    by_arm = {arm: [r.data.params for r in target if r.data.params["arm"] == arm] for arm in ARMS}
    assert {p["init_source"] for p in by_arm["soups"]} == {PRETRAINED}
    aux_names = {aux_entry_name(config, task, 0) for task in config.aux.tasks}
    # 3 runs over 3 sources (phi_pt + 2 auxiliary tasks): each source exactly once.
    assert sorted(p["init_source"] for p in by_arm["ratatouille"]) == sorted(
        {PRETRAINED} | aux_names
    )
    robust_names = {robust_name(name) for name in aux_names}
    assert sorted(p["init_source"] for p in by_arm["robust_ratatouille"]) == sorted(
        {PRETRAINED} | robust_names
    )
    for params in by_arm["fusing"]:
        assert params["init_source"] == FUSING
        lambdas = [float(v) for k, v in params.items() if k.startswith("fusing_lambda/")]
        assert len(lambdas) == 3 and sum(lambdas) == pytest.approx(1.0, abs=1e-3)


def test_pool_holds_the_auxiliary_featurizers_with_their_manifest(sweep):
    config, _, _ = sweep
    pool = Pool(pool_path(config))
    entries = {entry.name: entry for entry in pool.entries()}
    names = {aux_entry_name(config, task, 0): task for task in config.aux.tasks}
    assert set(entries) == set(names) | {robust_name(name) for name in names}
    for name, task in names.items():
        for entry, robust in ((entries[name], False), (entries[robust_name(name)], True)):
            assert (entry.source_task, entry.arch, entry.robust) == (task, "test_resnet", robust)
            assert 0.0 <= entry.id_val_acc <= 1.0
        # the moving average differs from the last weights it averages
        last, average = pool.load(name), pool.load(robust_name(name))
        assert any(
            not torch.equal(last[k], average[k]) for k in last if last[k].is_floating_point()
        )
    assert all(problem is None for _, problem in pool.verify())


def test_reducer_run_logs_every_strategy_table_figures_and_model(sweep):
    config, outcome, client = sweep
    (reducer,) = _children(client, outcome, "reducer")
    metrics = reducer.data.metrics
    assert reducer.data.tags["ratatouille.reducer_device"] == "cpu"  # no GPU in the suite
    for strategy in STRATEGIES:
        assert 0.0 <= metrics[f"ood_acc/{strategy}"] <= 1.0
        assert 0.0 <= metrics[f"id_val_acc/{strategy}"] <= 1.0
    for arm in ARMS:
        assert f"q_diversity/{arm}" in metrics and f"ratio_error/{arm}" in metrics
    artifacts = {a.path for a in client.list_artifacts(reducer.info.run_id)}
    assert {"comparison.csv", "comparison.json", "report.md", "figures"} <= artifacts
    figures = {a.path for a in client.list_artifacts(reducer.info.run_id, "figures")}
    assert len(figures) >= 4 and all(path.endswith(".png") for path in figures)
    # the paper's claims, computed: a table on both runs, a verdict metric per computable claim
    assert any(key.startswith("claims/") and key.endswith("/held") for key in metrics)
    parent = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"claims.json", "claims.csv"} <= artifacts and {"claims.json", "figures"} <= parent
    across = {a.path for a in client.list_artifacts(outcome.parent_run_id, "figures")}
    assert "figures/all_cells_strategies.png" in across
    assert "| claim | verdict | numbers |" in outcome.claims_markdown
    versions = client.search_model_versions("name = 'tiny-ratatouille'")
    # logged and registered by the parent run (the sweep that made it), an output of the reducer
    assert versions and versions[0].run_id == outcome.parent_run_id
    (logged,) = client.search_logged_models([reducer.info.experiment_id])
    assert versions[0].source == f"models:/{logged.model_id}"
    assert logged.source_run_id == outcome.parent_run_id
    assert [o.model_id for o in reducer.outputs.model_outputs] == [logged.model_id]
    # The registered model is the final ratatouille model: its weights, read from the registry
    # into a fresh timm classifier, score the OOD accuracy logged for the strategy the reducer
    # chose, and are those its version's digest names.
    mlflow.set_tracking_uri(config.tracking.mlflow_uri)
    exported = mlflow.pytorch.load_model(f"models:/tiny-ratatouille/{versions[0].version}")
    weights = exported.state_dict()
    assert weights_sha256(weights) == versions[0].tags["weights_sha256"]
    model = build_classifier(config.model.arch, weights["head.weight"].shape[0])
    model.load_state_dict(weights)
    splits = target_splits(get_dataset("digits", seed=config.seed), [2], 0)
    strategy = outcome.final_strategies["rot30-split0"]
    assert strategy == "ratatouille_uniform"  # reduce.final_model's default
    assert evaluate_accuracy(model, splits.ood_test) == pytest.approx(
        metrics[f"ood_acc/{strategy}"]
    )
    for strategy in STRATEGIES:
        assert strategy in outcome.table_markdown


PROVENANCE = (
    "mlflow.user",
    "mlflow.source.name",
    "mlflow.source.type",
    "mlflow.project.entryPoint",
    "ratatouille.version",
    "ratatouille.config_sha256",
)


def test_every_run_carries_the_provenance_of_the_command_that_made_it(sweep):
    _config, outcome, client = sweep
    parent = client.get_run(outcome.parent_run_id).data.tags
    assert parent["mlflow.user"] == getpass.getuser()
    assert parent["mlflow.project.entryPoint"] == "ratatouille run"
    runs = _children(client, outcome, "trial") + _children(client, outcome, "reducer")
    assert len(runs) == 17
    for run in runs:
        assert {key: run.data.tags.get(key) for key in PROVENANCE} == {
            key: parent[key] for key in PROVENANCE
        }
        assert run.data.tags.get("mlflow.source.git.commit") == parent.get(
            "mlflow.source.git.commit"
        )


def _inputs(run) -> dict[str, tuple[str, str, dict]]:
    """name -> (digest, context, profile) of a run's dataset inputs."""
    found = {}
    for item in run.inputs.dataset_inputs:
        tags = {tag.key: tag.value for tag in item.tags}
        profile = json.loads(item.dataset.profile)
        found[item.dataset.name] = (item.dataset.digest, tags["mlflow.data.context"], profile)
    return found


def test_every_run_records_the_data_it_was_computed_on(sweep):
    config, outcome, _client = sweep
    mlflow.set_tracking_uri(config.tracking.mlflow_uri)
    digits = get_dataset("digits", seed=config.seed)
    train = [name for name in digits.domains if name != "rot30"]
    train_name = f"digits ({', '.join(train)})"
    runs = mlflow.search_runs(
        experiment_names=["tiny"],
        filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'",
        output_format="list",
    )
    by_stage: dict[str, list[dict]] = {}
    for run in runs:
        stage = run.data.tags.get("stage", run.data.tags["ratatouille.role"])
        by_stage.setdefault(stage, []).append(_inputs(run))
    targets = by_stage["target"] + by_stage["probe"]
    assert all(list(found) == [train_name] for found in targets)
    digest, context, profile = targets[0][train_name]
    assert {found[train_name][0] for found in targets} == {digest}
    assert context == "training" and profile["split_seed"] == 0
    assert profile["items"] == sum(digits.domain_size(digits.domains.index(d)) for d in train)
    (pretrain,) = by_stage["pretrain"]
    assert list(pretrain) == ["digits_t0 (clean)"]
    assert sorted(name.split(" ")[0] for found in by_stage["aux"] for name in found) == sorted(
        config.aux.tasks
    )
    (reducer,) = by_stage["reducer"]
    assert reducer[train_name][:2] == (digest, "validation")
    test_digest, test_context, test_profile = reducer["digits (rot30)"]
    assert test_context == "test" and test_digest != digest
    assert test_profile["items"] == digits.domain_size(digits.domains.index("rot30"))
    # the parent, the one row the runs page shows folded, lists every dataset of the sweep
    parent = _inputs(mlflow.get_run(outcome.parent_run_id))
    children = {
        name: found[name][0] for group in by_stage.values() for found in group for name in found
    }
    assert {name: value[0] for name, value in parent.items()} == children


def test_the_champion_loads_in_a_fresh_process_and_scores_the_logged_ood_accuracy(sweep, tmp_path):
    config, outcome, client = sweep
    (reducer,) = _children(client, outcome, "reducer")
    champion = client.get_model_version_by_alias("tiny-ratatouille", "champion")
    assert champion.run_id == outcome.parent_run_id
    assert (champion.tags["test_domain"], champion.tags["split_seed"]) == ("rot30", "0")
    assert champion.tags["strategy"] == outcome.final_strategies["rot30-split0"]
    assert champion.tags["selection_rule"] == "ratatouille_uniform"
    assert "paper's main method" in champion.description
    cell = client.get_model_version_by_alias("tiny-ratatouille", "champion-rot30-split0")
    assert cell.version == champion.version
    assert champion.tags["ratatouille.model_format"] == "pt2"
    # the held-out domain in full, as the reducer's OOD split holds it
    digits = get_dataset("digits", seed=config.seed)
    held_out = digits.domain(digits.domains.index("rot30"), train=False)
    images = torch.stack([held_out[i][0] for i in range(len(held_out))])
    labels = torch.tensor([held_out[i][1] for i in range(len(held_out))])
    save_file({"images": images}, str(tmp_path / "ood.safetensors"))
    # a fresh process in which nothing can be unpickled (tests/no_pickle.py): the champion is a
    # torch.export program, already in eval mode
    script = PRELUDE + (
        "import sys, mlflow, torch\n"
        "from safetensors.torch import load_file\n"
        f"mlflow.set_tracking_uri({config.tracking.mlflow_uri!r})\n"
        "model = mlflow.pytorch.load_model('models:/tiny-ratatouille@champion')\n"
        "with torch.no_grad():\n"
        "    logits = model(load_file(sys.argv[1])['images'])\n"
        "print(','.join(str(int(k)) for k in logits.argmax(1)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "ood.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    predictions = torch.tensor([int(k) for k in result.stdout.strip().splitlines()[-1].split(",")])
    accuracy = (predictions == labels).double().mean().item()
    assert accuracy == pytest.approx(reducer.data.metrics[f"ood_acc/{champion.tags['strategy']}"])


def _reducer_state(client, outcome) -> dict:
    """The reducer run as a user's script reads it back: table, metric points, versions."""
    (reducer,) = _children(client, outcome, "reducer")
    run_id = reducer.info.run_id
    experiment = client.get_experiment_by_name("tiny").experiment_id
    mlflow.set_tracking_uri(client.tracking_uri)
    frame = mlflow.search_runs([experiment], filter_string=f"attributes.run_id = '{run_id}'")
    versions = client.search_model_versions("name = 'tiny-ratatouille'")
    return {
        "run_id": run_id,
        "table": client.load_table(experiment, "comparison.json", run_ids=[run_id]),
        "latest": {k: v for k, v in frame.iloc[0].items() if k.startswith("metrics.")},
        "points": {
            key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
            for key in reducer.data.metrics
        },
        "versions": sorted((int(v.version), v.tags["weights_sha256"]) for v in versions),
        "champion": client.get_model_version_by_alias("tiny-ratatouille", "champion").version,
    }


def test_reducing_an_unchanged_sweep_again_changes_nothing(sweep):
    config, outcome, client = sweep
    before = _reducer_state(client, outcome)
    assert len(before["table"]) == len(STRATEGIES)  # one row per strategy of the one cell
    assert all(len(points) == 1 for points in before["points"].values())
    again = reduce_latest("tiny", config.tracking.mlflow_uri)
    assert again.parent_run_id == outcome.parent_run_id
    after = _reducer_state(client, outcome)
    assert after["run_id"] == before["run_id"]
    pd.testing.assert_frame_equal(after["table"], before["table"])
    assert after["points"] == before["points"] and after["latest"] == before["latest"]
    assert after["versions"] == before["versions"] == [(1, before["versions"][0][1])]
    assert after["champion"] == before["champion"]
    assert len(_children(client, outcome, "trial")) == 16  # restoring trained nothing


def test_reducing_with_a_new_setting_replaces_the_table_and_keeps_the_model(sweep):
    config, outcome, client = sweep
    before = _reducer_state(client, outcome)
    raw = config.model_dump(mode="json")
    raw["reduce"]["wise_alpha"] = 0.9  # WiSE moves; the final ratatouille model does not
    run_pipeline(parse_config(raw), reduce_only=True)
    after = _reducer_state(client, outcome)
    wise = after["points"]["ood_acc/wise_ft"]
    assert [step for step, _ in wise] == [0, 1] and wise[0] == before["points"]["ood_acc/wise_ft"][
        0
    ]
    assert len(after["table"]) == len(STRATEGIES)  # replaced, not appended to
    row = after["table"].set_index("strategy").loc["wise_ft"]
    assert row.ood_acc == pytest.approx(wise[-1][1])
    assert after["latest"]["metrics.ood_acc/wise_ft"] == pytest.approx(wise[-1][1])
    assert after["versions"] == before["versions"]  # same final weights, no new version
    (reducer,) = _children(client, outcome, "reducer")
    assert reducer.data.tags["mlflow.project.entryPoint"] == "ratatouille reduce"


def test_second_experiment_reuses_pretrained_and_pool(sweep):
    config, _, client = sweep
    pool = Pool(pool_path(config))
    created = {entry.name: entry.created for entry in pool.entries()}
    other = tiny_config(
        Path(pool_path(config)).parent.parent,
        name="tiny-reuse",
        aux=ROBUST,
        target={"arms": ["ratatouille"], "n_runs": 3},
    )
    outcome = run_pipeline(other)
    experiment = client.get_experiment_by_name("tiny-reuse")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'"
    )
    stages = Counter(
        run.data.tags.get("stage")
        for run in runs
        if run.data.tags.get("ratatouille.role") == "trial"
    )
    assert stages == {"probe": 1, "target": 3}  # no pretrain, no auxiliary training again
    assert {entry.name: entry.created for entry in pool.entries()} == created


def test_report_prints_the_table_and_writes_markdown_and_csv(sweep, tmp_path, capsys):
    config, outcome, _ = sweep
    code = main(
        [
            "report",
            "--experiment",
            "tiny",
            "--tracking-uri",
            config.tracking.mlflow_uri,
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    markdown = (tmp_path / "tiny" / "report.md").read_text()
    csv = pd.read_csv(tmp_path / "tiny" / "report.csv")
    assert set(csv.strategy) == set(STRATEGIES)
    assert list(csv.test_domain.unique()) == ["rot30"]
    (reducer,) = _children(sweep[2], outcome, "reducer")
    for row in csv.itertuples():  # the CSV carries the numbers the reducer logged
        assert row.ood_acc == pytest.approx(reducer.data.metrics[f"ood_acc/{row.strategy}"])
        assert f"| {row.strategy} | {100 * row.ood_acc:.1f} |" in markdown
    assert "| ratatouille_uniform |" in out
    # the claims table is read back from the parent run, with the verdicts the reducer logged
    assert "## The paper's claims (computed)" in markdown
    held = reducer.data.metrics["claims/d_ratatouille_vs_soups/held"]
    verdict = "held" if held == 1.0 else "not held"
    assert f"| {verdict} |" in markdown.split("d_ratatouille_vs_soups")[1].split("\n")[0]
    assert "d_ratatouille_vs_soups" in out
    # the link opens the experiment on its training runs, not on MLflow 3's GenAI overview
    experiment = sweep[2].get_experiment_by_name("tiny").experiment_id
    assert f"/#/experiments/{experiment}/runs?workflowType=machine_learning" in out


def test_mlflow_server_serves_every_record_of_the_sweep(sweep, tmp_path):
    config, outcome, _client = sweep
    with mlflow_server(config.tracking.mlflow_uri, tmp_path) as url:
        api = f"{url}/api/2.0/mlflow"

        def get(endpoint, /, **params):
            response = requests.get(f"{api}/{endpoint}", params=params, timeout=30)
            assert response.ok, response.text
            return response.json()

        experiment = get("experiments/get-by-name", experiment_name="tiny")["experiment"]
        tags = {tag["key"]: tag["value"] for tag in experiment["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        found = requests.post(
            f"{api}/runs/search",
            json={"experiment_ids": [experiment["experiment_id"]], "max_results": 1000},
            timeout=30,
        ).json()["runs"]
        parent = next(r for r in found if r["info"]["run_id"] == outcome.parent_run_id)
        children = [r for r in found if _tag(r, "mlflow.parentRunId") == outcome.parent_run_id]
        stages = Counter(
            _tag(r, "stage") for r in children if _tag(r, "ratatouille.role") == "trial"
        )
        assert stages == {"pretrain": 1, "aux": 2, "probe": 1, "target": 12}
        (reducer,) = [r for r in children if _tag(r, "ratatouille.role") == "reducer"]
        # what the runs page shows in its Source, Dataset and Models columns
        for run in [parent, *children]:
            assert _tag(run, "mlflow.source.name") and _tag(run, "mlflow.source.type") == "LOCAL"
            assert run["inputs"]["dataset_inputs"], run["info"]["run_name"]
        for run in (parent, reducer):
            assert run["outputs"]["model_outputs"], run["info"]["run_name"]
        reducer_id = reducer["info"]["run_id"]
        listed = {f["path"] for f in get("artifacts/list", run_id=reducer_id)["files"]}
        assert {"comparison.json", "comparison.csv", "report.md", "figures"} <= listed
        figures = [
            f["path"] for f in get("artifacts/list", run_id=reducer_id, path="figures")["files"]
        ]
        assert len(figures) >= 4
        table = requests.get(
            f"{url}/get-artifact", params={"run_uuid": reducer_id, "path": "comparison.json"}
        ).json()
        strategy = table["columns"].index("strategy")
        assert sorted(row[strategy] for row in table["data"]) == sorted(STRATEGIES)
        image = requests.get(
            f"{url}/get-artifact", params={"run_uuid": reducer_id, "path": figures[0]}
        )
        assert image.content.startswith(b"\x89PNG")
        model = get("registered-models/get", name="tiny-ratatouille")["registered_model"]
        champion = get("registered-models/alias", name="tiny-ratatouille", alias="champion")
        assert champion["model_version"]["run_id"] == outcome.parent_run_id
        logged = requests.post(
            f"{api}/logged-models/search",
            json={"experiment_ids": [experiment["experiment_id"]]},
            timeout=30,
        ).json()["models"]
        assert [m["info"]["source_run_id"] for m in logged] == [outcome.parent_run_id]
        assert {a["alias"] for a in model["aliases"]} == {"champion", "champion-rot30-split0"}
        assert requests.get(url, timeout=30).ok  # the UI itself
    with pytest.raises(requests.ConnectionError):  # stopped on leaving the block
        requests.get(f"{url}/health", timeout=5)


def _tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run["data"].get("tags", []) if t["key"] == key), None)
