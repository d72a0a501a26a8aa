"""Pretraining on Ray Train: a TorchTrainer whose workers each run the same loop (pipeline/train.py).

    result = train_on_ray(config, data_dir="runs/q/tokenize-1a2b", out_dir="runs/q/pretrain",
                          log_metrics=lambda metrics, step: tracker.log_metrics(stage, metrics, step))

* Workers: `config.ray.num_workers`, one GPU each when `config.ray.use_gpu` (NCCL), else gloo on CPU.
  Ray sets up the process group; DeepSpeed joins it.
* Checkpoints: every rank writes its part (DeepSpeed shards, its RNG state) into a private staging
  directory and reports it; Ray merges the ranks' files into `<storage_path>/<name>/step_N/` and keeps
  the newest `train.keep_checkpoints`. On several nodes the storage path must be a filesystem every
  node sees (the run's workdir, README "Joining a Ray cluster").
* Failures: `FailureConfig(max_failures=ray.max_retries)` restarts the worker group, and each worker
  resumes from `ray.train.get_checkpoint()`. Rerunning the driver with the same (storage_path, name)
  resumes the same way. Either start takes a newer checkpoint found whole in that storage folder
  that Ray had not recorded yet (the run was stopped between the upload and the record). After the
  run, those older than Ray's newest recorded one that Ray does not list are removed (prune_unrecorded).
* Worker records: `<out_dir>/workers/rank_00000.pid` and `rank_00000.env.json`, the rank in five
  digits (pid, host and Ray node, the NVLink multicast variables as the worker process sees them,
  process-group backend, its GPU), for tests and debugging.
* Metrics: Ray Train V2 keeps only metrics reported with a checkpoint, so per-step metrics travel from
  rank 0 through a Ray queue to the driver, which calls `log_metrics(metrics, step)` on its own thread
  (the tracker lives in the driver; workers never import MLflow). A resumed group first reports again
  the recent reports its checkpoint holds (pipeline/train.py), which a killed driver may not have passed on.

Ray is imported inside the functions, so importing this module needs neither Ray nor a cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Ray Train's storage inside a training stage's folder: <stage folder>/ray/<run name>/step_*
STORAGE_FOLDER = "ray"
RAY_CHECKPOINT_RECORD = "checkpoint_manager_snapshot.json"  # Ray Train's list of the checkpoints it recorded

if TYPE_CHECKING:  # keep this module importable without torch (the driver needs only Ray)
    from orchestration.config import RunConfig
    from pipeline.train import MetricsFn


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: resume from Ray's checkpoint, train, report checkpoints."""
    import ray.train
    import torch

    from model import ModelConfig
    from pipeline.config import TrainConfig
    from pipeline.train import train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    os.environ["LOCAL_RANK"] = str(context.get_local_rank())
    torch.set_num_threads(loop_config["threads"])
    metrics_queue = loop_config["metrics_queue"]
    staging = _staging_dir(loop_config["checkpoint_storage"], rank)
    pid_dir = Path(loop_config["out_dir"]) / "workers"  # which process is which rank (debugging, tests)
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank_{rank:05d}.pid").write_text(str(os.getpid()))
    where = _worker_env(context.get_local_rank())
    (pid_dir / f"rank_{rank:05d}.env.json").write_text(json.dumps(where))
    node = where["node_id"][:8]
    print(f"rank {rank} of {context.get_world_size()} on {where['hostname']} (Ray node {node})", flush=True)

    def report(ckpt_dir: Path, metrics: dict[str, Any]) -> None:  # a barrier: every rank reports each one
        ray.train.report(
            {k: v for k, v in metrics.items() if v is not None},
            checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)),
            checkpoint_dir_name=ckpt_dir.name,
            delete_local_checkpoint_after_upload=True,
        )
        if rank == 0:
            print(f"checkpoint {ckpt_dir.name} stored", flush=True)

    def send_metrics(metrics: dict[str, float], step: int) -> None:  # the loop calls this on rank 0 only
        metrics_queue.put((metrics, step))

    checkpoint = ray.train.get_checkpoint()
    resume = checkpoint.as_directory() if checkpoint is not None else nullcontext(None)
    recorded = Path(checkpoint.path) if checkpoint is not None else None
    stored = newer_stored_checkpoint(recorded, Path(loop_config["checkpoint_storage"]), loop_config["driver_saw"])
    if stored is not None:
        resume = nullcontext(str(stored))
        if rank == 0:
            print(f"resuming from {stored}: whole in storage, newer than Ray's last recorded checkpoint", flush=True)
    try:
        with resume as resume_dir:
            train(
                TrainConfig(**loop_config["train"]),
                ModelConfig(**loop_config["model"]),
                loop_config["data_dir"],
                loop_config["out_dir"],
                log_metrics=send_metrics,
                checkpoint_root=staging,
                resume_from=resume_dir,
                on_checkpoint=report,
                tracking_run_id=loop_config["tracking_run_id"],
                init_weights=loop_config["init_weights"],
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _staging_dir(storage: str, rank: int) -> Path:
    """This rank's private folder for checkpoints before Ray uploads them, on this node's temp disk.

    Named by the run's storage and the rank, so that a rank starting again (a restarted group, a rerun)
    removes what an earlier attempt left when it was killed (it holds DeepSpeed's helper script at least):
    that attempt's process is gone, as Ray restarts the whole group.
    """
    prefix = f"rwkv-ckpt-{hashlib.sha256(storage.encode()).hexdigest()[:12]}-rank{rank}-"
    for earlier in Path(tempfile.gettempdir()).glob(prefix + "*"):
        shutil.rmtree(earlier, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=prefix))


