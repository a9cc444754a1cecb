"""Trial specs: every random choice of the sweep, made in the driver, reproducible."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from safetensors.torch import save_file

from ratatouille.core.names import FUSING, PRETRAINED
from ratatouille.core.seeding import seed_hash
from ratatouille.engine.models import create_featurizer
from ratatouille.orchestration.pipeline import _pretrained
from ratatouille.recipe.checks import experiment_cells
from ratatouille.recipe.sweep import (
    arm_sources,
    aux_entry_name,
    aux_specs,
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
    names = [group[0] for group in arm_sources(config, "fusing")]
    for spec in specs:
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


def _fake_sizes(dataset):
    """Images per domain: the target's four domains differ, so a wrong test domain shows."""
    return [100, 200, 300, 400] if dataset == "digits" else [50]


def test_plan_prices_each_stage_at_what_it_costs(tmp_path):
    from ratatouille.recipe.sweep import Rates, evaluations, plan_rows

    config = tiny_config(tmp_path, target={"checkpoint_freq": 5})
    rows = plan_rows(config, experiment_cells(config), _fake_sizes, Rates(100.0, 1000.0, "x"))
    got = {r["stage"]: (r["trials"], r["images"], r["eval_images"]) for r in rows}
    # Held-out rot30 (300 images): 700 training-domain images, ID-val = 20 % of them = 140.
    # pretrain: 30 steps x 32 x 1 domain; ID-val (10 of 50) at steps 0, 10, 20, 29.
    # aux: 2 tasks x 12 steps x 32; ID-val at steps 0, 6, 11.
    # probe: features of the 560 ID-train images once + one ID-val pass = 700, no training.
    # target: 3 arms x 3 runs x 12 steps x 32 x 3 domains; ID-val at steps 0, 5, 10, 11, then
    # the 300 test images once.
    # reduce: per arm, greedy 2 + uniform 1 ID-val passes, both soups once on OOD.
    assert got == {
        "pretrain": (1, 30 * 32, 4 * 10),
        "aux": (2, 2 * 12 * 32, 2 * 3 * 10),
        "probe": (1, 0, 700),
        "target": (9, 9 * 12 * 32 * 3, 9 * (4 * 140 + 300)),
        "reduce": (0, 0, 3 * (3 * 140 + 2 * 300)),
    }
    train = 30 * 32 + 2 * 12 * 32 + 9 * 12 * 32 * 3
    evals = 40 + 60 + 700 + 9 * 860 + 3 * 1020
    hours = sum(r["gpu_hours"] for r in rows)
    assert hours == pytest.approx((train / 100 + evals / 1000) / 3600)
    assert [evaluations(n, f) for n, f in ((12, 3), (12, 5), (400, 50), (1, 7))] == [5, 4, 9, 1]
