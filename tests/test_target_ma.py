"""The MA baseline's target side: soups runs keep a moving average of their weights when
``target.moving_average`` is on, and the closing checkpoint carries it beside the best weights."""

from __future__ import annotations

import torch

from ratatouille.core.names import PRETRAINED
from ratatouille.data import target_splits
from ratatouille.engine.models import build_classifier, create_featurizer
from ratatouille.engine.train import evaluate_accuracy
from ratatouille.recipe.checks import experiment_cells
from ratatouille.recipe.stages import context_for, run_trial
from ratatouille.recipe.sweep import probe_specs, target_specs
from test_stages import ListReporter
from tiny import tiny_config


def test_soups_runs_checkpoint_their_moving_average_and_its_id_val_score(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(tmp_path, target={"moving_average": True, "ma_start": 2})
    ctx = context_for(
        config, featurizers={PRETRAINED: create_featurizer("test_resnet").state_dict()}
    )
    assert ctx.ma_arms == ("soups",) and ctx.ma_start == 2
    cells = experiment_cells(config)
    probe = ListReporter()
    run_trial(probe_specs(config, cells)[0], ctx, probe)
    ctx.heads[cells[0].key] = probe.rows[-1][1]["head"]
    specs = target_specs(config, cells)
    soups = next(s for s in specs if s.arm == "soups")
    reporter = ListReporter()
    run_trial(soups, ctx, reporter)
    final, weights, _ = reporter.rows[-1]
    assert set(weights) == {"model", "model_ma"}
    assert all(w is None for _, w, _ in reporter.rows[:-1])  # weights written once, at the end
    best = weights["model"]
    assert any(not weights["model_ma"][k].equal(best[k]) for k in best)
    # each logged score is the accuracy of its weights on the cell's ID-val split
    dataset = ctx.dataset(config.data.dataset)
    cell = soups.cell
    splits = target_splits(dataset, [cell.test_env], cell.split_seed, config.data.holdout_fraction)
    model = build_classifier(config.model.arch, dataset.num_classes)
    model.load_state_dict(weights["model_ma"])
    assert final["ma_id_val_acc"] == evaluate_accuracy(model, splits.id_val)
    model.load_state_dict(best)
    assert final["best_id_val_acc"] == evaluate_accuracy(model, splits.id_val)


def test_moving_average_is_off_by_default_and_only_for_the_soups_arm(tmp_path):
    assert context_for(tiny_config(tmp_path)).ma_arms == ()
