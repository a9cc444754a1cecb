"""Trial specs: every random choice of the sweep, made in the driver, reproducible."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ratatouille.core.config import parse_config
from ratatouille.core.names import FUSING, PRETRAINED
from ratatouille.core.seeding import seed_hash
from ratatouille.engine.hparams import random_hparams
from ratatouille.engine.models import create_featurizer
from ratatouille.orchestration.pipeline import _pretrained
from ratatouille.recipe import sweep
from ratatouille.recipe.checks import experiment_cells
from ratatouille.recipe.specs import HParams
from ratatouille.recipe.sweep import (
    arm_sources,
    aux_entry_name,
    aux_probe_name,
    aux_probe_specs,
    aux_recipe,
    aux_specs,
    plan_rows,
    pretrained_identity,
    robust_name,
    target_specs,
)
from tiny import tiny_config


@pytest.fixture
def config(tmp_path):
    return tiny_config(
        tmp_path,
        aux={
            "tasks": ["digits_aux_flipped", "digits_aux_sheared", "digits_aux_shrunk"],
            "robust": True,
        },
        target={"arms": ["soups", "ratatouille", "fusing", "robust_ratatouille"], "n_runs": 10},
    )


def test_specs_are_identical_when_rebuilt(config):
    cells = experiment_cells(config)
    assert target_specs(config, cells) == target_specs(config, experiment_cells(config))
    assert len(target_specs(config, cells)) == 4 * 10


def test_ratatouille_inits_are_balanced_over_pretrained_and_aux_tasks(config):
    specs = [s for s in target_specs(config, experiment_cells(config)) if s.arm == "ratatouille"]
    counts = Counter(s.init_source for s in specs)
    # 10 runs over 4 sources: two sources get 3 runs, two get 2 (10 // 4 or one more).
    assert sorted(counts.values()) == [2, 2, 3, 3]
    assert set(counts) == {PRETRAINED} | {aux_entry_name(config, t, 0) for t in config.aux.tasks}
    robust = [
        s for s in target_specs(config, experiment_cells(config)) if s.arm == "robust_ratatouille"
    ]
    assert {s.init_source for s in robust} - {PRETRAINED} == {
        robust_name(aux_entry_name(config, t, 0)) for t in config.aux.tasks
    }


def test_featurizer_freeze_only_after_an_auxiliary_init(config):
    for spec in target_specs(config, experiment_cells(config)):
        expected = 0 if spec.init_source == PRETRAINED else config.target.lp_steps
        assert spec.lp_steps == expected


def test_fusing_lambdas_are_softmax_of_uniform_kappa(config):
    cell = experiment_cells(config)[0]
    specs = [s for s in target_specs(config, [cell]) if s.arm == FUSING]
    groups = arm_sources(config, "fusing")
    for spec in specs:
        names = [group[spec.run % len(group)] for group in groups]
        assert spec.init_source == FUSING and list(spec.fusing) == names
        rng = np.random.default_rng(seed_hash(config.seed, "fusing", cell.key, spec.run))
        kappa = rng.uniform(0.0, config.target.fusing_spread, size=len(names))
        expected = np.exp(kappa) / np.exp(kappa).sum()  # paper F.1, computed here by hand
        assert list(spec.fusing.values()) == pytest.approx(expected.tolist())


def test_hyperparameters_come_from_the_configured_grid(config):
    specs = target_specs(config, experiment_cells(config))
    assert {s.hparams.lr for s in specs} <= {1e-4, 3e-4}
    assert {s.hparams.weight_decay for s in specs} <= {1e-6, 1e-4}  # Table 3, mild
    assert {s.hparams.dropout for s in specs} <= {0.0, 0.1, 0.5}
    assert {s.hparams.batch_size for s in specs} == {32}
    assert len({s.seed for s in specs}) == len(specs)


def test_aux_entry_names_change_with_the_recipe_not_with_the_target(tmp_path, config):
    other_target = tiny_config(
        tmp_path, aux=config.aux.model_dump(), data={"dataset": "digits", "test_envs": ["thick"]}
    )
    assert aux_entry_name(config, "digits_aux_flipped", 0) == aux_entry_name(
        other_target, "digits_aux_flipped", 0
    )
    longer = tiny_config(tmp_path, aux={**config.aux.model_dump(), "steps": 99})
    assert aux_entry_name(config, "digits_aux_flipped", 0) != aux_entry_name(
        longer, "digits_aux_flipped", 0
    )
    assert [s.name for s in aux_specs(config)] == [
        aux_entry_name(config, t, 0) for t in config.aux.tasks
    ]


def test_phi_pt_from_a_local_file(tmp_path):
    featurizer = create_featurizer("test_resnet")
    path = tmp_path / "phi.safetensors"
    save_file(featurizer.state_dict(), str(path))
    config = tiny_config(tmp_path, model={"init": "file", "weights_file": str(path)})
    loaded = _pretrained(config, runner=None)[PRETRAINED]
    for key, value in featurizer.state_dict().items():
        assert loaded[key].equal(value), key


def test_pool_names_are_valid_for_hub_style_arch_names(tmp_path):
    from ratatouille.pool.store import PoolError, _check_name

    config = tiny_config(tmp_path, model={"arch": "hf-hub:timm/resnet50.a1_in1k"})
    name = aux_entry_name(config, "digits_aux_flipped", 0)
    assert name.startswith("digits_aux_flipped-hf-hub_timm_resnet50.a1_in1k-r0-")
    _check_name(name)  # the pool accepts it
    with pytest.raises(PoolError):
        _check_name("digits-hf-hub:timm/resnet50")  # the unsanitised form it would refuse


TASKS = ["digits_aux_flipped", "digits_aux_sheared", "digits_aux_shrunk"]


@pytest.fixture
def reference(tmp_path):
    """The reference's auxiliary recipe: 4 runs per task from a probed head, per-task steps."""
    return tiny_config(
        tmp_path,
        aux={
            "tasks": TASKS,
            "runs_per_task": 4,
            "head_init": "probe",
            "steps": {"digits_aux_flipped": 7, "digits_aux_shrunk": 15001},
            "hparams": "mild",
            "hparams_override": {},
        },
        target={"arms": ["soups", "ratatouille", "fusing"], "n_runs": 16},
    )


