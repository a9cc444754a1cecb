"""Ray Tune, and only here: one `Tuner.fit()` per stage, driven from one process.

Trials run `ratatouille.recipe.stages` bodies; the driver ships them their initial weights through
the object store, one entry per featurizer and head (`SharedWeights`), so workers need no shared
filesystem for the pool, only Tune's storage for checkpoints, and a trial fetches only the
weights it starts from. MLflow is written by the driver through a Tune callback.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from safetensors.torch import load_file, save_file

from ratatouille.core.config import ExperimentConfig
from ratatouille.core.errors import UserError
from ratatouille.core.names import MetricKey, Stage, WeightsFile
from ratatouille.core.paths import stable_path
from ratatouille.engine.state_files import load_train_state, save_train_state
from ratatouille.engine.train import TrainingDiverged
from ratatouille.recipe.specs import TrialSpec, spec_from_plain
from ratatouille.recipe.stages import StateDict, TrialContext, run_trial

if TYPE_CHECKING:  # workers unpickle this module: keep mlflow out of their imports
    from ratatouille.tracking.store import Tracker

TUNE_QUIET = {
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Tune's own table reporter (CLIReporter) needs the legacy output engine: the new
    # one shows the whole spec as one column and ignores parameter_columns.
    "RAY_AIR_NEW_OUTPUT": "0",
}
#: Tune's period between uploads of the experiment state (resources.experiment_sync_s).
EXPERIMENT_SYNC_ENV = "TUNE_GLOBAL_CHECKPOINT_S"
#: Columns of Tune's progress table: a trial's readable fields, then its progress.
PARAMETER_COLUMNS = {
    "spec/arm": "arm",
    "spec/task": "task",
    "spec/test_domain": "test domain",
    "spec/run": "run",
    "spec/init_source": "init source",
    "spec/lr": "lr",
}
METRIC_COLUMNS = {MetricKey.STEP.value: "step", MetricKey.BEST_ID_VAL_ACC.value: "best ID-val acc"}
PROGRESS_INTERVAL_S = 30


class SweepIncomplete(RuntimeError):
    """Some trials of a stage failed or never ran; finished ones are kept for --resume."""


class SweepInterrupted(SweepIncomplete):
    """A stop signal (Ctrl-C, SIGTERM) ended a stage early; finished trials are kept."""


@dataclass(frozen=True)
class Excluded:
    """A target trial left out of every strategy, and why."""

    spec: TrialSpec
    reason: str


def error_line(error: object) -> str:
    """The last non-empty line of an error (a Ray trace ends with the original exception)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def diverged(error: object) -> bool:
    """Whether a trial failed because its loss became NaN or infinite (engine.train)."""
    return isinstance(error, TrainingDiverged) or "TrainingDiverged" in str(error)


class RayUnreachable(UserError):
    """RAY_ADDRESS names a cluster this driver cannot reach."""


#: How long the address check may take in all: a name lookup and one TCP connect.
ADDRESS_CHECK_TIMEOUT_S = 4.0
DEFAULT_PORTS = {"": 6379, "ray": 10001, "http": 80, "https": 443}  # GCS, Ray Client, Jobs API
RAY_ADDRESS_FORMS = "host:port (the GCS, port 6379), ray://host:10001, auto or local"


@dataclass(frozen=True)
class RayEndpoint:
    """Where RAY_ADDRESS points: ``scheme`` is "" for a GCS address, else ray, http or https."""

    scheme: str
    host: str
    port: int


def ray_endpoint(address: str) -> RayEndpoint | None:
    """The endpoint a RAY_ADDRESS names; None for `auto` and `local`, which Ray resolves itself
    (from this machine's running Ray) without waiting on the network."""
    if address.strip().lower() in ("auto", "local"):
        return None
    scheme, _, rest = address.strip().rpartition("://")
    scheme = scheme.lower()
    if scheme not in DEFAULT_PORTS or not rest:
        raise RayUnreachable(
            f"RAY_ADDRESS={address} is not an address Ray takes: use {RAY_ADDRESS_FORMS}"
        )
    parts = urllib.parse.urlsplit("//" + rest)
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise RayUnreachable(
            f"RAY_ADDRESS={address} has no valid host and port: use {RAY_ADDRESS_FORMS}"
        )
    return RayEndpoint(scheme, parts.hostname, port)


