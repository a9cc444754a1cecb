"""Typed trial specs: exactly what each stage's trial reads, one frozen dataclass per stage.

The sweep planner builds them in the driver; they cross Ray as plain flat dicts
(:meth:`TrialSpec.to_plain`), so Tune's progress table and result files show readable columns
(``stage``, ``arm``, ``run``, ``init_source``, ``lr``, ...), and a trial rebuilds its typed spec
with :func:`spec_from_plain`. Nothing outside this module indexes a spec by key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar, get_type_hints

from ratatouille.core.names import Stage


def digest(payload: Any, length: int = 8) -> str:
    """Short stable hash of a JSON-able payload (identities of reusable artefacts)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Cell:
    """One (held-out domain, data split) of the target dataset: one reducer table column."""

    test_env: int
    test_domain: str
    split_seed: int

    @property
    def key(self) -> str:
        """Names the cell in paths, MLflow metric names and the w_lp lookup."""
        return cell_key(self.test_domain, self.split_seed)


def cell_key(test_domain: str, split_seed: int) -> str:
    return f"{test_domain}-split{split_seed}".replace(" ", "_")


@dataclass(frozen=True)
class HParams:
    """One draw of Table 3 (``batch_size`` is per training domain)."""

    lr: float
    weight_decay: float
    batch_size: int
    dropout: float


@dataclass(frozen=True, kw_only=True)
class TrialSpec:
    """Fields every trial has; subclasses add what their stage reads."""

    stage: ClassVar[Stage]
    hparams: HParams
    steps: int
    seed: int

    def to_plain(self) -> dict[str, Any]:
        """A flat JSON-able dict: nested dataclasses (hparams, cell) become top-level keys."""
        plain: dict[str, Any] = {"stage": str(self.stage)}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                plain.update(dataclasses.asdict(value))
            else:
                plain[field.name] = dict(value) if isinstance(value, dict) else value
        return plain

    @property
    def key(self) -> str:
        """Stable identity of the trial (MLflow tag, order after a restore)."""
        return digest(self.to_plain(), length=16)

    @property
    def trial_name(self) -> str:
        """Readable trial name: Tune's trial and folder names, MLflow's run name."""
        return "_".join(str(part).replace(" ", "-") for part in self._name_parts())

    def _name_parts(self) -> tuple[Any, ...]:
        return (self.stage,)


@dataclass(frozen=True, kw_only=True)
class PretrainSpec(TrialSpec):
    """phi_pt trained from scratch on task T0."""

    stage: ClassVar[Stage] = Stage.PRETRAIN
    name: str  # pretrained_identity: the key of phi_pt in the pretrained store
    task: str
    checkpoint_freq: int

    def _name_parts(self) -> tuple[Any, ...]:
        return (self.stage, self.task)


@dataclass(frozen=True, kw_only=True)
class AuxProbeSpec(TrialSpec):
    """The linear probe of phi_pt on an auxiliary task: the head its runs start from."""

    stage: ClassVar[Stage] = Stage.AUX_PROBE
    name: str  # the key of the head in the pool's head store
    task: str

    def _name_parts(self) -> tuple[Any, ...]:
        return (self.stage, self.task)


@dataclass(frozen=True, kw_only=True)
class AuxSpec(TrialSpec):
    """One auxiliary fine-tuning (w_aux, phi_aux) of phi_pt: a pool entry."""

    stage: ClassVar[Stage] = Stage.AUX
    name: str  # the pool entry it fills
    task: str
    run: int
    checkpoint_freq: int
    robust: bool  # also keep the moving average (App. E)
    head: str | None  # the AuxProbeSpec name whose head it starts from; None: a random head
    eval_freq: int | None = None  # ID-val every this many steps; None = at the end only

    def _name_parts(self) -> tuple[Any, ...]:
        return (self.stage, self.task, self.run)


@dataclass(frozen=True, kw_only=True)
class ProbeSpec(TrialSpec):
    """w_lp: the linear probe of phi_pt for one cell."""

    stage: ClassVar[Stage] = Stage.PROBE
    cell: Cell

    def _name_parts(self) -> tuple[Any, ...]:
        return (self.stage, self.cell.test_domain)


@dataclass(frozen=True, kw_only=True)
class TargetSpec(TrialSpec):
    """theta_i: one target fine-tuning of an arm, from (w_lp, its init featurizer)."""

    stage: ClassVar[Stage] = Stage.TARGET
    cell: Cell
    arm: str
    run: int
    init_source: str  # PRETRAINED, a pool entry, or FUSING
    fusing: dict[str, float] | None  # source -> softmax(kappa) weight, for FUSING
    checkpoint_freq: int
    lp_steps: int  # featurizer frozen this long (an auxiliary init only)

    def _name_parts(self) -> tuple[Any, ...]:
        return (self.stage, self.arm, self.cell.test_domain, self.run)

    @property
    def run_id(self) -> str:
        """The reducer's name of the run: unique within its cell."""
        return f"{self.arm}-{self.run}"


def ma_arms(moving_average: bool) -> tuple[str, ...]:
    """The target arms whose runs keep a moving average of their weights (``target.
    moving_average``: the MA and ensemble-of-averages rows of the soups arm)."""
    return ("soups",) if moving_average else ()


SPEC_TYPES: dict[str, type[TrialSpec]] = {
    str(cls.stage): cls for cls in (PretrainSpec, AuxProbeSpec, AuxSpec, ProbeSpec, TargetSpec)
}


def spec_from_plain(plain: dict[str, Any]) -> TrialSpec:
    """Rebuild the typed spec of :meth:`TrialSpec.to_plain`'s dict (inside a trial, or after a
    restore)."""
    cls = SPEC_TYPES[plain["stage"]]
    kwargs: dict[str, Any] = {}
    for name, hint in get_type_hints(cls).items():
        if name == "stage":
            continue
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[name] = hint(**{f.name: plain[f.name] for f in dataclasses.fields(hint)})
        else:
            kwargs[name] = plain[name]
    return cls(**kwargs)
