"""Typed experiment config, loaded from YAML.

Every section forbids unknown keys: a typo in a sweep config must fail before a cluster
spends GPU-hours on the wrong experiment, not silently fall back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ratatouille.core.arms import ARMS, MERGE_METHODS, final_model_rules
from ratatouille.core.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file that cannot be used; the message names the file, the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    dataset: str = Field(description="target dataset: a DomainBed name or the embedded 'digits'")
    root: str | None = Field(None, description="folder holding DomainBed's downloaded datasets")
    test_envs: list[str | int] | None = Field(
        None, description="held-out domains to sweep (names or indices); None = every domain"
    )
    split_seeds: list[int] = Field([0], min_length=1)
    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    image_size: int | None = Field(None, ge=8)
    augment: bool = True
    num_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader workers per training domain; None = cpus_per_trial - 1 (>= 0)",
    )
    pipeline: Literal["pil", "decoded"] = Field(
        "pil",
        description="pil: decode and augment each image with PIL (the reference); decoded: a "
        "uint8 store decoded once per node, augmented batched on the trial's device",
    )
    cache_dir: str | None = Field(
        None,
        description="absolute folder of the decoded stores (local disk of each node); "
        "None = $RATATOUILLE_CACHE_DIR or ~/.cache/ratatouille/decoded",
    )
    sampling: Literal["epochs", "with_replacement"] = Field(
        "epochs",
        description="epochs: each training domain's batches cut from concatenated seeded "
        "permutations (every image once per epoch); with_replacement: every index drawn "
        "uniformly, as DomainBed's InfiniteDataLoader. Both a pure function of the seed",
    )
    id_val_transform: Literal["eval", "train"] = Field(
        "eval",
        description="transform of the training domains' ID-val split during training: eval "
        "(deterministic); train: the training augmentation when data.augment is on, as "
        "DomainBed, drawn once per image from the split seed so every checkpoint sees the same",
    )

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir_absolute(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute():
            raise ValueError(
                f"cache_dir must be an absolute path (trials run in other folders), got {value!r}"
            )
        return str(path)


class ModelConfig(_Section):
    arch: str = "resnet50"
    init: Literal["hub", "file", "pretrain"] = Field(
        "hub",
        description="where phi_pt comes from: timm's hub, a local file, or our pretrain stage",
    )
    weights_file: str | None = Field(None, description="safetensors file of phi_pt when init=file")
    freeze_bn: bool = True
    compile: bool = Field(
        False,
        description="torch.compile the training forward on CUDA: about a minute of compilation "
        "per trial for a faster step; worth it for runs of thousands of steps (no-op on CPU)",
    )
    precision: Literal["bf16", "fp32"] = Field(
        "bf16",
        description="on CUDA, bf16 autocast of forward passes (weights and optimizer stay fp32); "
        "fp32: full precision, as the reference. The CPU always runs fp32",
    )

    @model_validator(mode="after")
    def _weights_file_matches_init(self) -> ModelConfig:
        if self.init == "file" and not self.weights_file:
            raise ValueError("init is 'file' but weights_file is not set: give a .safetensors path")
        if self.init != "file" and self.weights_file:
            raise ValueError(f"weights_file is set but init is {self.init!r}: set init: file")
        return self


class TrainStageConfig(_Section):
    """Schedule and default hyperparameters of a plain fine-tuning stage."""

    steps: int = Field(gt=0)
    checkpoint_freq: int = Field(100, gt=0)
    lr: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(32, gt=0, description="examples per domain per step")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class PretrainConfig(TrainStageConfig):
    task: str = Field(description="dataset of the pre-training task T0")


class AuxConfig(_Section):
    tasks: list[str] = Field(default_factory=list, description="auxiliary datasets T_1..T_K")
    runs_per_task: int = Field(
        1,
        gt=0,
        description="runs per auxiliary dataset, each its own draw of `hparams` (reference: 4); "
        "with hparams: default they share the defaults and differ by their seed alone",
    )
    steps: int | dict[str, int] = Field(
        5001,
        description="steps of every auxiliary run, or task -> steps (a task left out of the "
        "mapping gets DomainBed's schedule for it: 15001 on DomainNet, 5001 otherwise)",
    )
    head_init: Literal["probe", "random"] = Field(
        "random",
        description="probe: each auxiliary run starts from a linear probe of phi_pt on its task, "
        "made once per task (the reference's --output_dir_lp); random: a seeded random head",
    )
    checkpoint_freq: int = Field(100, gt=0)
    hparams: Literal["default", "mild", "domainbed"] = "default"
    hparams_override: dict[str, list[float]] = Field(default_factory=dict)
    robust: bool = Field(False, description="also keep a moving average of the weights (App. E)")
    extra_sources: list[str] = Field(
        default_factory=list, description="pool entries imported by hand to use as sources too"
    )
    eval_freq: int | None = Field(
        None,
        gt=0,
        description="ID-val evaluation every this many steps (a multiple of checkpoint_freq); "
        "None = at the last step only (the pool keeps the last featurizer). Snapshots for "
        "preemption safety stay at checkpoint_freq",
    )

    @model_validator(mode="after")
    def _eval_freq_on_checkpoints(self) -> AuxConfig:
        if self.eval_freq is not None and self.eval_freq % self.checkpoint_freq:
            raise ValueError(
                f"aux.eval_freq ({self.eval_freq}) must be a multiple of aux.checkpoint_freq "
                f"({self.checkpoint_freq}): evaluations happen at checkpoints"
            )
        return self

    @field_validator("steps")
    @classmethod
    def _steps_positive(cls, steps: int | dict[str, int]) -> int | dict[str, int]:
        values = steps.values() if isinstance(steps, dict) else [steps]
        if any(value < 1 for value in values):
            raise ValueError(f"steps must be >= 1, got {steps}")
        return steps

    @model_validator(mode="after")
    def _steps_name_tasks(self) -> AuxConfig:
        if isinstance(self.steps, dict):
            unknown = sorted(set(self.steps) - set(self.tasks))
            if unknown:
                raise ValueError(
                    f"steps names {unknown}, which are not in aux.tasks {self.tasks}: "
                    "fix the task name or add it to aux.tasks"
                )
        return self


class ProbeConfig(_Section):
    steps: int = Field(5001, gt=0)
    lr: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(32, gt=0)
    select: Literal["last", "best_id_val"] = Field(
        "last",
        description="which head a linear probe keeps (target w_lp and auxiliary heads): last: "
        "its last step; best_id_val: the best mean ID-val accuracy over checkpoints every "
        "checkpoint_freq steps, strict > (the reference)",
    )
    checkpoint_freq: int = Field(
        100, gt=0, description="steps between the ID-val checks of select: best_id_val"
    )


class TargetConfig(_Section):
    arms: list[str] = Field(
        ["soups", "ratatouille", "fusing"],
        min_length=1,
        description="target arms, names from ratatouille.core.arms.ARMS",
    )
    n_runs: int = Field(20, gt=0, description="trials per arm")
    steps: int | None = Field(None, gt=0, description="None = DomainBed's schedule for the dataset")
    checkpoint_freq: int | None = Field(None, gt=0)
    lp_steps: int = Field(200, ge=0, description="featurizer frozen this long after an aux init")
    hparams: Literal["mild", "domainbed"] = "mild"
    hparams_override: dict[str, list[float]] = Field(
        default_factory=dict, description="replace a hyperparameter's grid, e.g. lr: [1e-4, 3e-4]"
    )
    fusing_spread: float = Field(4.0, gt=0.0, description="kappa_i ~ U(0, spread), paper F.1")
    moving_average: bool = Field(
        False,
        description="the soups arm's runs also keep a moving average of their weights (MA, "
        "Arpit et al.), for the reducer's ma and ensemble_ma rows",
    )
    ma_start: int = Field(
        100, ge=0, description="first step of the moving average (capped at half the run)"
    )

    @field_validator("arms")
    @classmethod
    def _arms_registered(cls, arms: list[str]) -> list[str]:
        unknown = [arm for arm in arms if arm not in ARMS]
        if unknown:
            raise ValueError(f"unknown arms {unknown}: registered arms are {list(ARMS)}")
        return arms

    @model_validator(mode="after")
    def _arms_unique(self) -> TargetConfig:
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must not repeat, got {self.arms}")
        return self


MergeMethod = Literal["task_arithmetic", "ties", "dare", "model_stock", "fisher"]  # MERGE_METHODS


class MergesConfig(_Section):
    """The reducer's merge methods beyond averaging, each a row per averaging arm, with the
    grids their hyperparameters are chosen from on ID validation (never on the OOD split)."""

    methods: list[MergeMethod] = Field(
        list(MERGE_METHODS),  # type: ignore[arg-type]  # the Literal spelled out above
        min_length=1,
        description="which merge methods to build",
    )
    task_arithmetic_lambdas: list[float] = Field(
        [0.05, 0.1, 0.2, 0.3],
        min_length=1,
        description="task arithmetic: theta_0 + lambda * sum of task vectors; lambda = 1/M is "
        "the uniform soup",
    )
    ties_densities: list[float] = Field(
        [0.2], min_length=1, description="TIES: fraction of each task vector's entries kept"
    )
    ties_lambdas: list[float] = Field(
        [1.0], min_length=1, description="TIES: theta_0 + lambda * the agreeing mean"
    )
    dare_drop_rates: list[float] = Field(
        [0.5], min_length=1, description="DARE: probability p that an entry is dropped"
    )
    dare_lambdas: list[float] = Field(
        [1.0], min_length=1, description="DARE: theta_0 + lambda * merged task vector"
    )
    dare_merge: Literal["average", "ties"] = Field(
        "average", description="what follows DARE's drop and rescale: average or TIES"
    )
    fisher_batches: int = Field(
        2,
        gt=0,
        description="Fisher averaging: batches of reduce batch size per training domain's "
        "ID-train split on which each run's diagonal Fisher is estimated",
    )

    @field_validator("task_arithmetic_lambdas", "ties_lambdas", "dare_lambdas")
    @classmethod
    def _finite_scales(cls, values: list[float]) -> list[float]:
        if any(not v > 0.0 or v == float("inf") for v in values):
            raise ValueError(f"scales lambda must be finite and > 0, got {values}")
        return values

    @field_validator("ties_densities")
    @classmethod
    def _densities(cls, values: list[float]) -> list[float]:
        if any(not 0.0 < v <= 1.0 for v in values):
            raise ValueError(f"TIES densities are fractions in (0, 1], got {values}")
        return values

    @field_validator("dare_drop_rates")
    @classmethod
    def _drop_rates(cls, values: list[float]) -> list[float]:
        # DARE draws 16-bit uniforms (merging.merges.DRAW_LEVELS): a rate that rounds to
        # 2**16 levels would drop every entry
        if any(not (0.0 <= v < 1.0 and round(v * 2**16) < 2**16) for v in values):
            raise ValueError(f"DARE drop rates are in [0, 1 - 2**-17), got {values}")
        return values


class ReduceConfig(_Section):
    wise_alpha: float = Field(0.5, ge=0.0, le=1.0)
    lmc_tolerance: float = Field(0.01, ge=0.0)
    ablation_draws: int = Field(5, gt=0)
    max_pairs: int = Field(30, gt=0)
    uniform_dagger: bool = Field(
        True,
        description="with several split seeds, also the uniform† rows: every run of every "
        "split of a test domain averaged (paper Tables 1-2)",
    )
    greedy_threshold: Literal["logged", "measured"] = Field(
        "logged",
        description="the greedy soup's first threshold: logged: the best run's logged ID-val "
        "score (no evaluation); measured: that run re-evaluated on ID val by the reducer, as "
        "the reference (one more evaluation)",
    )
    final_model: str = Field(
        "ratatouille_uniform",
        description="the registered model of each cell: a single-model strategy of the reducer, "
        "or best_id_val (the highest-ID-val soup, biased towards greedy soups); the default is "
        "the paper's main method",
    )
    merges: MergesConfig | None = Field(
        None,
        description="merge methods beyond averaging (task arithmetic, TIES, DARE, Model Stock, "
        "Fisher averaging) as rows of every averaging arm; off when absent",
    )

    @field_validator("final_model")
    @classmethod
    def _final_model_is_a_rule(cls, rule: str) -> str:
        # checked here, before any training: the reducer would only refuse it at the very end
        if rule not in final_model_rules():
            raise ValueError(
                f"{rule!r} is not a final-model rule: use one of {final_model_rules()} (an "
                "ensemble or a mean over runs is not one network)"
            )
        return rule


class ResourcesConfig(_Section):
    cpus_per_trial: float = Field(1.0, gt=0.0)
    gpus_per_trial: float = Field(0.0, ge=0.0)
    max_concurrent_trials: int | None = Field(None, gt=0)
    max_failures: int = Field(2, ge=0)
    snapshot_every_s: float | None = Field(
        300.0,
        ge=0.0,
        description="seconds of training between a trial's resumable snapshots (model, "
        "optimizer, RNG, best weights so far) in Tune's storage: one is taken at the first "
        "checkpoint_freq step after that long since the last, so a lost trial redoes at most "
        "that much training (plus one checkpoint_freq segment); 0 = at every checkpoint_freq "
        "step; null = never (a lost trial restarts from step 0). Evaluation keeps its own "
        "schedule; the weights the reducer and the pool read are written once, at the end",
    )
    experiment_sync_s: float | None = Field(
        300.0,
        gt=0.0,
        description="seconds between the driver's uploads of Tune's experiment state (every "
        "trial's status, result.json, progress.csv, params) to storage; null = Tune's 'auto' "
        "(at least every 10 s: every trial's growing results re-uploaded that often, which "
        "slows the trials' checkpoints on S3: bench P15). Every stage's end still uploads it; "
        "only a driver killed outright resumes from a state up to this old (each trial from "
        "the snapshot it names)",
    )
    images_per_second: float = Field(
        400.0,
        gt=0.0,
        description="assumed training images/s per trial, for `ratatouille plan` when no "
        "`ratatouille bench-throughput` measurement of this config exists",
    )
    eval_images_per_second: float | None = Field(
        None,
        gt=0.0,
        description="assumed evaluation (forward-only) images/s per trial, likewise; None = 3x "
        "images_per_second (a forward pass is about a third of a training step's compute)",
    )


class TrackingConfig(_Section):
    mlflow_uri: str | None = Field(None, description="None = MLFLOW_TRACKING_URI or ./mlflow.db")
    storage_path: str | None = Field(None, description="Ray storage (local, NFS or s3://)")
    pool_path: str | None = Field(
        None, description="a folder or a URI (s3://bucket/pool); None = <storage_path>/pool"
    )
    registered_model_name: str | None = None


class ExperimentConfig(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    data: DataConfig
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig | None = None
    aux: AuxConfig = AuxConfig()
    probe: ProbeConfig = ProbeConfig()
    target: TargetConfig = TargetConfig()
    reduce: ReduceConfig = ReduceConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _stages_consistent(self) -> ExperimentConfig:
        if self.model.init == "pretrain" and self.pretrain is None:
            raise ValueError("model.init is 'pretrain' but there is no pretrain section")
        if self.data.dataset in self.aux.tasks:
            raise ValueError(
                f"aux.tasks contains the target dataset {self.data.dataset!r}: it would leak the "
                "target into its own initializations; remove it"
            )
        if self.pretrain is not None and self.pretrain.task == self.data.dataset:
            raise ValueError(
                f"pretrain.task is the target dataset {self.data.dataset!r}: phi_pt would have "
                "seen the held-out domain; pre-train on another dataset"
            )
        arms = [ARMS[name] for name in self.target.arms]
        needs_pool = sorted(arm.name for arm in arms if arm.needs_pool)
        if needs_pool and not (self.aux.tasks or self.aux.extra_sources):
            raise ValueError(f"arms {needs_pool} need aux.tasks or aux.extra_sources")
        for arm in arms:
            if arm.robust and not self.aux.robust:
                raise ValueError(f"arm {arm.name} needs aux.robust: true")
        return self


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and section)"
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)


def parse_config(raw: Any, source: str = "<dict>") -> ExperimentConfig:
    """Validate a mapping into an ExperimentConfig; ConfigError names every bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(source, error)) from None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML experiment config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass the path of a YAML config")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid config {path}: not valid YAML ({error})") from None
    return parse_config(raw, str(path))
