"""The fine-tuning engine: frozen BN, featurizer freeze, selection, seeding, divergence, resume."""

from __future__ import annotations

import math
import pickle
import sys
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import TensorDataset

from ratatouille.core.config import ConfigError
from ratatouille.core.names import PRETRAINED
from ratatouille.data import train_batches
from ratatouille.engine import state_files
from ratatouille.engine import train as train_module
from ratatouille.engine.models import build_classifier, featurizer_state, head_state
from ratatouille.engine.train import (
    FineTuneConfig,
    TrainingDiverged,
    evaluate_accuracy,
    fine_tune,
    loader_seed,
    predict_logits,
)
from ratatouille.recipe import stages
from ratatouille.recipe.sweep import aux_specs
from tiny import tiny_config

ARCH = "test_resnet"
NUM_CLASSES = 4

torch.set_num_threads(1)


def _domain(seed: int, n: int, shift: float) -> TensorDataset:
    """Images whose first two channels encode the class (learnable in a few steps)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    x = torch.randn(n, 3, 16, 16, generator=gen) * 0.5
    x[:, 0] += (y.float() - 1.5)[:, None, None] + shift
    x[:, 1] += ((y % 2).float() - 0.5)[:, None, None]
    return TensorDataset(x, y)


TRAIN = [_domain(i, 48, 0.2 * i) for i in range(3)]
ID_VAL = [_domain(10 + i, 16, 0.2 * i) for i in range(3)]


def _cfg(**overrides) -> FineTuneConfig:
    values = dict(steps=6, checkpoint_freq=2, lr=1e-2, weight_decay=0.0, batch_size=8)
    values.update(overrides)
    return FineTuneConfig(**values)


def _model(seed: int = 0, dropout: float = 0.0):
    return build_classifier(ARCH, NUM_CLASSES, dropout=dropout, seed=seed)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _recorder() -> tuple[dict[int, dict], Callable]:
    snapshots: dict[int, dict] = {}

    def on_checkpoint(step, metrics, snapshot):
        snapshots[step] = snapshot()

    return snapshots, on_checkpoint


def test_bn_running_stats_unchanged_and_bn_affine_trained() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}  # state_dict() aliases
    result = fine_tune(model, TRAIN, ID_VAL, _cfg())
    after = result.final_state
    buffers = [k for k in before if "running_" in k or "num_batches_tracked" in k]
    affine = [
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm)
        for p in ("weight", "bias")
    ]
    assert buffers and all(torch.equal(before[k], after[k]) for k in buffers)
    assert any(not torch.equal(before[k], after[k]) for k in affine)


def test_featurizer_frozen_during_lp_steps_then_trained() -> None:
    model = _model()
    phi_init = {k: v.clone() for k, v in featurizer_state(model).items()}
    w_init = {k: v.clone() for k, v in head_state(model).items()}
    snapshots, record = _recorder()
    fine_tune(
        model, TRAIN, ID_VAL, _cfg(steps=6, checkpoint_freq=1, lp_steps=3), on_checkpoint=record
    )
    for step in (0, 1, 2):  # the first lp_steps updates touch only the head
        assert _equal(featurizer_state(snapshots[step]["model"]), phi_init)
        assert not _equal(head_state(snapshots[step]["model"]), w_init)
    moved = featurizer_state(snapshots[3]["model"])
    assert any(not torch.equal(moved[k], phi_init[k]) for k in moved if "running" not in k)
    assert all(p.requires_grad for p in model.parameters())  # the freeze is undone afterwards


def test_optimizer_is_fresh_after_the_freeze_window() -> None:
    model = _model()
    n_head, n_all = len(list(model.head.parameters())), len(list(model.parameters()))
    snapshots, record = _recorder()
    fine_tune(
        model, TRAIN, ID_VAL, _cfg(steps=6, checkpoint_freq=1, lp_steps=3), on_checkpoint=record
    )
    head_only = snapshots[2]["optimizer"]["state"]
    assert len(head_only) == n_head
    assert all(float(s["step"]) == 3.0 for s in head_only.values())
    fresh = snapshots[3]["optimizer"]["state"]
    assert len(fresh) == n_all
    assert all(float(s["step"]) == 1.0 for s in fresh.values())  # Adam state reset at step 3


def test_best_weights_are_those_of_the_best_logged_checkpoint() -> None:
    snapshots, record = _recorder()
    model = _model()
    result = fine_tune(
        model, TRAIN, ID_VAL, _cfg(steps=12, checkpoint_freq=1, seed=1), on_checkpoint=record
    )
    accs = [h["id_val_acc"] for h in result.history]
    first_max = int(np.argmax(accs))  # np.argmax returns the FIRST maximum: strict >
    assert accs[first_max] > accs[-1], "scenario needs an ID-val curve that goes up then down"
    assert result.best_step == result.history[first_max]["step"]
    assert result.best_id_val_acc == accs[first_max]
    assert _equal(result.best_state, snapshots[result.best_step]["model"])
    model.load_state_dict(result.best_state)
    assert evaluate_accuracy(model, ID_VAL, batch_size=7) == pytest.approx(result.best_id_val_acc)
    assert not _equal(result.best_state, result.final_state)


def test_ties_keep_the_earliest_checkpoint() -> None:
    # label -1 is never predicted: ID-val accuracy is 0 at every checkpoint
    unreachable = [TensorDataset(torch.randn(5, 3, 16, 16), torch.full((5,), -1))]
    snapshots, record = _recorder()
    result = fine_tune(
        _model(), TRAIN, unreachable, _cfg(steps=5, checkpoint_freq=2), on_checkpoint=record
    )
    assert [h["step"] for h in result.history] == [0, 2, 4]
    assert [h["id_val_acc"] for h in result.history] == [0.0, 0.0, 0.0]
    assert result.best_step == 0
    assert _equal(result.best_state, snapshots[0]["model"])


def test_checkpoints_every_freq_steps_and_at_the_last_step() -> None:
    result = fine_tune(_model(), TRAIN, ID_VAL, _cfg(steps=8, checkpoint_freq=3))
    assert [h["step"] for h in result.history] == [0, 3, 6, 7]


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    def run(seed: int) -> dict:
        return fine_tune(_model(dropout=0.5), TRAIN, ID_VAL, _cfg(steps=4, seed=seed)).final_state

    first, again, other = run(0), run(0), run(1)
    assert _equal(first, again)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_huge_learning_rate_raises_training_diverged_with_the_step() -> None:
    with pytest.raises(TrainingDiverged, match="learning rate") as info:
        fine_tune(_model(), TRAIN, ID_VAL, _cfg(steps=20, lr=1e8))
    step = info.value.step
    assert isinstance(step, int) and 1 <= step < 20 and f"step {step}" in str(info.value)
    # every step before it is finite: the same run stopped just before `step` completes
    fine_tune(_model(), TRAIN, ID_VAL, _cfg(steps=step, lr=1e8))
    shipped = pickle.loads(pickle.dumps(info.value))  # as Ray sends it back from a worker
    assert isinstance(shipped, TrainingDiverged) and shipped.step == step


def _roundtrip(snapshot: dict) -> dict:
    """What the Ray layer does: the snapshot through its files in a Tune checkpoint (no pickle)."""
    return state_files.decode(*state_files.encode(snapshot))


def test_resume_from_mid_run_snapshots_gives_bit_identical_weights() -> None:
    cfg = _cfg(steps=10, checkpoint_freq=3, lp_steps=4, moving_average=True, ma_start=2, seed=5)
    snapshots, record = _recorder()
    full = fine_tune(_model(dropout=0.5), TRAIN, ID_VAL, cfg, on_checkpoint=record)
    # step 3: resuming crosses the freeze boundary; step 6: resumes Adam's state mid-phase
    for step in (3, 6):
        torch.manual_seed(123)  # a different global RNG state must not matter
        resumed = fine_tune(
            _model(seed=9, dropout=0.5), TRAIN, ID_VAL, cfg, resume=_roundtrip(snapshots[step])
        )
        assert _equal(resumed.final_state, full.final_state)
        assert _equal(resumed.average_state, full.average_state)
        assert _equal(resumed.best_state, full.best_state)
        assert resumed.history == full.history and resumed.best_step == full.best_step


def test_resume_with_another_config_is_refused() -> None:
    snapshots, record = _recorder()
    fine_tune(_model(), TRAIN, ID_VAL, _cfg(steps=3), on_checkpoint=record)
    with pytest.raises(ValueError, match="lr"):
        fine_tune(_model(), TRAIN, ID_VAL, _cfg(steps=3, lr=1e-3), resume=snapshots[0])


def test_moving_average_is_the_mean_of_the_weights_from_ma_start() -> None:
    snapshots, record = _recorder()
    cfg = _cfg(steps=5, checkpoint_freq=1, moving_average=True, ma_start=2)
    result = fine_tune(_model(), TRAIN, ID_VAL, cfg, on_checkpoint=record)
    states = [snapshots[s]["model"] for s in (2, 3, 4)]
    for key, value in result.average_state.items():
        if value.is_floating_point():
            expected = torch.stack([s[key] for s in states]).mean(0)
            assert torch.allclose(value, expected, atol=1e-6), key
    assert result.average_state.keys() == result.final_state.keys()


def test_predict_logits_and_accuracy_match_a_direct_forward() -> None:
    model = _model().eval()
    logits, labels = predict_logits(model, ID_VAL[0], batch_size=5)
    x, y = ID_VAL[0].tensors
    with torch.no_grad():
        direct = model(x)
    assert np.allclose(logits, direct.numpy(), atol=1e-5) and np.array_equal(labels, y.numpy())
    per_domain = []
    for dataset in ID_VAL:
        with torch.no_grad():
            out = model(dataset.tensors[0])
        per_domain.append((out.argmax(1) == dataset.tensors[1]).float().mean().item())
    assert evaluate_accuracy(model, ID_VAL) == pytest.approx(sum(per_domain) / 3)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(steps=0), "steps must be a positive integer"),
        (dict(lr=0.0), "lr > 0"),
        (dict(lp_steps=-1), "lp_steps"),
    ],
)
def test_bad_config_raises_value_error(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg(**overrides)


def test_moving_average_starting_after_the_run_is_refused() -> None:
    with pytest.raises(ValueError, match="ma_start"):
        fine_tune(_model(), TRAIN, ID_VAL, _cfg(steps=3, moving_average=True, ma_start=3))


# -- no host sync per step ---------------------------------------------------------------------
def _nan_at(model, step: int) -> list[int]:
    """Makes the training forward of step ``step`` (0-based) return NaN; counts training
    forwards (evaluation runs in eval mode and is not counted)."""
    forwards = [0]

    def hook(module, _inputs, output):
        if not module.training:
            return None
        forwards[0] += 1
        return output * float("nan") if forwards[0] == step + 1 else None

    model.register_forward_hook(hook)
    return forwards


@pytest.mark.parametrize(
    ("nan_step", "steps", "sync_freq", "stopped_after"),
    [
        (7, 30, 5, 10),  # read after steps 4, 9: caught at the read after step 9
        (9, 30, 5, 10),  # the read right after it
        (27, 30, 50, 30),  # no periodic read before the end: the last checkpoint catches it
        (3, 30, 1, 4),  # sync_freq 1: the old per-step check
    ],
)
def test_a_nan_loss_stops_the_run_within_sync_freq_naming_its_step(
    nan_step: int, steps: int, sync_freq: int, stopped_after: int
) -> None:
    model = _model()
    forwards = _nan_at(model, nan_step)
    reported: list[int] = []
    cfg = _cfg(steps=steps, checkpoint_freq=100, sync_freq=sync_freq)
    with pytest.raises(TrainingDiverged) as info:
        fine_tune(model, TRAIN, ID_VAL, cfg, on_checkpoint=lambda s, m, snap: reported.append(s))
    assert info.value.step == nan_step and math.isnan(info.value.loss)
    assert forwards[0] == stopped_after  # stopped at the first read after the NaN
    assert stopped_after - 1 - nan_step < sync_freq
    assert reported == [0]  # nothing trained on the NaN was reported


def test_nan_inputs_raise_at_the_step_that_first_sees_them() -> None:
    poisoned = [TensorDataset(torch.full((4, 3, 16, 16), float("nan")), torch.zeros(4).long())]
    with pytest.raises(TrainingDiverged) as info:
        fine_tune(_model(), TRAIN + poisoned, ID_VAL, _cfg(steps=10, sync_freq=3))
    assert info.value.step == 0


_SYNCS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def _count_host_reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts tensor-to-host reads made by ratatouille/engine/train.py, by calling function."""
    calls: Counter = Counter()
    for name in _SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename == train_module.__file__:
                calls[caller.co_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch) -> None:
    calls = _count_host_reads(monkeypatch)
    cfg = _cfg(steps=20, checkpoint_freq=10, sync_freq=4)
    result = fine_tune(_model(), TRAIN, ID_VAL, cfg)
    # reads: checkpoints 0, 10, 19, and every 4 steps between them (after steps 3, 7, 11, 15)
    assert calls["read"] == 7
    assert not {"train_step", "add", "_to_device", "fine_tune", "check_finite"} & set(calls)
    assert [h["step"] for h in result.history] == [0, 10, 19]


