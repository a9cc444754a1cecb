"""The auxiliary pool: featurizers ``phi_aux_i`` fine-tuned on auxiliary tasks T_i (paper, sec. 3).

A folder with one ``<name>.safetensors`` per featurizer and a ``manifest.json`` (source task, timm
arch, sha256, ID-val accuracy, robust flag, creation time). Target-agnostic: built once, shared.
The folder is local or on object storage (``s3://bucket/pool``), with the same files and checks
(``pool.files`` says how writes stay safe on each).
Safetensors never run code on load; pickles are refused unless trusted and then read with
``weights_only=True``. Every load checks sha256, arch and shapes first, so a tampered or mislabelled
file fails loudly instead of silently initialising the wrong network. Pure: no Ray, no MLflow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ratatouille.core.names import HF_WEIGHTS_FILE
from ratatouille.pool.files import PoolError, PoolFiles

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")
# Classifier tensors dropped on import when the featurizer (num_classes=0) has no such key.
_HEAD_PREFIXES = ("fc.", "head.", "head_dist.", "classifier.", "last_linear.")
# Wrappers that training scripts put around a state dict (DomainBed: "model_dict").
_WRAPPER_KEYS = ("state_dict", "model_dict", "model_state_dict", "model", "featurizer")


@dataclass(frozen=True)
class PoolEntry:
    """One featurizer of the pool; ``file`` is relative to the pool folder."""

    name: str
    source_task: str
    arch: str
    sha256: str
    file: str
    id_val_acc: float | None
    robust: bool
    created: str
    # What shaped the weights (arch, phi_pt, data, seed, head, steps, hparams) as the planner
    # records it; None for imported entries and manifests written before it was recorded.
    recipe: dict[str, Any] | None = None


@functools.lru_cache(maxsize=32)
def arch_shapes(arch: str, num_classes: int | None = 0) -> dict[str, tuple[int, ...]]:
    """Name -> shape of ``timm.create_model(arch, num_classes=...)`` (None: its default head).

    ``arch`` may be a timm registry name, a hub repo (``hf-hub:timm/...``, whose config.json is
    fetched or read from the local cache) or a model folder (``local-dir:/path``)."""
    import timm  # imported here so `pool list` does not pay for timm

    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    try:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, ValueError) as err:
        raise PoolError(
            f"unknown architecture {arch!r} ({err}); pass a timm model name such as 'resnet50' "
            "(see timm.list_models()), a hub repo hf-hub:timm/NAME or a model folder "
            "local-dir:/path"
        ) from err
    except OSError as err:  # a folder without config.json, or the hub out of reach
        raise PoolError(
            f"cannot read the config.json of architecture {arch!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check the folder, or fetch the hub "
            "repo where the hub is reachable and use local-dir:/path"
        ) from err
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def same_architecture(first: str, second: str) -> bool:
    """Whether two architecture names build featurizers with the same tensors and shapes
    (``resnet50`` and ``hf-hub:timm/resnet50.a1_in1k`` do)."""
    return first == second or arch_shapes(first) == arch_shapes(second)


def check_shapes(state_dict: Mapping[str, torch.Tensor], arch: str, what: str) -> None:
    """Raise PoolError unless ``state_dict`` has exactly the featurizer tensors of ``arch``."""
    expected = arch_shapes(arch)
    missing, unexpected = (
        sorted(set(expected) - set(state_dict)),
        sorted(set(state_dict) - set(expected)),
    )
    if missing or unexpected:
        raise PoolError(
            f"{what} does not match architecture {arch!r}: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]} (at most 5 shown); check --arch / the weights"
        )
    for key, shape in expected.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise PoolError(f"{what}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            raise PoolError(
                f"{what}: tensor {key!r} has shape {tuple(value.shape)} but architecture {arch!r} "
                f"expects {shape}; these weights belong to another architecture or variant"
            )


class Pool:
    """A pool folder: local, a shared mount at the same path on every node, or a URI on object
    storage (``s3://bucket/pool``). ``root`` is that location as messages show it."""

    def __init__(self, root: str | Path) -> None:
        self._files = PoolFiles(root)
        self.root = self._files.location

    def exists(self) -> bool:
        """Whether the pool has a manifest (a pool is created by its first add)."""
        return self._files.exists(MANIFEST)

    def entries(self) -> list[PoolEntry]:
        """All entries, sorted by name (empty when the pool does not exist yet)."""
        return [entry for _, entry in sorted(self._read_manifest().items())]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._read_manifest()

    def get(self, name: str) -> PoolEntry:
        manifest = self._read_manifest()
        if name not in manifest:
            known = ", ".join(sorted(manifest)) or "none"
            raise PoolError(
                f"no entry {name!r} in pool {self.root} (entries: {known}); "
                "run `ratatouille pool list --pool DIR` to see them"
            )
        return manifest[name]

    def add(
        self,
        name: str,
        state_dict: Mapping[str, torch.Tensor],
        *,
        source_task: str,
        arch: str,
        id_val_acc: float | None = None,
        robust: bool = False,
        overwrite: bool = False,
        recipe: Mapping[str, Any] | None = None,
    ) -> PoolEntry:
        """Store a featurizer state dict (keys of ``timm.create_model(arch, num_classes=0)``);
        ``recipe`` records what shaped it, for the compatibility check of a target."""
        _check_name(name)
        if not overwrite and name in self:  # fail before serialising; re-checked when writing
            raise self._exists(name)
        if id_val_acc is not None:
            id_val_acc = float(id_val_acc)
            if not math.isfinite(id_val_acc):
                raise PoolError(
                    f"id_val_acc of {name!r} is {id_val_acc}; pass a finite score or None"
                )
        check_shapes(state_dict, arch, f"weights for pool entry {name!r}")
        # clone: safetensors refuses tensors that share storage (views, tied weights)
        tensors = {
            key: value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            for key, value in state_dict.items()
        }
        payload = st_save(tensors, metadata={"arch": arch, "source_task": source_task})
        entry = PoolEntry(
            name,
            source_task,
            arch,
            hashlib.sha256(payload).hexdigest(),
            f"{name}.safetensors",
            id_val_acc,
            bool(robust),
            datetime.now(UTC).isoformat(timespec="seconds"),
            None if recipe is None else json.loads(json.dumps(dict(recipe))),  # JSON-able now
        )
        self._publish(entry, payload, overwrite)
        return entry

    def _publish(self, entry: PoolEntry, payload: bytes, overwrite: bool) -> None:
        """The entry's file first, then the manifest that names it: a crash in between leaves an
        unlisted file (overwritten by the next add of that name), never a listed entry without
        its bytes; an overwritten entry read in between fails its sha256 check, loudly. The file
        is written under the lock too, so two adds of one name cannot interleave."""
        with self._files.exclusive():
            manifest = self._read_manifest()  # re-read: another writer may have added since
            if entry.name in manifest and not overwrite:
                raise self._exists(entry.name)
            self._files.write(entry.file, payload)
            manifest[entry.name] = entry
            self._write_manifest(manifest)

    def load(self, name: str, *, expected_arch: str | None = None) -> dict[str, torch.Tensor]:
        """The featurizer ``phi_aux`` of ``name``, after checking its hash, arch and shapes."""
        entry = self.get(name)
        where = self._files.show(entry.file)
        try:
            payload = self._files.read(entry.file)  # hash and parse the same bytes: no swap
        except FileNotFoundError:
            raise PoolError(
                f"pool entry {name!r}: file {where} is missing; run `ratatouille pool verify "
                f"--pool {self.root}` and re-add or re-import the entry"
            ) from None
        if hashlib.sha256(payload).hexdigest() != entry.sha256:
            raise PoolError(
                f"pool entry {name!r}: sha256 of {where} does not match the manifest (file changed "
                f"or corrupted); run `ratatouille pool verify --pool {self.root}` and re-import it"
            )
        if expected_arch is not None and not same_architecture(entry.arch, expected_arch):
            raise PoolError(
                f"pool entry {name!r} holds a {entry.arch!r} featurizer but the experiment uses "
                f"{expected_arch!r}; pick entries of the same architecture"
            )
        try:
            state_dict = st_load(payload)
        except SafetensorError as err:
            raise PoolError(
                f"pool entry {name!r}: {where} is not a valid safetensors file ({err}); "
                "re-import it"
            ) from err
        check_shapes(state_dict, entry.arch, f"pool entry {name!r}")
        return state_dict

    def _exists(self, name: str) -> PoolError:
        return PoolError(
            f"pool {self.root} already has an entry {name!r}; choose another name "
            "or pass overwrite=True to replace it"
        )

    def verify(self) -> list[tuple[str, str | None]]:
        """``(name, problem or None)`` for every entry: missing file, hash or shape mismatch."""
        return [(entry.name, self._problem(entry.name)) for entry in self.entries()]

    def _problem(self, name: str) -> str | None:
        try:
            self.load(name)
        except PoolError as err:
            return str(err)
        return None

    def _read_manifest(self) -> dict[str, PoolEntry]:
        where = self._files.show(MANIFEST)
        try:
            raw = json.loads(self._files.read(MANIFEST))
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PoolError(f"{where} is not valid JSON ({err}); restore it from a backup") from err
        return _parse_manifest(raw, where)

    def _write_manifest(self, manifest: Mapping[str, PoolEntry]) -> None:
        document = {
            "version": MANIFEST_VERSION,
            "entries": [asdict(e) for _, e in sorted(manifest.items())],
        }
        self._files.write(MANIFEST, (json.dumps(document, indent=2) + "\n").encode())


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PoolError(
            f"pool entry name {name!r} is not allowed; use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 128 characters)"
        )


#: Fields a manifest of an earlier version may lack.
_OPTIONAL_FIELDS = frozenset({"recipe"})


def incompatibilities(
    entries: list[PoolEntry], expected: Mapping[str, Any], keys: tuple[str, ...]
) -> list[str]:
    """One line per entry whose recorded recipe differs from ``expected`` on one of ``keys``
    (entries with no recorded recipe, imported by hand, are judged by their arch alone)."""
    problems = []
    for entry in entries:
        if entry.recipe is None:
            continue
        differ = [
            f"{key} {entry.recipe.get(key)!r} (expected {expected.get(key)!r})"
            for key in keys
            if entry.recipe.get(key) != expected.get(key)
        ]
        if differ:
            problems.append(f"{entry.name}: {', '.join(differ)}")
    return problems


class HeadStore:
    """Linear heads (``weight``, ``bias``) kept beside the pool: the probed heads auxiliary runs
    start from, made once per auxiliary task and reused. Same files and safety as the pool:
    safetensors, a sha256 per file in ``heads.json``, checked on every load."""

    INDEX = "heads.json"

    def __init__(self, root: str | Path) -> None:
        self._files = PoolFiles(root)
        self.root = self._files.location

    def _index(self) -> dict[str, dict[str, Any]]:
        try:
            raw = json.loads(self._files.read(self.INDEX))
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PoolError(f"{self._files.show(self.INDEX)} is not valid JSON ({err})") from err
        if not isinstance(raw, dict):
            raise PoolError(f"{self._files.show(self.INDEX)} is not a head index")
        return raw

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._index()

    def add(self, name: str, head: Mapping[str, torch.Tensor], *, source_task: str) -> None:
        _check_name(name)
        if set(head) != {"weight", "bias"} or head["weight"].dim() != 2:
            raise PoolError(f"head {name!r} must be a 2-D 'weight' and a 'bias', got {list(head)}")
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in head.items()}
        payload = st_save(tensors, metadata={"source_task": source_task})
        with self._files.exclusive():
            index = self._index()
            self._files.write(f"{name}.safetensors", payload)
            index[name] = {"sha256": hashlib.sha256(payload).hexdigest(), "task": source_task}
            self._files.write(self.INDEX, (json.dumps(index, indent=2) + "\n").encode())

    def load(self, name: str) -> dict[str, torch.Tensor]:
        index = self._index()
        if name not in index:
            raise PoolError(f"no head {name!r} in {self.root}; run the experiment to make it")
        payload = self._files.read(f"{name}.safetensors")
        if hashlib.sha256(payload).hexdigest() != index[name]["sha256"]:
            raise PoolError(
                f"head {name!r} in {self.root} does not match its sha256 (changed or corrupted); "
                "delete it and its heads.json line so the experiment makes it again"
            )
        return st_load(payload)


