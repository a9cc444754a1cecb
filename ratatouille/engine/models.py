"""The network ``f_theta = f_w o f_phi``: a timm featurizer ``phi``, dropout, a linear head ``w``.

Following paper F.1 and the reference code, dropout sits between the featurizer output and the
newly added linear head, and every BatchNorm is frozen: kept in eval mode (running statistics are
never updated, even inside ``model.train()``) while its affine parameters keep training. Frozen BN
makes the running statistics identical across runs, which is what makes weight averaging safe.

State dicts are split into a featurizer part (``phi``, keys without the ``featurizer.`` prefix,
i.e. the keys of the bare timm model) and a head part (``w``: ``weight``, ``bias``), so that
auxiliary featurizers ``phi_i_aux`` and the shared linear probe ``w_lp`` can be stored and
recombined independently.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ratatouille.core.errors import UserError
from ratatouille.core.names import HF_WEIGHTS_FILE

FEATURIZER_PREFIX = "featurizer."
HEAD_PREFIX = "head."


class PretrainedWeightsUnavailable(UserError):
    """Hub weights could not be fetched; the message says how to pass a local file instead."""


class ModelConfigError(UserError, ValueError):
    """An unknown architecture or an unusable weights file; the message names the fix."""


#: timm's prefixes for models that carry their own config.json and weights (timm >= 1.0).
HUB_SOURCE, LOCAL_DIR_SOURCE = "hf-hub", "local-dir"
#: The one weights file read from a hub repo or a model folder: pickles are never loaded.


def model_source(arch: str) -> tuple[str | None, str]:
    """``(source, id)`` of a timm model name: ``(None, name)`` for a registry name,
    ``("hf-hub", "timm/resnet50.a1_in1k")`` or ``("local-dir", "/path")`` otherwise."""
    try:
        source, model_id = timm.models.parse_model_name(arch)
    except ValueError as error:
        raise ModelConfigError(f"model.arch {arch!r}: {error}") from None
    return source, model_id


def check_arch(arch: str) -> None:
    """Fail with close matches when ``arch`` is not a timm architecture; for a hub repo or a
    model folder, fail when its config.json cannot be read or names no timm architecture."""
    source = model_source(arch)[0]
    name = arch if source is None else str(_source_config(arch).get("architecture"))
    if timm.is_model(name):
        return
    if source is not None:
        raise ModelConfigError(
            f"model.arch {arch!r}: its config.json names architecture {name!r}, which this timm "
            f"({timm.__version__}) does not know; upgrade timm or pick another model"
        )
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.8)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    raise ModelConfigError(
        f"model.arch {arch!r} is not a timm architecture{hint}; see "
        "timm.list_models() for valid names, or name a hub repo (hf-hub:timm/NAME) or a model "
        "folder (local-dir:/path holding config.json and model.safetensors)"
    )


def _source_config(arch: str) -> dict[str, Any]:
    """The config.json of a hub repo (fetched, or read from the local cache) or a folder."""
    source, model_id = model_source(arch)
    if source == LOCAL_DIR_SOURCE:
        path = Path(model_id).expanduser() / "config.json"
        if not path.is_file():
            raise ModelConfigError(
                f"model folder {arch!r} has no {path.name}: a timm model folder holds config.json "
                f"and {HF_WEIGHTS_FILE} (timm.models.save_for_hf writes both)"
            )
        try:
            return dict(json.loads(path.read_text()))
        except ValueError as error:
            raise ModelConfigError(f"{path} is not a timm config.json ({error})") from None
    try:
        pretrained_cfg, name, _args = timm.models.load_model_config_from_hf(model_id)
    except Exception as error:
        if not _is_hub_failure(error):
            raise
        raise _hub_unavailable(arch, "its config.json", error) from error
    return {"architecture": name, "pretrained_cfg": pretrained_cfg}


def check_folder_weights(arch: str) -> Path:
    """The ``model.safetensors`` of a ``local-dir:`` model folder, which must exist."""
    folder = Path(model_source(arch)[1]).expanduser()
    if not (folder / HF_WEIGHTS_FILE).is_file():
        raise ModelConfigError(
            f"model folder {folder} has no {HF_WEIGHTS_FILE}; pickled weights "
            "(pytorch_model.bin) can run code when loaded and are refused: convert them with "
            "safetensors.torch.save_file"
        )
    return folder / HF_WEIGHTS_FILE


def _hub_unavailable(arch: str, what: str, error: BaseException) -> PretrainedWeightsUnavailable:
    _source, model_id = model_source(arch)
    return PretrainedWeightsUnavailable(
        f"could not fetch {what} of {arch!r} from the Hugging Face hub "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Offline or "
        f"behind a firewall? Download the repo where the hub is reachable (`hf download {model_id} "
        "--local-dir DIR`), copy DIR here and use `model.arch: local-dir:DIR`, or point HF_HOME at "
        "a cache that holds it."
    )


def check_weights_file(path: str | Path) -> Path:
    """A ``.safetensors`` file that exists; pickles are refused (they can run code on load)."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ModelConfigError(
            f"featurizer weights {path} are not a .safetensors file: pickled checkpoints can run "
            "code when loaded and are refused; convert with safetensors.torch.save_file"
        )
    if not path.is_file():
        raise ModelConfigError(
            f"featurizer weights file {path} does not exist: check "
            "model.weights_file (relative paths start at the working directory)"
        )
    return path


