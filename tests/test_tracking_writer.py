"""Trial records leave Tune's loop: queued, merged per run, written by one thread, and all in
the store (each step once) when a run ends, is stopped, or is continued by a new driver."""

from __future__ import annotations

import logging
import os
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow import MlflowClient

from ratatouille.tracking import writer as writer_module
from ratatouille.tracking.store import TRACKING_ERRORS, Tracker
from tiny import tiny_config


class Recording:
    """A client that forwards to a real one, counting metric batches; optionally slow or
    failing on metric batches."""

    def __init__(self, client: MlflowClient, delay_s: float = 0.0, fail_metrics: bool = False):
        self._client, self.delay_s, self.fail_metrics = client, delay_s, fail_metrics
        self.metric_batches: list[tuple[str, int]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            time.sleep(self.delay_s)
            if name == "log_batch" and kwargs.get("metrics"):
                if self.fail_metrics:
                    raise ConnectionError("tracking server unreachable")
                self.metric_batches.append((args[0], len(kwargs["metrics"])))
            return method(*args, **kwargs)

        return call


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds); an experiment per test."""
    return tmp_path_factory.mktemp("store")


def _tracker(store, parent_id: str | None = None, **recording: Any) -> Tracker:
    config = tiny_config(store)
    name = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].split(" ")[0]
    tracker = Tracker(name, config.tracking.mlflow_uri)
    tracker.start_parent(str(store / name), config.model_dump(mode="json"), parent_id)
    tracker.client = Recording(tracker.client, **recording)  # type: ignore[assignment]
    return tracker


def _report(step: int, trial: int) -> dict[str, Any]:
    # values that say which trial and step they belong to
    return {"step": step, "id_val_acc": trial + step / 1000, "loss": 1 / (step + 1)}


def _hold(tracker: Tracker) -> threading.Event:
    """Keep the writer busy until the returned event is set, so what follows queues up."""
    release = threading.Event()
    tracker.writer.submit("hold", release.wait)
    return release


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_queued_reports_are_merged_per_run_and_each_step_is_logged_once(store):
    tracker = _tracker(store)
    for trial in (1, 2):
        tracker.trial_started(f"k{trial}", f"t{trial}", "target", {"arm": "soups"})
    runs = {trial: tracker.trial_run(f"k{trial}") for trial in (1, 2)}
    release = _hold(tracker)
    for step in range(30):  # two trials reporting in turn, as Tune's loop interleaves them
        for trial in (1, 2):
            tracker.trial_result(f"k{trial}", _report(step, trial))
    for step in range(20, 30):  # trial 1 restarted from its step-19 checkpoint
        tracker.trial_result("k1", _report(step, 1))
    tracker.trial_finished("k1", metrics={"best_id_val_acc": 0.9, "node_id": "n1"})
    release.set()
    tracker.finish_parent()
    client = MlflowClient(tracker.uri)
    for trial, run_id in runs.items():
        expected = [(step, pytest.approx(trial + step / 1000)) for step in range(30)]
        assert _history(client, run_id, "id_val_acc") == expected
        assert [s for s, _ in _history(client, run_id, "loss")] == list(range(30))
    # everything queued while the writer was busy: one request per run for its 30 x 2 points,
    # then trial 1's final metric with its end
    batches = [(runs[1], 60), (runs[2], 60), (runs[1], 1)]
    assert sorted(tracker.client.metric_batches) == sorted(batches)
    finished = client.get_run(runs[1])
    assert finished.info.status == "FINISHED"
    assert finished.data.metrics["best_id_val_acc"] == 0.9
    assert finished.data.tags["ray.node_id"] == "n1"
    # trial 2 never finished: it ends with the parent, after its points were written
    assert client.get_run(runs[2]).info.status == "FINISHED"


def test_a_stop_writes_what_is_queued_and_a_new_driver_continues_without_duplicates(store):
    tracker = _tracker(store)
    tracker.trial_started("k1", "t1", "target", {"arm": "soups"})
    release = _hold(tracker)
    for step in range(10):
        tracker.trial_result("k1", _report(step, 1))
    threading.Timer(0.3, release.set).start()  # the writer is still busy when the stop comes
    tracker.finish_parent("KILLED")  # what the pipeline does on SweepInterrupted / Ctrl-C
    client = MlflowClient(tracker.uri)
    run_id = tracker.trial_run("k1")
    assert [s for s, _ in _history(client, run_id, "id_val_acc")] == list(range(10))
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(tracker.parent_id).info.status == "KILLED"

    resumed = _tracker(store, parent_id=tracker.parent_id)  # `ratatouille run --resume`
    resumed.trial_started("k1", "t1", "target", {"arm": "soups"})
    for step in range(5, 15):  # Tune restarts the trial from its step-4 checkpoint
        resumed.trial_result("k1", _report(step, 1))
    resumed.trial_finished("k1")
    resumed.finish_parent()
    assert resumed.trial_run("k1") == run_id
    assert [s for s, _ in _history(client, run_id, "id_val_acc")] == list(range(15))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_closing_the_writer_writes_everything_queued(store):
    tracker = _tracker(store)
    tracker.trial_started("k1", "t1", "target", {"arm": "soups"})
    run_id = tracker.trial_run("k1")
    release = _hold(tracker)
    for step in range(40):
        tracker.trial_result("k1", _report(step, 1))
    threading.Timer(0.2, release.set).start()
    assert tracker.writer.close(timeout=30)
    steps = [s for s, _ in _history(MlflowClient(tracker.uri), run_id, "loss")]
    assert steps == list(range(40))
    with pytest.raises(RuntimeError, match="closed"):
        tracker.writer.submit("late", lambda: None)


def test_lost_writes_are_logged_once_and_the_parent_is_not_finished(store, caplog, monkeypatch):
    monkeypatch.setattr(writer_module, "RETRY_DELAY_S", 0.0)
    caplog.set_level(logging.ERROR)
    tracker = _tracker(store, fail_metrics=True)
    tracker.trial_started("k1", "t1", "target", {"arm": "soups"})
    for step in range(4):
        tracker.trial_result("k1", _report(step, 1))
        tracker.flush()  # one failing request per step
    tracker.finish_parent()
    parent = MlflowClient(tracker.uri).get_run(tracker.parent_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags[TRACKING_ERRORS].startswith("4 MLflow writes failed; first: ")
    assert "tracking server unreachable" in parent.data.tags[TRACKING_ERRORS]
    by_logger = [(r.name.rsplit(".", 1)[-1], r.getMessage()) for r in caplog.records]
    assert [name for name, _ in by_logger] == ["writer", "store"]
    assert "metric points of run" in by_logger[0][1]
    assert "marked FAILED" in by_logger[1][1]


def test_the_tune_callback_does_not_wait_for_a_slow_store(store):
    from ratatouille.orchestration.search import MlflowTrialCallback
    from ratatouille.recipe.checks import experiment_cells
    from ratatouille.recipe.sweep import target_specs

    config = tiny_config(store)
    specs = target_specs(config, experiment_cells(config))[:4]
    tracker = _tracker(store, delay_s=0.05)  # 50 ms per store call
    callback = MlflowTrialCallback(tracker)
    trials = [
        SimpleNamespace(trial_id=f"t{i}", config={"spec": s.to_plain()}, last_result={})
        for i, s in enumerate(specs)
    ]
    for trial in trials:
        callback.on_trial_start(0, trials, trial)
    started = time.perf_counter()
    for step in range(25):
        for number, trial in enumerate(trials):
            callback.on_trial_result(0, trials, trial, _report(step, number))
    elapsed = time.perf_counter() - started
    # written from Tune's loop, 100 reports would take 100 store calls (5 s); queued, they
    # take less than 5 (a loaded machine's slack), while the writer still creates the runs
    assert elapsed < 0.25, elapsed
    for trial in trials:
        callback.on_trial_complete(0, trials, trial)
    tracker.finish_parent()
    client = MlflowClient(tracker.uri)
    for spec in specs:
        run_id = tracker.trial_run(spec.key)
        assert [s for s, _ in _history(client, run_id, "id_val_acc")] == list(range(25))
        assert client.get_run(run_id).info.status == "FINISHED"
