"""Test-only fault injection: a trial that fails once at a given step, in-process or under Ray.

Production code has no fault hook. In-process, a test wraps the trial's reporter; under Ray,
`inject_fault` replaces the trainable that `StageRunner` hands to Tune with one that wraps the
Tune reporter of the matching trial. This module is pickled by value, so Ray's workers need
not import it.
"""

from __future__ import annotations

import sys
from typing import Any

from ratatouille.core.names import MetricKey


class InjectedFault(RuntimeError):
    """Raised on purpose, to prove restarts resume from checkpoints."""


class FailingReporter:
    """Reports as ``inner`` does, then fails once the trial reports step ``step`` or later,
    unless the trial was restored from a checkpoint (so a restart runs to the end)."""

    def __init__(self, inner: Any, step: int) -> None:
        self.inner, self.step = inner, step
        self.restored = inner.restored_state() is not None

    def report(self, metrics, **kwargs) -> None:
        self.inner.report(metrics, **kwargs)
        step = metrics.get(MetricKey.STEP)
        if not self.restored and step is not None and step >= self.step:
            raise InjectedFault(f"injected fault at step {step}")

    def restored_state(self):
        return self.inner.restored_state()


def matches(spec: Any, where: dict[str, Any]) -> bool:
    return all(str(getattr(spec, key, None)) == str(value) for key, value in where.items())


def inject_fault(monkeypatch, *, step: int, **where: Any) -> None:
    """Make the trial whose spec matches ``where`` (e.g. stage, arm, run) fail at ``step``."""
    import ray.cloudpickle
    import torch

    from ratatouille.orchestration import search
    from ratatouille.recipe.specs import spec_from_plain
    from ratatouille.recipe.stages import run_trial

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def trainable(config: dict[str, Any], context: Any) -> None:
        torch.set_num_threads(search.trial_threads())
        spec = spec_from_plain(config["spec"])
        reporter: Any = search.TuneReporter()
        if matches(spec, where):
            reporter = FailingReporter(reporter, step)
        run_trial(spec, context, reporter)

    # Tune names a trainable after its function: `Tuner.restore` (--resume) must find the same.
    trainable.__name__ = trainable.__qualname__ = search._trainable.__name__
    monkeypatch.setattr(search, "_trainable", trainable)