def _resolve(host: str, port: int, timeout_s: float) -> list[Any]:
    """getaddrinfo with a deadline: a resolver with no DNS server answering blocks for long."""
    found: list[Any] = []
    failure: list[OSError] = []

    def lookup() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as error:
            failure.append(error)

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise OSError(f"the name {host} did not resolve within {timeout_s:.0f} s")
    if failure:
        raise OSError(f"the name {host} does not resolve ({failure[0].strerror or failure[0]})")
    return found


def probe_endpoint(endpoint: RayEndpoint, timeout_s: float = ADDRESS_CHECK_TIMEOUT_S) -> None:
    """Raise OSError unless something accepts TCP connections at the endpoint."""
    deadline = time.monotonic() + timeout_s
    addresses = _resolve(endpoint.host, endpoint.port, timeout_s)
    errors = []
    for family, kind, proto, _, sockaddr in addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with socket.socket(family, kind, proto) as connection:
            connection.settimeout(left)
            try:
                connection.connect(sockaddr)
                return
            except OSError as error:
                errors.append(error)
    reason = errors[0].strerror or type(errors[0]).__name__ if errors else "timed out"
    raise OSError(f"nothing answers at {endpoint.host}:{endpoint.port} ({reason})")


def check_ray_address(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse, in seconds and before anything starts, a RAY_ADDRESS this driver cannot use.

    ``ray.init`` retries an unreachable GCS for minutes, printing warnings; a dashboard/Jobs API
    URL (http://head:8265) is what `ray job submit` takes, never a driver.
    """
    address = environ.get("RAY_ADDRESS", "").strip()
    endpoint = ray_endpoint(address) if address else None
    if endpoint is None:
        return
    try:
        probe_endpoint(endpoint)
    except OSError as error:
        raise RayUnreachable(
            f"RAY_ADDRESS={address}: {error}: start the cluster (`ray start --head`, "
            "`ray up cluster.yaml`), fix the address, or unset RAY_ADDRESS to run on a local Ray "
            "of this run's own"
        ) from None
    if endpoint.scheme in ("http", "https"):
        raise RayUnreachable(
            f"RAY_ADDRESS={address} is a dashboard / Jobs API address, which a driver cannot "
            f"attach to: submit with `ray job submit --address {address} -- ratatouille run "
            "CONFIG`, or set RAY_ADDRESS to the cluster's GCS address (host:6379)"
        )


def connect_ray() -> str:
    """Attach to the cluster RAY_ADDRESS names (`ray submit`, `ray job submit` and
    experiments/submit.py set it), else start a Ray of this run's own.

    Never `address="auto"` without RAY_ADDRESS: it would attach to whatever Ray another process
    started on this machine, e.g. a second `ratatouille run`, and wait for its CPUs, then die
    with it. A set but unreachable RAY_ADDRESS is an error, never a silent local Ray (on a
    cluster's head node, GPU trials would then wait forever).
    """
    for key, value in TUNE_QUIET.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return "attached (already initialized)"
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        return "started a local Ray for this run"
    check_ray_address()
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as error:
        raise RayUnreachable(
            f"RAY_ADDRESS={address} but no Ray cluster answers there ({error_line(error)}): "
            "start it (`ray start --head`, `ray up cluster.yaml`) or unset RAY_ADDRESS to run "
            "on a local Ray of this run's own"
        ) from None
    return f"attached to the cluster at {address}"


class StorageNotShared(UserError):
    """A local store that some node of the cluster cannot see."""


def _seen(paths: list[str]) -> list[bool]:
    return [os.path.exists(path) for path in paths]


def blind_fields(probes: Mapping[str, str], seen: Mapping[str, list[bool]]) -> dict[str, list[str]]:
    """Config field -> the nodes that could not see its probe file (``seen``: node -> one flag
    per probe, in ``probes``' order)."""
    blind: dict[str, list[str]] = {}
    for node, flags in seen.items():
        for field_name, flag in zip(probes, flags):
            if not flag:
                blind.setdefault(field_name, []).append(node)
    return blind


def check_storage_shared(stores: Mapping[str, str]) -> None:
    """On a cluster of several nodes, every local store (config field -> path) must be visible
    from every node, or each trial fails at its first checkpoint and is retried for nothing.
    A probe file written here is looked for by a task pinned to each live node. URIs
    (s3://, gs://) are shared by construction."""
    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    local = {name: path for name, path in stores.items() if "://" not in path}
    if len(nodes) < 2 or not local:
        return
    token = uuid.uuid4().hex
    probes = {
        name: os.path.join(path, f".ratatouille-probe-{token}") for name, path in local.items()
    }
    for probe in probes.values():
        Path(probe).parent.mkdir(parents=True, exist_ok=True)
        Path(probe).touch()
    try:
        check = ray.remote(_seen)
        pending = {
            node: check.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote(list(probes.values()))
            for node in nodes
        }
        seen = {f"{nodes[node]} ({node[:8]})": ray.get(ref) for node, ref in pending.items()}
    finally:
        for probe in probes.values():
            Path(probe).unlink(missing_ok=True)
    blind = blind_fields(probes, seen)
    if blind:
        name, where = next(iter(blind.items()))
        raise StorageNotShared(
            f"{name} {local[name]} is not visible from node(s) {', '.join(where)} of this "
            f"cluster: set {name} to an s3:// or gs:// URI, or to a path on shared storage "
            "(NFS, EFS) mounted at the same place on every node"
        )


def storage_root(config: ExperimentConfig) -> str:
    """Absolute local path or a URI: Tune's storage for every stage's trials and checkpoints."""
    configured = config.tracking.storage_path
    if configured and "://" in configured:
        return configured.rstrip("/")
    return str(stable_path(configured, "ray_results"))


# -- inside a trial ---------------------------------------------------------------------------
class TuneReporter:
    """Bridges `stages.Reporter` to `tune.report` and Tune checkpoints; every report also says
    where the trial runs (node, GPU ids), so users can see the placement in MLflow."""

    def __init__(self) -> None:
        self.placement = {
            MetricKey.NODE_ID.value: ray.get_runtime_context().get_node_id(),
            MetricKey.GPU_IDS.value: ",".join(str(i) for i in ray.get_gpu_ids()),
        }

    def report(
        self,
        metrics: Mapping[str, Any],
        *,
        weights: Mapping[WeightsFile, StateDict] | None = None,
        train_state: Mapping[str, Any] | None = None,
    ) -> None:
        """A metrics-only report, or one with a Tune checkpoint: a trial's snapshots (train
        state, on resources.snapshot_every_s) and its closing report (its weights files, once).
        Tune uploads the checkpoint inside this call, so both are kept rare."""
        row = {**{str(key): value for key, value in metrics.items()}, **self.placement}
        if not weights and train_state is None:
            tune.report(row)
            return
        with tempfile.TemporaryDirectory() as folder:
            for name, state in (weights or {}).items():
                tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
                save_file(tensors, os.path.join(folder, WeightsFile(name).filename))
            if train_state is not None:
                save_train_state(dict(train_state), folder)
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(folder))

    def restored_state(self) -> dict[str, Any] | None:
        """The train state of the trial's latest checkpoint, read without unpickling (a
        bucket-writer must not run code on the worker); a pickled one is refused."""
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_train_state(folder)


def trial_threads() -> int:
    """The CPUs Ray gave this trial (Ray's launcher exports OMP_NUM_THREADS=1)."""
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    return max(1, int(cpus))


class SharedWeights(Mapping[str, StateDict]):
    """State dicts in Ray's object store, one entry per name, fetched when read.

    What Tune and Ray tasks pickle is the references only: a trial's context (through
    `tune.with_parameters`) or a reducer task's arguments carry every name, and the process
    reading ``weights[name]`` pulls that one entry. ``fetch`` turns a reference into its state
    dict (``ray.get``; a test counts fetches with its own)."""

    def __init__(
        self,
        refs: Mapping[str, ray.ObjectRef] | None = None,
        fetch: Callable[[ray.ObjectRef], StateDict] = ray.get,
    ) -> None:
        self.refs = dict(refs or {})
        self.fetch = fetch

    def put(self, states: Mapping[str, StateDict]) -> SharedWeights:
        """These weights and ``states``, each put in the object store once (from the driver,
        which owns them while it holds this mapping)."""
        refs = {name: ray.put(state) for name, state in states.items()}
        return SharedWeights({**self.refs, **refs}, self.fetch)

    def only(self, names: Iterable[str]) -> SharedWeights:
        return SharedWeights({name: self.refs[name] for name in names}, self.fetch)

    def __getitem__(self, name: str) -> StateDict:
        return self.fetch(self.refs[name])

    def __contains__(self, name: object) -> bool:  # Mapping's would fetch the entry
        return name in self.refs

    def __iter__(self) -> Iterator[str]:
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)


def share_weights(states: Mapping[str, StateDict]) -> SharedWeights:
    """Put each state dict in the object store once; trials and tasks get references."""
    return SharedWeights().put(states)


def _trainable(config: dict[str, Any], context: TrialContext) -> None:
    torch.set_num_threads(trial_threads())
    run_trial(spec_from_plain(config["spec"]), context, TuneReporter())


# -- the driver -------------------------------------------------------------------------------
@dataclass
class TrialOutcome:
    spec: TrialSpec
    metrics: dict[str, Any]
    checkpoint: tune.Checkpoint | None


#: bytes per read when copying a weights file from storage.
COPY_BLOCK = 8 << 20


def fetch_file(checkpoint: tune.Checkpoint, filename: str, local: str) -> int:
    """Copy one file of a checkpoint to ``local``, through the checkpoint's own filesystem
    (pyarrow: local, NFS or S3), without the rest of its folder; returns the bytes copied."""
    source = f"{checkpoint.path.rstrip('/')}/{filename}"
    filesystem = checkpoint.filesystem
    assert filesystem is not None  # Checkpoint infers it from the path when not given
    with filesystem.open_input_stream(source) as stream, open(local, "wb") as out:
        copied = 0
        while block := stream.read(COPY_BLOCK):
            out.write(block)
            copied += len(block)
    return copied


class LocalWeights:
    """Weights files of trial checkpoints, each copied once to a node-local folder: every later
    load of the same file reads the local copy. ``fetched`` counts the copies per remote file
    (each should be 1), ``bytes_fetched`` their bytes."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.fetched: Counter[str] = Counter()
        self.bytes_fetched = 0
        self._local: dict[str, str] = {}

    def path(self, checkpoint: tune.Checkpoint, name: WeightsFile) -> str:
        source = f"{checkpoint.path.rstrip('/')}/{name.filename}"
        if source not in self._local:
            local = os.path.join(self.folder, f"{len(self._local)}-{name.filename}")
            self.bytes_fetched += fetch_file(checkpoint, name.filename, local)
            self.fetched[source] += 1
            self._local[source] = local
        return self._local[source]


_LOCAL_WEIGHTS: list[LocalWeights] = []  # the innermost `local_weights()` of this process


@contextlib.contextmanager
def local_weights() -> Iterator[LocalWeights]:
    """While open, :func:`read_weights` reads each weights file from storage once, into a
    temporary folder on this node's disk (removed on exit). A reducer task holds one open for
    its lifetime: its soups, ablations and curves reload runs from the local copies."""
    folder = tempfile.mkdtemp(prefix="ratatouille-weights-")
    cache = LocalWeights(folder)
    _LOCAL_WEIGHTS.append(cache)
    try:
        yield cache
    finally:
        _LOCAL_WEIGHTS.remove(cache)
        shutil.rmtree(folder, ignore_errors=True)


def read_weights(checkpoint: tune.Checkpoint, name: WeightsFile) -> StateDict:
    """One safetensors file of a trial's checkpoint (local or remote storage): only that file
    is read, from the node-local copy when a :func:`local_weights` is open."""
    if _LOCAL_WEIGHTS:
        return load_file(_LOCAL_WEIGHTS[-1].path(checkpoint, name))
    with tempfile.TemporaryDirectory(prefix="ratatouille-weights-") as folder:
        local = os.path.join(folder, name.filename)
        fetch_file(checkpoint, name.filename, local)
        return load_file(local)


def _drop_snapshots(result: Any) -> None:
    """Delete a finished trial's snapshots from storage: only its closing checkpoint (its
    latest, the weights files) is read again. A snapshot that cannot be deleted only costs
    storage."""
    latest = result.checkpoint
    for checkpoint, _metrics in result.best_checkpoints or []:
        if latest is None or checkpoint.path == latest.path:
            continue
        with contextlib.suppress(OSError):
            checkpoint.filesystem.delete_dir(checkpoint.path)


def _spec_of(trial: Any) -> TrialSpec:
    return spec_from_plain(trial.config["spec"])


_LIVE_TRACKERS: dict[str, Tracker] = {}


class MlflowTrialCallback(tune.Callback):
    """One MLflow child run per trial, written from the driver (one writer).

    Each hook only queues its write on the tracker's writer thread (tracking.writer): Tune's
    event loop never waits on the store. `Tuner.restore` brings back the callbacks pickled with
    the first run; this one therefore keeps only the parent run id and writes through the
    tracker of the current process.
    """

    def __init__(self, tracker: Tracker):
        assert tracker.parent_id is not None, "start the parent run before the stages"
        self.parent_id = tracker.parent_id
        _LIVE_TRACKERS[self.parent_id] = tracker
        self._keys: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"parent_id": self.parent_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.parent_id, self._keys = state["parent_id"], {}

    @property
    def tracker(self) -> Tracker:
        return _LIVE_TRACKERS[self.parent_id]

    def _key(self, trial: Any) -> str:
        """A trial's key, parsed from its spec once (every report asks for it)."""
        key = self._keys.get(trial.trial_id)
        if key is None:
            key = self._keys[trial.trial_id] = _spec_of(trial).key
        return key

    def on_trial_start(self, iteration, trials, trial, **info):
        spec = _spec_of(trial)
        self._keys[trial.trial_id] = spec.key
        self.tracker.trial_started(spec.key, spec.trial_name, spec.stage, spec.to_plain())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.tracker.trial_result(self._key(trial), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.tracker.trial_finished(self._key(trial), metrics=trial.last_result)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.tracker.trial_restarted(self._key(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.tracker.trial_finished(self._key(trial), failed=True)


def _trial_name(trial: Any) -> str:
    return _spec_of(trial).trial_name


def _trial_dirname(trial: Any) -> str:
    return f"{_trial_name(trial)}_{trial.trial_id}"


@dataclass
class StageRunner:
    """Runs the stages of one `ratatouille run` under `<storage>/<name>/<run>/<stage>`."""

    config: ExperimentConfig
    run_dir: str
    tracker: Tracker
    resume: bool = False
    restore_only: bool = False
    #: target trials that diverged after every retry: left out of the reducer, reported
    excluded: list[Excluded] = field(default_factory=list)
    #: per stage, the trials a resume added to the experiment (its config grew)
    grown: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.tracker.parent_id is not None, "start the parent run before the stages"
        _LIVE_TRACKERS[self.tracker.parent_id] = self.tracker

    @staticmethod
    def share(states: Mapping[str, StateDict]) -> SharedWeights:
        """Weights for this runner's trials: one object-store entry each (`SharedWeights`)."""
        return share_weights(states)

    def _resources(self) -> dict[str, float]:
        res = self.config.resources
        return {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial}

    def _trainable(self, context: TrialContext) -> Any:
        return tune.with_resources(
            tune.with_parameters(_trainable, context=context), self._resources()
        )

    def _new_tuner(
        self, stage: Stage, specs: list[TrialSpec], trainable: Any, name: str
    ) -> tune.Tuner:
        # No num_to_keep: with it, Tune forces a sync of the whole experiment folder to
        # storage after trials checkpoint (tune/execution/experiment_state.py,
        # sync_every_n_trial_checkpoints) while trials wait in tune.report. Without it Tune
        # deletes no checkpoint (train/_internal/checkpoint_manager.py): storage keeps, per
        # trial, its snapshots (one train state per resources.snapshot_every_s of training,
        # none in a trial shorter than that) and its closing checkpoint (the weights files,
        # written once); the latest, the closing one, is what the reducer and the pool read.
        # `_drop_snapshots` deletes a finished trial's snapshots when its stage ends.
        checkpoints = tune.CheckpointConfig()
        progress = tune.CLIReporter(
            parameter_columns={
                k: v
                for k, v in PARAMETER_COLUMNS.items()
                if k.removeprefix("spec/") in specs[0].to_plain()
            },
            metric_columns=METRIC_COLUMNS,
            max_report_frequency=PROGRESS_INTERVAL_S,
            sort_by_metric=False,
            # explicit: its default follows the verbosity the previous Tuner left set globally
            print_intermediate_tables=True,
        )
        return tune.Tuner(
            trainable,
            param_space={"spec": tune.grid_search([spec.to_plain() for spec in specs])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=self.config.resources.max_concurrent_trials,
                reuse_actors=True,  # a new actor per trial re-imports torch and timm
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=self.run_dir,
                verbose=1,
                progress_reporter=progress,
                checkpoint_config=checkpoints,
                failure_config=tune.FailureConfig(max_failures=self.config.resources.max_failures),
                callbacks=[MlflowTrialCallback(self.tracker)],
            ),
        )

    @contextlib.contextmanager
    def _experiment_sync_period(self) -> Iterator[None]:
        """Tune's controller reads its experiment-state period from the environment when a
        fit starts (tune/execution/tune_controller.py); set it for this stage's fits only."""
        period = self.config.resources.experiment_sync_s
        saved = os.environ.get(EXPERIMENT_SYNC_ENV)
        if period is not None:
            os.environ[EXPERIMENT_SYNC_ENV] = f"{period:g}"
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop(EXPERIMENT_SYNC_ENV, None)
            else:
                os.environ[EXPERIMENT_SYNC_ENV] = saved

    def run(
        self, stage: Stage, specs: list[TrialSpec], context: TrialContext
    ) -> list[TrialOutcome]:
        """Fit (or restore and finish) one stage; every trial must end without error.

        A resume restores each Tune experiment of the stage (the first, then one per growth)
        and finishes what they hold; the requested trials none of them holds (an experiment
        grown by the config) run as a new experiment of their own beside them."""
        if not specs:
            return []
        trainable = self._trainable(context)
        with self._experiment_sync_period():
            if not (self.resume or self.restore_only):
                results = _listed(self._new_tuner(stage, specs, trainable, str(stage)).fit())
            else:
                results = self._restored(stage, specs, trainable)
        self.tracker.flush()  # the stage's trial records are in the store before it ends
        wanted = {spec.key for spec in specs}
        results = [r for r in results if spec_from_plain(r.config["spec"]).key in wanted]
        outcomes = self._outcomes(stage, results, expected=len(specs))
        # Tune's result order differs between fit and restore; the reducer breaks ties by order.
        order = {spec.key: index for index, spec in enumerate(specs)}
        return sorted(outcomes, key=lambda o: order.get(o.spec.key, len(order)))

    def _experiments(self, stage: Stage) -> list[str]:
        """The stage's Tune experiments that exist: ``<stage>``, ``<stage>.growth-1``, ..."""
        names: list[str] = []
        for index in itertools.count():
            name = str(stage) if index == 0 else f"{stage}.growth-{index}"
            if not tune.Tuner.can_restore(f"{self.run_dir}/{name}"):
                return names
            names.append(name)
        raise AssertionError("unreachable")

    def _restored(self, stage: Stage, specs: list[TrialSpec], trainable: Any) -> list[Any]:
        names = self._experiments(stage)
        results: list[Any] = []
        for name in names:
            path = f"{self.run_dir}/{name}"
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
            results += _listed(tuner.get_results() if self.restore_only else tuner.fit())
        held = {spec_from_plain(r.config["spec"]).key for r in results}
        missing = [spec for spec in specs if spec.key not in held]
        if not missing:
            return results
        if self.restore_only:
            raise SweepIncomplete(
                f"stage {str(stage)!r} has {len(missing)} trials with no results under "
                f"{self.run_dir}: run `ratatouille run CONFIG --resume` to train them"
            )
        name = str(stage) if not names else f"{stage}.growth-{len(names)}"
        self.grown[str(stage)] = [spec.trial_name for spec in missing]
        return results + _listed(self._new_tuner(stage, missing, trainable, name).fit())

    def _outcomes(self, stage: Stage, grid: Any, expected: int) -> list[TrialOutcome]:
        """Finished trials. A target trial that diverged after every retry is excluded (and
        recorded in ``excluded``); any other failure, or a stop, ends the stage."""
        results = list(grid)
        finished = [
            r for r in results if r.error is None and (r.metrics or {}).get(MetricKey.DONE.value)
        ]
        errors = [r for r in results if r.error is not None]
        unfinished = len(results) - len(finished) - len(errors)  # a stop cut them short
        for result in errors:  # Tune's error callback comes before the error is readable
            key = spec_from_plain(result.config["spec"]).key
            self.tracker.trial_error(key, error_line(result.error))
        if stage == Stage.TARGET:
            self._exclude([r for r in errors if diverged(r.error)])
            errors = [r for r in errors if not diverged(r.error)]
        if errors or unfinished or len(results) != expected:
            raise self._incomplete(stage, errors, unfinished, expected)
        for result in finished:
            _drop_snapshots(result)
        return [
            TrialOutcome(spec_from_plain(r.config["spec"]), dict(r.metrics), r.checkpoint)
            for r in finished
        ]

    def _exclude(self, results: list[Any]) -> None:
        known = {excluded.spec.key for excluded in self.excluded}
        for result in results:
            spec = spec_from_plain(result.config["spec"])
            if spec.key not in known:
                reason = error_line(result.error)
                self.excluded.append(Excluded(spec, reason))
                self.tracker.trial_excluded(spec.key, reason)

    @staticmethod
    def _incomplete(
        stage: Stage, errors: list[Any], unfinished: int, expected: int
    ) -> SweepIncomplete:
        keep = "Finished trials are kept: fix the cause, then `ratatouille run CONFIG --resume`."
        if errors:
            return SweepIncomplete(
                f"stage {str(stage)!r}: {len(errors)} of {expected} trials failed "
                f"(first: {error_line(errors[0].error)}). {keep}"
            )
        if unfinished:
            return SweepInterrupted(
                f"stage {str(stage)!r} was stopped with {unfinished} of {expected} trials "
                f"unfinished. Finished trials are kept: `ratatouille run CONFIG --resume`."
            )
        return SweepIncomplete(f"stage {str(stage)!r}: expected {expected} trials. {keep}")


def _listed(grid: Any) -> list[Any]:
    """A ResultGrid's results (it iterates, but is not typed as an Iterable)."""
    return list(grid)


def run_remote(fn, resources, *args: Any, memory: int | None = None):
    """Run ``fn(*args)`` as a Ray task with a trial's resources (and ``memory`` bytes of RAM
    reserved, when given); call the result to wait."""
    options: dict[str, Any] = {
        "num_cpus": resources.cpus_per_trial,
        "num_gpus": resources.gpus_per_trial,
    }
    if memory is not None:
        options["memory"] = memory
    task = ray.remote(fn).options(**options)
    ref = task.remote(*args)
    return lambda: ray.get(ref)


def new_run_dir(config: ExperimentConfig) -> str:
    return f"{storage_root(config)}/{config.name}/run-{time.strftime('%Y%m%d-%H%M%S')}"
