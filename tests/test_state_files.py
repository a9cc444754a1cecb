"""Train states on disk without pickle: round trip, a planted pickle refused, none in the code."""

from __future__ import annotations

import ast
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from ray import tune

import ratatouille
from ratatouille.core.errors import UserError
from ratatouille.engine import state_files
from ratatouille.engine.state_files import (
    UnsafeTrainState,
    load_train_state,
    save_train_state,
)
from ratatouille.engine.train import _rng_state, _set_rng_state
from ratatouille.orchestration import search


def test_every_kind_of_value_a_snapshot_holds_comes_back_equal(tmp_path):
    state = {
        "model": {"w": torch.randn(3, 2), "n": torch.tensor(7, dtype=torch.int64)},
        "optimizer": {
            "state": {0: {"step": torch.tensor(2.0)}},
            "param_groups": [{"betas": (0.9, 0.999), "params": [0], "foreach": None}],
        },
        "best": -math.inf,
        "lr": 1e-4 / 3,  # a float JSON must write in full
        "flags": [True, False, None],
        "phase": "all",
        "$odd": 1,
    }
    save_train_state(state, tmp_path)
    back = load_train_state(tmp_path)
    assert back["optimizer"]["state"].keys() == {0}  # int keys stay ints (Adam maps them)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # a tuple again
    assert back["model"]["w"].equal(state["model"]["w"])
    assert back["model"]["n"].dtype == torch.int64 and back["model"]["n"].item() == 7
    assert back["best"] == -math.inf and back["lr"] == state["lr"]
    assert back["flags"] == [True, False, None] and back["phase"] == "all"
    assert back["$odd"] == 1


def test_rng_states_come_back_exactly(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.standard_normal()  # numpy keeps a cached gaussian: it must survive too
    save_train_state({"rng": _rng_state(torch.device("cpu"))}, tmp_path)
    expected = (torch.rand(4), np.random.standard_normal(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    _set_rng_state(load_train_state(tmp_path)["rng"], torch.device("cpu"))
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.standard_normal(3), expected[1])
    assert random.random() == expected[2]


def test_an_object_is_refused_at_save_time_never_pickled(tmp_path):
    with pytest.raises(TypeError, match="Path"):
        save_train_state({"where": tmp_path}, tmp_path)


def test_a_weights_only_checkpoint_has_no_train_state(tmp_path):
    assert load_train_state(tmp_path) is None


class _Payload:
    """Unpickling this creates the marker file: what a bucket-writer's object would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / state_files.PICKLED_FILE, "wb") as file:
        pickle.dump({"model": _Payload(marker)}, file)
    assert not marker.exists()


def test_the_planted_pickle_is_live(tmp_path):
    """The payload does run when unpickled: the refusal below is what keeps the marker away."""
    marker = tmp_path / "pwned"
    _plant(tmp_path / "checkpoint", marker)
    with open(tmp_path / "checkpoint" / state_files.PICKLED_FILE, "rb") as file:
        pickle.load(file)
    assert marker.exists()


def test_a_restored_trial_refuses_a_planted_pickle_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    folder = tmp_path / "trial" / "checkpoint_000003"
    folder.mkdir(parents=True)
    save_train_state({"step": 3}, folder)  # a genuine snapshot beside it changes nothing
    _plant(folder, marker)
    monkeypatch.setattr(
        search.tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(folder))
    )
    reporter = search.TuneReporter.__new__(search.TuneReporter)  # no Ray context needed
    with pytest.raises(UnsafeTrainState, match="never loaded") as refused:
        reporter.restored_state()
    assert isinstance(refused.value, UserError) and str(folder) in str(refused.value)
    assert not marker.exists()


#: Calls that unpickle: (module or object name, attribute).
UNPICKLING = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
}


def _unpickling_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in {"pickle", "cloudpickle", "dill"}:
            found += [f"from {node.module} import {a.name}" for a in node.names if "load" in a.name]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute):
            owner = func.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if (name, func.attr) in UNPICKLING:
                found.append(f"{name}.{func.attr}(...)")
        for keyword in node.keywords:
            value = keyword.value
            if keyword.arg == "weights_only" and not (
                isinstance(value, ast.Constant) and value.value is True
            ):
                found.append(f"weights_only={ast.unparse(value)}")
    return found


def test_the_walker_finds_what_it_looks_for():
    code = (
        "import pickle, torch, ray.cloudpickle\n"
        "from pickle import loads\n"
        "pickle.load(f)\nray.cloudpickle.loads(b)\ntorch.load(p, weights_only=False)\n"
        "torch.load(p, weights_only=flag)\ntorch.load(p, weights_only=True)\n"
    )
    assert sorted(_unpickling_calls(ast.parse(code))) == sorted(
        [
            "from pickle import loads",
            "pickle.load(...)",
            "cloudpickle.loads(...)",
            "weights_only=False",
            "weights_only=flag",
        ]
    )


def test_the_package_never_unpickles():
    package = Path(ratatouille.__file__).parent
    files = sorted(package.rglob("*.py"))
    assert len(files) > 30  # the whole package, not an empty folder
    found = {
        str(path.relative_to(package)): calls
        for path in files
        if (calls := _unpickling_calls(ast.parse(path.read_text(), str(path))))
    }
    assert found == {}
