"""The stage DAG: content-hashed outputs, skip what is complete, retry what fails, track everything.

    stages = [
        Stage("tokenizer", train_tokenizer_fn, config={"vocab": 4096}),
        Stage("tokenize", tokenize_fn, config={"val": 0.01}, inputs=("tokenizer",)),
    ]
    outputs = DagRunner(RunDir(Path("runs/demo")), NullTracker()).run(stages, run_name="demo")
    outputs["tokenize"]   # Path("runs/demo/tokenize-<hash12>")

A stage is a function of a `StageContext` (its `.partial` output folder, its inputs' folders, a
logger and the tracking calls) and nothing else; where its work runs (this process, Ray tasks,
Ray Train) is the function's business. The folder name hashes the stage's own config section and
its inputs' hashes, so changing `train.*` changes pretrain and everything after it but leaves the
tokenizer and shards where they are. Completion is the `_SUCCESS` marker, written last after the
atomic rename of `.partial` to the final name; a killed stage finds its `.partial` folder again
(same hash) and resumes from whatever its function left there.

Runs of one workdir share complete folders: a stage whose folder is complete in another run
directory beside this one (same name, so the same config and inputs) is not run again; its folder
here becomes a relative symbolic link to that one (action "shared"). So experiments that differ in
`train.*` tokenize their corpus once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestration.rundir import SUCCESS, RunDir, now_iso, write_atomic
from orchestration.stage_log import stage_log
from orchestration.tracking import NullTracker, RunHandle, SystemMetricsSampler, flatten

log = logging.getLogger("orchestration.dag")


@dataclass(frozen=True)
class Stage:
    """One unit of the pipeline: `run(ctx)` fills `ctx.out_dir` from `ctx.inputs`."""

    name: str
    run: Callable[[StageContext], Any]
    config: Any = None  # JSON-able: the config section(s) that decide this stage's output
    inputs: tuple[str, ...] = ()
    version: int = 1  # bump when the stage's code changes what it writes for the same config
    names: Mapping[str, str] = field(default_factory=dict)  # config keys as a user writes them ("workers": ...)
    # The parent run's metrics from the stage's complete folder, logged unless this parent has them already
    # (MLflow's run list sorts and compares parent runs by them, so a cached or shared stage gives them too)
    parent_metrics: Callable[[Path], Mapping[str, float]] | None = None


def stage_hashes(stages: Sequence[Stage]) -> dict[str, str]:
    """12 hex digits per stage over (name, version, config, inputs' hashes); inputs come first."""
    digests: dict[str, str] = {}
    for stage in stages:
        missing = [name for name in stage.inputs if name not in digests]
        if missing:
            raise ValueError(f"stage {stage.name!r} needs {missing}, which no earlier stage produces")
        identity = {
            "stage": stage.name,
            "version": stage.version,
            "config": stage.config,
            "inputs": {name: digests[name] for name in stage.inputs},
        }
        blob = json.dumps(identity, sort_keys=True, default=str).encode()
        digests[stage.name] = hashlib.sha256(blob).hexdigest()[:12]
    return digests


class StageFailed(RuntimeError):
    """A stage failed on every attempt; names the stage, the error and its log."""

    def __init__(self, stage: str, attempts: int, error: BaseException, log_path: Path) -> None:
        self.stage, self.error, self.log_path = stage, error, log_path
        super().__init__(
            f"stage '{stage}' failed after {attempts} attempt(s): {describe(error).rstrip('.')}. Full log: {log_path}. "
            "Fix the cause and run the same command again: finished stages are reused."
        )


def retryable(error: BaseException) -> bool:
    """False for errors whose class says `retryable = False`: the config or the data is wrong, and the
    message names the fix, so another attempt would fail the same way (a Ray task's error wraps it)."""
    return getattr(getattr(error, "cause", None) or error, "retryable", True)


def config_changes(
    before: Mapping[str, Any], after: Mapping[str, Any], names: Mapping[str, str], shown: int = 3
) -> str:
    """The fields that differ between two stage configs, as "train.lr_init 0.0006 -> 0.001, ..." (the first
    `shown` of them), each key's head spelled as `names` has it."""
    old, new = flatten(before or {}), flatten(after or {})
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]

    def label(key: str) -> str:
        head, dot, rest = key.partition(".")
        return names.get(head, head) + dot + rest

    def change(key: str) -> str:
        was, now = old.get(key, "-"), new.get(key, "-")
        return f"{label(key)} changed" if max(len(was), len(now)) > 24 else f"{label(key)} {was} -> {now}"

    more = f" and {len(changed) - shown} more" if len(changed) > shown else ""
    return ", ".join(change(key) for key in changed[:shown]) + more


