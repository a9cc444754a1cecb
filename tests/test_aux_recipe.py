"""The reference's auxiliary recipe end to end without Ray: probed heads made once per task and
reused (a resume included), entries recorded with their recipe, and targets that refuse
incompatible or leaking pool entries."""

from __future__ import annotations

import pytest
import torch

from ratatouille.core.config import ConfigError, parse_config
from ratatouille.core.names import PRETRAINED, MetricKey, Stage, WeightsFile
from ratatouille.engine.models import create_featurizer, feature_dim
from ratatouille.orchestration import pipeline
from ratatouille.orchestration.pipeline import PipelineError, _fill_pool, _sources
from ratatouille.orchestration.search import TrialOutcome
from ratatouille.pool.store import HeadStore, Pool, PoolError
from ratatouille.recipe.checks import check_source_leakage
from ratatouille.recipe.specs import AuxSpec
from ratatouille.recipe.sweep import aux_entry_name, aux_probe_name, aux_recipe
from tiny import TINY, tiny_config

TASKS = ["digits_aux_flipped", "digits_aux_sheared", "digits_aux_shrunk"]


class CountingRunner:
    """Records each stage's specs and context; outcomes carry no checkpoint (weights are faked)."""

    def __init__(self):
        self.calls: list[tuple[Stage, list, object]] = []

    def run(self, stage, specs, context):
        self.calls.append((stage, list(specs), context))
        return [TrialOutcome(s, {MetricKey.FINAL_ID_VAL_ACC: 0.5}, None) for s in specs]

    def specs(self, stage):
        return [spec for called, specs, _ in self.calls if called == stage for spec in specs]

    @staticmethod
    def share(states):  # no Ray here: the weights stay a plain mapping
        return dict(states)


@pytest.fixture
def phi_pt():
    return create_featurizer("test_resnet").state_dict()


@pytest.fixture
def fake_weights(monkeypatch, phi_pt):
    dim = feature_dim(create_featurizer("test_resnet"))

    def weights(outcome, name):
        if name == WeightsFile.HEAD:  # a head that says which task it was probed on
            tag = float(TASKS.index(outcome.spec.task))
            return {"weight": torch.full((10, dim), tag), "bias": torch.zeros(10)}
        return phi_pt

    monkeypatch.setattr(pipeline, "_weights", weights)


def _config(tmp_path, **aux):
    return tiny_config(
        tmp_path,
        aux={"tasks": TASKS, "runs_per_task": 2, "head_init": "probe", **aux},
        tracking={"pool_path": str(tmp_path / "store" / "pool")},
    )


def test_probe_made_once_per_aux_task_and_reused_by_its_runs_and_on_resume(
    tmp_path, fake_weights, phi_pt
):
    config = _config(tmp_path)
    pool = Pool(pipeline.pool_path(config))
    runner = CountingRunner()
    _fill_pool(config, runner, pool, {PRETRAINED: phi_pt})
    assert [stage for stage, _, _ in runner.calls] == [Stage.AUX_PROBE, Stage.AUX]
    assert [s.task for s in runner.specs(Stage.AUX_PROBE)] == TASKS  # 3 probes for 6 runs
    aux_context = runner.calls[1][2]
    for spec in runner.specs(Stage.AUX):
        assert isinstance(spec, AuxSpec)
        head = aux_context.heads[spec.head]  # the head of its own task, from the store
        assert head["weight"].unique().tolist() == [float(TASKS.index(spec.task))]
    assert len(runner.specs(Stage.AUX)) == 6

    again = CountingRunner()  # a resume with the pool full: nothing trains
    _fill_pool(config, again, pool, {PRETRAINED: phi_pt})
    assert again.specs(Stage.AUX_PROBE) == [] and again.specs(Stage.AUX) == []

    # more runs per task: the new runs train, from the probes already made
    more = _config(tmp_path, runs_per_task=3)
    third = CountingRunner()
    _fill_pool(more, third, pool, {PRETRAINED: phi_pt})
    assert third.specs(Stage.AUX_PROBE) == []
    assert sorted((s.task, s.run) for s in third.specs(Stage.AUX)) == [(t, 2) for t in TASKS]
    store = HeadStore(tmp_path / "store" / "aux_heads")
    assert all(aux_probe_name(config, t) in store for t in TASKS)