def test_reference_recipe_plans_runs_per_task_draws_and_per_task_steps(reference):
    specs = aux_specs(reference)
    assert len(specs) == 3 * 4
    assert [(s.task, s.run) for s in specs] == [(t, r) for t in TASKS for r in range(4)]
    # by hand: flipped has its own 7; sheared is not in the mapping, so DomainBed's 5001
    steps = {s.task: s.steps for s in specs}
    assert steps == {
        "digits_aux_flipped": 7,
        "digits_aux_sheared": 5001,
        "digits_aux_shrunk": 15001,
    }
    for task in TASKS:
        runs = [s for s in specs if s.task == task]
        # each run its own seeded draw of Table 3's mild grid, as the target's hparams
        for spec in runs:
            want = random_hparams("mild", seed_hash(reference.seed, "aux", task, spec.run))
            assert spec.hparams == HParams(**want)
        assert len({s.hparams for s in runs}) > 1 and len({s.seed for s in runs}) == 4
    assert len({s.name for s in specs}) == 12


def test_one_probe_per_aux_task_shared_by_that_tasks_runs(reference, tmp_path):
    probes = aux_probe_specs(reference)
    assert [p.task for p in probes] == TASKS
    assert [p.steps for p in probes] == [7, 5001, 15001]  # the task's own schedule
    heads = {p.task: p.name for p in probes}
    assert len(set(heads.values())) == 3
    for spec in aux_specs(reference):
        assert spec.head == heads[spec.task]
    random_head = tiny_config(tmp_path, aux={**reference.aux.model_dump(), "head_init": "random"})
    assert aux_probe_specs(random_head) == []
    assert {s.head for s in aux_specs(random_head)} == {None}


