"""The driver's one MLflow writer: a thread fed by a queue, so Tune's event loop only enqueues.

Why our own thread and not MLflow's asynchronous logging (`log_batch(..., synchronous=False)`):
MLflow's queue hands each merged batch to a pool of up to 10 threads (concurrent writers on one
SQLite file, the contention the one-writer rule exists to avoid), covers only metrics, params and
tags (creating a run, ending it and logging inputs stay synchronous, so Tune's loop would still
wait on them and they could overtake queued metrics), and reports a failure per batch through a
future nobody waits on. Here every write of a sweep, in the order it was made, goes through one
thread; consecutive metric points are merged into one `log_batch` per run.

Errors: a write that fails is retried (SQLite locks and server hiccups pass), then dropped and
recorded in `failures`; the first is logged with its traceback, later ones are counted. The
tracker reads `failures` before ending the parent run, which is then never FINISHED silently.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from mlflow.entities import Metric

log = logging.getLogger(__name__)

#: MLflow's limit of metrics per `log_batch` request.
MAX_METRICS_PER_BATCH = 1000
RETRIES = 3
RETRY_DELAY_S = 0.2


@dataclass(frozen=True)
class Failure:
    what: str
    error: str


@dataclass(frozen=True)
class _Op:
    what: str
    run: Callable[[], Any]
    #: True for ops that only buffer metric points: they need no flush of the buffer before
    buffers: bool = False


_STOP = _Op("stop", lambda: None)


class MlflowWriter:
    """Runs writes submitted from any thread, one at a time and in submission order, on one
    daemon thread; `buffer_metrics` (called from a submitted op) merges points per run."""

    def __init__(self, client: Any, interval_s: float = 0.0, name: str = "mlflow-writer"):
        self.client = client
        self.interval_s = interval_s
        self._wake = threading.Event()  # set by flush and close: write now, not at the interval
        self.failures: list[Failure] = []
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._pending: dict[str, list[Metric]] = {}  # run id -> points; writer thread only
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        # A driver that exits without closing (an uncaught error) still writes what it queued.
        atexit.register(self.close)

    # -- any thread ---------------------------------------------------------------------
    def submit(self, what: str, write: Callable[[], Any], buffers: bool = False) -> None:
        if self._closed:
            raise RuntimeError(f"MLflow writer is closed; cannot write {what}")
        self._queue.put(_Op(what, write, buffers))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write submitted so far is done (or failed); False on timeout."""
        if not self._thread.is_alive():
            return self._queue.empty()
        done = threading.Event()
        self._queue.put(_Op("flush", done.set))
        self._wake.set()
        return done.wait(timeout)

    def close(self, timeout: float | None = 60.0) -> bool:
        """Write everything queued, then stop the thread; False if it did not end in time."""
        if self._closed:
            return not self._thread.is_alive()
        self._closed = True
        atexit.unregister(self.close)
        self._queue.put(_STOP)
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the writer thread --------------------------------------------------------------
    def buffer_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        self._pending.setdefault(run_id, []).extend(metrics)

    def _loop(self) -> None:
        while True:
            ops = [self._queue.get()]
            while True:  # everything already queued: one pass, one batch per run
                try:
                    ops.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for op in ops:
                if op is _STOP:
                    self._write_pending()
                    return
                if not op.buffers:
                    self._write_pending()  # points before a status change are written first
                self._attempt(op.what, op.run)
            self._write_pending()
            # Pause between passes: what arrives meanwhile is merged, fewer and larger
            # requests. The GIL is the cost of a busy writer: Tune's loop shares it.
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _write_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for run_id, points in pending.items():
            for start in range(0, len(points), MAX_METRICS_PER_BATCH):
                chunk = points[start : start + MAX_METRICS_PER_BATCH]
                what = f"{len(chunk)} metric points of run {run_id}"
                self._attempt(what, partial(self.client.log_batch, run_id, metrics=chunk))

    def _attempt(self, what: str, write: Callable[[], Any]) -> None:
        for attempt in range(RETRIES):
            try:
                write()
                return
            except Exception as error:  # any store error: retry, then record
                if attempt + 1 < RETRIES:
                    time.sleep(RETRY_DELAY_S * 2**attempt)
                    continue
                self._record(what, error)

    def _record(self, what: str, error: Exception) -> None:
        if not self.failures:
            log.error("MLflow write failed (%s); later failures are counted", what, exc_info=error)
        self.failures.append(Failure(what, f"{type(error).__name__}: {error}"))