def prune_unrecorded(storage: Path, keep: int) -> list[Path]:
    """After a run: the checkpoints Ray's record does not name and that are older than the newest it
    names, removed (without a record, all but the newest `keep`).

    Ray keeps the newest `keep` of those it recorded; one stored but never recorded (a group restarted
    before the record, see newer_stored_checkpoint) is not among them and would stay forever. Those it
    names stay whatever their age: Ray refuses to start again on that storage without one of them (a
    rerun of a stage stopped before its folder was committed). One newer than all it names stays too: a
    rerun after a kill between the last upload and its record trains no step, so Ray records nothing.
    """
    from pipeline.checkpoint_files import list_checkpoints, prune, step_of

    snapshot = storage / RAY_CHECKPOINT_RECORD
    if not snapshot.is_file():
        return prune(storage, keep)
    # The folder names as they appear in Ray's record, whose layout is Ray's own (not a stable format).
    recorded = set(re.findall(r"step_\d+", snapshot.read_text()))
    newest_recorded = max((step_of(Path(name)) for name in recorded), default=-1)
    removed = [p for p in list_checkpoints(storage) if p.name not in recorded and step_of(p) < newest_recorded]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def newer_stored_checkpoint(recorded: Path | None, storage: Path, driver_saw: str | None) -> Path | None:
    """The newest whole checkpoint in `storage` when it is newer than the one Ray recorded, else None.

    Ray records a checkpoint a poll after every rank's upload, so a run stopped in between (a killed
    driver, or a lost worker: the group restarts with what Ray recorded) leaves a newer, whole one in
    storage that Ray does not list. Looked up at every start of the worker group, retries included.
    `driver_saw` is the driver's own lookup at the first start: a rank that sees less of the storage
    than the driver did is on a node that does not share the workdir, and every rank must resume from
    the same step.
    """
    from pipeline.checkpoint_files import newest_intact, step_of

    here = newest_intact(storage)
    if driver_saw is not None and (here is None or step_of(here) < step_of(Path(driver_saw))):
        raise FileNotFoundError(
            f"{driver_saw} is not visible on node {socket.gethostname()}: the run's workdir (where the Ray "
            "checkpoints are stored) must be on a filesystem every node shares"
        )
    if here is None or (recorded is not None and step_of(here) <= step_of(recorded)):
        return None
    return here


def _worker_env(local_rank: int) -> dict[str, Any]:
    """What this worker runs with, as the process sees it: its host and Ray node, NVLink multicast variables,
    process group, GPU."""
    import ray
    import torch
    import torch.distributed as dist

    from pipeline.distributed_env import NVLINK_MULTICAST_OFF

    return {
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "env": {name: os.environ.get(name) for name in NVLINK_MULTICAST_OFF},
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "local_rank": local_rank,
        "gpu_uuid": str(torch.cuda.get_device_properties(local_rank).uuid) if torch.cuda.is_available() else None,
    }


