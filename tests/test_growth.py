"""Updatable sweeps (issue 22): a finished experiment grows on `--resume`, training only what is
new, keeping every existing trial and its init."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from safetensors.torch import save_file

from ratatouille.cli.main import main
from ratatouille.core.arms import InitChoice, InitDraw, grow_balanced, grow_fusing
from ratatouille.core.names import FUSING, PRETRAINED
from ratatouille.orchestration.pipeline import pool_path, run_pipeline
from ratatouille.pool.store import Pool
from ratatouille.recipe.checks import experiment_cells
from ratatouille.recipe.growth import compare, grown_target_specs
from ratatouille.recipe.sweep import target_specs
from tiny import tiny_config


# -- what a config may add -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sections", "added"),
    [
        ({"target": {"n_runs": 5}}, {"target.n_runs": "3 -> 5"}),
        (
            {"aux": {"tasks": ["digits_aux_flipped", "digits_aux_sheared", "digits_aux_shrunk"]}},
            {"aux.tasks": ["digits_aux_shrunk"]},
        ),
        ({"aux": {"extra_sources": ["community"]}}, {"aux.extra_sources": ["community"]}),
        ({"data": {"split_seeds": [0, 1]}}, {"data.split_seeds": [1]}),
        ({"data": {"test_envs": ["rot30", "thick"]}}, {"data.test_envs": ["thick"]}),
        ({"data": {"test_envs": None}}, {"data.test_envs": ["inverted", "noisy", "thick"]}),
        ({"target": {"arms": ["soups", "ratatouille", "fusing"]}}, {"target.arms": ["fusing"]}),
    ],
)
def test_additions_are_growth(tmp_path, sections, added):
    two_arms = {"arms": ["soups", "ratatouille"]}
    logged = tiny_config(tmp_path, target=two_arms)
    sections = {**sections, "target": {**two_arms, **sections.get("target", {})}}
    growth = compare(logged, tiny_config(tmp_path, **sections))
    assert growth.added == added and growth.refused == []


@pytest.mark.parametrize(
    ("sections", "refused"),
    [
        ({"target": {"steps": 20}}, ["target.steps"]),
        ({"target": {"n_runs": 2}}, ["target.n_runs"]),  # fewer runs: trials would vanish
        ({"target": {"hparams_override": {"lr": [1e-4]}}}, ["target.hparams_override.lr"]),
        ({"aux": {"tasks": ["digits_aux_sheared", "digits_aux_flipped"]}}, ["aux.tasks"]),
        ({"aux": {"tasks": ["digits_aux_flipped"]}}, ["aux.tasks"]),
        ({"data": {"test_envs": ["thick"]}}, ["data.test_envs"]),
        ({"model": {"arch": "resnet18"}}, ["model.arch"]),
    ],
)
def test_changes_to_existing_trials_are_refused_by_field(tmp_path, sections, refused):
    logged = tiny_config(tmp_path)
    assert compare(logged, tiny_config(tmp_path, **sections)).refused == refused


def test_seed_and_growth_together_name_only_the_seed(tmp_path):
    logged = tiny_config(tmp_path)
    grown = tiny_config(tmp_path, target={"n_runs": 4})
    grown = grown.model_copy(update={"seed": 7})
    growth = compare(logged, grown)
    assert growth.refused == ["seed"] and growth.added == {"target.n_runs": "3 -> 4"}


# -- the inits of added runs -----------------------------------------------------------------
def _draw(groups, n_runs):
    return InitDraw("ratatouille", groups, n_runs, seed=0, cell_key="c", fusing_spread=1.0)


def test_added_runs_take_the_new_source_first_then_the_least_used():
    previous = [["pt"], ["a1", "a2"], ["b1"]]
    grown = [*previous, ["new"]]
    existing = [InitChoice(s) for s in ("pt", "a1", "b1", "pt")]  # pt 2, a 1, b 1
    added = grow_balanced(_draw(grown, 8), existing, previous)
    # the new group has no run: it takes the first; then a, b and new have one each: new first
    # (new sources first among equals), then a (with a2, its entry not used yet), then b
    assert [c.init_source for c in added] == ["new", "new", "a2", "b1"]
    counts = {g[0]: sum(c.init_source in g for c in existing + added) for g in grown}
    assert counts == {"pt": 2, "a1": 2, "b1": 2, "new": 2}


def test_added_runs_balance_an_arm_without_a_new_source():
    groups = [["pt"], ["a1"], ["b1"]]
    existing = [InitChoice(s) for s in ("a1", "a1", "b1")]
    added = grow_balanced(_draw(groups, 6), existing, groups)
    assert [c.init_source for c in added] == ["pt", "pt", "b1"]


def test_added_fusing_runs_mix_every_source_and_old_ones_keep_theirs():
    groups = [["pt"], ["a1"], ["new"]]
    existing = [InitChoice(FUSING, {"pt": 0.5, "a1": 0.5})]
    (added,) = grow_fusing(_draw(groups, 2), existing, [["pt"], ["a1"]])
    assert added.init_source == FUSING and set(added.fusing) == {"pt", "a1", "new"}
    assert sum(added.fusing.values()) == pytest.approx(1.0)


def test_grown_specs_keep_every_existing_trial_and_number_the_new_ones_after(tmp_path):
    logged = tiny_config(tmp_path)
    grown = tiny_config(
        tmp_path,
        aux={"tasks": [*logged.aux.tasks, "digits_aux_shrunk"]},
        target={"n_runs": 4},
        data={"split_seeds": [0, 1]},
    )
    existing = target_specs(logged, experiment_cells(logged))
    specs = grown_target_specs(grown, experiment_cells(grown), existing, logged)
    keys = [s.key for s in specs]
    assert len(keys) == len(set(keys))
    assert {s.key for s in existing} <= set(keys)  # not one existing trial changed
    old_cell = [s for s in specs if s.cell.split_seed == 0]
    assert len(old_cell) == 3 * 4 and len(specs) == 2 * 3 * 4
    added = [s for s in old_cell if s.key not in {e.key for e in existing}]
    assert sorted((s.arm, s.run) for s in added) == [
        ("fusing", 3),
        ("ratatouille", 3),
        ("soups", 3),
    ]
    (new_ratatouille,) = [s for s in added if s.arm == "ratatouille"]
    assert new_ratatouille.init_source.startswith("digits_aux_shrunk")
    # a new cell is drawn as a new sweep would draw it
    fresh = {s.key for s in target_specs(grown, experiment_cells(grown)) if s.cell.split_seed == 1}
    assert {s.key for s in specs if s.cell.split_seed == 1} == fresh


# -- a community contribution, end to end ----------------------------------------------------
ARMS = {"arms": ["soups", "ratatouille"], "n_runs": 2}


def _children(client, config, parent_id, stage=None):
    experiment = client.get_experiment_by_name(config.name)
    query = f"tags.mlflow.parentRunId = '{parent_id}'"
    runs = client.search_runs([experiment.experiment_id], query, max_results=1000)
    return [r for r in runs if stage is None or r.data.tags.get("stage") == stage]


def _results(folder: Path) -> dict[str, str]:
    """Tune's record of each trial in an experiment folder: its results, one line per report
    (a trial trained again would add lines)."""
    return {str(p.relative_to(folder)): p.read_text() for p in folder.glob("*/result.json")}


def test_a_contributed_featurizer_grows_the_experiment_training_only_new_runs(
    ray_session, tmp_path, capsys
):
    config = tiny_config(tmp_path, name="grow", target=ARMS, aux={"tasks": ["digits_aux_flipped"]})
    first = run_pipeline(config)
    client = MlflowClient(config.tracking.mlflow_uri)
    parent = client.get_run(first.parent_run_id)
    run_dir = Path(parent.data.tags["ratatouille.run_dir"])
    before = {run.info.run_id: run for run in _children(client, config, first.parent_run_id)}
    histories = {
        run_id: client.get_metric_history(run_id, "id_val_acc")
        for run_id, run in before.items()
        if run.data.tags.get("ratatouille.role") == "trial"
    }
    target_before = _results(run_dir / "target")
    assert len(target_before) == 4

    # a contributor's run: its own pool (sharing phi_pt's store), another auxiliary task
    contrib = tiny_config(
        tmp_path,
        name="contrib",
        target={"arms": ["soups"], "n_runs": 1},
        aux={"tasks": ["digits_aux_shrunk"]},
    )
    contrib.tracking.pool_path = str(tmp_path / "ray_results" / "contrib_pool")
    run_pipeline(contrib)
    pool = Pool(pool_path(contrib))
    (entry,) = [e for e in pool.entries() if e.source_task == "digits_aux_shrunk"]
    handed_over = tmp_path / "community.safetensors"
    save_file(pool.load(entry.name), str(handed_over))
    pool_arg = ["--pool", pool_path(config), "--name", "community", "--arch", "test_resnet"]
    assert main(["pool", "import", str(handed_over), *pool_arg]) == 0

    grown = tiny_config(
        tmp_path,
        name="grow",
        target={**ARMS, "n_runs": 3},
        aux={"tasks": ["digits_aux_flipped"], "extra_sources": ["community"]},
    )
    path = tmp_path / "grown.yaml"
    path.write_text(yaml.safe_dump(grown.model_dump(mode="json")))
    capsys.readouterr()
    assert main(["plan", str(path), "--resume"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["target"][1] == "2" and rows["probe"][1] == "0" and rows["aux"][1] == "0"

    outcome = run_pipeline(grown, resume=True)

    assert outcome.parent_run_id == first.parent_run_id
    # Tune: the old experiment's trials were not run again; exactly the 2 new ones ran beside
    assert _results(run_dir / "target") == target_before
    assert len(_results(run_dir / "target.growth-1")) == 2
    assert not list(run_dir.glob("aux*.growth-*")) and not list(run_dir.glob("probe.growth-*"))
    # MLflow: the old child runs as they were, two new target runs
    after = {run.info.run_id: run for run in _children(client, config, first.parent_run_id)}
    new = [run for run_id, run in after.items() if run_id not in before]
    assert sorted(run.data.params["arm"] + run.data.params["run"] for run in new) == [
        "ratatouille2",
        "soups2",
    ]
    for run_id, run in before.items():
        old = after[run_id]
        assert old.data.params == run.data.params  # init_source included: unchanged
        if run_id in histories:  # a trial: not trained again
            assert client.get_metric_history(run_id, "id_val_acc") == histories[run_id]
            assert old.info.end_time == run.info.end_time
    (new_ratatouille,) = [run for run in new if run.data.params["arm"] == "ratatouille"]
    assert new_ratatouille.data.params["init_source"] == "community"  # the new source first
    (new_soups,) = [run for run in new if run.data.params["arm"] == "soups"]
    assert new_soups.data.params["init_source"] == PRETRAINED
    # the reducer ran over old and new: one more point, the new run in the ratatouille soup
    (reducer,) = [r for r in after.values() if r.data.tags.get("ratatouille.role") == "reducer"]
    points = client.get_metric_history(reducer.info.run_id, "ood_acc/ratatouille_uniform")
    assert len(points) == 2
    table = json.loads(mlflow.artifacts.load_text(f"{reducer.info.artifact_uri}/comparison.json"))
    by_strategy = {row[table["columns"].index("strategy")]: row for row in table["data"]}
    n_models = by_strategy["ratatouille_uniform"][table["columns"].index("n_models")]
    assert n_models == 3  # the uniform soup of the arm's runs: the two old ones and the new one
    # the registered model follows the grown reduction: champion on this reduction's version
    (version,) = outcome.model_versions.values()
    champion = client.get_model_version_by_alias("grow-ratatouille", "champion")
    assert str(champion.version) == version
    # the parent run records the growth
    parent = client.get_run(first.parent_run_id)
    assert parent.data.tags["ratatouille.growths"] == "1"
    record = json.loads(mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/growth/1.json"))
    assert record["added"] == {"aux.extra_sources": ["community"], "target.n_runs": "2 -> 3"}
    assert sorted(record["trials"]["target"]) == sorted(
        f"target_{arm}_rot30_2" for arm in ("ratatouille", "soups")
    )
    # a second resume with the same config trains nothing and keeps the grown trials
    capsys.readouterr()
    assert main(["plan", str(path), "--resume"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["target"][1] == "0"