# How Ray Train says a worker stopped answering (its process or its node died): its health check, or
# calls to its actor, failed. The worker's own error snippet then names its rank, host and node.
_LOST_WORKER = re.compile(r"\[Rank (\d+) Error Snippet\]:\s*A worker health check failed\.")
_WORKER_FIELD = r"{}='([^']*)'"


def _lost_worker(text: str) -> str | None:
    """Which worker, as "rank R on host H (node IP)", when `text` is Ray Train's report of a worker that
    stopped answering; else None."""
    found = _LOST_WORKER.search(text)
    if found is None:
        return None
    rest = text[found.end() :]
    host, ip = (re.search(_WORKER_FIELD.format(name), rest) for name in ("hostname", "node_ip"))
    where = f" on host {host.group(1)}" if host else ""
    return f"rank {found.group(1)}{where}" + (f" (node {ip.group(1)})" if ip else "")


def describe(error: BaseException) -> str:
    """`Type: message` of the real error (a Ray task's error wraps it), tracebacks cut to their last line."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lost = _lost_worker(text)
    if lost:
        return (
            f"{type(cause).__name__}: the training worker of {lost} stopped answering: its process or its node "
            "died or lost the network, and Ray Train's retries (ray.max_retries) were used up; the rerun resumes "
            "from the newest checkpoint"
        )
    if len(lines) > 3:  # Ray worker-group errors embed whole tracebacks: keep the final exception line
        return f"{type(cause).__name__}: {lines[0]} ... {lines[-1]}"
    return f"{type(cause).__name__}: {' '.join(lines)}"


@dataclass
class StageContext:
    """What a stage function sees."""

    name: str
    out_dir: Path
    inputs: dict[str, Path]
    attempt: int
    log: logging.Logger
    tracker: NullTracker
    run: RunHandle
    on_progress: Callable[[int, int], None] = lambda done, total: None
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.tracker.log_metrics(self.run, metrics, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker.log_params(self.run, params)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload after the stage completes (paths inside out_dir are mapped to the final folder)."""
        self.artifacts.append((Path(path), artifact_path))

    def progress(self, done: int, total: int) -> None:
        self.on_progress(done, total)


@dataclass
class PlanItem:
    stage: str
    digest: str
    folder: Path
    action: str  # cached | shared | resume | run
    source: Path | None = None  # shared: the complete folder in another run directory
    reason: str = ""  # run: why not the folder this run directory had for the stage before


