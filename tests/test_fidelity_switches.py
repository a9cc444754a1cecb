"""The switches between our recipe and the reference's (docs/fidelity.md): both settings of each
do what they say, checked against a hand computation or an independent route, and the ones that
shape pooled weights rename the pool entries."""

from __future__ import annotations

import itertools
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from probe_routes import calibrated_phi_pt, frozen_featurizer_loop
from ratatouille.core.config import ConfigError
from ratatouille.core.names import PRETRAINED
from ratatouille.core.seeding import seed_hash
from ratatouille.data import InfiniteLoader, get_dataset, target_splits, train_batches
from ratatouille.data.loaders import _EndlessBatches, sampling_of
from ratatouille.data.splits import TrainSplit
from ratatouille.engine import train as train_module
from ratatouille.engine.models import build_classifier, featurizer_state, head_state
from ratatouille.engine.probe import eval_train_views, linear_probe
from ratatouille.engine.train import evaluate_accuracy
from ratatouille.merging.soups import greedy_soup
from ratatouille.recipe import stages
from ratatouille.recipe.checks import experiment_cells
from ratatouille.recipe.stages import context_for, run_trial
from ratatouille.recipe.sweep import (
    aux_entry_name,
    aux_probe_name,
    aux_recipe,
    pretrained_identity,
    probe_specs,
    target_specs,
)
from ratatouille.reducer import strategies
from ratatouille.reducer.inputs import ReduceSettings
from test_data_store import _decoded, _write_pacs
from tiny import tiny_config

ARCH = "test_resnet"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits", augment=True)


@pytest.fixture(scope="module")
def phi_pt():
    return calibrated_phi_pt(ARCH)


class ListReporter:
    def __init__(self):
        self.rows = []

    def report(self, metrics, *, weights=None, train_state=None):
        self.rows.append((dict(metrics), weights))

    def restored_state(self):
        return None


# --- probe.select -------------------------------------------------------------------------------


def _probe(phi_pt, dataset, splits, steps, **kwargs):
    model = build_classifier(ARCH, splits.num_classes, featurizer_weights=phi_pt, seed=0)
    return linear_probe(
        model.featurizer,
        eval_train_views(dataset, splits),
        splits.id_val,
        splits.num_classes,
        steps=steps,
        lr=0.05,  # large: the ID-val accuracy goes up and down between checkpoints
        batch_size=8,
        seed=1,
        head_init=head_state(model),
        **kwargs,
    )


def test_probe_best_id_val_keeps_the_strictly_best_checkpoint_and_last_keeps_the_last(
    digits, phi_pt
):
    splits = target_splits(digits, [0], split_seed=0)
    steps, freq = 9, 2
    kept = _probe(phi_pt, digits, splits, steps, select="best_id_val", checkpoint_freq=freq)
    last = _probe(phi_pt, digits, splits, steps)  # select: last, the default
    # Independent route: the head after step s is the last head of a probe of s + 1 steps (same
    # streams), scored by plugging it into the classifier; the best is picked by hand.
    classifier = build_classifier(ARCH, splits.num_classes, featurizer_weights=phi_pt, seed=0)
    best_acc, best_step, best_head = float("-inf"), -1, None
    for step in [0, 2, 4, 6, 8]:  # step % 2 == 0, and 8 is the last
        head = _probe(phi_pt, digits, splits, step + 1).head_state
        classifier.head.load_state_dict(head)
        acc = evaluate_accuracy(classifier, splits.id_val)
        if acc > best_acc:
            best_acc, best_step, best_head = acc, step, head
    assert best_step != steps - 1, "precondition: the last checkpoint is not the best one here"
    assert kept.step == best_step and kept.id_val_acc == pytest.approx(best_acc)
    assert all(torch.allclose(kept.head_state[k], best_head[k], atol=1e-5) for k in best_head)
    assert last.step == steps - 1
    assert not torch.allclose(last.head_state["weight"], kept.head_state["weight"])


