"""What each stage trains: trial specs built from the config, with no Ray in sight.

Every random choice of the sweep (hyperparameters, init source, fusing weights, training seed)
is made here, in the driver, by hashing the trial's identity. The specs are typed
(:mod:`ratatouille.recipe.specs`) and turn into flat plain dicts for Tune and MLflow, so
`ratatouille plan` can count them, Tune can grid over them, MLflow can log them and a resumed
sweep rebuilds exactly the same ones.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ratatouille.core.arms import InitChoice, InitDraw, get_arm
from ratatouille.core.config import ExperimentConfig
from ratatouille.core.names import PRETRAINED
from ratatouille.core.seeding import seed_hash
from ratatouille.data import DOMAINBED_DATASETS, get_dataset
from ratatouille.engine.hparams import dataset_schedule, default_hparams, random_hparams
from ratatouille.engine.throughput import (
    Throughput,
    default_throughput_path,
    load_throughput,
    measure_throughput,
    save_throughput,
)
from ratatouille.recipe.specs import (
    AuxProbeSpec,
    AuxSpec,
    Cell,
    HParams,
    PretrainSpec,
    ProbeSpec,
    TargetSpec,
    digest,
    ma_arms,
)

#: Bump when the data pipeline (transforms, splits, loaders) changes what a trial reads: every
#: featurizer made before then gets another name, so old and new never mix in one pool.
DATA_PIPELINE_VERSION = 1


def pretrained_identity(config: ExperimentConfig) -> str:
    """Names phi_pt: what the pool's entries were fine-tuned from."""
    model = config.model
    if model.init == "pretrain":
        assert config.pretrain is not None
        recipe = {
            **config.pretrain.model_dump(),
            "data": _data_recipe(config, augment=config.data.augment),
            "seed": seed_hash(config.seed, "pretrain", config.pretrain.task),
        }
        return f"pretrain-{config.pretrain.task}-{model.arch}-{digest(recipe)}"
    if model.init == "file":
        assert model.weights_file is not None
        return f"file-{model.arch}-{_file_identity(model.weights_file)}"
    return f"hub-{model.arch}"


