"""MLflow tracking for pipeline runs: one parent run, one nested run per stage, never blocking training.

    tracker = make_tracker(resolve_tracking_uri(None, Path("runs")), "rwkv-pipeline")
    parent = tracker.open_run("quickstart", params={"train.lr_init": 6e-4})
    stage = tracker.open_run("pretrain", parent=parent)
    tracker.log_metrics(stage, {"loss": 2.5, "lr": 6e-4}, step=10)   # ~microseconds: queued
    tracker.close_run(stage); tracker.close_run(parent)
    tracker.close(timeout_s=60)

The embedded default is a SQLite file in the workdir with artifacts beside it; `tracking.uri` or
MLFLOW_TRACKING_URI point at a server. Every call only queues work for `OperationQueue`'s thread,
so an unreachable server slows nothing down (see tracking_queue.py). When mlflow is not
importable (a GPU box with only torch and DeepSpeed) `make_tracker` returns a `NullTracker`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestration.tracking_queue import Operation, OperationQueue, RunHandle

log = logging.getLogger("orchestration.tracking")

__all__ = ["MlflowTracker", "NullTracker", "RunHandle", "SystemMetricsSampler", "make_tracker", "resolve_tracking_uri"]


def resolve_tracking_uri(configured: str | None, workdir: Path) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else a SQLite file in the workdir."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir.resolve() / 'mlflow.db'}"


def embedded_artifact_location(uri: str) -> str | None:
    """Artifacts of the embedded SQLite store live beside the database file."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr_init": "0.0006", ...} (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value):
            for index, item in enumerate(value):
                flat.update(flatten(item, f"{name}.{index}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


class NullTracker:
    """Same interface, does nothing: used when mlflow is not installed."""

    uri: str | None = None
    experiment: str | None = None

    def open_run(
        self,
        name: str,
        parent: RunHandle | None = None,
        run_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        wait_s: float = 0.0,
    ) -> RunHandle:
        handle = RunHandle(name=name, parent=parent, run_id=run_id)
        handle.mark_ready()  # nothing to wait for: no run will be created
        return handle

    def log_metrics(self, handle: RunHandle, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_params(self, handle: RunHandle, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, handle: RunHandle, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, handle: RunHandle, path: Path, artifact_path: str | None = None) -> None:
        pass

    def close_run(self, handle: RunHandle, status: str = "FINISHED") -> None:
        pass

    def flush(self, timeout_s: float) -> bool:
        return True

    def close(self, timeout_s: float) -> int:
        return 0

    def run_url(self, handle: RunHandle) -> str | None:
        return None


class MlflowTracker(NullTracker):
    """Queues every operation for the sending thread; see the module docstring."""

    def __init__(self, uri: str, experiment: str) -> None:
        # Our queue retries with its own backoff: MLflow's built-in retries (7, exponential) would
        # hold the sending thread for minutes on a dead server, so fail fast and let the queue wait.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        # MLflow prints two "View run / View experiment" lines per finished run on a server; the run's
        # summary gives the parent run's link once.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow import MlflowClient

        self.uri, self.experiment = uri, experiment
        self.client = MlflowClient(uri)
        self.queue = OperationQueue(self.client, uri, experiment, embedded_artifact_location(uri))

    def open_run(
        self,
        name: str,
        parent: RunHandle | None = None,
        run_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        wait_s: float = 10.0,
    ) -> RunHandle:
        """Create (or with run_id, reopen) a run; waits up to wait_s for its id, then goes on."""
        handle = RunHandle(name=name, parent=parent, run_id=run_id, tags=dict(tags or {}))
        self.queue.put(Operation("open", handle, run_id is not None))
        if params:
            self.log_params(handle, params)
        handle.ready.wait(wait_s)
        return handle

    def log_metrics(self, handle: RunHandle, metrics: Mapping[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        points = [(key, float(value), int(step), stamp) for key, value in metrics.items() if value is not None]
        if points:
            self.queue.put(Operation("metrics", handle, points))

    def log_params(self, handle: RunHandle, params: Mapping[str, Any]) -> None:
        self.queue.put(Operation("params", handle, {key: str(value) for key, value in params.items()}))

    def set_tags(self, handle: RunHandle, tags: Mapping[str, Any]) -> None:
        self.queue.put(Operation("tags", handle, dict(tags)))

    def log_artifact(self, handle: RunHandle, path: Path, artifact_path: str | None = None) -> None:
        self.queue.put(Operation("artifact", handle, (Path(path), artifact_path)))

    def close_run(self, handle: RunHandle, status: str = "FINISHED") -> None:
        self.queue.put(Operation("status", handle, status))

    def flush(self, timeout_s: float) -> bool:
        return self.queue.flush(timeout_s)

    def close(self, timeout_s: float) -> int:
        return self.queue.close(timeout_s)

    def run_url(self, handle: RunHandle) -> str | None:
        if handle.run_id is None:
            return None
        try:
            experiment = self.queue._experiment_id or self.client.get_run(handle.run_id).info.experiment_id
        except Exception:  # noqa: BLE001 - a link is a convenience; the server may be away
            return None
        base = self.uri if self.uri.startswith("http") else "http://127.0.0.1:5000"
        return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{handle.run_id}"


def make_tracker(uri: str, experiment: str) -> NullTracker:
    """An MlflowTracker, or a NullTracker (with one warning) when mlflow is not importable."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        log.warning("mlflow is not installed: this run is not tracked (pip install mlflow)")
        return NullTracker()
    return MlflowTracker(uri, experiment)


class SystemMetricsSampler:
    """CPU/memory (and GPU, with pynvml) every interval_s, logged as system/* through the tracker.

    Steps are whole intervals since `origin` (the stage's first start), so a resumed stage continues
    the same step axis instead of restarting at 0 and colliding with the points already stored.
    """

    def __init__(self, tracker: NullTracker, handle: RunHandle, origin: float, interval_s: float = 10.0) -> None:
        self.tracker, self.handle, self.origin, self.interval_s = tracker, handle, origin, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)
        self.monitors = self._monitors()

    @staticmethod
    def _monitors() -> list[Any]:
        try:
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        except ImportError:  # psutil missing
            return []
        monitors: list[Any] = [CPUMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            monitors.append(GPUMonitor())
        except Exception:  # noqa: BLE001 - no pynvml or no GPU: CPU metrics only
            pass
        return monitors

    def __enter__(self) -> SystemMetricsSampler:
        if self.monitors and type(self.tracker) is not NullTracker:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            metrics: dict[str, float] = {}
            for monitor in self.monitors:
                monitor.collect_metrics()
                metrics.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            step = int((time.time() - self.origin) / self.interval_s)
            self.tracker.log_metrics(self.handle, {f"system/{k}": v for k, v in metrics.items()}, step)