def test_probe_stage_keeps_the_head_probe_select_asks_for(tmp_path, digits, phi_pt):
    probe = {"steps": 9, "lr": 0.5, "select": "best_id_val", "checkpoint_freq": 2}
    config = tiny_config(tmp_path, probe=probe)
    cell = experiment_cells(config)[0]
    spec = probe_specs(config, [cell])[0]
    ctx = context_for(config, featurizers={PRETRAINED: phi_pt})
    reporter = ListReporter()
    run_trial(spec, ctx, reporter)
    # The stage's route against a direct call with the same settings.
    model = build_classifier(ARCH, 10, featurizer_weights=phi_pt, seed=spec.seed)
    dataset = get_dataset("digits", augment=False)
    splits = target_splits(dataset, [cell.test_env], cell.split_seed)
    direct = linear_probe(
        model.featurizer,
        splits.train,
        splits.id_val,
        10,
        steps=9,
        lr=0.5,
        batch_size=config.probe.batch_size,
        seed=spec.seed,
        select="best_id_val",
        checkpoint_freq=2,
    )
    assert ctx.probe_select == "best_id_val" and ctx.probe_checkpoint_freq == 2
    # precondition: the last head is not the kept one, so a stage ignoring probe.select fails
    assert direct.step != 8
    ((metrics, weights),) = reporter.rows
    assert metrics["final_id_val_acc"] == pytest.approx(direct.id_val_acc)
    assert torch.allclose(weights["head"]["weight"], direct.head_state["weight"])


def test_probe_select_renames_the_auxiliary_heads_and_runs(tmp_path):
    plain = tiny_config(tmp_path, aux={"head_init": "probe"})
    best = tiny_config(tmp_path, aux={"head_init": "probe"}, probe={"select": "best_id_val"})
    other_freq = tiny_config(
        tmp_path, aux={"head_init": "probe"}, probe={"select": "best_id_val", "checkpoint_freq": 7}
    )
    task = plain.aux.tasks[0]
    names = {aux_probe_name(c, task) for c in (plain, best, other_freq)}
    assert len(names) == 3
    assert aux_entry_name(plain, task, 0) != aux_entry_name(best, task, 0)
    # checkpoint_freq means nothing with select: last, so it renames nothing there
    plain_freq = tiny_config(tmp_path, aux={"head_init": "probe"}, probe={"checkpoint_freq": 7})
    assert aux_probe_name(plain_freq, task) == aux_probe_name(plain, task)


# --- data.sampling ------------------------------------------------------------------------------


def _indices(n: int, sampling: str, draws: int, batch: int = 5, seed: int = 3) -> list[int]:
    split = TrainSplit(TensorDataset(torch.arange(n)), list(range(n)), sampling)  # type: ignore[arg-type]
    stream = iter(InfiniteLoader(split, batch, seed))
    out: list[int] = []
    while len(out) < draws:
        (x,) = next(stream)
        out.extend(x.tolist())
    return out[:draws]


def test_epochs_sampling_sees_every_item_once_per_epoch():
    n = 10
    picks = _indices(n, "epochs", 5 * n)
    for epoch in range(5):
        assert sorted(picks[epoch * n : (epoch + 1) * n]) == list(range(n))