def _plain_adam_loop(model, xs: list, ys: list, cfg: FineTuneConfig, fused: bool) -> dict:
    """The textbook loop, for reference: same data every step, Adam, cross-entropy."""
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused
    )
    model.train()
    x, y = torch.cat(xs), torch.cat(ys)
    for _ in range(cfg.steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fine_tune_trains_the_same_weights_as_a_plain_adam_loop() -> None:
    # one example per domain and batch_size 1: every batch is the same, whatever the loader does
    singles = [TensorDataset(*(t[:1] for t in d.tensors)) for d in TRAIN]
    cfg = _cfg(steps=12, checkpoint_freq=4, sync_freq=5, batch_size=1, seed=3)
    ours = fine_tune(_model(dropout=0.5), singles, ID_VAL, cfg).final_state
    xs, ys = zip(*(d.tensors for d in singles))
    plain = _plain_adam_loop(_model(dropout=0.5), list(xs), list(ys), cfg, fused=True)
    assert _equal(ours, plain)  # dropout draws included: evaluation does not consume the RNG
    # Adam's per-tensor implementation (the independent route): the same weights up to the
    # fused kernel's rounding (Adam scales the update of a near-zero gradient up to about lr,
    # so the rounding reaches 4e-5 at lr 1e-2); one step fewer moves them 7.5e-3.
    textbook = _plain_adam_loop(_model(dropout=0.5), list(xs), list(ys), cfg, fused=False)
    assert _max_gap(ours, textbook) < 2e-4
    fewer = _plain_adam_loop(
        _model(dropout=0.5), list(xs), list(ys), _cfg(steps=11, batch_size=1, seed=3), fused=False
    )
    assert _max_gap(fewer, textbook) > 2e-3


def _max_gap(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_logged_loss_is_the_mean_of_the_step_losses_since_the_last_checkpoint() -> None:
    singles = [TensorDataset(*(t[:1] for t in d.tensors)) for d in TRAIN]
    labels = torch.cat([d.tensors[1] for d in singles])
    model, losses = _model(), []

    def record(module, _inputs, logits):
        if module.training:
            losses.append(torch.nn.functional.cross_entropy(logits.detach(), labels).item())

    model.register_forward_hook(record)
    cfg = _cfg(steps=7, checkpoint_freq=3, sync_freq=2, batch_size=1)
    result = fine_tune(model, singles, ID_VAL, cfg)
    # checkpoints at steps 0, 3, 6: each logs the mean since the one before
    expected = [losses[0], sum(losses[1:4]) / 3, sum(losses[4:7]) / 3]
    assert [h["loss"] for h in result.history] == pytest.approx(expected, rel=1e-6)


# -- evaluation vs snapshot frequency -------------------------------------------------------------
def _reports(cfg: FineTuneConfig, **kwargs) -> tuple[list, dict, object]:
    rows: list = []
    snapshots: dict[int, dict] = {}

    def on_checkpoint(step, metrics, snapshot):
        rows.append((step, dict(metrics)))
        snapshots[step] = snapshot()

    result = fine_tune(_model(dropout=0.5), TRAIN, ID_VAL, cfg, on_checkpoint=on_checkpoint)
    return rows, snapshots, result


def test_eval_freq_evaluates_at_its_multiples_and_snapshots_stay_at_checkpoint_freq() -> None:
    cfg = _cfg(steps=13, checkpoint_freq=2, eval_freq=4, moving_average=True, ma_start=1)
    rows, _, result = _reports(cfg)
    assert [step for step, _ in rows] == [0, 2, 4, 6, 8, 10, 12]
    evaluated = [step for step, m in rows if "id_val_acc" in m]
    assert evaluated == [0, 4, 8, 12] == [h["step"] for h in result.history]
    by_step = dict(rows)
    assert by_step[2]["best_step"] == 0  # the last known best, not a new measurement
    assert by_step[6]["best_id_val_acc"] == max(by_step[s]["id_val_acc"] for s in (0, 4))
    # evaluating less often changes nothing in the trajectory
    every = fine_tune(
        _model(dropout=0.5), TRAIN, ID_VAL, _cfg(**{**_fields(cfg), "eval_freq": None})
    )
    assert _equal(every.final_state, result.final_state)
    assert _equal(every.average_state, result.average_state)


def _fields(cfg: FineTuneConfig) -> dict:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


def test_eval_at_the_end_only() -> None:
    rows, _, result = _reports(_cfg(steps=7, checkpoint_freq=2, eval_freq="end"))
    assert [step for step, _ in rows] == [0, 2, 4, 6]
    assert [h["step"] for h in result.history] == [6] and result.best_step == 6
    assert "best_id_val_acc" not in rows[0][1] and "id_val_acc" not in rows[0][1]
    assert _equal(result.best_state, result.final_state)


def test_resume_from_a_snapshot_only_checkpoint_is_bit_identical() -> None:
    cfg = _cfg(
        steps=13,
        checkpoint_freq=2,
        eval_freq=4,
        lp_steps=3,
        moving_average=True,
        ma_start=1,
        seed=4,
    )
    rows, snapshots, full = _reports(cfg)
    assert "id_val_acc" not in dict(rows)[6]  # a snapshot-only point
    resumed = fine_tune(
        _model(seed=7, dropout=0.5), TRAIN, ID_VAL, cfg, resume=_roundtrip(snapshots[6])
    )
    assert _equal(resumed.final_state, full.final_state)
    assert _equal(resumed.average_state, full.average_state)
    assert _equal(resumed.best_state, full.best_state)
    assert resumed.history == full.history and resumed.best_step == full.best_step


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(checkpoint_freq=2, eval_freq=3), "multiple of checkpoint_freq"),
        (dict(eval_freq=0), "eval_freq must be"),
        (dict(eval_freq="never"), "eval_freq must be"),
        (dict(sync_freq=0), "sync_freq must be a positive integer"),
    ],
)
def test_bad_schedules_are_refused(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg(**overrides)


# -- the stage's wiring --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cpus", "explicit", "expected"),
    [(4, None, 3), (1, None, 0), (0.5, None, 0), (2.5, None, 1), (4, 0, 0), (1, 2, 2)],
)
def test_num_workers_is_cpus_per_trial_minus_one_unless_set(
    tmp_path, cpus: float, explicit: int | None, expected: int
) -> None:
    config = tiny_config(
        tmp_path, resources={"cpus_per_trial": cpus}, data={"num_workers": explicit}
    )
    ctx = stages.context_for(config)
    assert ctx.num_workers() == expected
    assert stages._finetune_config(aux_specs(config)[0], ctx).num_workers == expected


