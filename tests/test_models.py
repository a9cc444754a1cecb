"""The classifier f_theta = head o dropout o featurizer, frozen BN, and the state-dict split."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ratatouille.engine.models import (
    Classifier,
    ModelConfigError,
    PretrainedWeightsUnavailable,
    build_classifier,
    create_featurizer,
    feature_dim,
    featurizer_state,
    freeze_bn,
    head_state,
    join_state,
    load_featurizer_params,
)

ARCH = "test_resnet"
NUM_CLASSES = 5

torch.set_num_threads(1)


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if "running_" in k or "num_batches_tracked" in k
    }


def _bn_affine(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for m_name, m in model.named_modules()
        if isinstance(m, _BatchNorm)
        for n, p in m.named_parameters(prefix=m_name)
    }


def _train_a_few_steps(model: nn.Module, steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 3, 16, 16, generator=gen) * 3 + 1
        y = torch.randint(0, NUM_CLASSES, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_frozen_bn_keeps_running_stats_while_affine_weights_train() -> None:
    model = build_classifier(ARCH, NUM_CLASSES, seed=0)
    stats, affine = _bn_buffers(model), _bn_affine(model)
    _train_a_few_steps(model)
    after_stats, after_affine = _bn_buffers(model), _bn_affine(model)
    assert stats.keys() == after_stats.keys() and len(stats) > 0
    assert all(torch.equal(stats[k], after_stats[k]) for k in stats)
    assert any(not torch.equal(affine[k], after_affine[k]) for k in affine)


def test_unfrozen_bn_does_update_running_stats_under_the_same_loop() -> None:
    # the control of the test above: the loop really would move the statistics
    model = build_classifier(ARCH, NUM_CLASSES, seed=0, freeze_bn=False)
    stats = _bn_buffers(model)
    _train_a_few_steps(model)
    assert any(not torch.equal(stats[k], v) for k, v in _bn_buffers(model).items())


def test_frozen_bn_stays_in_eval_mode_inside_train_with_trainable_affine() -> None:
    model = build_classifier(ARCH, NUM_CLASSES, dropout=0.0, seed=0)
    model.train()
    x = torch.randn(4, 3, 16, 16)
    out_train = model(x)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(not m.training for m in bns)
    assert all(p.requires_grad for m in bns for p in m.parameters())
    assert model.dropout.training  # only BN is pinned, not the whole model
    model.eval()
    assert torch.allclose(out_train, model(x), atol=1e-6)  # running stats used in train mode too


def test_freeze_bn_survives_deepcopy_pickle_and_repeated_calls() -> None:
    model = freeze_bn(freeze_bn(timm.create_model(ARCH, num_classes=0)))
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    clone.train()
    before = _bn_buffers(clone)
    clone(torch.randn(4, 3, 16, 16) * 5)
    assert all(torch.equal(before[k], v) for k, v in _bn_buffers(clone).items())
    bn = next(m for m in clone.modules() if isinstance(m, _BatchNorm))
    assert len(bn._forward_pre_hooks) == 1


def test_classifier_is_head_after_dropout_after_featurizer() -> None:
    model = build_classifier(ARCH, NUM_CLASSES, dropout=0.5, seed=0)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.5
    reference = timm.create_model(ARCH, num_classes=0).eval()
    assert (
        feature_dim(model)
        == reference(torch.randn(1, 3, 16, 16)).shape[1]
        == model.head.in_features
    )
    x = torch.randn(6, 3, 16, 16)
    model.train()
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    feats = model.featurizer(x)
    mask_applied = nn.functional.dropout(feats, p=0.5, training=True)
    assert torch.allclose(out, model.head(mask_applied), atol=1e-6)


def test_build_classifier_seed_fixes_init_and_spares_global_rng() -> None:
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    a = build_classifier(ARCH, NUM_CLASSES, seed=1).state_dict()
    assert torch.equal(torch.rand(1), expected_next)
    b = build_classifier(ARCH, NUM_CLASSES, seed=1).state_dict()
    c = build_classifier(ARCH, NUM_CLASSES, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_state_split_uses_bare_timm_keys_and_joins_back() -> None:
    model = build_classifier(ARCH, NUM_CLASSES, seed=0)
    phi, w = featurizer_state(model), head_state(model)
    assert set(phi) == set(timm.create_model(ARCH, num_classes=0).state_dict())
    assert set(w) == {"weight", "bias"} and w["weight"].shape == (NUM_CLASSES, feature_dim(model))
    joined = join_state(phi, w)
    full = model.state_dict()
    assert joined.keys() == full.keys() and all(torch.equal(joined[k], full[k]) for k in full)
    assert featurizer_state(full).keys() == phi.keys()  # works on a state dict too


def test_load_featurizer_params_copies_parameters_but_not_bn_statistics() -> None:
    target = build_classifier(ARCH, NUM_CLASSES, seed=0)
    source = build_classifier(ARCH, NUM_CLASSES, seed=1)
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.fill_(7.0)
    stats_before = _bn_buffers(target)
    head_before = {k: v.clone() for k, v in head_state(target).items()}
    load_featurizer_params(target, featurizer_state(source))
    src_params = dict(source.featurizer.named_parameters())
    for name, param in target.featurizer.named_parameters():
        assert torch.equal(param, src_params[name])
    assert all(torch.equal(stats_before[k], v) for k, v in _bn_buffers(target).items())
    assert all(torch.equal(head_before[k], v) for k, v in head_state(target).items())


def test_load_featurizer_params_rejects_another_architecture() -> None:
    model = build_classifier(ARCH, NUM_CLASSES, seed=0)
    other = timm.create_model("test_efficientnet", num_classes=0).state_dict()
    with pytest.raises(ValueError, match="same architecture"):
        load_featurizer_params(model, other)


def test_featurizer_loads_from_safetensors_file_including_a_timm_head(tmp_path) -> None:
    # a timm checkpoint as published on the hub: backbone + its own classifier `fc`
    torch.manual_seed(4)
    full = timm.create_model(ARCH, num_classes=10).eval()
    path = tmp_path / "phi_pt.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    featurizer = create_featurizer(ARCH, str(path)).eval()
    x = torch.randn(3, 3, 16, 16)
    expected = full.forward_head(full.forward_features(x), pre_logits=True)
    assert torch.allclose(featurizer(x), expected, atol=1e-6)
    model = build_classifier(ARCH, NUM_CLASSES, featurizer_weights=str(path), seed=0)
    assert torch.allclose(model.features(x.clone()), expected, atol=1e-6)


def test_featurizer_weights_accept_a_state_dict_with_bn_statistics() -> None:
    source = build_classifier(ARCH, NUM_CLASSES, seed=3)
    with torch.no_grad():
        source.featurizer.bn1.running_var.fill_(2.5)
    model = build_classifier(ARCH, NUM_CLASSES, featurizer_weights=featurizer_state(source), seed=0)
    assert torch.equal(model.featurizer.bn1.running_var, torch.full((32,), 2.5))
    assert torch.equal(model.featurizer.conv1[0].weight, source.featurizer.conv1[0].weight)


def test_bad_weight_files_raise_clear_errors(tmp_path) -> None:
    pickled = tmp_path / "phi.pth"
    torch.save({}, pickled)
    with pytest.raises(ValueError, match="not a .safetensors file"):
        create_featurizer(ARCH, str(pickled))
    with pytest.raises(ModelConfigError, match="does not exist"):
        create_featurizer(ARCH, str(tmp_path / "missing.safetensors"))
    wrong = tmp_path / "other_arch.safetensors"
    save_file(timm.create_model("test_efficientnet", num_classes=0).state_dict(), str(wrong))
    with pytest.raises(ValueError, match="model.arch"):
        create_featurizer(ARCH, str(wrong))
    with pytest.raises(ModelConfigError, match="'resnet_9000' is not a timm architecture"):
        create_featurizer("resnet_9000")
    with pytest.raises(ValueError, match="not both"):
        create_featurizer(ARCH, str(wrong), pretrained_hub=True)


def test_unreachable_hub_raises_one_error_naming_the_local_file_option(monkeypatch) -> None:
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to establish a new connection: network is unreachable")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(builder, "load_state_dict_from_hf", offline)
    monkeypatch.setattr(builder, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsUnavailable, match="model.weights_file") as info:
        build_classifier(ARCH, NUM_CLASSES, pretrained_hub=True)
    assert "test_resnet" in str(info.value) and "model.init: file" in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionError)


def test_classifier_rejects_bad_sizes() -> None:
    featurizer = timm.create_model(ARCH, num_classes=0)
    with pytest.raises(ValueError, match="num_classes"):
        Classifier(featurizer, 0)
    with pytest.raises(ValueError, match="dropout"):
        Classifier(featurizer, 3, dropout=1.0)
    with pytest.raises(ValueError, match="num_features"):
        Classifier(nn.Conv2d(3, 4, 3), 3)