def test_with_replacement_draws_every_index_uniformly_not_once_per_epoch():
    n = 10
    picks = _indices(n, "with_replacement", 2000)
    epochs = [sorted(picks[e * n : (e + 1) * n]) for e in range(len(picks) // n)]
    assert sum(e != list(range(n)) for e in epochs) > 0.99 * len(epochs)  # repeats inside epochs
    counts = Counter(picks)
    assert set(counts) == set(range(n))
    # multinomial(2000, 1/10): sd 13.4 per count; 60 is > 4 sd
    assert all(abs(c - 200) < 60 for c in counts.values())


def test_with_replacement_is_a_pure_function_of_the_seed_whatever_num_workers():
    split = TrainSplit(TensorDataset(torch.arange(37)), list(range(37)), "with_replacement")  # type: ignore[arg-type]

    def first(workers: int, seed: int) -> list[list[int]]:
        stream = iter(InfiniteLoader(split, 4, seed, num_workers=workers))
        return [next(stream)[0].tolist() for _ in range(6)]

    assert first(0, 5) == first(1, 5)
    assert first(0, 5) != first(0, 6)


def test_train_batches_follow_the_splits_sampling_on_both_paths(digits):
    epochs = target_splits(digits, [0], 0).train[0]
    replaced = target_splits(digits, [0], 0, sampling="with_replacement").train[0]
    assert isinstance(replaced, TrainSplit) and replaced.sampling == "with_replacement"
    # PIL path: train_batches is InfiniteLoader with the split's own sampling
    direct = next(iter(InfiniteLoader(replaced, 8, 2, sampling="with_replacement")))
    via = next(train_batches(replaced, 8, 2))
    assert torch.equal(direct[0], via[0]) and torch.equal(direct[1], via[1])
    assert not torch.equal(next(train_batches(epochs, 8, 2))[0], via[0])


def test_decoded_batches_follow_the_splits_sampling(tmp_path):
    decoded = _decoded(_write_pacs(tmp_path / "data", per_class=2), tmp_path / "cache")
    view = decoded.domain(1, train=True)
    rows = list(range(len(view)))
    split = TrainSplit(view, rows, "with_replacement")
    batched = list(itertools.islice(train_batches(split, 4, seed=7), 4))
    # Independent route: item by item through StoredDomain.__getitem__, same index stream
    single = list(itertools.islice(iter(InfiniteLoader(split, 4, seed=7)), 4))
    for (x1, y1), (x2, y2) in zip(batched, single):
        torch.testing.assert_close(x1, x2, rtol=0, atol=1e-5)
        assert torch.equal(y1, y2)
    picks = [
        i
        for keys in itertools.islice(_EndlessBatches(len(rows), 4, 7, "with_replacement"), 4)
        for i, _ in keys
    ]
    assert len(set(picks[: len(rows)])) < len(rows)  # a repeat inside the first epoch
    epochs = list(itertools.islice(train_batches(TrainSplit(view, rows, "epochs"), 4, seed=7), 4))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batched, epochs))


def test_probe_draws_its_indices_as_the_split_asks(digits, phi_pt):
    """The probe on cached features against the reference's frozen-featurizer loop over the
    same with-replacement streams."""
    dataset = get_dataset("digits", augment=False)
    splits = target_splits(dataset, [0], 0, sampling="with_replacement")
    model = build_classifier(ARCH, splits.num_classes, featurizer_weights=phi_pt, seed=0)
    w0 = {k: v.clone() for k, v in head_state(model).items()}

    def probe_on(cell_splits):
        return linear_probe(
            model.featurizer,
            cell_splits.train,
            cell_splits.id_val,
            10,
            steps=15,
            lr=1e-2,
            batch_size=8,
            seed=4,
            head_init=w0,
        )

    probe = probe_on(splits)
    frozen_featurizer_loop(model, splits.train, steps=15, lr=1e-2, batch_size=8, seed=4)
    assert torch.allclose(probe.head_state["weight"], model.head.weight, atol=1e-4)
    other = probe_on(target_splits(dataset, [0], 0))
    assert not torch.allclose(other.head_state["weight"], probe.head_state["weight"])


def test_sampling_renames_pool_entries_and_phi_pt_only_off_its_default(tmp_path):
    epochs = tiny_config(tmp_path)
    replaced = tiny_config(tmp_path, data={"sampling": "with_replacement"})
    task = epochs.aux.tasks[0]
    assert "sampling" not in aux_recipe(epochs, task, 0)  # older names unchanged
    assert aux_recipe(replaced, task, 0)["sampling"] == "with_replacement"
    assert aux_entry_name(epochs, task, 0) != aux_entry_name(replaced, task, 0)
    assert pretrained_identity(epochs) != pretrained_identity(replaced)


# --- data.id_val_transform ----------------------------------------------------------------------


