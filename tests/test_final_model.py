"""The registered final model says which rule chose it (tag and version description), and loads
without unpickling anything (a torch.export program), or says in a tag why it cannot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from no_pickle import PRELUDE
from ratatouille.core.config import ConfigError, parse_config
from ratatouille.engine.models import build_classifier
from ratatouille.tracking.store import MODEL_FORMAT, MODEL_FORMAT_REASON, Tracker
from tiny import tiny_config


def test_the_model_version_carries_the_rule_as_tag_and_description(tmp_path):
    config = tiny_config(tmp_path)
    tracker = Tracker("final", config.tracking.mlflow_uri, entry_point="ratatouille run")
    tracker.start_parent(str(tmp_path / "run-1"), config.model_dump(mode="json"))
    run_id = tracker.reducer_run().info.run_id
    model = build_classifier("test_resnet", 3, seed=0).eval()
    why = "ratatouille_uniform: reduce.final_model=ratatouille_uniform (the paper's main method)"
    tags = {"strategy": "ratatouille_uniform", "selection_rule": "ratatouille_uniform"}
    example = np.zeros((1, 3, 16, 16), dtype=np.float32)
    version = tracker.log_final_model(
        run_id, model, "final-model", "model-rot30", tags, example, ["champion"], description=why
    )
    stored = tracker.client.get_model_version("final-model", version)
    assert stored.description == why
    assert stored.tags["selection_rule"] == "ratatouille_uniform"


@pytest.mark.parametrize("rule", ["", "ratatouile_uniform", "ensemble_soups", "ma"])
def test_config_refuses_a_rule_that_is_not_one_network_before_anything_trains(tmp_path, rule):
    raw = tiny_config(tmp_path).model_dump(mode="json")
    assert parse_config(raw).reduce.final_model == "ratatouille_uniform"
    raw["reduce"]["final_model"] = rule
    with pytest.raises(ConfigError, match="reduce.final_model.*best_id_val"):
        parse_config(raw)


def test_every_strategy_is_a_final_model_rule_or_not_one_network():
    from ratatouille.core.arms import MULTI_MODEL_STRATEGIES, final_model_rules
    from ratatouille.reducer.strategies import STRATEGIES

    rules = set(final_model_rules())
    assert rules == {"best_id_val", *STRATEGIES} - MULTI_MODEL_STRATEGIES
    assert {"ratatouille_uniform", "soup_greedy", "fusing", "erm"} <= rules


class DataDependent(torch.nn.Module):
    """A classifier torch.export cannot trace: its branch depends on the input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) if x.sum() > 0 else -self.head(x)


def _load_without_pickle(uri: str, model_uri: str, inputs: Path) -> subprocess.CompletedProcess:
    """Load ``model_uri`` in a fresh Python where nothing can be unpickled and print its logits
    on the safetensors ``inputs``, as JSON."""
    script = PRELUDE + (
        "import json, sys, mlflow\n"
        "from safetensors.torch import load_file\n"
        f"mlflow.set_tracking_uri({uri!r})\n"
        f"model = mlflow.pytorch.load_model({model_uri!r})\n"
        "with torch.no_grad():\n"
        "    print(json.dumps(model(load_file(sys.argv[1])['x']).tolist()))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script, str(inputs)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_prelude_refuses_every_unpickler_but_torchs_restricted_one(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "tensors.pt")
    torch.save(DataDependent(), tmp_path / "module.pt")  # a pickle that names a class
    checks = (
        "import pickle, io\n"
        "def refused(f):\n"
        "    try:\n"
        "        f()\n"
        "    except Exception:\n"
        "        return True\n"
        "    return False\n"
        "print(refused(lambda: pickle.loads(pickle.dumps(1))),\n"
        "      refused(lambda: pickle.Unpickler(io.BytesIO(b'')).load()),\n"
        f"      refused(lambda: torch.load({str(tmp_path / 'module.pt')!r}, weights_only=False)),\n"
        f"      refused(lambda: torch.load({str(tmp_path / 'module.pt')!r})),\n"
        f"      torch.load({str(tmp_path / 'tensors.pt')!r})['w'].tolist())\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", PRELUDE + checks], capture_output=True, text=True, check=True
    )
    assert shown.stdout.split() == ["True", "True", "True", "True", "[1.0,", "1.0]"]


def test_the_final_model_is_a_torch_export_program_that_loads_without_unpickling(tmp_path):
    config = tiny_config(tmp_path)
    tracker = Tracker("final", config.tracking.mlflow_uri, entry_point="ratatouille run")
    tracker.start_parent(str(tmp_path / "run-1"), config.model_dump(mode="json"))
    run_id = tracker.reducer_run().info.run_id
    model = build_classifier("test_resnet", 3, seed=0).eval()
    example = np.zeros((1, 3, 16, 16), dtype=np.float32)  # one image, as the reducer gives it
    version = tracker.log_final_model(run_id, model, "final-model", "m", {}, example, ["champion"])
    stored = tracker.client.get_model_version("final-model", version)
    assert stored.tags[MODEL_FORMAT] == "pt2" and MODEL_FORMAT_REASON not in stored.tags
    files = mlflow.artifacts.download_artifacts(f"models:/final-model/{version}", dst_path=tmp_path)
    names = {p.name for p in Path(files).rglob("*") if p.is_file()}
    assert "model.pt2" in names and "model.pth" not in names
    # five images: the exported batch dimension is free although the example had one
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    result = _load_without_pickle(
        tracker.uri, "models:/final-model@champion", tmp_path / "x.safetensors"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(x)
    logits = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_a_model_torch_export_cannot_trace_is_logged_as_pickle_with_the_reason(tmp_path):
    config = tiny_config(tmp_path)
    tracker = Tracker("final", config.tracking.mlflow_uri, entry_point="ratatouille run")
    tracker.start_parent(str(tmp_path / "run-1"), config.model_dump(mode="json"))
    run_id = tracker.reducer_run().info.run_id
    example = np.ones((1, 4), dtype=np.float32)
    model = DataDependent().eval()
    version = tracker.log_final_model(run_id, model, "odd", "m", {}, example, ["champion"])
    stored = tracker.client.get_model_version("odd", version)
    assert stored.tags[MODEL_FORMAT] == "pickle"
    assert "data-dependent" in stored.tags[MODEL_FORMAT_REASON]
    # the failed export left no half-made model behind: one logged model, the pickle one
    (logged,) = tracker.client.search_logged_models([tracker.experiment_id])
    assert logged.tags[MODEL_FORMAT] == "pickle"
    # and a process that refuses pickles refuses it
    save_file({"x": torch.ones(2, 4)}, str(tmp_path / "x.safetensors"))
    result = _load_without_pickle(tracker.uri, "models:/odd@champion", tmp_path / "x.safetensors")
    assert result.returncode != 0 and "pickle" in result.stderr.lower()
