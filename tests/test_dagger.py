"""uniform† where the data lives: the OOD test set is the held-out domain in full, the same in
every split, and the cross-split soup is scored on it (checked by plain forward passes)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ratatouille.data import target_splits
from ratatouille.engine.models import build_classifier
from ratatouille.orchestration.reporting import reduce_domain_dagger_task
from ratatouille.recipe.checks import experiment_cells
from ratatouille.recipe.stages import context_for
from ratatouille.recipe.sweep import domain_sizes_of
from ratatouille.reducer.inputs import TargetRun
from tiny import tiny_config


def _labels_and_inputs(datasets):
    xs, ys = zip(*(dataset[i] for dataset in datasets for i in range(len(dataset))))
    return torch.stack(xs), torch.tensor(ys)


def test_dagger_task_scores_the_soup_of_every_split_on_the_full_held_out_domain(tmp_path):
    config = tiny_config(tmp_path, data={"split_seeds": [0, 1]})
    cells = experiment_cells(config)
    assert [c.split_seed for c in cells] == [0, 1]
    dataset = context_for(config).dataset(config.data.dataset)
    test_sets = [
        target_splits(dataset, [c.test_env], c.split_seed, config.data.holdout_fraction).ood_test
        for c in cells
    ]
    x0, y0 = _labels_and_inputs(test_sets[0])
    x1, y1 = _labels_and_inputs(test_sets[1])
    assert torch.equal(x0, x1) and torch.equal(y0, y1)  # the same images whatever the split
    states = [
        build_classifier(config.model.arch, dataset.num_classes, seed=seed).state_dict()
        for seed in range(3)
    ]
    runs = {
        0: [TargetRun("soups-0", "soups", "pretrained", 0.5, lambda: dict(states[0]))],
        1: [
            TargetRun("soups-0", "soups", "pretrained", 0.5, lambda: dict(states[1])),
            TargetRun("soups-1", "soups", "pretrained", 0.5, lambda: dict(states[2])),
        ],
    }
    frame = reduce_domain_dagger_task(config, cells, runs)
    assert list(frame.strategy) == ["soup_uniform_dagger"]
    mean = {
        k: (sum(s[k].double() for s in states) / 3).to(v.dtype) if v.is_floating_point() else v
        for k, v in states[0].items()
    }
    model = build_classifier(config.model.arch, dataset.num_classes)
    model.load_state_dict(mean)
    with torch.no_grad():
        hand = float((model.eval()(x0).argmax(1) == y0).double().mean())
    assert frame.ood_acc[0] == pytest.approx(hand, abs=1e-9)
    assert frame.members[0] == ["0:soups-0", "1:soups-0", "1:soups-1"]
    assert frame.split_seed[0] == -1 and np.isnan(frame.id_val_acc[0])


def test_reporting_launches_one_dagger_task_per_domain_and_logs_its_rows(tmp_path, monkeypatch):
    from ray import tune
    from safetensors.torch import save_file

    from ratatouille.core.names import MetricKey, WeightsFile
    from ratatouille.orchestration import reporting
    from ratatouille.orchestration.search import TrialOutcome
    from ratatouille.recipe.specs import HParams, TargetSpec

    config = tiny_config(tmp_path, data={"split_seeds": [0, 1]})
    cells = experiment_cells(config)
    dataset = context_for(config).dataset(config.data.dataset)
    by_cell = {}
    for seed, cell in enumerate(cells):
        folder = tmp_path / f"ckpt{seed}"
        folder.mkdir()
        state = build_classifier(config.model.arch, dataset.num_classes, seed=seed).state_dict()
        save_file(
            {k: v.contiguous() for k, v in state.items()}, folder / WeightsFile.MODEL.filename
        )
        spec = TargetSpec(
            cell=cell, arm="soups", run=0, init_source="pretrained", fusing=None,
            checkpoint_freq=3, lp_steps=0, steps=12, seed=seed,
            hparams=HParams(lr=1e-4, weight_decay=0.0, batch_size=8, dropout=0.0),
        )  # fmt: skip
        metrics = {MetricKey.BEST_ID_VAL_ACC: 0.5}
        by_cell[cell.key] = [TrialOutcome(spec, metrics, tune.Checkpoint.from_directory(folder))]
    # in-process instead of a Ray task: the wiring, not Ray, is under test here
    asked: list = []
    monkeypatch.setattr(
        reporting,
        "run_remote",
        lambda fn, _res, *args, memory: asked.append(memory) or (lambda: fn(*args)),
    )
    weights = {"pretrained": {"w": torch.zeros(1000)}}  # 4,000 bytes of featurizer
    state = SimpleNamespace(
        featurizers=weights, heads={c.key: {"weight": torch.zeros(3, 5)} for c in cells}
    )
    dagger = reporting._collect_daggers(reporting._launch_daggers(config, cells, by_cell, state))
    images = sum(domain_sizes_of(config.seed)(config.data.dataset))
    # 1 GiB + 8 networks of 4,060 bytes + two chunks of 3-class logits + per image, 2 runs'
    # predictions (int16), their stacked copy (int16) and correctness (bool), and the label
    assert asked == [2**30 + 8 * 4060 + 2 * 4096 * 3 * 4 + images * (2 * (2 + 2 + 1) + 8)]
    assert list(dagger.strategy) == ["soup_uniform_dagger"] and dagger.n_models[0] == 2
    off = config.model_copy(
        update={"reduce": config.reduce.model_copy(update={"uniform_dagger": False})}
    )
    assert reporting._collect_daggers(reporting._launch_daggers(off, cells, by_cell, state)) is None
    one_seed = [cells[0]]
    assert reporting._launch_daggers(config, one_seed, by_cell, state) == []