class Classifier(nn.Module):
    """``f_theta``: featurizer ``phi`` -> Dropout(p) -> Linear head ``w``."""

    def __init__(self, featurizer: nn.Module, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.featurizer = featurizer
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(_featurizer_dim(featurizer), num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.featurizer(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.featurizer(x)))


def _featurizer_dim(featurizer: nn.Module) -> int:
    dim = getattr(featurizer, "num_features", None)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(
            f"featurizer {type(featurizer).__name__} has no integer `num_features`: build it with "
            "timm.create_model(arch, num_classes=0) or set `num_features` to its output width"
        )
    return dim


def feature_dim(model: nn.Module) -> int:
    """Width of ``phi``'s output (the input width of the head ``w``)."""
    if isinstance(model, Classifier):
        return model.head.in_features
    return _featurizer_dim(model)


def _force_eval(module: nn.Module, _inputs: object) -> None:
    # A forward pre-hook rather than a train() override: it holds for any model, whoever calls
    # .train() on whichever submodule, and it survives deepcopy and pickling (Ray).
    module.training = False


def freeze_bn(model: nn.Module) -> nn.Module:
    """Keep every BatchNorm in eval mode, even inside ``model.train()``; affine stays trainable.

    Running statistics are therefore never updated by training; ``requires_grad`` is untouched.
    Calling it twice is harmless.
    """
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()
            if not getattr(module, "_ratatouille_frozen", False):
                module.register_forward_pre_hook(_force_eval)
                object.__setattr__(module, "_ratatouille_frozen", True)
    return model


def _is_hub_failure(error: BaseException) -> bool:
    return isinstance(error, (OSError, ConnectionError, TimeoutError)) or any(
        word in type(error).__name__ for word in ("Connect", "Timeout", "HTTP", "Hub", "NotFound")
    )


def _create_timm(arch: str, pretrained: bool) -> nn.Module:
    check_arch(arch)
    if model_source(arch)[0] is not None:
        return _create_from_source(arch, pretrained)
    try:
        return timm.create_model(arch, num_classes=0, pretrained=pretrained)
    except Exception as error:
        if not (pretrained and _is_hub_failure(error)):
            raise
        raise PretrainedWeightsUnavailable(
            f"could not download pretrained weights of {arch!r} from the hub "
            f"({type(error).__name__}: {error}). Offline or behind a firewall? Fetch the weights "
            "elsewhere as a .safetensors file and point the config at it: "
            "`model.init: file` and `model.weights_file: /path/file.safetensors`."
        ) from error


def _create_from_source(arch: str, pretrained: bool) -> nn.Module:
    """A hub repo or a model folder: the architecture from its config.json, then (pretrained)
    its safetensors weights, loaded by us so a pickle is never read and shapes are checked."""
    try:
        featurizer = timm.create_model(arch, num_classes=0, pretrained=False)
    except Exception as error:
        if not _is_hub_failure(error):
            raise
        raise _hub_unavailable(arch, "its config.json", error) from error
    if pretrained:
        load_featurizer_state(featurizer, source_weights(arch), arch)
    return featurizer


def source_weights(arch: str) -> dict[str, Tensor]:
    """The ``model.safetensors`` of a hub repo or a model folder (refused when it has only a
    pickle: pickles can run code when loaded)."""
    source, model_id = model_source(arch)
    if source == LOCAL_DIR_SOURCE:
        return _read_safetensors(check_folder_weights(arch))
    try:
        return timm.models.load_state_dict_from_hf(model_id, filename=HF_WEIGHTS_FILE)
    except Exception as error:
        if not _is_hub_failure(error):
            raise
        raise _hub_unavailable(arch, HF_WEIGHTS_FILE, error) from error


def _read_safetensors(path: str | Path) -> dict[str, Tensor]:
    path = check_weights_file(path)
    from safetensors.torch import load_file

    return load_file(str(path))


def _classifier_keys(featurizer: nn.Module) -> tuple[str, ...]:
    cfg = getattr(featurizer, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _normalise_featurizer_state(featurizer: nn.Module, state: Mapping[str, Tensor]) -> dict:
    """Accept a bare timm state, a Classifier state or a hub checkpoint with its own classifier."""
    state = dict(state)
    if state and all(key.startswith(FEATURIZER_PREFIX) for key in state):
        state = featurizer_state(state)
    own = set(featurizer.state_dict())
    heads = _classifier_keys(featurizer)
    return {
        key: value
        for key, value in state.items()
        if key in own or not any(key.startswith(head + ".") for head in heads)
    }


def load_featurizer_state(featurizer: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Strictly load a full featurizer state (parameters and BN statistics), one clear error."""
    state = _normalise_featurizer_state(featurizer, state)
    own = featurizer.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"featurizer weights from {source} do not fit this architecture: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(wrong)} with another shape (e.g. {wrong[:3]}); "
            "check `model.arch` matches the architecture the file was saved from"
        )
    featurizer.load_state_dict(state, strict=True)


def create_featurizer(
    arch: str, weights: str | Path | None = None, *, pretrained_hub: bool = False
) -> nn.Module:
    """``phi_pt``: ``timm.create_model(arch, num_classes=0)`` with weights from a local
    ``.safetensors`` file, from the hub (``pretrained_hub``), or random (neither)."""
    if weights is not None and pretrained_hub:
        raise ValueError("give either a weights file or pretrained_hub=True, not both")
    featurizer = _create_timm(arch, pretrained=pretrained_hub)
    if weights is not None:
        load_featurizer_state(featurizer, _read_safetensors(weights), str(weights))
    return featurizer


def build_classifier(
    arch: str,
    num_classes: int,
    *,
    dropout: float = 0.0,
    featurizer_weights: str | Path | Mapping[str, Tensor] | None = None,
    pretrained_hub: bool = False,
    freeze_bn: bool = True,
    seed: int | None = None,
) -> Classifier:
    """``f_theta`` around a timm featurizer; ``featurizer_weights`` (a file or a state dict, with
    BN statistics) initialises ``phi``. ``seed`` fixes the random init without touching torch's
    global RNG; without it the global RNG is used."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if isinstance(featurizer_weights, Mapping):
            featurizer = create_featurizer(arch)
            load_featurizer_state(featurizer, featurizer_weights, "a state dict")
        else:
            featurizer = create_featurizer(arch, featurizer_weights, pretrained_hub=pretrained_hub)
        model = Classifier(featurizer, num_classes, dropout)
    if freeze_bn:
        _freeze(model)
    return model


_freeze = freeze_bn  # build_classifier's keyword shadows the function name


def _state_of(model_or_state: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(model_or_state, nn.Module):
        return model_or_state.state_dict()
    return model_or_state


def _strip(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def featurizer_state(model_or_state: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``phi``'s entries of a Classifier (or of its state dict), without the prefix."""
    return _strip(_state_of(model_or_state), FEATURIZER_PREFIX)


def head_state(model_or_state: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``w``'s entries (``weight``, ``bias``) of a Classifier or of its state dict."""
    return _strip(_state_of(model_or_state), HEAD_PREFIX)


def join_state(featurizer: Mapping[str, Tensor], head: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The Classifier state dict of ``(w, phi)``."""
    state = {FEATURIZER_PREFIX + key: value for key, value in featurizer.items()}
    state.update({HEAD_PREFIX + key: value for key, value in head.items()})
    return state


@torch.no_grad()
def load_featurizer_params(model: Classifier, featurizer_state: Mapping[str, Tensor]) -> None:
    """Copy only ``phi_aux``'s *parameters* into ``model.featurizer``, as the reference does: BN
    running statistics stay those of ``phi_pt`` (with frozen BN they are equal anyway)."""
    state = _normalise_featurizer_state(model.featurizer, featurizer_state)
    params = dict(model.featurizer.named_parameters())
    missing = sorted(set(params) - set(state))
    wrong = sorted(k for k in set(params) - set(missing) if params[k].shape != state[k].shape)
    if missing or wrong:
        raise ValueError(
            f"featurizer state does not fit the model: {len(missing)} parameters missing "
            f"(e.g. {missing[:3]}), {len(wrong)} with another shape (e.g. {wrong[:3]}); "
            "was it saved from the same architecture?"
        )
    for name, param in params.items():
        param.copy_(state[name])