def test_random_head_runs_no_probe(tmp_path, fake_weights, phi_pt):
    config = _config(tmp_path, head_init="random")
    runner = CountingRunner()
    _fill_pool(config, runner, Pool(pipeline.pool_path(config)), {PRETRAINED: phi_pt})
    assert runner.specs(Stage.AUX_PROBE) == []
    assert runner.calls[-1][2].heads == {}


def test_pool_entries_record_their_recipe(tmp_path, fake_weights, phi_pt):
    config = _config(tmp_path)
    pool = Pool(pipeline.pool_path(config))
    _fill_pool(config, CountingRunner(), pool, {PRETRAINED: phi_pt})
    entry = pool.get(aux_entry_name(config, "digits_aux_sheared", 1))
    assert entry.recipe == aux_recipe(config, "digits_aux_sheared", 1)


def _pool_with(tmp_path, phi_pt, name, **kwargs):
    pool = Pool(tmp_path / "store" / "pool")
    pool.add(name, phi_pt, arch="test_resnet", **kwargs)
    return pool


def test_target_refuses_an_entry_made_from_another_phi_pt(tmp_path, phi_pt):
    config = tiny_config(
        tmp_path,
        aux={"tasks": [], "extra_sources": ["theirs"]},
        tracking={"pool_path": str(tmp_path / "store" / "pool")},
    )
    other = tiny_config(tmp_path, pretrain={"lr": 3e-3}, model={"freeze_bn": False})
    recipe = aux_recipe(other, "digits_aux_flipped", 0)
    pool = _pool_with(tmp_path, phi_pt, "theirs", source_task="digits_aux_flipped", recipe=recipe)
    with pytest.raises(PipelineError, match="theirs: pretrained .*freeze_bn False") as info:
        _sources(config, pool)
    assert "cannot be mixed" in str(info.value)


def test_target_accepts_an_entry_of_its_own_recipe_and_imported_ones(tmp_path, phi_pt):
    config = tiny_config(
        tmp_path,
        aux={"tasks": [], "extra_sources": ["ours", "imported"]},
        tracking={"pool_path": str(tmp_path / "store" / "pool")},
    )
    recipe = aux_recipe(config, "digits_aux_flipped", 0)
    pool = _pool_with(tmp_path, phi_pt, "ours", source_task="digits_aux_flipped", recipe=recipe)
    pool.add("imported", phi_pt, arch="test_resnet", source_task="imported")  # no recipe
    assert set(_sources(config, pool)) == {"ours", "imported"}


def test_extra_source_trained_on_the_target_dataset_is_refused(tmp_path, phi_pt):
    config = tiny_config(
        tmp_path,
        aux={"tasks": [], "extra_sources": ["leaky"]},
        tracking={"pool_path": str(tmp_path / "store" / "pool")},
    )
    pool = _pool_with(tmp_path, phi_pt, "leaky", source_task="digits")
    with pytest.raises(ConfigError, match=r"aux.extra_sources \['leaky'\] .* target dataset"):
        _sources(config, pool)
    check_source_leakage(config, {"leaky": "digits_aux_flipped"})  # another task: fine


def test_pretrain_on_the_target_dataset_is_refused():
    raw = {**TINY, "pretrain": {**TINY["pretrain"], "task": "digits"}}
    with pytest.raises(ConfigError, match="pretrain.task is the target dataset 'digits'"):
        parse_config(raw)


def test_per_task_steps_must_name_aux_tasks():
    raw = {**TINY, "aux": {**TINY["aux"], "steps": {"digits_aux_shrunk": 5}}}
    with pytest.raises(ConfigError, match=r"aux: .*steps names \['digits_aux_shrunk'\]"):
        parse_config(raw)
    raw = {**TINY, "aux": {**TINY["aux"], "steps": {"digits_aux_flipped": 0}}}
    with pytest.raises(ConfigError, match="aux.steps: .*>= 1"):
        parse_config(raw)


def test_head_store_checks_its_hash(tmp_path):
    store = HeadStore(tmp_path / "heads")
    store.add("h", {"weight": torch.ones(3, 4), "bias": torch.zeros(3)}, source_task="t")
    assert store.load("h")["weight"].equal(torch.ones(3, 4))
    (tmp_path / "heads" / "h.safetensors").write_bytes(b"tampered")
    with pytest.raises(PoolError, match="sha256"):
        store.load("h")
    with pytest.raises(PoolError, match="2-D 'weight' and a 'bias'"):
        store.add("g", {"weight": torch.ones(3)}, source_task="t")
