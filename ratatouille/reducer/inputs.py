"""What the reducer takes for one cell: its finished target runs, evaluation data and settings.

Its own module so that the reducer's parts (strategies, curves, ablations) share these types
without importing the reducer that calls them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor
from torch.utils.data import Dataset

from ratatouille.core.arms import arms_where
from ratatouille.core.config import MergesConfig, ReduceConfig
from ratatouille.core.names import PRETRAINED
from ratatouille.engine.models import Classifier
from ratatouille.reducer.evaluate import Predict


class ReduceError(ValueError):
    """The reducer's inputs are inconsistent; the message names the field to fix."""


@dataclass
class TargetRun:
    """One finished target fine-tuning (a Tune trial)."""

    run_id: str
    arm: str  # "soups" | "ratatouille" | "fusing" | "robust_ratatouille"
    init_source: str  # "pretrained" (source 0), a pool entry name, or "fusing"
    id_val_acc: float  # best ID-val accuracy logged by the run: its selection score
    load_state: Callable[[], dict[str, Tensor]]  # the run's best-ID-val Classifier state
    hparams: dict = field(default_factory=dict)
    # the run's moving average of weights (target.moving_average; MA, Arpit et al.), if kept
    load_ma_state: Callable[[], dict[str, Tensor]] | None = None


@dataclass
class ReduceSettings:
    """``wise_alpha``: WiSE-FT ``theta = (1 - alpha) * theta_erm + alpha * theta_init`` (App. A).

    ``max_pairs`` caps the diversity-vs-gain pairs (each costs one OOD evaluation; 0 disables);
    ``ablation_points`` caps the sizes M evaluated per arm in the runs ablation (Fig. 8);
    ``final_model`` is the rule that picks the registered model (a single-model strategy, or
    ``best_id_val``; see :func:`ratatouille.reducer.strategies.choose_final`);
    ``greedy_threshold``: the greedy soup's first threshold, the best run's logged ID-val score
    or (``measured``) its ID-val accuracy measured by the reducer; ``merges``: the merge
    methods beyond averaging and their grids (``reduce.merges``; None builds none of them).
    """

    wise_alpha: float = 0.5
    lmc_tolerance: float = 0.01
    n_lambdas: int = 11
    ablation_draws: int = 5
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 64
    max_pairs: int = 30
    ablation_points: int = 6
    final_model: str = "ratatouille_uniform"
    greedy_threshold: Literal["logged", "measured"] = "logged"
    merges: MergesConfig | None = None


@dataclass
class ReduceInputs:
    """One cell (test domain, split seed) of a finished sweep: its runs and evaluation data."""

    test_domain: str
    split_seed: int
    runs: list[TargetRun]
    build_model: Callable[[], Classifier]  # a fresh model of the right arch / num_classes
    id_val: list[Dataset]
    ood_test: list[Dataset]
    init_state: dict[str, Tensor]  # (w_lp, phi_pt): the soups arm's init, WiSE-FT's anchor
    w_lp: dict[str, Tensor]  # head state of the shared linear probe
    pool_featurizers: dict[str, Callable[[], dict[str, Tensor]]]  # name -> phi_aux loader
    settings: ReduceSettings = field(default_factory=ReduceSettings)
    predict: Predict | None = None  # defaults to ratatouille.engine.train.predict_logits
    # ID-train split of each training domain, evaluation transform (a random augmentation
    # would make the estimate differ run to run): only Fisher averaging reads it
    id_train: list[Dataset] = field(default_factory=list)


def settings_from_config(reduce: ReduceConfig, seed: int, device: str = "cpu") -> ReduceSettings:
    """The reducer's settings of an experiment (its ``reduce`` section and seed): one place, so
    `plan` counts the very reduction `ratatouille reduce` runs."""
    return ReduceSettings(
        wise_alpha=reduce.wise_alpha,
        lmc_tolerance=reduce.lmc_tolerance,
        ablation_draws=reduce.ablation_draws,
        max_pairs=reduce.max_pairs,
        final_model=reduce.final_model,
        greedy_threshold=reduce.greedy_threshold,
        merges=reduce.merges,
        seed=seed,
        device=device,
    )


def recycled_sources(arms: list[str], init_sources: list[str]) -> list[str]:
    """Pool entries for Hypothesis 1, from the runs' (arm, init source) in order: those of the
    first recycling arm of the registry that has runs, so a curve never joins a featurizer to
    its own moving average."""
    for arm in arms_where(lambda a: a.recycles):
        names = sorted({s for a, s in zip(arms, init_sources) if a == arm} - {PRETRAINED})
        if names:
            return names
    return []