def test_id_val_train_transform_is_one_seeded_augmentation_per_image(digits):
    env, split_seed = 1, 2
    plain = target_splits(digits, [0], split_seed)
    augmented = target_splits(digits, [0], split_seed, id_val_transform="train")
    keys = plain.id_val[0].indices
    assert augmented.id_val[0].indices == keys  # same images
    seed = seed_hash("id_val_augmentation", seed_hash(split_seed, env))
    train_view = digits.domain(env, train=True)
    for position in (0, 5):
        torch.manual_seed(seed_hash(seed, position))  # the hand route
        expected, label = train_view[keys[position]]
        x, y = augmented.id_val[0][position]
        assert torch.equal(x, expected) and y == label
        assert not torch.equal(x, plain.id_val[0][position][0])  # eval transform differs
        assert torch.equal(x, augmented.id_val[0][position][0])  # the same at every evaluation
    state = torch.random.get_rng_state()
    augmented.id_val[0][3]
    assert torch.equal(torch.random.get_rng_state(), state)  # the trainer's RNG untouched


def test_id_val_train_transform_without_augmentation_is_the_eval_transform():
    data = get_dataset("digits", augment=False)
    plain = target_splits(data, [0], 0)
    augmented = target_splits(data, [0], 0, id_val_transform="train")
    assert torch.equal(augmented.id_val[1][4][0], plain.id_val[1][4][0])


def test_stages_build_their_splits_with_the_configured_options(tmp_path, monkeypatch, phi_pt):
    """A probe and a target run of a config with both switches on: the stage builds its splits
    with them, and fine_tune (through its TrainStreams) draws the batches as the split asks."""
    data = {"id_val_transform": "train", "sampling": "with_replacement"}
    config = tiny_config(tmp_path, data=data, target={"steps": 2, "checkpoint_freq": 1})
    seen, drawn = [], []
    real_splits, real_stream = stages.target_splits, train_module.TrainStream

    def spy_splits(*args, **kwargs):
        seen.append(kwargs)
        return real_splits(*args, **kwargs)

    def spy_stream(dataset, *args, **kwargs):
        drawn.append(sampling_of(dataset))
        return real_stream(dataset, *args, **kwargs)

    monkeypatch.setattr(stages, "target_splits", spy_splits)
    monkeypatch.setattr(train_module, "TrainStream", spy_stream)
    cell = experiment_cells(config)[0]
    ctx = context_for(config, featurizers={PRETRAINED: phi_pt})
    probe = ListReporter()
    run_trial(probe_specs(config, [cell])[0], ctx, probe)
    ctx.heads[cell.key] = probe.rows[-1][1]["head"]
    spec = next(s for s in target_specs(config, [cell]) if s.init_source == PRETRAINED)
    run_trial(spec, ctx, ListReporter())
    assert seen == [data, data]  # the probe's splits, then the target run's
    assert drawn and set(drawn) == {"with_replacement"}
    task = config.aux.tasks[0]
    # ID val shapes no pooled weights: pool entries keep their last featurizer
    eval_config = tiny_config(tmp_path, data={"sampling": "with_replacement"})
    assert aux_entry_name(config, task, 0) == aux_entry_name(eval_config, task, 0)


# --- reduce.greedy_threshold --------------------------------------------------------------------


def _scalar_models(values):
    return [lambda v=v: {"w": torch.tensor([v])} for v in values]


def test_greedy_threshold_logged_or_measured():
    """Model 0 logged 0.9 but measures 0.5; adding model 1 gives a soup scoring 0.6: under
    the logged threshold it is refused (0.6 < 0.9), under the measured one kept (0.6 >= 0.5)."""
    calls = []

    def evaluate(state):
        calls.append(float(state["w"]))
        return {1.0: 0.5, 2.0: 0.6}[float(state["w"])]  # w=1: model 0; w=2: mean of 1 and 3

    logged = greedy_soup(_scalar_models([1.0, 3.0]), [0.9, 0.8], evaluate)
    assert logged.selected == (0,) and logged.score == 0.9 and calls == [2.0]
    calls.clear()
    measured = greedy_soup(_scalar_models([1.0, 3.0]), [0.9, 0.8], evaluate, threshold="measured")
    assert measured.selected == (0, 1) and measured.score == 0.6 and calls == [1.0, 2.0]
    assert torch.equal(measured.state_dict["w"], torch.tensor([2.0]))
    with pytest.raises(ValueError, match="threshold"):
        greedy_soup(_scalar_models([1.0]), [0.9], evaluate, threshold="best")  # type: ignore[arg-type]


