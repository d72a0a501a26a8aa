"""An ordered, off-thread queue of MLflow operations that survives a tracking outage.

    from mlflow import MlflowClient
    queue = OperationQueue(MlflowClient("http://127.0.0.1:5000"), "http://127.0.0.1:5000")
    queue.put(Operation("metrics", handle, [("loss", 2.5, 0, 1700000000000)]))
    queue.close(timeout_s=30)   # flushes; reports dropped points if the server never answers

Training threads only append to a deque (microseconds); one daemon thread sends the operations
in order, merging consecutive metric points of one run into `log_batch` calls. A transient
failure (connection refused, timeout, 5xx) keeps the operation at the head and retries with
backoff, so nothing is reordered or lost while the server is away; the first failure of an
outage is reported once, and its end too. A permanent failure (4xx: a bad value) drops that one
operation with a warning instead of blocking the queue forever.

A metric point at or below the highest step the run already holds for its key is not sent: a resumed
stage, a restarted worker group and a retried stage report steps again (pipeline/train.py, MetricHistory),
and each step is stored once. After a failed send the stored steps are read again from the server.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("orchestration.tracking")

METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
PARAMS_PER_BATCH = 100


@dataclass
class RunHandle:
    """One MLflow run as the pipeline sees it; `run_id` is filled in once the server created it."""

    name: str
    parent: RunHandle | None = None
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    # Highest step already stored per metric key (resumed runs): points at or below are not resent.
    logged_steps: dict[str, int] | None = None
    _waiting: list[Callable[[str], None]] = field(default_factory=list, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def when_created(self, record: Callable[[str], None]) -> None:
        """`record(run_id)` now, or on the sending thread once the server has created (or reopened) the run;
        never when it is not created."""
        with self._lock:
            if not self.ready.is_set():
                self._waiting.append(record)
                return
        if self.run_id is not None:
            record(self.run_id)

    def mark_ready(self) -> None:
        with self._lock:
            self.ready.set()
            waiting, self._waiting = self._waiting, []
        for record in waiting:
            try:
                record(self.run_id)
            except Exception:  # noqa: BLE001 - a caller's bookkeeping must not stop the sending thread
                log.exception("recording the id of MLflow run %s failed", self.name)


@dataclass
class Operation:
    kind: str  # open | metrics | params | tags | artifact | status
    handle: RunHandle
    payload: Any = None


def is_permanent(error: Exception) -> bool:
    """4xx answers and missing local files will not get better by retrying; network errors and 5xx might."""
    if isinstance(error, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError):
        return True
    status = getattr(error, "get_http_status_code", None)
    return status is not None and 400 <= int(status()) < 500


class OperationQueue:
    """Sends operations in order from one daemon thread; see the module docstring."""

    def __init__(
        self,
        client: Any,
        uri: str,
        experiment: str = "rwkv-pipeline",
        artifact_location: str | None = None,
        max_buffered_points: int = 2_000_000,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.client, self.uri, self.experiment = client, uri, experiment
        self.artifact_location = artifact_location
        self.max_buffered_points, self.max_backoff_s = max_buffered_points, max_backoff_s
        self._ops: collections.deque[Operation] = collections.deque()
        self._cond = threading.Condition()
        self._closing_deadline: float | None = None
        self._experiment_id: str | None = None
        self.outage_since: float | None = None
        self.buffered_points = 0
        self.dropped_points = 0
        self.sent_points = 0
        self._thread = threading.Thread(target=self._loop, name="mlflow-logger", daemon=True)
        self._thread.start()

    # -- producer side (any thread) -------------------------------------------------------------
    def put(self, op: Operation) -> None:
        with self._cond:
            if op.kind == "metrics":
                if self.buffered_points + len(op.payload) > self.max_buffered_points:
                    self.dropped_points += len(op.payload)
                    return
                self.buffered_points += len(op.payload)
            self._ops.append(op)
            self._cond.notify()

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued so far is sent; False on timeout (e.g. an outage)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._ops and time.monotonic() < deadline:
                self._cond.wait(min(0.2, max(0.0, deadline - time.monotonic())))
            return not self._ops

    def close(self, timeout_s: float) -> int:
        """Flush for up to timeout_s, stop the thread; returns (and reports) undelivered points."""
        with self._cond:
            self._closing_deadline = time.monotonic() + timeout_s
            self._cond.notify_all()
        self._thread.join(timeout_s + 15)
        with self._cond:
            lost_points = self.buffered_points + self.dropped_points
            lost_other = sum(op.kind != "metrics" for op in self._ops)
        if lost_points or lost_other:
            log.warning(
                "MLflow at %s never came back: %d metric points and %d other operations were dropped (%d points sent).",
                self.uri,
                lost_points,
                lost_other,
                self.sent_points,
            )
        return lost_points

    # -- the sending thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        backoff_s = 0.25
        while True:
            with self._cond:
                while not self._ops and self._closing_deadline is None:
                    self._cond.wait()
                if not self._ops or self._past_deadline():
                    return
                batch = self._head_batch()
            try:
                self._execute(batch)
            except Exception as error:  # noqa: BLE001 - any failure is either retried or dropped
                if is_permanent(error):
                    log.warning("MLflow rejected %s for run %s: %s", batch[0].kind, batch[0].handle.name, error)
                    self._pop(batch)
                    continue
                self._note_outage(error)
                with self._cond:
                    self._cond.wait(backoff_s)  # close() wakes us to try once more right away
                backoff_s = min(backoff_s * 2, self.max_backoff_s)
                continue
            backoff_s = 0.25
            self._note_recovery()
            self._pop(batch)

    def _past_deadline(self) -> bool:
        return self._closing_deadline is not None and time.monotonic() > self._closing_deadline

    def _head_batch(self) -> list[Operation]:
        """The head operation, plus following metric operations of the same run (one log_batch)."""
        head = self._ops[0]
        batch = [head]
        if head.kind != "metrics":
            return batch
        points = len(head.payload)
        for op in list(self._ops)[1:]:
            if op.kind != "metrics" or op.handle is not head.handle or points + len(op.payload) > METRICS_PER_BATCH:
                break
            batch.append(op)
            points += len(op.payload)
        return batch

    def _pop(self, batch: list[Operation]) -> None:
        with self._cond:
            for op in batch:
                self._ops.popleft()
                if op.kind == "metrics":
                    self.buffered_points -= len(op.payload)
            self._cond.notify_all()

    def _note_outage(self, error: Exception) -> None:
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            reason = str(error).splitlines()[0][:200]
            log.warning(
                "MLflow at %s is unreachable (%s). Training goes on; metrics are buffered and will be "
                "sent when the server is back.",
                self.uri,
                reason,
            )

    def _note_recovery(self) -> None:
        if self.outage_since is not None:
            log.warning(
                "MLflow at %s is reachable again after %.0f s; sending %d buffered metric points.",
                self.uri,
                time.monotonic() - self.outage_since,
                self.buffered_points,
            )
            self.outage_since = None

    def _execute(self, batch: list[Operation]) -> None:
        op = batch[0]
        if op.kind == "open":
            self._open(op.handle, resume=op.payload)
            return
        run_id = op.handle.run_id
        if run_id is None:  # its open failed permanently; nothing can be sent for it
            return
        if op.kind == "metrics":
            self._send_metrics(op.handle, [point for item in batch for point in item.payload])
        elif op.kind == "params":
            from mlflow.entities import Param

            items = [Param(key, value) for key, value in op.payload.items()]
            for start in range(0, len(items), PARAMS_PER_BATCH):
                self.client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])
        elif op.kind == "tags":
            from mlflow.entities import RunTag

            self.client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in op.payload.items()])
        elif op.kind == "artifact":
            path, artifact_path = op.payload
            upload = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
            upload(run_id, str(path), artifact_path)
        elif op.kind == "status":
            self.client.set_terminated(run_id, status=op.payload)

    def _send_metrics(self, handle: RunHandle, points: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        if handle.logged_steps is None:
            handle.logged_steps = self._stored_steps(handle.run_id)
        # Against a running copy of the steps held: one batch can carry a step twice (a restarted worker
        # group reports its checkpoint's steps again, merged with the first reports while the server was away).
        held, fresh = dict(handle.logged_steps), []
        for point in points:
            key, _, step, _ = point
            if step > held.get(key, -1):
                fresh.append(point)
                held[key] = step
        if fresh:
            try:
                self.client.log_batch(handle.run_id, metrics=[Metric(k, v, ts, step) for k, v, step, ts in fresh])
            except Exception as error:
                if not is_permanent(error):  # a lost answer may hide a stored batch: ask the server before the retry
                    handle.logged_steps = None
                raise
        handle.logged_steps = held
        self.sent_points += len(fresh)

    def _stored_steps(self, run_id: str | None) -> dict[str, int]:
        """Latest step per key already in the run (MLflow keeps the max-step value per key)."""
        run = self.client.get_run(run_id)
        return {metric.key: metric.step for metric in run.data._metric_objs}

    def _open(self, handle: RunHandle, resume: bool) -> None:
        """Create the run, or reopen a stored one (status RUNNING again, known steps loaded)."""
        if resume and handle.run_id is not None:
            try:
                self.client.update_run(handle.run_id, status="RUNNING")
                handle.logged_steps = self._stored_steps(handle.run_id)
                handle.mark_ready()
                return
            except Exception as error:  # noqa: BLE001
                if not is_permanent(error):
                    raise
                log.warning("MLflow run %s of %s is gone (%s); starting a new run", handle.run_id, handle.name, error)
        tags = {"mlflow.runName": handle.name, **handle.tags}
        if handle.parent is not None and handle.parent.run_id is not None:
            tags["mlflow.parentRunId"] = handle.parent.run_id
        run = self.client.create_run(self._experiment(), tags=tags, run_name=handle.name)
        handle.run_id, handle.logged_steps = run.info.run_id, {}
        handle.mark_ready()

    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None:
                self._experiment_id = found.experiment_id
            else:
                self._experiment_id = self.client.create_experiment(self.experiment, self.artifact_location)
        return self._experiment_id
