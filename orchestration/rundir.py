"""The run directory: `<workdir>/<run>/` with config.yaml, state.json, logs/ and one folder per stage.

    run = RunDir(Path("runs/quickstart"))
    with run.locked():
        run.write_config(yaml_text)
        run.update_stage("pretrain", status="running", hash="0123456789ab")
    print(run.read_state()["stages"]["pretrain"]["status"])

A stage's output is `<stage>-<hash12>/`; it is complete when `_SUCCESS` exists in it. Work in
progress lives in `<stage>-<hash12>.partial/` so a killed stage resumes from what it left (training
checkpoints, finished shards). state.json is rewritten atomically (temp file + rename) so a reader
never sees half a file, and the lock (flock, released by the kernel even on kill -9) keeps two
drivers from running the same directory at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SUCCESS = "_SUCCESS"


class RunDirBusy(RuntimeError):
    """Another driver holds this run directory."""


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class NotARunDirectory(ValueError):
    """A path given as a run directory holds no state.json (named in the message)."""


class RunDir:
    @classmethod
    def existing(cls, root: Path) -> RunDir:
        """The run directory at `root`, which a run must have made: NotARunDirectory otherwise."""
        run_dir = cls(root)
        if not run_dir.state_path.is_file():
            raise NotARunDirectory(f"{run_dir.root} is not a run directory (no state.json); give <workdir>/<run name>")
        return run_dir

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()  # stage code and Ray tasks get absolute paths
        self._state_lock = threading.RLock()  # the metrics thread writes progress while stages run

    # -- layout ---------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def stage_dir(self, stage: str, digest: str) -> Path:
        return self.root / f"{stage}-{digest}"

    def partial_dir(self, stage: str, digest: str) -> Path:
        return self.root / f"{stage}-{digest}.partial"

    def log_path(self, stage: str) -> Path:
        return self.root / "logs" / f"{stage}.log"

    @staticmethod
    def is_complete(stage_dir: Path) -> bool:
        return (stage_dir / SUCCESS).is_file()

    # -- config and state -----------------------------------------------------------------------
    def write_config(self, yaml_text: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config_path, yaml_text)

    def read_state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {"stages": {}, "stage_runs": {}, "parent_runs": {}}
        state = json.loads(self.state_path.read_text())
        for key in ("stages", "stage_runs", "parent_runs"):
            state.setdefault(key, {})
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        state["updated_at"] = now_iso()
        write_atomic(self.state_path, json.dumps(state, indent=2) + "\n")

    def edit(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read state.json, change it in place and write it, as one step (other threads write it too)."""
        with self._state_lock:
            state = self.read_state()
            change(state)
            self.write_state(state)
            return state

    def update(self, **fields: Any) -> dict[str, Any]:
        return self.edit(lambda state: state.update(fields))

    def update_stage(self, stage: str, **fields: Any) -> dict[str, Any]:
        return self.edit(lambda state: state["stages"].setdefault(stage, {}).update(fields))

    def driver_running(self) -> bool:
        """Whether a driver holds this run directory now (`locked`; a killed one holds nothing)."""
        try:
            handle = open(self.root / ".lock")
        except FileNotFoundError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of this run directory for the life of one driver."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirBusy(
                    f"run directory {self.root} is in use by another rwkv-pipeline process; wait for it "
                    "to finish or choose another run name (name=...)"
                ) from None
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
