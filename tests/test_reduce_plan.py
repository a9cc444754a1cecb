"""`plan` counts the reducer's evaluations by running the reducer (reducer.dry_run): its count
matches an instrumented reduction of a real sweep, and the cells it counts are the ones the
reducer reads."""

from __future__ import annotations

import torch

from ratatouille.cli.main import reducer_evaluations
from ratatouille.engine.train import predict_logits
from ratatouille.recipe.checks import experiment_cells
from ratatouille.recipe.stages import context_for
from ratatouille.recipe.sweep import domain_sizes_of, reducer_cells, target_specs
from ratatouille.reducer.dry_run import (
    CellShape,
    ShadowRun,
    count_cell,
    count_dagger,
    count_sweep,
)
from ratatouille.reducer.inputs import settings_from_config
from ratatouille.reducer.reduce import reduce_cell
from reduce_sweep import build_sweep, make_inputs
from tiny import tiny_config

torch.set_num_threads(1)

GREEDY = ("soup_greedy", "ratatouille_greedy", "robust_ratatouille_greedy")


def _shape(sweep, keeps_ma: bool = False, split_seed: int = 0) -> CellShape:
    runs = tuple(
        ShadowRun(run_id, arm, source, keeps_ma and arm == "soups")
        for run_id, arm, source in sweep["meta"]
    )
    return CellShape("d2", split_seed, runs, (70, 70), (240,))


def _instrumented(sweep, keeps_ma: bool = False):
    """A real reduction whose forward passes are counted image by image."""
    images = {"id_val": 0, "ood_test": 0}

    def counting(model, dataset, **kwargs):
        logits, labels = predict_logits(model, dataset, **kwargs)
        images[dataset.split] += len(labels)  # a SpyDataset: each fits one chunk
        return logits, labels

    inputs = make_inputs(sweep, predict=counting)
    if keeps_ma:
        for run in inputs.runs:
            if run.arm == "soups":
                run.load_ma_state = run.load_state
    return reduce_cell(inputs), images


def test_the_reducers_own_count_matches_an_instrumented_reduction_of_a_real_sweep():
    sweep = build_sweep()
    for keeps_ma in (False, True):
        result, images = _instrumented(sweep, keeps_ma)
        counted = count_cell(_shape(sweep, keeps_ma), make_inputs(sweep).settings)
        assert counted.id_val_images == images["id_val"] == result.evaluated["id_val_images"]
        # zero logits keep every greedy candidate: a real greedy soup of one run costs no pass
        single = [s for s in GREEDY if (result.table.strategy == s).any()
                  and result.table.set_index("strategy").n_models[s] == 1]  # fmt: skip
        assert counted.ood_test_images == images["ood_test"] + 240 * len(single)
        assert counted.id_val_passes == images["id_val"] // 140


def test_a_domain_with_two_split_seeds_adds_one_uniform_dagger_pass_per_averaging_arm():
    sweep = build_sweep()
    settings = make_inputs(sweep).settings
    one = count_cell(_shape(sweep), settings)
    shapes = [_shape(sweep, split_seed=0), _shape(sweep, split_seed=1)]
    both = count_sweep(shapes, settings, uniform_dagger=True)
    # soups, ratatouille and robust ratatouille have runs: three † soups on the 240 OOD images
    assert both.ood_test_images == 2 * one.ood_test_images + 3 * 240
    assert both.id_val_images == 2 * one.id_val_images
    assert count_sweep(shapes, settings, uniform_dagger=False).ood_test_images == (
        2 * one.ood_test_images
    )


def test_plan_counts_the_runs_and_images_the_reducer_of_each_cell_reads(tmp_path):
    config = tiny_config(tmp_path, data={"split_seeds": [0, 1]})
    cells = experiment_cells(config)
    sizes = domain_sizes_of(config.seed)
    context = context_for(config)
    dataset = context.dataset(config.data.dataset)
    specs = target_specs(config, cells)
    for cell, runs, id_val, ood in reducer_cells(config, cells, sizes):
        splits = context.cell_splits(dataset, cell)
        assert id_val == [len(d) for d in splits.id_val]
        assert ood == [len(d) for d in splits.ood_test]
        expected = [(s.run_id, s.arm, s.init_source) for s in specs if s.cell == cell]
        assert [r[:3] for r in runs] == expected and len(expected) == 9
    total = reducer_evaluations(config, cells, sizes)
    shapes = [
        CellShape(c.test_domain, c.split_seed, tuple(ShadowRun(*r) for r in runs), (*i,), (*o,))
        for c, runs, i, o in reducer_cells(config, cells, sizes)
    ]
    settings = settings_from_config(config.reduce, config.seed)
    per_cell = sum(count_cell(s, settings).images for s in shapes)
    # two split seeds of one test domain: one uniform† task too
    assert total.images == per_cell + count_dagger(shapes).images > per_cell
