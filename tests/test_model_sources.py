"""timm's hub repos (hf-hub:timm/...) and model folders (local-dir:/path) as model.arch and as
pool sources: a community fine-tuning, saved the way timm saves it, joins in one command."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models import save_for_hf

from ratatouille.cli.main import main
from ratatouille.engine.models import (
    ModelConfigError,
    PretrainedWeightsUnavailable,
    build_classifier,
    create_featurizer,
)
from ratatouille.pool.store import Pool
from ratatouille.recipe.checks import check_experiment
from tiny import tiny_config

HUB_REPO = "timm/resnet50.a1_in1k"


def _community_model(arch: str = "test_resnet") -> torch.nn.Module:
    """A 'fine-tuning' with its own 7-class head, weights moved away from timm's init."""
    torch.manual_seed(7)
    model = timm.create_model(arch, num_classes=7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    return model


@pytest.fixture
def folder(tmp_path):
    """A timm model folder: config.json + model.safetensors, written by timm itself."""
    path = tmp_path / "community"
    save_for_hf(_community_model(), str(path), safe_serialization=True)
    return path


def _featurizer_tensors(path) -> dict[str, torch.Tensor]:
    """The folder's weights without the classifier: what a pool entry or phi_pt must hold."""
    return {k: v for k, v in load_file(str(path / "model.safetensors")).items() if "fc." not in k}


def _same(first, second) -> bool:
    return set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_a_model_folder_is_a_usable_model_arch(tmp_path, folder):
    arch = f"local-dir:{folder}"
    config = tiny_config(tmp_path, model={"arch": arch, "init": "hub"})
    assert check_experiment(config)  # the checks run before Ray or MLflow start accept it
    featurizer = create_featurizer(arch, pretrained_hub=True)
    assert _same(featurizer.state_dict(), _featurizer_tensors(folder))
    model = build_classifier(arch, 10, pretrained_hub=True)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


def test_a_model_folder_joins_the_pool_in_one_command(tmp_path, folder, capsys):
    pool_dir = tmp_path / "pool"
    argv = ["pool", "import", f"local-dir:{folder}", "--pool", str(pool_dir), "--name", "comm"]
    assert main([*argv, "--arch", "test_resnet"]) == 0, capsys.readouterr().err
    pool = Pool(pool_dir)
    assert _same(pool.load("comm"), _featurizer_tensors(folder))
    # an experiment naming the folder itself as model.arch uses the entry: same architecture
    assert _same(pool.load("comm", expected_arch=f"local-dir:{folder}"), pool.load("comm"))
    with pytest.raises(ValueError, match="'test_efficientnet'"):
        pool.load("comm", expected_arch="test_efficientnet")


def test_a_folder_of_another_architecture_is_refused_by_shape(tmp_path, capsys):
    other = tmp_path / "other"
    save_for_hf(_community_model("test_efficientnet"), str(other), safe_serialization=True)
    argv = ["pool", "import", f"local-dir:{other}", "--pool", str(tmp_path / "pool")]
    assert main([*argv, "--name", "x", "--arch", "test_resnet"]) == 2
    assert "test_resnet" in capsys.readouterr().err
    assert not (tmp_path / "pool" / "manifest.json").exists()


def test_a_folder_with_pickled_weights_only_is_refused(tmp_path, capsys):
    pickled = tmp_path / "pickled"
    save_for_hf(_community_model(), str(pickled), safe_serialization=False)
    assert not (pickled / "model.safetensors").exists()
    config = tiny_config(tmp_path, model={"arch": f"local-dir:{pickled}", "init": "hub"})
    with pytest.raises(ModelConfigError, match="no model.safetensors"):
        check_experiment(config)
    argv = ["pool", "import", f"local-dir:{pickled}", "--pool", str(tmp_path / "pool")]
    assert main([*argv, "--name", "x", "--arch", "test_resnet"]) == 2
    assert "--trust-pickle" in capsys.readouterr().err


def test_a_folder_without_config_is_a_clear_error(tmp_path):
    config = tiny_config(tmp_path, model={"arch": f"local-dir:{tmp_path / 'nowhere'}"})
    with pytest.raises(ModelConfigError, match="has no config.json"):
        check_experiment(config)


@pytest.fixture
def hub_requests(monkeypatch):
    """Every file timm asks the hub for, then the error an offline machine gets."""
    import huggingface_hub
    import timm.models._hub as timm_hub

    asked: list[tuple[str, str]] = []

    def offline(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline: not in the local cache")

    monkeypatch.setattr(timm_hub, "hf_hub_download", offline)
    return asked


def test_a_hub_name_is_checked_up_to_the_download_of_its_config(tmp_path, hub_requests):
    config = tiny_config(tmp_path, model={"arch": f"hf-hub:{HUB_REPO}", "init": "hub"})
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        check_experiment(config)
    assert hub_requests == [(HUB_REPO, "config.json")]
    message = str(info.value)
    assert f"hf download {HUB_REPO}" in message and "local-dir:" in message


def test_pool_import_from_the_hub_asks_for_safetensors_only(tmp_path, hub_requests, capsys):
    argv = ["pool", "import", f"hf-hub:{HUB_REPO}", "--pool", str(tmp_path / "pool")]
    assert main([*argv, "--name", "a1", "--arch", "resnet50"]) == 2
    assert hub_requests == [(HUB_REPO, "model.safetensors")]
    err = capsys.readouterr().err
    assert err.startswith("error: could not fetch model.safetensors") and "local-dir:" in err
