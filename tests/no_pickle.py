"""A Python prelude under which nothing can be unpickled: for a fresh process that must show a
file loads without pickle (`python -c PRELUDE + script`).

Python's pickle (module functions, `Unpickler`, the C accelerator) and torch's pickle-based
loaders raise; `torch.load` stays only in its restricted `weights_only=True` mode, which admits
tensors and plain containers and never imports or calls anything a file names. MLflow is told
to refuse pickles too (`MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`), so it also checks a pt2
archive before torch reads it.
"""

from __future__ import annotations

PRELUDE = """
import os, pickle, _pickle
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"

def _refused(*args, **kwargs):
    raise RuntimeError("unpickling refused in this process")

def _refusing(unpickler):
    # a subclass, so that modules which subclass or inspect the original still import
    return type(unpickler.__name__, (unpickler,), {"__init__": _refused})

for _module in (pickle, _pickle):
    _module.load = _module.loads = _refused
pickle.Unpickler = _pickle.Unpickler = _refusing(_pickle.Unpickler)
pickle._Unpickler = _refusing(pickle._Unpickler)
pickle._load = pickle._loads = _refused

import torch

_restricted_load = torch.load

def _weights_only_load(*args, weights_only=None, **kwargs):
    if weights_only is False or "pickle_module" in kwargs:
        _refused()
    return _restricted_load(*args, weights_only=True, **kwargs)

torch.load = _weights_only_load
torch.serialization.load = _weights_only_load
torch._C._pickle_load_obj = _refused
try:
    import cloudpickle
    cloudpickle.load = cloudpickle.loads = _refused
except ImportError:
    pass
"""
