"""One pipeline run from a resolved config: the run directory, Ray, MLflow and the stage DAG together.

    from orchestration.config import load_config
    summary = run_pipeline(load_config("configs/quickstart.yaml"))
    print(summary.describe())

`plan_pipeline` answers what would run and what is cached without starting or contacting anything
(it checks the corpus paths). `run_pipeline` checks the corpus paths and, when a stage is left to run,
the Ray address and that every node sees the workdir, before any work (errors name the path / address /
nodes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestration.cluster import check_reachable, check_workers_fit, ray_address_from, start_ray
from orchestration.config import RunConfig, dump_config
from orchestration.dag import DagRunner, PlanItem, Stage
from orchestration.rundir import RunDir
from orchestration.shared_workdir import check_workdir_shared
from orchestration.stages import build_stages, check_val_split, eval_headline, is_training_stage
from orchestration.tracking import embedded_artifact_location, make_tracker, resolve_tracking_uri


@dataclass
class RunSummary:
    run_dir: Path
    outputs: dict[str, Path]
    tracking_uri: str | None
    parent_url: str | None
    report: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [f"run directory: {self.run_dir}"]
        if self.report:
            lines.append(eval_headline(self.report))
        if "export" in self.outputs:
            lines.append(f"exported model: {self.outputs['export'] / 'model.pth'} (+ model.safetensors, tokenizer)")
        lines += mlflow_hints(self.tracking_uri, self.parent_url)
        if self.report.get("sample"):
            lines += ["sample:", "    " + self.report["sample"].replace("\n", "\n    ")]
        return "\n".join(lines)


def mlflow_hints(uri: str | None, url: str | None) -> list[str]:
    if uri is None:
        return ["MLflow: not tracked (mlflow is not installed)"]
    if uri.startswith("sqlite:///"):
        artifacts = embedded_artifact_location(uri) or ""
        return [
            f"MLflow data: {uri.removeprefix('sqlite:///')} (artifacts in {artifacts.removeprefix('file://')})",
            f"open it: mlflow ui --backend-store-uri {uri} --port 5000" + (f"  then {url}" if url else ""),
        ]
    return [f"MLflow: {url or uri}"]


def run_dir_of(config: RunConfig) -> RunDir:
    return RunDir(Path(config.workdir) / config.name)


def plan_pipeline(config: RunConfig, stages: list[Stage] | None = None) -> list[PlanItem]:
    """What would run; raises PipelineSetupError when the shards are made and their val split is shorter
    than one evaluation window, which every training stage left to run would find only at its start."""
    stages = build_stages(config) if stages is None else stages  # building checks the corpus paths
    plan = DagRunner(run_dir_of(config)).plan(stages)
    shards = next(item for item in plan if item.stage == "tokenize")
    if shards.action in ("cached", "shared") and any(item.action in ("run", "resume") for item in plan):
        check_val_split(config, shards.source or shards.folder)
    return plan


def run_pipeline(config: RunConfig, reporter: Callable[[str], None] = print) -> RunSummary:
    """Run every stage that is not complete; raises StageFailed / CorpusError / RayUnreachable."""
    stages = build_stages(config)
    address = ray_address_from(config.ray.address)
    run_dir = run_dir_of(config)
    # What is left to run decides whether Ray is needed, starts, and must hold the training workers:
    # known (read-only) before the run directory, the tracking store or a stage is made, so a run that
    # cannot start leaves nothing behind, and a finished one reruns without its cluster. The plan that
    # counts is made again under the lock.
    pending = [item.stage for item in plan_pipeline(config, stages) if item.action in ("run", "resume")]
    if pending:
        check_reachable(address)
    started_ray = bool(pending) and start_ray(address)
    try:
        if pending:
            check_workdir_shared(Path(config.workdir))
        if any(is_training_stage(name) for name in pending):
            check_workers_fit(config.ray, address)
        with run_dir.locked():
            run_dir.write_config(dump_config(config))
            uri = resolve_tracking_uri(config.tracking.uri, Path(config.workdir))
            tracker = make_tracker(uri, config.tracking.experiment)
            interval = config.tracking.system_metrics_interval_s if config.tracking.system_metrics else None
            runner = DagRunner(run_dir, tracker, config.ray.stage_retries, interval, reporter)
            try:
                outputs = runner.run(stages, config.name, config.model_dump(mode="json"), run_dir.config_path)
            finally:
                tracker.close(timeout_s=config.tracking.flush_timeout_s)
            state = run_dir.read_state()
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    report_path = outputs["evaluate"] / "eval_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    parent_url = _parent_url(tracker, state)
    return RunSummary(run_dir.root, outputs, tracker.uri, parent_url, report)


def _parent_url(tracker: Any, state: dict[str, Any]) -> str | None:
    from orchestration.tracking import RunHandle

    run_id = state.get("parent_run_id")
    return tracker.run_url(RunHandle(name="parent", run_id=run_id)) if run_id else None
