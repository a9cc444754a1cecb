"""The linear probe w_lp on cached features, against a plain frozen-featurizer loop."""

from __future__ import annotations

import pytest
import torch

from probe_routes import calibrated_phi_pt, frozen_featurizer_loop
from ratatouille.data import get_dataset, target_splits
from ratatouille.engine.models import build_classifier, featurizer_state, head_state
from ratatouille.engine.probe import eval_train_views, linear_probe
from ratatouille.engine.train import evaluate_accuracy

ARCH = "test_resnet"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    dataset = get_dataset("digits", augment=True)
    return dataset, target_splits(dataset, [0], split_seed=0)


@pytest.fixture(scope="module")
def phi_pt():
    return calibrated_phi_pt(ARCH)


def test_probe_on_cached_features_matches_afrozen_featurizer_loop(digits, phi_pt) -> None:
    dataset, splits = digits
    train = eval_train_views(dataset, splits)
    steps, lr, batch_size, seed = 60, 1e-2, 16, 3
    model = build_classifier(ARCH, splits.num_classes, featurizer_weights=phi_pt, seed=0)
    phi_before = {k: v.clone() for k, v in featurizer_state(model).items()}
    w_init = {k: v.clone() for k, v in head_state(model).items()}

    probe = linear_probe(
        model.featurizer,
        train,
        splits.id_val,
        splits.num_classes,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        head_init=w_init,
    )
    reference = frozen_featurizer_loop(model, train, steps, lr, batch_size, seed)
    reference_acc = evaluate_accuracy(reference, splits.id_val)

    assert abs(probe.id_val_acc - reference_acc) <= 0.01
    assert probe.id_val_acc > 0.3  # it learned something: chance is 0.1
    for key, value in head_state(reference).items():
        assert torch.allclose(probe.head_state[key], value, atol=1e-4), key
    assert all(torch.equal(v, phi_before[k]) for k, v in featurizer_state(model).items())


def test_probe_head_reaches_its_reported_accuracy_when_plugged_into_the_classifier(
    digits, phi_pt
) -> None:
    dataset, splits = digits
    model = build_classifier(ARCH, splits.num_classes, featurizer_weights=phi_pt, seed=1)
    probe = linear_probe(
        model.featurizer,
        eval_train_views(dataset, splits),
        splits.id_val,
        splits.num_classes,
        steps=20,
        lr=1e-2,
        seed=0,
    )
    assert set(probe.head_state) == {"weight", "bias"}
    model.head.load_state_dict(probe.head_state)
    assert evaluate_accuracy(model, splits.id_val, batch_size=50) == pytest.approx(probe.id_val_acc)


def test_eval_train_views_keep_indices_and_use_the_eval_transform(digits) -> None:
    dataset, splits = digits
    views = eval_train_views(dataset, splits)
    assert [len(v) for v in views] == [len(t) for t in splits.train]
    for name, view, train in zip(splits.train_domains, views, splits.train):
        env = dataset.domains.index(name)
        plain = dataset.domain(env, train=False)
        index = train.indices[5]
        assert torch.equal(view[5][0], plain[index][0]) and view[5][1] == plain[index][1]


def test_probe_rejects_empty_inputs(digits) -> None:
    _, splits = digits
    model = build_classifier(ARCH, splits.num_classes, seed=0)
    with pytest.raises(ValueError, match="at least one training domain"):
        linear_probe(model.featurizer, [], splits.id_val, splits.num_classes, steps=1)
    with pytest.raises(ValueError, match="steps >= 1"):
        linear_probe(model.featurizer, splits.id_val, splits.id_val, splits.num_classes, steps=0)