class DagRunner:
    """Runs stages in order in one run directory; see the module docstring."""

    def __init__(
        self,
        run_dir: RunDir,
        tracker: NullTracker | None = None,
        stage_retries: int = 0,
        system_metrics_s: float | None = 10.0,
        reporter: Callable[[str], None] | None = None,
    ) -> None:
        self.run_dir, self.tracker = run_dir, tracker or NullTracker()
        self.stage_retries, self.system_metrics_s = stage_retries, system_metrics_s
        self.report = reporter or (lambda line: log.info("%s", line))
        self._progress_written = 0.0

    def plan(self, stages: Sequence[Stage]) -> list[PlanItem]:
        items, digests = [], stage_hashes(stages)
        before = self.run_dir.read_state()["stages"]
        for stage in stages:
            digest = digests[stage.name]
            final = self.run_dir.stage_dir(stage.name, digest)
            source = None
            if RunDir.is_complete(final):
                action = "cached"
            elif self.run_dir.partial_dir(stage.name, digest).exists():
                action = "resume"
            elif (source := self._complete_elsewhere(final.name)) is not None:
                action = "shared"
            else:
                action = "run"
            reason = ""
            if action == "run":
                reason = self._why_new(stage, before.get(stage.name, {}), final, {item.stage: item for item in items})
            elif action == "resume":
                reason = self._where_stopped(before.get(stage.name, {}), final)
            items.append(PlanItem(stage.name, digest, final, action, source, reason))
        return items

    @staticmethod
    def _where_stopped(before: Mapping[str, Any], folder: Path) -> str:
        progress = before.get("progress") if before.get("dir") == folder.name else None
        return f"last reported {progress[0]}/{progress[1]}; goes on from what it saved" if progress else ""

    def _why_new(self, stage: Stage, before: Mapping[str, Any], folder: Path, planned: Mapping[str, PlanItem]) -> str:
        """What changed since the stage's folder in this run directory was another one ("" if it had none)."""
        if not before.get("dir") or before["dir"] == folder.name:
            return ""
        if "config" not in before:  # written before the state kept stage configs
            reason = f"settings changed since {before['dir']}"
        elif changes := config_changes(before["config"], stage.config, stage.names):
            reason = f"changed: {changes}"
        elif inputs := self._changed_inputs(stage, before["dir"], planned):
            reason = f"new input: {inputs}"
        else:
            reason = "an earlier stage's output or this stage's code changed"
        if self.run_dir.partial_dir(stage.name, before.get("hash", "")).is_dir():
            reason += f"; the unfinished {before['dir']}.partial stays as it is"
        return reason

    def _changed_inputs(self, stage: Stage, before_dir: str, planned: Mapping[str, PlanItem]) -> str:
        """The inputs whose folders differ from those the stage's earlier folder was made from (its stage.json)."""
        try:
            made_from = json.loads((self.run_dir.root / before_dir / "stage.json").read_text())["inputs"]
        except (OSError, ValueError, KeyError):
            return ""
        return ", ".join(name for name in stage.inputs if made_from.get(name) != planned[name].folder.name)

    def _complete_elsewhere(self, folder_name: str) -> Path | None:
        """The same stage folder, complete, in another run directory of this workdir."""
        workdir = self.run_dir.root.parent
        for other in sorted(workdir.iterdir()) if workdir.is_dir() else []:
            candidate = other / folder_name
            if other != self.run_dir.root and other.is_dir() and RunDir.is_complete(candidate):
                return candidate.resolve()
        return None

    def _link_shared(self, parent: RunHandle, item: PlanItem) -> None:
        assert item.source is not None
        if item.folder.is_symlink():  # a link whose folder was deleted
            item.folder.unlink()
        item.folder.symlink_to(os.path.relpath(item.source, item.folder.parent), target_is_directory=True)
        # The stage run that made the folder, named on this run's parent only: kept out of stage_runs,
        # so a folder made again here (its run deleted) gets a stage run of this run, not of that one.
        run_id = RunDir(item.source.parent).read_state()["stage_runs"].get(item.source.name)
        self._note_cached(parent, item, source=item.source, run_id=run_id)

    def run(
        self,
        stages: Sequence[Stage],
        run_name: str,
        config_tree: Mapping[str, Any] | None = None,
        config_file: Path | None = None,
    ) -> dict[str, Path]:
        """Run what is not complete; returns each stage's final folder. Raises StageFailed."""
        plan = self.plan(stages)
        outputs = {item.stage: item.folder for item in plan}
        parent_key = self._parent_key(plan)
        state = self.run_dir.read_state()
        parent_id = state["parent_runs"].get(parent_key)
        if all(item.action == "cached" for item in plan) and parent_id is not None:
            # Nothing to run or to track; the run directory still describes this config from now on (it
            # may be an earlier one, whose folders are all complete).
            self.run_dir.update(
                name=run_name,
                parent_key=parent_key,
                parent_run_id=parent_id,
                tracking_uri=self.tracker.uri,
                stages=self._planned_stages(stages, plan, state["stages"]),
            )
            for item in plan:
                self._record_cached(item)
            return outputs
        parent = self.tracker.open_run(
            run_name,
            run_id=parent_id,
            tags={"rwkv.run_dir": str(self.run_dir.root)},
            params=None if parent_id else flatten(config_tree or {}),
        )
        if parent_id is None and config_file is not None:
            self.tracker.log_artifact(parent, config_file)
        self.run_dir.update(
            name=run_name,
            parent_key=parent_key,
            parent_run_id=parent.run_id,
            tracking_uri=self.tracker.uri,
            parent_runs={**state["parent_runs"], parent_key: parent.run_id},
            stages=self._planned_stages(stages, plan, state["stages"]),
        )

        def record_parent(run_id: str) -> None:
            def change(state: dict[str, Any]) -> None:
                state["parent_runs"][parent_key] = run_id
                if state.get("parent_key") == parent_key:
                    state["parent_run_id"] = run_id

            self.run_dir.edit(change)

        parent.when_created(record_parent)  # also when the server answers late: a rerun reopens it
        self._close_abandoned(state, plan, parent)
        status = "FAILED"
        try:
            for stage, item in zip(stages, plan, strict=True):
                if item.action == "cached":
                    self._note_cached(parent, item)
                elif item.action == "shared":
                    self._link_shared(parent, item)
                else:
                    self._run_stage(stage, item, outputs, parent)
                if stage.parent_metrics is not None and (parent_id is None or item.action != "cached"):
                    self.tracker.log_metrics(parent, stage.parent_metrics(item.folder), step=0)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.tracker.close_run(parent, status)
        return outputs

    def _parent_key(self, plan: list[PlanItem]) -> str:
        """Which MLflow parent run a run continues: one per set of outputs (the stages' folder hashes) and
        place of tracking. A change that alters no stage's output (ray.address, retries, how often to
        log) continues the parent, whose params stay those of its first run; a change of any output is
        a new parent."""
        identity = {
            "outputs": [[item.stage, item.digest] for item in plan],
            "tracking": [self.tracker.uri, self.tracker.experiment],
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]

    @staticmethod
    def _planned_stages(stages: Sequence[Stage], plan: list[PlanItem], previous: dict[str, Any]) -> dict[str, Any]:
        """This config's stages, in order, as `status` should show them before they run: what is to run
        `pending` in its new folder (an earlier config's entry, or a stage it had that this one has not,
        would read as current). Each keeps its config, from which a later plan says what changed."""
        entries = {}
        for stage, item in zip(stages, plan, strict=True):
            entry = dict(previous.get(item.stage, {}))
            if entry.get("dir") != item.folder.name:
                entry = {"dir": item.folder.name, "hash": item.digest}
            if item.action in ("run", "resume"):
                entry.update(status="pending", error=None)
            entries[item.stage] = {**entry, "config": stage.config}
        return entries

    def _close_abandoned(self, state: Mapping[str, Any], plan: list[PlanItem], parent: RunHandle) -> None:
        """The MLflow runs a killed driver left RUNNING that this run does not continue: KILLED.

        A stage still `running` in the state had its driver killed (this driver holds the run directory's
        lock). If this run takes the stage to another folder, its run and the old parent stay as they were
        left, RUNNING, for good; the same folder reopens the stage run (resume)."""
        folders = {item.stage: item.folder.name for item in plan}
        dead = {name: entry for name, entry in state["stages"].items() if entry.get("status") == "running"}
        for name, entry in dead.items():
            if entry.get("mlflow_run_id") and entry.get("dir") != folders.get(name):
                self.tracker.close_run(RunHandle(name, run_id=entry["mlflow_run_id"]), "KILLED")
        old_parent = state.get("parent_run_id")
        if dead and old_parent and old_parent != parent.run_id:
            self.tracker.close_run(RunHandle("parent", run_id=old_parent), "KILLED")

    def _note_cached(
        self, parent: RunHandle, item: PlanItem, source: Path | None = None, run_id: str | None = None
    ) -> None:
        run_id = run_id or self.run_dir.read_state()["stage_runs"].get(item.folder.name)
        made = f" (run {run_id})" if run_id else ""  # none when that run was tracked elsewhere, or not at all
        self.tracker.set_tags(parent, {f"rwkv.cached.{item.stage}": f"{source or item.folder.name}{made}"})
        self._record_cached(item, source, run_id)

    def _record_cached(self, item: PlanItem, source: Path | None = None, made_by: str | None = None) -> None:
        """state.json and the console: the stage is this complete folder (or a link to `source`, made by the
        stage run `made_by` of another run)."""
        status = "shared" if source else "cached"
        fields = {"status": status, "dir": item.folder.name, "hash": item.digest}
        made_by = made_by or self.run_dir.read_state()["stage_runs"].get(item.folder.name)
        if made_by:  # the stage run that made this folder, which `status` links to
            fields["mlflow_run_id"] = made_by
        self.run_dir.update_stage(item.stage, **fields)
        self.report(f"{item.stage:<10} {status}  {source or item.folder}")

    def _run_stage(self, stage: Stage, item: PlanItem, outputs: dict[str, Path], parent: RunHandle) -> None:
        partial = self.run_dir.partial_dir(stage.name, item.digest)
        partial.mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir.log_path(stage.name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        state = self.run_dir.read_state()
        previous = state["stages"].get(stage.name, {})
        same_output = previous.get("dir") == item.folder.name
        origin = previous.get("origin_time") if same_output and previous.get("origin_time") else time.time()
        handle = self.tracker.open_run(
            stage.name,
            parent=parent,
            run_id=state["stage_runs"].get(item.folder.name),
            tags={"rwkv.stage": stage.name, "rwkv.stage_dir": str(item.folder), "rwkv.stage_hash": item.digest},
        )
        self.run_dir.update_stage(
            stage.name,
            status="running",
            dir=item.folder.name,
            hash=item.digest,
            started_at=now_iso(),
            origin_time=origin,
            log=str(log_path),
            mlflow_run_id=handle.run_id,
            error=None,
            progress=None,
        )

        def record_stage_run(run_id: str) -> None:
            def change(state: dict[str, Any]) -> None:
                state["stage_runs"][item.folder.name] = run_id
                entry = state["stages"].get(stage.name, {})
                if entry.get("dir") == item.folder.name:
                    entry["mlflow_run_id"] = run_id

            self.run_dir.edit(change)

        handle.when_created(record_stage_run)  # also when the server answers late: a rerun reopens it
        reason = f"  ({item.reason})" if item.reason else ""
        self.report(f"{stage.name:<10} {'resume' if item.action == 'resume' else 'run':<7} {item.folder}{reason}")
        started = time.monotonic()
        sampler = SystemMetricsSampler(self.tracker, handle, origin, self.system_metrics_s or 10.0)
        with stage_log(log_path):
            try:
                if self.system_metrics_s:
                    sampler.__enter__()
                ctx = self._attempts(stage, partial, outputs, handle, log_path)
                self._commit(stage, item, partial, ctx)
            except BaseException as error:
                status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
                self.tracker.close_run(handle, status)
                # The error itself: `status` shows it on the stage's row, with the attempts and the log beside it.
                cause = describe(error.error) if isinstance(error, StageFailed) else f"{type(error).__name__}: {error}"
                self.run_dir.update_stage(stage.name, status=status.lower(), finished_at=now_iso(), error=cause)
                raise
            finally:
                sampler.__exit__()
        seconds = time.monotonic() - started
        self.tracker.log_metrics(handle, {"stage_seconds": seconds}, step=0)
        self.tracker.close_run(handle, "FINISHED")
        self.run_dir.update_stage(
            stage.name, status="done", finished_at=now_iso(), seconds=round(seconds, 1), mlflow_run_id=handle.run_id
        )
        self.report(f"{stage.name:<10} done    {seconds:6.1f} s")

    def _attempts(
        self, stage: Stage, partial: Path, outputs: dict[str, Path], handle: RunHandle, log_path: Path
    ) -> StageContext:
        attempts = self.stage_retries + 1
        for attempt in range(1, attempts + 1):
            ctx = StageContext(
                name=stage.name,
                out_dir=partial,
                inputs={name: outputs[name] for name in stage.inputs},
                attempt=attempt,
                log=logging.getLogger(f"stage.{stage.name}"),
                tracker=self.tracker,
                run=handle,
                on_progress=lambda done, total, name=stage.name: self._write_progress(name, done, total),
            )
            self.run_dir.update_stage(stage.name, attempts=attempt)
            try:
                stage.run(ctx)
                return ctx
            except Exception as error:  # noqa: BLE001 - retried, then raised as StageFailed
                # The traceback goes to the stage log only; the console gets one line (or StageFailed).
                ctx.log.info("attempt %d/%d failed:\n%s", attempt, attempts, traceback.format_exc())
                if attempt == attempts or not retryable(error):
                    raise StageFailed(stage.name, attempt, error, log_path) from error
                self.report(f"{stage.name:<10} retry   attempt {attempt} failed ({describe(error)})")
        raise AssertionError("unreachable")

    def _commit(self, stage: Stage, item: PlanItem, partial: Path, ctx: StageContext) -> None:
        """stage.json, atomic rename of .partial to the final name, then _SUCCESS last."""
        record = {
            "stage": stage.name,
            "hash": item.digest,
            "version": stage.version,
            "config": stage.config,
            "inputs": {name: path.name for name, path in ctx.inputs.items()},
            "finished_at": now_iso(),
        }
        write_atomic(partial / "stage.json", json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        if item.folder.is_symlink():  # a shared folder that has since been deleted in its own run
            item.folder.unlink()
        elif item.folder.exists():  # a final folder without _SUCCESS is debris from a crash mid-commit
            shutil.rmtree(item.folder)
        os.rename(partial, item.folder)
        marker = item.folder / SUCCESS
        with open(marker, "w") as handle:
            handle.write(now_iso() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for path, artifact_path in ctx.artifacts:
            final = item.folder / path.relative_to(partial) if path.is_relative_to(partial) else path
            self.tracker.log_artifact(ctx.run, final, artifact_path)

    def _write_progress(self, stage: str, done: int, total: int) -> None:
        # At most twice a second (tokenize reports every unit); a dropped update is not written later, so
        # `status` after a crash can be one report behind.
        if time.monotonic() - self._progress_written > 0.5 or done >= total:
            self._progress_written = time.monotonic()
            self.run_dir.update_stage(stage, progress=[done, total])
