"""Initial weights by reference: one object-store entry per featurizer and head; a trial fetches
the ones it starts from, nothing else of the pool."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from ratatouille.core.names import FUSING, PRETRAINED, Stage
from ratatouille.engine.fisher import diagonal_fisher
from ratatouille.engine.models import build_classifier, create_featurizer
from ratatouille.orchestration import reporting
from ratatouille.orchestration.search import SharedWeights, StageRunner, share_weights
from ratatouille.recipe.checks import experiment_cells
from ratatouille.recipe.stages import context_for, run_trial
from ratatouille.recipe.sweep import arm_sources, target_specs
from ratatouille.tracking.store import Tracker
from tiny import tiny_config

pytestmark = pytest.mark.ray


class LoggedFetch:
    """ray.get that appends "<trial name> <object id>" to a file, from whichever process (a
    Tune trial) reads an entry. Pickled by value: Ray's workers need not import this module."""

    def __init__(self, log: Path) -> None:
        self.log = str(log)

    def __call__(self, ref):
        import ray
        from ray import tune

        try:
            who = tune.get_context().get_trial_name() or "driver"
        except Exception:  # outside a trial
            who = "driver"
        with open(self.log, "a") as out:
            out.write(f"{who} {ref.hex()}\n")
        return ray.get(ref)