def test_plan_counts_aux_evaluations_at_their_eval_freq(tmp_path):
    from ratatouille.recipe.sweep import Rates

    config = tiny_config(tmp_path, aux={"eval_freq": 6})  # 12 steps: ID-val at 0, 6 and 11
    rows = {
        r["stage"]: r
        for r in plan_rows(config, experiment_cells(config), _fake_sizes, Rates(1.0, 1.0, "x"))
    }
    assert rows["aux"]["eval_images"] == 2 * 3 * 10


def test_plan_counts_the_aux_probes(reference):
    from ratatouille.recipe.sweep import Rates

    cells = experiment_cells(reference)
    rows = {r["stage"]: r for r in plan_rows(reference, cells, _fake_sizes, Rates(1.0, 1.0, "x"))}
    assert rows["aux_probe"]["trials"] == 3
    assert rows["aux_probe"]["steps"] == 7 + 5001 + 15001
    # one feature extraction over every image of each task (50 each); no training images
    assert (rows["aux_probe"]["images"], rows["aux_probe"]["eval_images"]) == (0, 3 * 50)
    assert rows["aux"]["trials"] == 12
    assert rows["aux"]["steps"] == 4 * (7 + 5001 + 15001)


def test_sixteen_ratatouille_runs_start_from_distinct_featurizers(reference):
    # 16 runs over phi_pt + 3 tasks x 4 runs: 4 per source, so each aux entry exactly once
    specs = target_specs(reference, experiment_cells(reference))
    counts = Counter(s.init_source for s in specs if s.arm == "ratatouille")
    want = {aux_entry_name(reference, t, r): 1 for t in TASKS for r in range(4)}
    assert counts == {PRETRAINED: 4, **want}


def _changed(tmp_path, **sections):
    return tiny_config(tmp_path, **sections)


@pytest.mark.parametrize(
    "change",
    [
        {"model": {"arch": "resnet18"}},
        {"pretrain": {"lr": 3e-3}},  # another phi_pt
        {"pretrain": {"task": "digits_aux_shrunk"}},
        {"data": {"image_size": 16}},
        {"data": {"augment": False}},
        {"model": {"freeze_bn": False}},
        {"data": {"holdout_fraction": 0.3}},
        {"data": {"pipeline": "decoded"}},
        {"aux": {"checkpoint_freq": 4}},  # loaders are re-seeded at every snapshot point
        {"model": {"precision": "fp32"}},
        {"seed": 1},
        {"aux": {"head_init": "probe"}},
        {"aux": {"steps": 13}},
        {"aux": {"steps": {"digits_aux_flipped": 13}}},
        {"aux": {"hparams_override": {"lr": [1e-4]}}},
        {"probe": {"lr": 3e-3}, "aux": {"head_init": "probe"}},  # vs the probe with lr 1e-3
    ],
)
def test_anything_that_shapes_the_weights_renames_the_entry(tmp_path, change):
    base = tiny_config(tmp_path, aux={"head_init": "probe"} if "probe" in change else {})
    raw = base.model_dump()
    for section, values in change.items():
        if isinstance(values, dict):
            raw[section] = {**(raw[section] or {}), **values}
        else:
            raw[section] = values
    other = parse_config(raw)
    assert aux_entry_name(base, "digits_aux_flipped", 0) != aux_entry_name(
        other, "digits_aux_flipped", 0
    )