def _pump(metrics_queue: Any, log_metrics: MetricsFn | None, stop: threading.Event) -> None:
    """Driver thread: hand rank 0's metrics to the caller's callback until told to stop, then what the
    queue holds at that moment. After a finished run that is every report; after Ctrl-C the workers may
    go on reporting until Ray ends them, which is not waited for (a resumed run reports them again)."""
    from ray.util.queue import Empty

    def deliver(item: tuple[dict[str, float], int]) -> None:
        if log_metrics is not None:
            log_metrics(*item)

    while not stop.is_set():
        try:
            deliver(metrics_queue.get(timeout=0.5))
        except Empty:
            continue
    for _ in range(metrics_queue.qsize()):
        try:
            deliver(metrics_queue.get_nowait())
        except Empty:
            return


def _fit_interruptibly(trainer: Any) -> Any:
    """trainer.fit() on a helper thread, so that Ctrl-C stays a KeyboardInterrupt of this one.

    On the main thread, fit() installs its own SIGINT handler: it asks the run's controller to abort,
    which does not return while the controller waits for resources, and then exits the process
    (SystemExit, so the stage was marked failed). Off the main thread Ray installs none; an interrupt
    here leaves the stage killed, and Ray ends the job's workers when the driver goes.
    """
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - re-raised on the calling thread
            outcome["error"] = error

    runner = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    runner.start()
    while runner.is_alive():
        runner.join(timeout=0.5)  # short waits: the interrupt is raised between them
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def train_on_ray(
    config: RunConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    log_metrics: MetricsFn | None = None,
    storage_path: str | Path | None = None,
    name: str = "pretrain",
    tracking_run_id: str | None = None,
    init_weights: str | Path | None = None,
) -> dict[str, Any]:
    """Run pretraining as a Ray Train job; returns the newest whole checkpoint's path and Ray's metrics.

    storage_path defaults to `<out_dir>/ray`; rerunning with the same storage_path and name resumes
    from the newest checkpoint Ray holds there. init_weights: start from these weights (a
    `final_weights.pt`) when there is no checkpoint yet, e.g. a context-extension stage.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from orchestration.cluster import check_workers_fit, ray_address_from, start_ray
    from pipeline.checkpoint_files import newest_intact, step_of

    out_dir = Path(out_dir).resolve()
    storage = Path(storage_path).resolve() if storage_path else out_dir / STORAGE_FOLDER

    address = ray_address_from(config.ray.address)
    start_ray(address)  # no-op when this process already joined Ray
    check_workers_fit(config.ray, address)
    stored = newest_intact(storage / name)  # each rank checks it sees this too (newer_stored_checkpoint)
    use_gpu = config.ray.use_gpu
    metrics_queue = Queue(actor_options={"num_cpus": 0})
    loop_config = {
        "train": config.train.model_dump(),
        "model": asdict(config.model),
        "data_dir": str(Path(data_dir).resolve()),
        "out_dir": str(out_dir),
        "metrics_queue": metrics_queue,
        "tracking_run_id": tracking_run_id,
        "init_weights": str(Path(init_weights).resolve()) if init_weights is not None else None,
        "threads": max(int(config.ray.cpus_per_worker), 1),
        "checkpoint_storage": str(storage / name),
        "driver_saw": str(stored) if stored is not None else None,
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.ray.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": config.ray.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=config.ray.max_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
        ),
    )
    stop = threading.Event()
    pump = threading.Thread(target=_pump, args=(metrics_queue, log_metrics, stop), daemon=True)
    pump.start()
    try:
        result = _fit_interruptibly(trainer)
    finally:
        stop.set()
        pump.join(timeout=30)
        ray.kill(metrics_queue.actor)
    prune_unrecorded(storage / name, config.train.keep_checkpoints)
    # Ray's newest recorded checkpoint, or a newer whole one it never recorded (see prune_unrecorded).
    final = newest_intact(storage / name)
    if result.checkpoint is not None and (final is None or step_of(Path(result.checkpoint.path)) >= step_of(final)):
        final = Path(result.checkpoint.path)
    return {
        "checkpoint": str(final) if final is not None else None,
        "metrics": dict(result.metrics or {}),
        "path": result.path,
    }