def test_aux_eval_freq_must_sit_on_checkpoints(tmp_path) -> None:
    with pytest.raises(ConfigError, match="aux.eval_freq"):
        tiny_config(tmp_path, aux={"checkpoint_freq": 6, "eval_freq": 9})


class _ListReporter:
    def __init__(self) -> None:
        self.rows: list = []

    def report(self, metrics, *, weights=None, train_state=None):
        self.rows.append((dict(metrics), train_state))

    def restored_state(self):
        return None


@pytest.mark.parametrize(("eval_freq", "evaluated"), [(None, [11]), (6, [0, 6, 11])])
def test_aux_runs_snapshot_on_their_budget_and_evaluate_as_configured(
    tmp_path, eval_freq: int | None, evaluated: list[int]
) -> None:
    config = tiny_config(tmp_path, aux={"checkpoint_freq": 3, "eval_freq": eval_freq})
    phi_pt = build_classifier(ARCH, NUM_CLASSES).featurizer.state_dict()
    reporter = _ListReporter()
    stages.run_trial(
        aux_specs(config)[0], stages.context_for(config, featurizers={PRETRAINED: phi_pt}), reporter
    )
    *checkpoints, _final = reporter.rows
    assert [m["step"] for m, _ in checkpoints] == [0, 3, 6, 9, 11]
    # snapshot_every_s 0 (tiny): a snapshot at every checkpoint step but the last, which the
    # closing report (the featurizer files) follows
    *snapshots, (_, last_state) = checkpoints
    assert all(state is not None and state["step"] == m["step"] for m, state in snapshots)
    assert last_state is None
    assert [m["step"] for m, _ in checkpoints if "id_val_acc" in m] == evaluated