def test_the_data_pipeline_version_renames_entries(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    before = aux_entry_name(config, "digits_aux_flipped", 0)
    monkeypatch.setattr(sweep, "DATA_PIPELINE_VERSION", sweep.DATA_PIPELINE_VERSION + 1)
    assert aux_entry_name(config, "digits_aux_flipped", 0) != before


@pytest.mark.parametrize(
    "change",
    [
        {"aux": {"eval_freq": 12}},  # when ID-val is read, not what is trained
        {"aux": {"tasks": ["digits_aux_flipped"]}},  # another task's entries stay
        {"target": {"n_runs": 7}},
        {"data": {"test_envs": ["thick"], "split_seeds": [1]}},
        {"resources": {"cpus_per_trial": 2}},
    ],
)
def test_what_does_not_shape_an_entry_keeps_its_name(tmp_path, change):
    base = tiny_config(tmp_path)
    assert aux_entry_name(base, "digits_aux_flipped", 0) == aux_entry_name(
        tiny_config(tmp_path, **change), "digits_aux_flipped", 0
    )


def test_the_manifest_recipe_records_each_field_that_shapes_the_weights(reference):
    recipe = aux_recipe(reference, "digits_aux_shrunk", 2)
    assert recipe["steps"] == 15001 and recipe["run"] == 2 and recipe["task"] == "digits_aux_shrunk"
    assert recipe["head"] == aux_probe_name(reference, "digits_aux_shrunk")
    assert recipe["pretrained"] == pretrained_identity(reference)
    for key in ("arch", "image_size", "augment", "freeze_bn", "holdout_fraction", "seed"):
        assert key in recipe
    assert recipe["hparams"] == dataclasses.asdict(aux_specs(reference)[10].hparams)


def test_domainbed_configs_follow_the_reference_pool_and_share_its_entries():
    from pathlib import Path

    from ratatouille.core.config import load_config

    folder = Path(__file__).parent.parent / "experiments" / "domainbed"
    configs = [load_config(path) for path in sorted(folder.glob("*.yaml"))]
    assert len(configs) == 5
    names: dict[tuple[str, int], set[str]] = {}
    for config in configs:
        assert (config.aux.runs_per_task, config.aux.head_init) == (4, "probe")
        for spec in aux_specs(config):
            assert spec.steps == (15001 if spec.task == "DomainNet" else 5001)
            names.setdefault((spec.task, spec.run), set()).add(spec.name)
    # each of the 5 datasets is an auxiliary task of the 4 others: one name per (task, run)
    assert len(names) == 5 * 4 and all(len(n) == 1 for n in names.values())


def test_a_weights_file_is_identified_by_its_content_not_its_path(tmp_path):
    path = tmp_path / "phi.safetensors"
    save_file(create_featurizer("test_resnet").state_dict(), str(path))
    config = tiny_config(tmp_path, model={"init": "file", "weights_file": str(path)})
    before = aux_entry_name(config, "digits_aux_flipped", 0)
    torch.manual_seed(1)
    save_file(create_featurizer("test_resnet").state_dict(), str(path))  # same path, new phi_pt
    mtime = path.stat().st_mtime_ns + 10**9  # a coarse clock could repeat the first mtime
    os.utime(path, ns=(mtime, mtime))
    assert aux_entry_name(config, "digits_aux_flipped", 0) != before


def _fake_sizes(dataset):
    """Images per domain: the target's four domains differ, so a wrong test domain shows."""
    return [100, 200, 300, 400] if dataset == "digits" else [50]


def test_plan_prices_each_stage_at_what_it_costs(tmp_path):
    from ratatouille.recipe.sweep import Rates, evaluations, plan_rows

    config = tiny_config(tmp_path, target={"checkpoint_freq": 5})
    rows = plan_rows(config, experiment_cells(config), _fake_sizes, Rates(100.0, 1000.0, "x"), 1020)
    got = {r["stage"]: (r["trials"], r["images"], r["eval_images"]) for r in rows}
    # Held-out rot30 (300 images): 700 training-domain images, ID-val = 20 % of them = 140.
    # pretrain: 30 steps x 32 x 1 domain; ID-val (10 of 50) at steps 0, 10, 20, 29.
    # aux: 2 tasks x 12 steps x 32; ID-val once, at the last step (aux.eval_freq unset).
    # probe: features of the 560 ID-train images once + one ID-val pass = 700, no training.
    # target: 3 arms x 3 runs x 12 steps x 32 x 3 domains; ID-val at steps 0, 5, 10, 11; the
    # test domain is never read (run_target scores ID val only).
    # reduce: the images the reducer's own count gives (tests/test_reduce_plan.py checks it).
    assert got == {
        "pretrain": (1, 30 * 32, 4 * 10),
        "aux": (2, 2 * 12 * 32, 2 * 1 * 10),
        "probe": (1, 0, 700),
        "target": (9, 9 * 12 * 32 * 3, 9 * 4 * 140),
        "reduce": (0, 0, 1020),
    }
    train = 30 * 32 + 2 * 12 * 32 + 9 * 12 * 32 * 3
    evals = 40 + 20 + 700 + 9 * 560 + 1020
    hours = sum(r["gpu_hours"] for r in rows)
    assert hours == pytest.approx((train / 100 + evals / 1000) / 3600)
    assert [evaluations(n, f) for n, f in ((12, 3), (12, 5), (400, 50), (1, 7))] == [5, 4, 9, 1]


def test_plan_counts_the_snapshots_the_clock_takes_and_their_moving_average(tmp_path):
    from ratatouille.recipe.sweep import ModelBytes, Rates, plan_rows, snapshots_of

    def with_budget(every):
        return tiny_config(tmp_path, resources={"snapshot_every_s": every})

    # 11 checkpoint steps: a snapshot at each but the last, at most one per budget
    assert snapshots_of(with_budget(0), 1e9, 11) == 10
    assert snapshots_of(with_budget(30), 95.0, 11) == 3
    assert snapshots_of(with_budget(1), 1e9, 11) == 10
    assert snapshots_of(with_budget(None), 1e9, 11) == 0
    assert snapshots_of(with_budget(0), 5.0, 1) == 0  # one checkpoint step: the closing one
    config = tiny_config(
        tmp_path, target={"moving_average": True}, resources={"snapshot_every_s": 0}
    )
    cells = experiment_cells(config)
    rows = plan_rows(config, cells, _fake_sizes, Rates(1.0, 1.0, "x"), 0, ModelBytes(90, 10))
    target = next(r for r in rows if r["stage"] == "target")
    specs = target_specs(config, cells)
    by_hand = sum(
        100 * (1 + (s.arm == "soups"))  # the weights files, the moving average for soups
        + 100 * (sweep.evaluations(s.steps, s.checkpoint_freq) - 1) * (4 + (s.arm == "soups"))
        for s in specs
    )
    assert target["written"] == by_hand


def test_plan_prices_storage_as_weights_files_written_once_and_read_once_per_task(tmp_path):
    from ratatouille.recipe.sweep import ModelBytes, Rates, plan_rows, storage_bytes

    # two trials writing 1 and 2 whole-model files, 12 model-sized snapshot files, 5 reads
    assert storage_bytes([(1, 0), (2, 0)], ModelBytes(100, 10), [3 * 4, 0], 5) == (
        110 + 220 + 3 * 4 * 110,
        5 * 110,
    )
    assert storage_bytes([(0, 1)] * 2, ModelBytes(100, 10), [], 0) == (20, 0)
    config = tiny_config(
        tmp_path, target={"moving_average": True}, resources={"snapshot_every_s": None}
    )
    cells = experiment_cells(config)
    rows = {
        r["stage"]: r
        for r in plan_rows(config, cells, _fake_sizes, Rates(1.0, 1.0, "x"), 0, ModelBytes(90, 10))
    }
    # 9 target trials, the 3 soups runs also write their moving average; no snapshots
    assert rows["target"]["written"] == (9 + 3) * 100
    # the reducer reads those 12 files once (one split seed: no uniform† task), writes the
    # cell's final model
    assert (rows["reduce"]["written"], rows["reduce"]["read"]) == (100, 12 * 100)
    assert rows["probe"]["written"] == 10 and rows["target"]["read"] == 0
    unknown = plan_rows(config, cells, _fake_sizes, Rates(1.0, 1.0, "x"))
    assert {r["written"] for r in unknown} == {None}
