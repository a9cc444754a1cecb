"""Trial bodies in-process (no Ray): what each stage reports and checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from faults import FailingReporter, InjectedFault
from ratatouille.core.names import FUSING, PRETRAINED
from ratatouille.engine.models import create_featurizer
from ratatouille.recipe import stages
from ratatouille.recipe.checks import experiment_cells
from ratatouille.recipe.stages import context_for, init_featurizer, run_trial
from ratatouille.recipe.sweep import aux_probe_specs, aux_specs, probe_specs, target_specs
from tiny import tiny_config


class ListReporter:
    def __init__(self, restored=None):
        self.rows, self.restored = [], restored

    def report(self, metrics, *, weights=None, train_state=None):
        self.rows.append((dict(metrics), weights, train_state))

    def restored_state(self):
        return self.restored


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_config(tmp_path_factory.mktemp("stages"), aux={"robust": True})
    phi_pt = create_featurizer("test_resnet").state_dict()
    ctx = context_for(config, featurizers={PRETRAINED: phi_pt})
    cells = experiment_cells(config)
    probe = ListReporter()
    run_trial(probe_specs(config, cells)[0], ctx, probe)
    ctx.heads[cells[0].key] = probe.rows[-1][1]["head"]
    return config, ctx, cells


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_target_writes_its_weights_once_and_snapshots_hold_the_best_so_far(setup):
    config, ctx, cells = setup
    spec = next(s for s in target_specs(config, cells) if s.init_source == PRETRAINED)
    reporter = ListReporter()
    run_trial(spec, ctx, reporter)
    *steps, (final, final_weights, final_state) = reporter.rows
    assert [m["step"] for m, _, _ in steps] == [0, 3, 6, 9, 11]  # every checkpoint_freq, last
    # snapshot_every_s 0: a train state at every checkpoint step but the last, no weights file
    assert all(weights is None for _, weights, _ in steps)
    assert [state is not None for _, _, state in steps] == [True, True, True, True, False]
    best, best_weights = float("-inf"), None
    for metrics, _, state in steps[:-1]:
        assert state["step"] == metrics["step"]
        if metrics["id_val_acc"] > best:  # strict: a tie keeps the earlier weights
            best, best_weights = metrics["id_val_acc"], state["model"]
        assert _same(state["best_state"], best_weights)  # what a restored trial ends with
    assert final["done"] and final_state is None and set(final_weights) == {"model"}
    if steps[-1][0]["id_val_acc"] <= best:
        assert _same(final_weights["model"], best_weights)
    assert final["best_id_val_acc"] == max(best, steps[-1][0]["id_val_acc"])


def test_snapshots_follow_the_time_budget_not_the_evaluations(setup, monkeypatch):
    config, _, cells = setup
    spec = next(s for s in target_specs(config, cells) if s.arm == "soups")
    now = [0.0]

    def clock():  # each read of the clock: 1 s more of training
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(stages, "monotonic", clock)
    reporter = ListReporter()
    ma_ctx = replace(setup[1], snapshot_every_s=2.5, ma_arms=("soups",))  # target.moving_average
    run_trial(spec, ma_ctx, reporter)
    *steps, (_final, final_weights, _) = reporter.rows
    snapshot_steps = [m["step"] for m, _, state in steps if state is not None]
    # clock reads: start 1; step 0: 2-1 < 2.5; step 3: 3-1 < 2.5; step 6: 4-1 >= 2.5, a
    # snapshot, restarted at 5; step 9: 6-5 < 2.5; step 11, the last, never takes one
    assert snapshot_steps == [6]
    assert all("id_val_acc" in m for m, _, _ in steps)  # evaluation keeps its own frequency
    assert set(final_weights) == {"model", "model_ma"}  # soups keep the moving average
    (snap,) = [state for _, _, state in steps if state is not None]
    assert snap["ma_state"] is not None and snap["best_state"] is not None
    never = ListReporter()
    run_trial(spec, replace(ma_ctx, snapshot_every_s=None), never)
    assert all(state is None for _, _, state in never.rows)


def test_fusing_init_is_the_lambda_weighted_featurizer(setup):
    config, _ctx, cells = setup
    spec = next(s for s in target_specs(config, cells) if s.init_source == FUSING)
    sources = {name: {"w": torch.full((2,), float(i + 1))} for i, name in enumerate(spec.fusing)}
    ctx_sources = context_for(config, featurizers=sources)
    expected = sum(lam * (i + 1) for i, lam in enumerate(spec.fusing.values()))
    assert init_featurizer(spec, ctx_sources)["w"] == pytest.approx(torch.full((2,), expected))


def test_injected_fault_fires_once_at_its_step(setup):
    config, ctx, cells = setup
    spec = next(s for s in target_specs(config, cells) if s.arm == "soups")
    reporter = ListReporter()
    with pytest.raises(InjectedFault, match="step 6"):
        run_trial(spec, ctx, FailingReporter(reporter, step=6))
    assert reporter.rows[-1][0]["step"] == 6
    last_checkpoint = next(state for _, _, state in reversed(reporter.rows) if state is not None)
    resumed = ListReporter(restored=last_checkpoint)
    run_trial(spec, ctx, FailingReporter(resumed, step=6))  # a restored trial is not failed again
    assert resumed.rows[-1][0]["done"]
    assert resumed.rows[0][0]["step"] > last_checkpoint["step"]


def test_aux_probe_fits_a_head_on_every_domain_of_its_task_and_the_run_starts_from_it(setup):
    config, ctx, _ = setup
    probed = tiny_config(_tmp(setup), aux={"head_init": "probe"})
    (probe_spec, *_) = aux_probe_specs(probed)
    reporter = ListReporter()
    run_trial(probe_spec, ctx, reporter)
    metrics, weights, _ = reporter.rows[-1]
    assert metrics["done"] and 0.0 <= metrics["final_id_val_acc"] <= 1.0
    record = json.loads(metrics["data_input"])
    assert record["domains"] == ["flipped"]  # every domain of the task (it has one)
    head = weights["head"]
    aux_spec = next(s for s in aux_specs(probed) if s.task == probe_spec.task)
    assert aux_spec.head == probe_spec.name
    head_ctx = context_for(config, featurizers=ctx.featurizers, heads={aux_spec.head: head})
    first = FirstCheckpoint()
    with pytest.raises(StopAtFirst):
        run_trial(aux_spec, head_ctx, first)
    # after at most one Adam step of lr 3e-4, the head is still the probed one
    start = first.state["model"]["head.weight"]
    assert torch.allclose(start, head["weight"], atol=1e-3)
    assert not torch.allclose(start, torch.zeros_like(start), atol=1e-2)


class StopAtFirst(Exception):
    pass


class FirstCheckpoint(ListReporter):
    def report(self, metrics, *, weights=None, train_state=None):
        self.state = train_state
        raise StopAtFirst


def _tmp(setup):
    config, _, _ = setup
    return Path(config.tracking.storage_path).parent