@pytest.mark.parametrize("threshold", ["logged", "measured"])
def test_reducer_greedy_reads_its_threshold_from_the_settings(monkeypatch, threshold):
    seen = {}

    def fake(loaders, scores, evaluate, *, threshold):
        seen["threshold"] = threshold
        return SimpleNamespace(selected=(0, 1), score=0.5, state_dict={})

    monkeypatch.setattr(strategies, "greedy_soup", fake)
    runs = [SimpleNamespace(run_id=f"r{i}", load_state=dict, id_val_acc=0.5) for i in range(2)]
    sel = SimpleNamespace(
        inputs=SimpleNamespace(settings=ReduceSettings(greedy_threshold=threshold)),
        ev=SimpleNamespace(accuracy=lambda state, split: 0.5),
        store=SimpleNamespace(save=lambda name, state: None),
    )
    selected = strategies._greedy("soup_greedy", "soups", runs, sel)  # type: ignore[arg-type]
    assert seen["threshold"] == threshold and selected.members == ("r0", "r1")


# --- config -------------------------------------------------------------------------------------


def test_switch_defaults_and_bad_values(tmp_path):
    config = tiny_config(tmp_path)
    assert (
        config.probe.select,
        config.data.sampling,
        config.data.id_val_transform,
        config.reduce.greedy_threshold,
        config.model.precision,
    ) == ("last", "epochs", "eval", "logged", "bf16")
    assert tiny_config(tmp_path, model={"precision": "fp32"}).model.precision == "fp32"
    for section, key, value in [
        ("probe", "select", "best"),
        ("data", "sampling", "bootstrap"),
        ("data", "id_val_transform", "augmented"),
        ("reduce", "greedy_threshold", "measure"),
        ("model", "precision", "fp16"),
    ]:
        with pytest.raises(ConfigError, match=f"{section}.{key}"):
            tiny_config(tmp_path, **{section: {key: value}})


# --- model.precision ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_is_bf16_on_cuda_only_when_precision_asks_for_it():
    # the context objects say what they do without a GPU: torch.autocast records its dtype
    bf16 = train_module.autocast_for("cuda", "bf16")
    assert isinstance(bf16, torch.autocast) and bf16.fast_dtype == torch.bfloat16
    assert not isinstance(train_module.autocast_for("cuda", "fp32"), torch.autocast)
    assert not isinstance(train_module.autocast_for("cpu", "bf16"), torch.autocast)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_model_precision_reaches_every_forward_of_a_trial_and_the_reducer(
    tmp_path, monkeypatch, digits, precision
):
    import dataclasses

    from ratatouille.orchestration.reporting import _predict
    from ratatouille.recipe.sweep import target_specs

    seen: list[str] = []
    real = train_module.autocast_for

    def recording(device, precision="bf16"):
        seen.append(precision)
        return real(device, precision)

    monkeypatch.setattr(train_module, "autocast_for", recording)
    config = tiny_config(tmp_path, model={"precision": precision})
    model = build_classifier(ARCH, 10, seed=0)
    ctx = context_for(config, featurizers={PRETRAINED: featurizer_state(model)})
    assert ctx.precision == precision
    cells = experiment_cells(config)
    ctx.heads[cells[0].key] = head_state(model)
    spec = next(s for s in target_specs(config, cells) if s.init_source == PRETRAINED)
    spec = dataclasses.replace(spec, steps=3, checkpoint_freq=2)
    run_trial(spec, ctx, ListReporter())
    assert seen and set(seen) == {precision}  # training steps and ID-val evaluations
    predict = _predict(config)
    seen.clear()
    predict(model, digits.domain(0, train=False), batch_size=512)
    assert set(seen) == {precision}