def _file_identity(path: str) -> str:
    """The weights file's content hash: another file at the same path is another phi_pt. A
    path this process cannot read (a worker's disk) is named by its path alone."""
    try:
        stat = os.stat(path)
    except OSError:
        return digest(path)
    return _content_digest(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of the file, computed once per (path, size, mtime): the planner asks per spec."""
    del size, mtime_ns  # part of the cache key only: a rewritten file is hashed again
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:8]


def _data_recipe(config: ExperimentConfig, *, augment: bool) -> dict[str, Any]:
    data = config.data
    recipe: dict[str, Any] = {
        "image_size": data.image_size,
        "augment": augment,
        "holdout_fraction": data.holdout_fraction,
        "pipeline": DATA_PIPELINE_VERSION,
        # the decoded store crops from the stored S x S image, PIL from the original file
        "loader": data.pipeline,
    }
    # Named only off its default, so the entries made before the switch existed keep their
    # names. data.id_val_transform is absent: pool entries keep their last weights and probes
    # read ID val through the evaluation transform, so it shapes no pooled weights.
    if data.sampling != "epochs":
        recipe["sampling"] = data.sampling
    return recipe


#: The fields of a pool entry's recipe that every featurizer one target run mixes must share.
COMPATIBILITY_KEYS = ("arch", "pretrained", "image_size", "freeze_bn")


def base_recipe(config: ExperimentConfig) -> dict[str, Any]:
    """What the featurizers of one experiment share: the network, the phi_pt they were
    fine-tuned from, the input size and BN freezing. A target refuses pool entries whose
    recorded recipe differs on any of these (``COMPATIBILITY_KEYS``)."""
    return {
        "arch": config.model.arch,
        "pretrained": pretrained_identity(config),
        "image_size": config.data.image_size,
        "freeze_bn": config.model.freeze_bn,
    }


def aux_steps(config: ExperimentConfig, task: str) -> int:
    """Steps of the auxiliary runs on ``task``: one number for all, or a per-task mapping whose
    missing tasks get DomainBed's schedule (15001 on DomainNet, as the reference)."""
    steps = config.aux.steps
    if isinstance(steps, int):
        return steps
    return steps.get(task, dataset_schedule(task)[0])


def _entry_stem(config: ExperimentConfig, task: str) -> str:
    arch = re.sub(r"[^A-Za-z0-9._-]", "_", config.model.arch)  # e.g. "hf-hub:timm/..." names
    return f"{task}-{arch}"


def _aux_probe_recipe(config: ExperimentConfig, task: str) -> dict[str, Any]:
    probe = config.probe
    return {
        **base_recipe(config),
        **_data_recipe(config, augment=False),  # features of the evaluation transform
        "task": task,
        "steps": aux_steps(config, task),
        "hparams": {"lr": probe.lr, "weight_decay": probe.weight_decay, "batch": probe.batch_size},
        "seed": seed_hash(config.seed, "aux_probe", task),
        **_probe_selection(config),
        **_precision(config),
    }


def _precision(config: ExperimentConfig) -> dict[str, Any]:
    """bf16 autocast (on CUDA) shapes weights and features; named only off the default."""
    return {} if config.model.precision == "bf16" else {"precision": config.model.precision}


def _probe_selection(config: ExperimentConfig) -> dict[str, Any]:
    """Which head a probe keeps, named only off the default (``last``: older names stay)."""
    probe = config.probe
    if probe.select == "last":
        return {}
    return {"select": probe.select, "checkpoint_freq": probe.checkpoint_freq}


def aux_probe_name(config: ExperimentConfig, task: str) -> str | None:
    """Key of the probed head the runs on ``task`` start from (None with a random head)."""
    if config.aux.head_init != "probe":
        return None
    return f"{_entry_stem(config, task)}-lp-{digest(_aux_probe_recipe(config, task))}"


def aux_probe_specs(config: ExperimentConfig) -> list[AuxProbeSpec]:
    """One linear probe of phi_pt per auxiliary task (aux.head_init: probe), shared by that
    task's runs: made once, kept in the pool's head store, reused on resume."""
    specs = []
    for task in config.aux.tasks:
        name = aux_probe_name(config, task)
        if name is None:
            continue
        probe = config.probe
        specs.append(
            AuxProbeSpec(
                name=name,
                task=task,
                hparams=HParams(
                    lr=probe.lr,
                    weight_decay=probe.weight_decay,
                    batch_size=probe.batch_size,
                    dropout=0.0,
                ),
                steps=aux_steps(config, task),
                seed=seed_hash(config.seed, "aux_probe", task),
            )
        )
    return specs


def aux_recipe(config: ExperimentConfig, task: str, run: int) -> dict[str, Any]:
    """Everything that shapes the weights of auxiliary run ``run`` on ``task``: its pool
    entry's name is a digest of it and the manifest records it."""
    return {
        **base_recipe(config),
        **_data_recipe(config, augment=config.data.augment),
        "task": task,
        "run": run,
        "steps": aux_steps(config, task),
        "hparams": dataclasses.asdict(_aux_hparams(config, task, run)),
        "seed": seed_hash(config.seed, "aux", task, run),
        "head": aux_probe_name(config, task),  # itself a digest of the probe's recipe
        # loaders are re-seeded at every snapshot point, so the schedule shapes the batches
        "checkpoint_freq": config.aux.checkpoint_freq,
        **_precision(config),
    }


def _stage_steps(config: ExperimentConfig) -> tuple[int, int]:
    default_steps, default_freq = dataset_schedule(config.data.dataset)
    return (config.target.steps or default_steps, config.target.checkpoint_freq or default_freq)


def pretrain_spec(config: ExperimentConfig) -> PretrainSpec | None:
    """The T0 pre-training trial, when phi_pt is ours to make."""
    if config.model.init != "pretrain":
        return None
    stage = config.pretrain
    assert stage is not None
    hparams = HParams(
        lr=stage.lr,
        weight_decay=stage.weight_decay,
        batch_size=stage.batch_size,
        dropout=stage.dropout,
    )
    return PretrainSpec(
        name=pretrained_identity(config),
        task=stage.task,
        hparams=hparams,
        steps=stage.steps,
        checkpoint_freq=stage.checkpoint_freq,
        seed=seed_hash(config.seed, "pretrain", stage.task),
    )


def aux_entry_name(config: ExperimentConfig, task: str, run: int) -> str:
    """Pool name of an auxiliary fine-tuning: same recipe -> same name -> reused; any change
    of what shapes its weights (see ``aux_recipe``) -> another name, never a mixed pool."""
    return f"{_entry_stem(config, task)}-r{run}-{digest(aux_recipe(config, task, run))}"


def robust_name(entry_name: str) -> str:
    return f"{entry_name}-ma"


def _aux_hparams(config: ExperimentConfig, task: str, run: int) -> HParams:
    if config.aux.hparams == "default":
        return HParams(**default_hparams())
    seed = seed_hash(config.seed, "aux", task, run)
    return HParams(
        **random_hparams(config.aux.hparams, seed, overrides=config.aux.hparams_override)
    )


def aux_specs(config: ExperimentConfig) -> list[AuxSpec]:
    """``runs_per_task`` trials per auxiliary task, each with its own hyperparameter draw
    (``--n_hparams`` of the reference); the pool stage skips names it already holds."""
    return [
        AuxSpec(
            name=aux_entry_name(config, task, run),
            task=task,
            run=run,
            hparams=_aux_hparams(config, task, run),
            steps=aux_steps(config, task),
            checkpoint_freq=config.aux.checkpoint_freq,
            robust=config.aux.robust,
            head=aux_probe_name(config, task),
            eval_freq=config.aux.eval_freq,
            seed=seed_hash(config.seed, "aux", task, run),
        )
        for task in config.aux.tasks
        for run in range(config.aux.runs_per_task)
    ]


def probe_specs(config: ExperimentConfig, cells: list[Cell]) -> list[ProbeSpec]:
    """w_lp: one linear probe of phi_pt per (test domain, split), default hparams (paper F.1)."""
    probe = config.probe
    hparams = HParams(
        lr=probe.lr, weight_decay=probe.weight_decay, batch_size=probe.batch_size, dropout=0.0
    )
    return [
        ProbeSpec(
            cell=cell,
            steps=probe.steps,
            hparams=hparams,
            seed=seed_hash(config.seed, "probe", cell.test_env, cell.split_seed),
        )
        for cell in cells
    ]


def arm_sources(config: ExperimentConfig, arm_name: str) -> list[list[str]]:
    """Sources of an arm: source 0 is phi_pt, then one group of pool entries per aux task."""
    arm = get_arm(arm_name)
    groups = [[PRETRAINED]]
    if not arm.needs_pool:
        return groups
    for task in config.aux.tasks:
        names = [aux_entry_name(config, task, run) for run in range(config.aux.runs_per_task)]
        groups.append([robust_name(name) if arm.robust else name for name in names])
    groups.extend([name] for name in config.aux.extra_sources)
    return groups


def target_spec(
    config: ExperimentConfig, cell: Cell, arm_name: str, run: int, init: InitChoice
) -> TargetSpec:
    """Target run ``run`` of an arm in a cell: hyperparameters from Table 3 drawn by the run's
    index, the init its arm chose."""
    steps, checkpoint_freq = _stage_steps(config)
    target = config.target
    hparams = random_hparams(
        target.hparams,
        seed_hash(config.seed, "target", cell.split_seed, run),
        overrides=target.hparams_override,
    )
    return TargetSpec(
        cell=cell,
        arm=arm_name,
        run=run,
        init_source=init.init_source,
        fusing=init.fusing,
        hparams=HParams(**hparams),
        steps=steps,
        checkpoint_freq=checkpoint_freq,
        lp_steps=0 if init.init_source == PRETRAINED else target.lp_steps,
        seed=seed_hash(config.seed, config.data.dataset, arm_name, cell.key, run),
    )


def target_specs(config: ExperimentConfig, cells: list[Cell]) -> list[TargetSpec]:
    """n_runs trials per arm and cell, hyperparameters from Table 3, inits from the arm's policy."""
    target = config.target
    specs = []
    for cell in cells:
        for arm_name in target.arms:
            draw = InitDraw(
                arm=arm_name,
                groups=arm_sources(config, arm_name),
                n_runs=target.n_runs,
                seed=config.seed,
                cell_key=cell.key,
                fusing_spread=target.fusing_spread,
            )
            for run, init in enumerate(get_arm(arm_name).init_policy(draw)):
                specs.append(target_spec(config, cell, arm_name, run, init))
    return specs


#: Images per domain of the DomainBed datasets (their folders as DomainBed downloads them), so
#: that `plan` prices evaluation without the data on this machine. Order: ``ENVIRONMENTS``.
DOMAINBED_DOMAIN_SIZES: dict[str, dict[str, int]] = {
    "PACS": {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929},
    "VLCS": {"Caltech101": 1415, "LabelMe": 2656, "SUN09": 3282, "VOC2007": 3376},
    "OfficeHome": {"Art": 2427, "Clipart": 4365, "Product": 4439, "Real World": 4357},
    "TerraIncognita": {
        "location_100": 4741,
        "location_38": 9736,
        "location_43": 3970,
        "location_46": 5883,
    },
    "DomainNet": {
        "clipart": 48129,
        "infograph": 51605,
        "painting": 72266,
        "quickdraw": 172500,
        "real": 172947,
        "sketch": 69128,
    },
}


@dataclass(frozen=True)
class Rates:
    """Images per second of one trial: training (forward + backward + Adam) and evaluation
    (forward only); ``source`` says where they come from, for the plan's last line."""

    train: float
    eval: float
    source: str


def assumed_rates(config: ExperimentConfig) -> Rates:
    res = config.resources
    return Rates(
        res.images_per_second,
        res.eval_images_per_second or 3 * res.images_per_second,
        "assumed (resources.images_per_second and eval_images_per_second); "
        "`ratatouille bench-throughput CONFIG` measures them",
    )


def evaluations(steps: int, freq: int) -> int:
    """ID-val evaluations of a trial, as `fine_tune` makes them: at steps 0, freq, 2 freq, ...
    and at the last step, ``steps - 1``."""
    return len(range(0, steps, freq)) + ((steps - 1) % freq != 0)


def _evaluations_of(spec: Any) -> int:
    """ID-val evaluations of a pretrain or aux trial: aux runs evaluate every ``eval_freq``
    steps, or only at their last step when it is None (their last featurizer is kept)."""
    if isinstance(spec, AuxSpec):
        return evaluations(spec.steps, spec.eval_freq) if spec.eval_freq else 1
    return evaluations(spec.steps, spec.checkpoint_freq)


def plan_row(
    stage: str,
    specs: list[Any],
    train: int,
    evals: int,
    rates: Rates,
    storage: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """One row of `plan`; ``storage``: (bytes written to, bytes read from storage), None when
    the model's size is not known here."""
    return {
        "stage": stage,
        "trials": len(specs),
        "steps": sum(getattr(s, "steps", 0) for s in specs),
        "images": train,
        "eval_images": evals,
        "gpu_hours": (train / rates.train + evals / rates.eval) / 3600,
        "written": storage[0] if storage else None,
        "read": storage[1] if storage else None,
    }


#: Classes of the DomainBed datasets (the embedded tasks' are read from the tasks).
DOMAINBED_NUM_CLASSES: dict[str, int] = {
    "PACS": 7,
    "VLCS": 5,
    "OfficeHome": 65,
    "TerraIncognita": 10,
    "DomainNet": 345,
}


@dataclass(frozen=True)
class ModelBytes:
    """Bytes of a trial's weights files (safetensors of float32 tensors, as the trials write)."""

    featurizer: int
    head: int

    @property
    def model(self) -> int:
        return self.featurizer + self.head


def model_bytes(config: ExperimentConfig) -> ModelBytes | None:
    """The size of the config's classifier, built on PyTorch's meta device (no memory, no
    weights read); None when the architecture cannot be built here (a hub or folder model)."""
    import torch

    from ratatouille.engine.models import build_classifier

    dataset = config.data.dataset
    if dataset in DOMAINBED_NUM_CLASSES:
        classes = DOMAINBED_NUM_CLASSES[dataset]
    else:
        classes = get_dataset(dataset, seed=config.seed).num_classes
    try:
        with torch.device("meta"):
            model = build_classifier(config.model.arch, classes)
    except Exception:  # a hub or local-dir model needs files this machine may not have
        return None
    sizes = {"featurizer": 0, "head": 0}
    for key, tensor in model.state_dict().items():
        sizes[key.split(".", 1)[0]] += tensor.numel() * tensor.element_size()
    return ModelBytes(sizes["featurizer"], sizes["head"])


#: A resumable snapshot of a trial, in model-sized files: the model, Adam's two moments and the
#: best ID-val weights (plus the moving average where the trial keeps one: :func:`snapshot_files`).
SNAPSHOT_WEIGHTS = 4


def snapshot_files(keeps_moving_average: bool) -> int:
    """Model-sized files in one resumable snapshot of a trial (its train state)."""
    return SNAPSHOT_WEIGHTS + bool(keeps_moving_average)


def snapshots_of(config: ExperimentConfig, seconds: float, checkpoints: int) -> int:
    """Resumable snapshots a trial of ``seconds`` with ``checkpoints`` checkpoint_freq steps
    writes, as :class:`ratatouille.recipe.stages.SnapshotClock` takes them: at most one per
    checkpoint step but the last (the closing report follows it), one per
    ``resources.snapshot_every_s`` of its time, at every such step for 0, none for null."""
    every = getattr(config.resources, "snapshot_every_s", None)
    chances = max(checkpoints - 1, 0)
    if every is None:
        return 0
    return chances if every == 0 else min(int(seconds // every), chances)


def storage_bytes(
    files_per_trial: list[tuple[int, int]],
    weights: ModelBytes,
    snapshot_files: list[int],
    read_files: int = 0,
) -> tuple[int, int]:
    """(bytes written, bytes read) by a stage on storage: `plan`'s byte model, in one place.

    ``files_per_trial``: per trial, the (whole-model, head-only) weights files it writes once
    (its final weights: best ID-val, moving average, a pool entry, a head); ``snapshot_files``:
    per trial, the model-sized files of its resumable snapshots (their number times
    :func:`snapshot_files`);
    ``read_files``: whole-model weights files the stage reads (the reducer: each run's once
    per task). Initial weights travel through Ray's object store, not storage.
    """
    written = sum(m * weights.model + h * weights.head for m, h in files_per_trial)
    written += sum(snapshot_files) * weights.model
    return written, read_files * weights.model


def id_val_images(sizes: list[int], holdout: float) -> int:
    """ID-val images of training domains of these sizes (``data.splits``: ``int(n * f)`` each)."""
    return sum(int(n * holdout) for n in sizes)


def reducer_cells(
    config: ExperimentConfig,
    cells: list[Cell],
    domain_sizes: Callable[[str], list[int]],
    targets: list[TargetSpec] | None = None,
) -> list[tuple[Cell, list[tuple[str, str, str, bool]], list[int], list[int]]]:
    """What the reducer sees of each cell before any trial runs: its runs ``(run id, arm, init
    source, keeps a moving average)`` (``targets``, default a new sweep's), its ID-val images
    per training domain and its OOD images (the held-out domain in full)."""
    sizes = domain_sizes(config.data.dataset)
    holdout = config.data.holdout_fraction
    keeps_ma = ma_arms(config.target.moving_average)
    by_cell: dict[str, list[tuple[str, str, str, bool]]] = {c.key: [] for c in cells}
    for spec in target_specs(config, cells) if targets is None else targets:
        by_cell[spec.cell.key].append(
            (spec.run_id, spec.arm, spec.init_source, spec.arm in keeps_ma)
        )
    return [
        (
            cell,
            by_cell[cell.key],
            [int(n * holdout) for i, n in enumerate(sizes) if i != cell.test_env],
            [sizes[cell.test_env]],
        )
        for cell in cells
    ]


def reducer_reads(config: ExperimentConfig, cells: list[Cell], targets: list[TargetSpec]) -> int:
    """Weights files the reducer reads from storage: each run's (and its moving average's) once
    in its cell's task, and its best weights once more in its test domain's uniform† task."""
    keeps_ma = ma_arms(config.target.moving_average)
    files = sum(1 + (s.arm in keeps_ma) for s in targets)
    seeds: dict[str, set[int]] = {}
    for cell in cells:
        seeds.setdefault(cell.test_domain, set()).add(cell.split_seed)
    if config.reduce.uniform_dagger:
        files += sum(1 for s in targets if len(seeds[s.cell.test_domain]) > 1)
    return files


def plan_rows(
    config: ExperimentConfig,
    cells: list[Cell],
    domain_sizes: Callable[[str], list[int]],
    rates: Rates,
    reducer_images: int = 0,
    weights: ModelBytes | None = None,
    *,
    targets: list[TargetSpec] | None = None,
    done: Callable[[Any], bool] | None = None,
) -> list[dict[str, Any]]:
    """Trials, training images, evaluated images, storage bytes per stage, and the GPU-hours.

    ``domain_sizes(dataset)`` gives the number of images of each domain. A training stage costs
    its steps x per-domain batch x training domains at the training rate, plus an ID-val pass
    (``holdout_fraction`` of its training domains) at every checkpoint. The probe costs one
    feature extraction over the target's ID-train split and one ID-val pass: its head steps
    run on cached features (negligible). A target trial evaluates ID val at each checkpoint,
    and once more for its moving average where it keeps one; it never reads its test domain.
    ``reducer_images``: the images the reducer forward-passes, counted by running it
    (:func:`ratatouille.reducer.dry_run.count_sweep`, which `ratatouille plan` calls).
    ``weights``: the model's size, for the bytes written and read (:func:`storage_bytes`).

    A resume prices only what it would train: ``targets`` are the grown experiment's target
    trials (default: a new sweep's), and a trial ``done`` says is kept is not counted (the
    reducer runs again over every run).
    """
    holdout = config.data.holdout_fraction
    sizes = domain_sizes(config.data.dataset)

    def stored(
        files: list[tuple[int, int]],
        seconds: list[float],
        read: int = 0,
        checkpoints: list[int] | None = None,
    ):
        """``files[i][0] > 1``: trial i keeps a moving average, in its snapshots too."""
        if weights is None:
            return None
        snapshots = [
            snapshots_of(config, t, c) * snapshot_files(f[0] > 1)
            for t, c, f in zip(seconds, checkpoints or [], files)
        ]
        return storage_bytes(files, weights, snapshots, read)

    def seconds(train: list[int], evals: list[int]) -> list[float]:
        return [t / rates.train + e / rates.eval for t, e in zip(train, evals)]

    rows = []
    pretrain = pretrain_spec(config)

    def kept(spec: Any) -> bool:
        return done is not None and done(spec)

    stages = (("pretrain", [pretrain] if pretrain else []), ("aux", aux_specs(config)))
    for stage, every in stages:
        specs = [spec for spec in every if not kept(spec)]
        train = [s.steps * s.hparams.batch_size * len(domain_sizes(s.task)) for s in specs]
        evals = [_evaluations_of(s) * round(holdout * sum(domain_sizes(s.task))) for s in specs]
        if stage == "aux" and config.aux.head_init == "probe":
            # one feature extraction over every domain of each auxiliary task; the head steps
            # run on the cached features (as the target's probe)
            heads = [spec for spec in aux_probe_specs(config) if not kept(spec)]
            extract = sum(sum(domain_sizes(h.task)) for h in heads)
            heads_stored = stored([(0, 1)] * len(heads), [])
            rows.append(plan_row("aux_probe", heads, 0, extract, rates, heads_stored))
        if stage == "aux" or specs:
            # a pool entry (featurizer and head), and its moving average where robust keeps one
            files = [(1 + bool(getattr(s, "robust", False)), 0) for s in specs]
            chances = [evaluations(s.steps, s.checkpoint_freq) for s in specs]
            written = stored(files, seconds(train, evals), checkpoints=chances)
            rows.append(plan_row(stage, specs, sum(train), sum(evals), rates, written))
    probes = [spec for spec in probe_specs(config, cells) if not kept(spec)]
    extract = sum(sum(sizes) - sizes[p.cell.test_env] for p in probes)
    rows.append(plan_row("probe", probes, 0, extract, rates, stored([(0, 1)] * len(probes), [])))
    every_target = target_specs(config, cells) if targets is None else targets
    new_targets = [spec for spec in every_target if not kept(spec)]
    keeps_ma = ma_arms(config.target.moving_average)
    domains = len(sizes) - 1  # leave-one-domain-out
    train = [s.steps * s.hparams.batch_size * domains for s in new_targets]
    evals = []
    for s in new_targets:
        id_val = id_val_images([n for i, n in enumerate(sizes) if i != s.cell.test_env], holdout)
        evals.append((evaluations(s.steps, s.checkpoint_freq) + (s.arm in keeps_ma)) * id_val)
    chances = [evaluations(s.steps, s.checkpoint_freq) for s in new_targets]
    files = [(1 + (s.arm in keeps_ma), 0) for s in new_targets]
    written = stored(files, seconds(train, evals), checkpoints=chances)
    rows.append(plan_row("target", new_targets, sum(train), sum(evals), rates, written))
    # the reducer writes each cell's final model (MLflow's artifact store) and reads the runs
    read = stored([(len(cells), 0)], [], reducer_reads(config, cells, every_target))
    rows.append(plan_row("reduce", [], 0, reducer_images, rates, read))
    return rows


def trial_shape(config: ExperimentConfig) -> tuple[int, int]:
    """(image size, images per training step) of a target trial of ``config`` with the default
    per-domain batch (Table 3; the sweep may draw others, at about the same images/s)."""
    dataset = config.data.dataset
    default_size = 224 if dataset in DOMAINBED_DATASETS else 16  # get_dataset's defaults
    domains = len(domain_sizes_of(config.seed)(dataset)) - 1
    return config.data.image_size or default_size, int(default_hparams()["batch_size"]) * domains


def domain_sizes_of(seed: int) -> Callable[[str], list[int]]:
    """``dataset -> images per domain``; DomainBed's from the table (no disk access: the data
    may live on the workers only), the embedded tasks' by building them (they are small)."""

    def sizes(dataset: str) -> list[int]:
        if dataset in DOMAINBED_DATASETS:
            table = DOMAINBED_DOMAIN_SIZES[dataset]
            return [table[env] for env in DOMAINBED_DATASETS[dataset].ENVIRONMENTS]
        task = get_dataset(dataset, seed=seed)
        return [task.domain_size(i) for i in range(len(task.domains))]

    return sizes


def plan_rates(
    config: ExperimentConfig, config_path: str, throughput: str | None
) -> tuple[Rates, str | None]:
    """The measured rates of ``throughput`` (default: the file beside the config, if any) when
    they were measured for this config's model, image size and batch, else the assumed ones
    and, when a file was set aside, a note saying why."""
    path = throughput or str(default_throughput_path(config_path))
    if throughput is None and not os.path.exists(path):
        return assumed_rates(config), None
    measured = load_throughput(path)
    size, batch = trial_shape(config)
    if not measured.matches(config.model.arch, size, batch):
        note = (
            f"note: {path} measured {measured.arch} at {measured.image_size} px, batch "
            f"{measured.batch}, not this config's {config.model.arch} at {size} px, batch {batch}: "
            "using the assumed rates; rerun `ratatouille bench-throughput`"
        )
        return assumed_rates(config), note
    source = f"measured on {measured.device} at {measured.measured_at} ({path})"
    return Rates(measured.train_images_per_s, measured.eval_images_per_s, source), None


def bench_throughput(
    config: ExperimentConfig,
    config_path: str,
    out: str | None = None,
    device: str | None = None,
    steps: int = 20,
) -> tuple[Throughput, str]:
    """Measure a target trial's rates on ``device`` (default: CUDA when present) and write
    them to ``out`` (default: beside the config); on the CPU with the trial's threads."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(max(1, int(config.resources.cpus_per_trial)))
    size, batch = trial_shape(config)
    result = measure_throughput(config.model.arch, size, batch, device, steps=steps)
    path = out or str(default_throughput_path(config_path))
    save_throughput(result, path)
    return result, path


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**30:,.2f}"


def format_plan(rows: list[dict[str, Any]], rates: Rates) -> str:
    lines = [
        f"{'stage':<10}{'trials':>8}{'trials x steps':>16}{'images':>14}{'eval images':>14}"
        f"{'GPU-hours':>11}{'written GiB':>13}{'read GiB':>10}"
    ]
    for row in rows:
        lines.append(
            f"{row['stage']:<10}{row['trials']:>8}{row['steps']:>16,}"
            f"{row['images']:>14,}{row['eval_images']:>14,}{row['gpu_hours']:>11.2f}"
            f"{_gib(row.get('written')):>13}{_gib(row.get('read')):>10}"
        )
    total = sum(row["gpu_hours"] for row in rows)
    lines.append(
        f"total {total:.2f} GPU-hours at {rates.train:g} training and {rates.eval:g} evaluation "
        f"images/s per trial, {rates.source}. The aux stage skips entries already in the pool; "
        "the probe's head steps (on cached features) are not counted. The reducer's images are "
        "counted by running it on the sweep's shape (at most one OOD pass too many per greedy "
        "soup). Storage: each trial's weights files written once, plus resumable snapshots "
        "where resources.snapshot_every_s sets them; the reducer reads each run's weights "
        "once per task (? = the model's size is unknown here)."
    )
    return "\n".join(lines)