def _parse_manifest(raw: object, path: str) -> dict[str, PoolEntry]:
    known = {field.name for field in fields(PoolEntry)}
    required = known - _OPTIONAL_FIELDS
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list):
        raise PoolError(f"{path} has no 'entries' list; it is not a ratatouille pool manifest")
    manifest: dict[str, PoolEntry] = {}
    for item in raw["entries"]:
        if not isinstance(item, dict) or not required <= set(item) <= known:
            raise PoolError(
                f"{path}: malformed entry {item!r}; expected the fields {sorted(known)}"
            )
        entry = PoolEntry(**item)
        if Path(entry.file).name != entry.file:  # a manifest must not point outside its folder
            raise PoolError(
                f"{path}: entry {entry.name!r} has file {entry.file!r} outside the pool"
            )
        manifest[entry.name] = entry
    return manifest


def strip_to_featurizer(state_dict: Mapping[str, object], arch: str) -> dict[str, torch.Tensor]:
    """The featurizer tensors of a (possibly wrapped, prefixed, full-model) state dict.

    Finds the key prefix (``""``, ``"module."``, ``"featurizer."``, DomainBed's
    ``"featurizer.network."``, ...) under which the arch's featurizer tensors sit, strips it, and
    drops classifier tensors (the arch's own head, ``fc.*``, ``head.*``, ``classifier.*``) and all
    keys outside that prefix. Any other extra tensor is an error: no half-matching weights.
    """
    state_dict = _unwrap(state_dict)
    expected = arch_shapes(arch)
    anchor = next(iter(expected))  # e.g. "conv1.weight": where it sits reveals candidate prefixes
    prefixes = {
        key[: -len(anchor)] for key in state_dict if key == anchor or key.endswith("." + anchor)
    }
    if not prefixes:
        raise PoolError(
            f"weights have no tensor {anchor!r} under any prefix, so they are not a {arch!r} "
            f"featurizer (first keys: {list(state_dict)[:5]}); check --arch"
        )
    # the prefix holding most of the featurizer's tensors; the shortest among equals
    prefix = min(prefixes, key=lambda p: (-sum(p + k in state_dict for k in expected), len(p)))
    head_keys = set(arch_shapes(arch, None)) - set(expected)
    under_prefix = {
        key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
    }
    featurizer: dict[str, Any] = {
        short: value
        for short, value in under_prefix.items()
        if short in expected or not (short in head_keys or short.startswith(_HEAD_PREFIXES))
    }
    check_shapes(featurizer, arch, f"weights (prefix {prefix!r} stripped)")
    return featurizer