def test_weights_come_back_contiguous_from_a_channels_last_model() -> None:
    # what CUDA runs use; safetensors and the soups need plain contiguous tensors
    model = _model().to(memory_format=torch.channels_last)
    assert not model.featurizer.conv1[0].weight.is_contiguous()
    cfg = _cfg(steps=3, moving_average=True, ma_start=1)
    result = fine_tune(model, TRAIN, ID_VAL, cfg)
    for state in (result.final_state, result.best_state, result.average_state):
        assert all(t.is_contiguous() for t in state.values())


class _PidRecording(torch.utils.data.Dataset):
    """A domain that appends the loading process's id to a file for every item it serves."""

    def __init__(self, base: TensorDataset, log) -> None:
        self.base, self.log = base, log

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        with open(self.log, "a") as out:
            out.write(f"{__import__('os').getpid()}\n")
        return self.base[index]


def test_loader_workers_live_for_the_whole_run_and_change_no_batch(tmp_path) -> None:
    log = tmp_path / "pids.txt"
    train = [_PidRecording(d, log) for d in TRAIN[:2]]
    # 7 steps, a checkpoint every 2: the streams are re-seeded at steps 0, 1, 3, 5 (after each
    # checkpoint), as a resume would re-seed them
    cfg = _cfg(steps=7, num_workers=2)
    with_workers = fine_tune(_model(), train, ID_VAL[:2], cfg).final_state
    pids = set(log.read_text().split())
    # 2 domains x 2 workers, started once: re-created loaders would start 2 x 2 per re-seed
    assert len(pids) == 2 * 2
    assert str(__import__("os").getpid()) not in pids
    in_process = fine_tune(_model(), TRAIN[:2], ID_VAL[:2], _cfg(steps=7)).final_state
    assert _equal(with_workers, in_process)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_streams_start_over_after_every_checkpoint_as_a_resumed_run_would(num_workers) -> None:
    """fine_tune's training inputs, segment by segment: after each snapshot point every domain's
    batches are a fresh stream of ``loader_seed(seed, domain, step)`` (what a run resumed there
    draws), although the loaders are never restarted (the sampler re-seeds in place)."""
    cfg = _cfg(steps=7, seed=3, num_workers=num_workers)  # snapshots 0, 2, 4, 6
    model = _model()
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].clone()) if module.training else None
    )
    fine_tune(model, TRAIN[:2], ID_VAL[:2], cfg)
    expected = []
    for start, end in [(0, 1), (1, 3), (3, 5), (5, 7)]:  # the steps after each snapshot point
        fresh = [train_batches(d, 8, loader_seed(3, i, start)) for i, d in enumerate(TRAIN[:2])]
        expected += [torch.cat([next(s)[0] for s in fresh]) for _ in range(start, end)]
    assert len(seen) == 7
    for step, (got, want) in enumerate(zip(seen, expected)):
        assert torch.equal(got, want), step