class ListReporter:
    def __init__(self):
        self.rows = []

    def report(self, metrics, *, weights=None, train_state=None):
        self.rows.append((dict(metrics), weights))

    def restored_state(self):
        return None


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A target sweep over a pool of four distinct featurizers (two tasks x two runs): every
    state dict differs, so a fetch names exactly one entry."""
    root = tmp_path_factory.mktemp("shared")
    config = tiny_config(root, aux={"runs_per_task": 2})
    names = sorted({name for group in arm_sources(config, "ratatouille") for name in group})
    assert len(names) == 5
    featurizers = {}
    for index, name in enumerate(names):
        torch.manual_seed(index)
        featurizers[name] = create_featurizer("test_resnet").state_dict()
    cells = experiment_cells(config)
    num_classes = context_for(config).dataset(config.data.dataset).num_classes
    heads = {
        key: build_classifier("test_resnet", num_classes, seed=index).head.state_dict()
        for index, key in enumerate([cells[0].key, "another-cell"])
    }
    return root, config, cells, featurizers, heads


def _three_specs(config, cells):
    """One run per kind of init: phi_pt, one pool entry, a fusing mixture."""
    specs = target_specs(config, cells)
    return [
        next(s for s in specs if s.init_source == PRETRAINED),
        next(s for s in specs if s.init_source not in (PRETRAINED, FUSING)),
        next(s for s in specs if s.init_source == FUSING),
    ]


def _expected_featurizers(spec) -> set[str]:
    """phi_pt (its BN statistics stay, engine.models.load_featurizer_params) and the init."""
    if spec.init_source == FUSING:
        return {PRETRAINED, *spec.fusing}
    return {PRETRAINED, spec.init_source}


def test_each_tune_trial_fetches_only_phi_pt_its_init_and_its_cell_head(
    ray_session, sweep, tmp_path, monkeypatch
):
    import ray.cloudpickle
    from ray.tune.execution.tune_controller import TuneController

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root, config, cells, featurizers, heads = sweep
    log = tmp_path / "fetches.log"
    fetch = LoggedFetch(log)
    shared_f = SharedWeights(fetch=fetch).put(featurizers)
    shared_h = SharedWeights(fetch=fetch).put(heads)
    context = context_for(config, featurizers=shared_f, heads=shared_h)
    # what Tune ships to every trial: references, not the 5 featurizers
    assert len(pickle.dumps(context)) < sum(
        t.numel() * t.element_size() for t in featurizers[PRETRAINED].values()
    )
    specs = _three_specs(config, cells)
    fusing = specs[2]
    assert set(fusing.fusing) < set(featurizers)  # mixes some of the pool, not all of it
    tracker = Tracker(config.name, config.tracking.mlflow_uri)
    run_dir = str(root / "ray_results" / "shared")
    tracker.start_parent(run_dir, config.model_dump(mode="json"))
    # the period between the driver's uploads of the experiment state, as the controller set it
    periods = []
    make_manager = TuneController._create_checkpoint_manager

    def spied(controller):
        manager = make_manager(controller)
        periods.append((manager.auto_checkpoint_enabled, manager._checkpoint_period))
        return manager

    monkeypatch.setattr(TuneController, "_create_checkpoint_manager", spied)
    env_before = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S")
    try:
        outcomes = StageRunner(config, run_dir, tracker).run(Stage.TARGET, specs, context)
    finally:
        tracker.finish_parent()
    assert len(outcomes) == 3
    # resources.experiment_sync_s (300 s by default), not Tune's auto period of 10 s or more;
    # the environment is as it was once the stage is over
    assert config.resources.experiment_sync_s == 300.0
    assert periods == [(False, 300.0)]
    assert os.environ.get("TUNE_GLOBAL_CHECKPOINT_S") == env_before
    name_of = {ref.hex(): name for name, ref in shared_f.refs.items()}
    head_of = {ref.hex(): name for name, ref in shared_h.refs.items()}
    fetched: dict[str, list[str]] = {}
    for line in log.read_text().splitlines():
        who, ref = line.split()
        fetched.setdefault(who, []).append(name_of.get(ref) or f"head:{head_of[ref]}")
    assert set(fetched) == {spec.trial_name for spec in specs}  # the driver fetched nothing
    for spec in specs:
        got = fetched[spec.trial_name]
        assert sorted(got) == sorted({*_expected_featurizers(spec), f"head:{cells[0].key}"})

    # the cell's reducer task gets the references too, and reads phi_pt and its w_lp, at most
    # the pool entry a Hypothesis-1 curve would interpolate (the ratatouille run's, here one
    # source, so no curve), nothing else, each once
    log.unlink()
    reduce_task = reporting.run_remote(
        reporting.reduce_one_cell,
        config.resources,
        config,
        cells[0],
        reporting._target_runs(outcomes),
        shared_f,
        shared_h,
    )
    assert reduce_task().result.table is not None
    reads = [line.split()[1] for line in log.read_text().splitlines()]
    read = [name_of.get(r) or f"head:{head_of[r]}" for r in reads]
    assert len(read) == len(set(read))
    head = f"head:{cells[0].key}"
    assert {PRETRAINED, head} <= set(read) <= {PRETRAINED, specs[1].init_source, head}


def test_a_trial_from_references_trains_as_from_the_state_dicts(ray_session, sweep):
    _, config, cells, featurizers, heads = sweep
    spec = _three_specs(config, cells)[2]  # fusing: reads several entries
    runs = {}
    for kind, (f, h) in {
        "dicts": (featurizers, heads),
        "refs": (share_weights(featurizers), share_weights(heads)),
    }.items():
        reporter = ListReporter()
        run_trial(spec, context_for(config, featurizers=f, heads=h), reporter)
        runs[kind] = reporter.rows
    assert [m["id_val_acc"] for m, _ in runs["refs"][:-1]] == [
        m["id_val_acc"] for m, _ in runs["dicts"][:-1]
    ]
    # the closing report carries the trial's weights files (written once per trial)
    (_, best_refs), (_, best_dicts) = runs["refs"][-1], runs["dicts"][-1]
    assert best_refs["model"].keys() == best_dicts["model"].keys()
    assert all(best_refs["model"][k].equal(best_dicts["model"][k]) for k in best_dicts["model"])


def test_shared_weights_answer_membership_without_fetching(ray_session):
    fetched = []

    def fetch(ref):
        fetched.append(ref)
        return {"w": torch.ones(1)}

    weights = SharedWeights(fetch=fetch).put({"a": {"w": torch.zeros(1)}})
    assert "a" in weights and "b" not in weights and list(weights) == ["a"]
    assert len(weights.only(["a"])) == 1 and fetched == []
    assert weights["a"]["w"].item() == 1.0 and len(fetched) == 1


def test_the_reducers_fisher_reads_the_id_train_images_without_augmentation(sweep):
    """Fisher averaging's estimate is a pure function of the runs: on the training transform's
    fresh random augmentation per read it differed between two reductions of one sweep."""
    _, config, cells, featurizers, heads = sweep
    assert config.data.augment
    dataset, inputs = reporting.cell_reduce_inputs(config, cells[0], [], featurizers, heads)
    splits = context_for(config).cell_splits(dataset, cells[0])
    assert [list(v.indices) for v in inputs.id_train] == [list(t.indices) for t in splits.train]
    model = inputs.build_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def two_fishers(datasets):
        return [diagonal_fisher(model, state, datasets, n_batches=1, batch_size=8) for _ in "ab"]

    first, second = two_fishers(inputs.id_train)
    assert all(torch.equal(first[k], second[k]) for k in first)
    first, second = two_fishers(splits.train)  # the training transform: not reproducible
    assert not all(torch.equal(first[k], second[k]) for k in first)
