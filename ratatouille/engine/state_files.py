"""A resumable train state on disk without pickle: its tensors in one safetensors file, the
rest (numbers, strings, the nesting) in one JSON file that names them.

A trial's snapshot is read back from Tune's storage, which on a cluster is a shared bucket:
unpickling it would run whatever code someone wrote there. Neither file format can run code
on load, and a pickled ``train_state.pt`` found in a checkpoint is refused without being read.
The encoding takes what `engine.train` snapshots hold: tensors, dicts (any key type), lists,
tuples, str, int, float (inf and NaN included), bool and None; anything else is a TypeError
at save time, never a silent pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from ratatouille.core.errors import UserError

#: The two files of a train state in a checkpoint folder.
TENSORS_FILE = "train_state.safetensors"
STRUCTURE_FILE = "train_state.json"
#: What earlier versions wrote (a pickle): refused, never read.
PICKLED_FILE = "train_state.pt"

_TENSOR, _TUPLE, _ITEMS = "$tensor", "$tuple", "$items"
FORMAT = 1


class UnsafeTrainState(UserError):
    """A checkpoint holds a pickled train state, which is never loaded."""


def _encode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        name = f"t{len(tensors)}"
        # a copy: safetensors refuses tensors that share memory, and views of bigger storages
        tensors[name] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: name}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {str(k): _encode(v, tensors) for k, v in obj.items()}
        return {_ITEMS: [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, str):
        return str(obj)  # a StrEnum (MetricKey) as its value
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    raise TypeError(f"a train state holds a {type(obj).__name__}, which it cannot store")


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {_TENSOR}:
        return tensors[obj[_TENSOR]]
    if set(obj) == {_TUPLE}:
        return tuple(_decode(v, tensors) for v in obj[_TUPLE])
    if set(obj) == {_ITEMS}:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def encode(state: Any) -> tuple[bytes, str]:
    """``(safetensors bytes, JSON text)`` of a train state."""
    tensors: dict[str, Tensor] = {}
    structure = _encode(state, tensors)
    return save_tensors(tensors), json.dumps({"format": FORMAT, "state": structure})


def decode(tensor_bytes: bytes, structure: str) -> Any:
    """The train state `encode` wrote, bit for bit (floats through JSON's shortest repr)."""
    record = json.loads(structure)
    if record.get("format") != FORMAT:
        raise UserError(f"train state format {record.get('format')!r} is not {FORMAT}")
    return _decode(record["state"], load_tensors(tensor_bytes))


def save_train_state(state: Any, folder: str | Path) -> list[Path]:
    """Write ``state`` into ``folder``; the paths written."""
    tensor_bytes, structure = encode(state)
    paths = [Path(folder, TENSORS_FILE), Path(folder, STRUCTURE_FILE)]
    paths[0].write_bytes(tensor_bytes)
    paths[1].write_text(structure)
    return paths


def load_train_state(folder: str | Path) -> Any | None:
    """The train state saved in ``folder``, or None when it holds none (a weights-only final
    checkpoint). A pickled ``train_state.pt`` is refused without being opened."""
    pickled = Path(folder, PICKLED_FILE)
    if pickled.exists():
        raise UnsafeTrainState(
            f"{pickled} is a pickled train state (an old ratatouille's, or planted): it is never "
            "loaded, since unpickling can run code. Delete that trial folder (or the run's "
            "stage folder) and rerun the stage, or start the run again without --resume"
        )
    tensors, structure = Path(folder, TENSORS_FILE), Path(folder, STRUCTURE_FILE)
    if not (tensors.exists() and structure.exists()):
        return None
    return decode(tensors.read_bytes(), structure.read_text())