def _unwrap(obj: Any) -> Mapping[str, object]:
    """Descend into training-script wrappers like ``{"model_dict": {...}, "args": ...}``."""
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
            raise PoolError(
                f"weights file holds a non-tensor entry {bad!r} and no state dict under "
                f"{list(_WRAPPER_KEYS)}; save a plain state dict (tensor name -> tensor)"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise PoolError(f"weights file holds a {type(obj).__name__}, not a state dict")
    return obj


#: timm's prefixes for a hub repo or a model folder given to `pool import` instead of a file.
_MODEL_SOURCES = ("hf-hub:", "local-dir:")
_PICKLED_WEIGHTS_NAME = "pytorch_model.bin"


def import_weights(
    path: str | Path,
    pool: Pool,
    *,
    name: str,
    arch: str,
    source_task: str = "imported",
    trust_pickle: bool = False,
) -> PoolEntry:
    """Add an external featurizer (e.g. a community fine-tuning) to ``pool`` as ``name``.

    ``path`` is a weights file, a timm model folder (``local-dir:/path``: its model.safetensors)
    or a timm hub repo (``hf-hub:timm/NAME``: its model.safetensors, downloaded or cached)."""
    if str(path).startswith(_MODEL_SOURCES[0]):
        raw: object = _hub_weights(str(path))
    else:
        raw = _read_weights_file(_weights_file(path), trust_pickle)
    if not isinstance(raw, Mapping):
        raise PoolError(f"{path} holds a {type(raw).__name__}, not a state dict")
    featurizer = strip_to_featurizer(raw, arch)
    return pool.add(name, featurizer, source_task=source_task, arch=arch)


def _weights_file(path: str | Path) -> Path:
    """The file to read: ``path`` itself, or the weights file of a ``local-dir:`` folder
    (model.safetensors; pytorch_model.bin only when that is all it has, then a pickle)."""
    if not str(path).startswith(_MODEL_SOURCES[1]):
        return Path(path)
    folder = Path(str(path).removeprefix(_MODEL_SOURCES[1])).expanduser()
    if not folder.is_dir():
        raise PoolError(f"model folder {folder} does not exist")
    for filename in (HF_WEIGHTS_FILE, _PICKLED_WEIGHTS_NAME):
        if (folder / filename).is_file():
            return folder / filename
    raise PoolError(f"model folder {folder} has no {HF_WEIGHTS_FILE}")


def _hub_weights(name: str) -> Mapping[str, torch.Tensor]:
    """A hub repo's model.safetensors; its pickle is never fetched."""
    import timm

    repo = name.removeprefix(_MODEL_SOURCES[0])
    try:
        return timm.models.load_state_dict_from_hf(repo, filename=HF_WEIGHTS_FILE)
    except (OSError, ConnectionError, TimeoutError) as err:  # offline, unknown repo or file
        raise PoolError(
            f"could not fetch {HF_WEIGHTS_FILE} of {name} from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Offline? "
            f"Download it where the hub is reachable (`hf download {repo} --local-dir DIR`) and "
            "import local-dir:DIR; repos with pickled weights only are refused"
        ) from err


def _read_weights_file(path: Path, trust_pickle: bool) -> object:
    if not path.is_file():
        raise PoolError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return st_load(path.read_bytes())
        except SafetensorError as err:
            raise PoolError(f"{path} is not a valid safetensors file: {err}") from err
    if suffix not in _PICKLE_SUFFIXES:
        raise PoolError(
            f"{path}: unknown weights format {suffix!r}; use .safetensors (or a pickle "
            f"{', '.join(_PICKLE_SUFFIXES)} with --trust-pickle)"
        )
    if not trust_pickle:
        raise PoolError(
            f"{path} is a pickle, which can run arbitrary code when loaded; convert it to "
            "safetensors, or pass --trust-pickle if you trust its origin (it is then read "
            "with torch.load(weights_only=True))"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError: anything beyond plain tensors
        raise PoolError(
            f"{path} holds more than tensors and containers, so it was refused even with "
            f"--trust-pickle ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "re-save a plain state dict"
        ) from err
