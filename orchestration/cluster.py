"""Joining Ray: `ray.address`, else RAY_ADDRESS, else a fresh local cluster; a dead address fails fast.

    address = ray_address_from(config.ray.address)    # "127.0.0.1:6379", or "local"
    start_ray(address)                                # RayUnreachable names the address if nothing answers
    check_workers_fit(config.ray, address)            # ClusterTooSmall: more workers than a local cluster holds

`ray.init("host:port")` on an address where nothing listens retries for a long while before it
gives up with a long traceback; a TCP connect with a short timeout answers the same question in
at most a few seconds, so the run stops with one sentence naming the address.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestration.config import RayConfig

# Ray Train's per-run helper that removes a dead controller's placement group (Ray 2.60).
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# Ray Train's controller loop and its retry policy, which log each failed worker-group start (Ray 2.60).
CONTROLLER_LOGGER = "ray.train.v2._internal.execution.controller.controller"
FAILURE_POLICY_LOGGER = "ray.train.v2._internal.execution.failure_handling.default"
# Ray Train's checkpoint manager, whose one INFO line on a resume advises deleting the checkpoint folder.
CHECKPOINT_MANAGER_LOGGER = "ray.train.v2._internal.execution.checkpoint.checkpoint_manager"
# Settings read by Ray Train's controller, a process of the cluster: passed on from the driver's environment.
FORWARDED_ENV = ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",)


class RayUnreachable(ConnectionError):
    """Nothing answers at the configured Ray address."""


class ClusterTooSmall(ValueError):
    """The local Ray cluster cannot hold the training workers the config asks for."""


def ray_address_from(configured: str | None) -> str:
    # "local", not None: ray.init(None) would join whatever cluster `ray start` last left on this machine.
    return configured or os.environ.get("RAY_ADDRESS") or "local"


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as error:
        source = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") == address else "ray.address"
        raise RayUnreachable(
            f"cannot reach the Ray cluster at {address} (from {source}): {error}. Start one there with "
            f"`ray start --head --port={port or 6379}`, fix the address, or leave ray.address unset "
            "(and RAY_ADDRESS empty) to run on a local Ray cluster started for this run."
        ) from None


def use_token_if_present() -> None:
    """Send the local Ray auth token when joining a cluster, as `ray start` does when it finds one.

    Ray 2.60: a local `ray.init()` writes ~/.ray/auth_token, after which `ray start --head` enables
    token auth, but `ray.init(address=...)` keeps RAY_AUTH_MODE disabled and is refused. A client in
    token mode is accepted by clusters with and without token auth alike.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:  # Ray's own switch also refreshes its cached config, which a bare env var would not
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray version: no token auth to worry about, or a new API
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _job_runtime_env() -> dict:
    """Environment of every task and actor of our Ray jobs, Ray Train's workers included.

    NVLink multicast off (pipeline.distributed_env): Ray Train makes the process group before the
    training loop could set it. And Ray Train (2.60) patches `print` in its workers to go through the
    root logger, also printing the line itself when stdout is wrapped, which Ray's log capture does:
    every training log line reached the driver's console twice. Our workers print plain progress
    lines, so `print` is left alone. RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, set where the driver runs,
    reaches Ray Train's controller (how long one round of waiting for the workers' resources lasts).
    """
    from pipeline.distributed_env import multicast_off_env

    forwarded = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    return {
        "env_vars": {**multicast_off_env(), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **forwarded},
        "worker_process_setup_hook": f"{__name__}.prepare_worker_process",
    }


def prepare_worker_process() -> None:
    """Run by Ray in each worker process of our jobs, once it has joined the cluster.

    Ray Train (2.60) starts a detached PlacementGroupCleaner per run that asks Ray's state API every
    second whether the run's controller is alive, and finds the state API through the address `ray
    start` last wrote to /tmp/ray/ray_current_cluster, not through the cluster it runs in. On a
    machine that ever ran `ray start`, that is another, usually dead, cluster: the cleaner's thread
    died with a GCS-timeout traceback in every run. On a cluster without Ray's dashboard (ours start
    without one) the state API does not answer at all, and it logged a warning every second for the
    whole run. So "auto" lookups in our workers resolve to their own cluster, and the cleaner only
    speaks for errors; when the state API is there it still removes a dead controller's placement group.

    The console keeps the training loop's own lines: each rank's "Checkpoint successfully created at"
    and "Reporting training result" (a `.partial` path gone once the stage finishes, and the last
    batch's loss beside our window mean; rank 0 prints one line per stored checkpoint instead), the
    checkpoint manager's note on a resume (it found the run's checkpoints, and advises deleting their
    folder to start afresh: the stage resumes on purpose, and says from where), and torch's deprecation
    warning for a call inside DeepSpeed, are left out.
    """
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    # Filters, not levels: Ray Train's logging setup in its workers resets the levels of loggers under ray.train.
    for name in (*ray_train_report_loggers(ray.__file__), CHECKPOINT_MANAGER_LOGGER):
        logging.getLogger(name).addFilter(lambda record: record.levelno >= logging.WARNING)
    quiet = StartupWaitInOneLine()
    for name in (CONTROLLER_LOGGER, FAILURE_POLICY_LOGGER):
        logging.getLogger(name).addFilter(quiet)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated")


def ray_train_report_loggers(ray_init_file: str) -> tuple[str, ...]:
    """The loggers of Ray Train's per-report INFO lines (2.60); one is named by its file's path."""
    context = os.path.join(os.path.dirname(ray_init_file), "train", "v2", "_internal", "execution", "context.py")
    return "ray.train._internal.storage", "ray.train.v2._internal.execution.storage", context


def _is_startup_timeout(error: BaseException | None) -> bool:
    # By name: importing ray.train in every worker process of the job to test a class costs seconds.
    return any(cls.__name__ == "WorkerGroupStartupTimeoutError" for cls in type(error).__mro__)


class StartupWaitInOneLine(logging.Filter):
    """Ray Train waits for the workers' resources in rounds (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s),
    and logs each round that ends without them as an error and a retried failure, two tracebacks of
    ~40 lines, without end. On a cluster that has yet to grow that is the expected wait (the driver
    warned once, naming what the workers need): one line per round instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.name == CONTROLLER_LOGGER:
            return not _is_startup_timeout(error)  # the retry policy's record below says the same
        failure = getattr(error, "controller_failure", None)
        if _is_startup_timeout(failure):
            record.msg = "still waiting for the cluster to hold %d training workers; Ray Train tries again"
            record.args, record.exc_info, record.exc_text = (failure.num_workers,), None, None
        return True


def start_ray(address: str) -> bool:
    """Connect (or start local); True when this call initialised Ray."""
    import ray

    if ray.is_initialized():
        return False
    check_reachable(address)
    if address == "local":
        _start_local_cluster()
        return True
    use_token_if_present()
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=True,
            runtime_env=_job_runtime_env(),
        )
    except (ConnectionError, RuntimeError, ValueError) as error:  # ValueError: a ray:// address without ray[client]
        reason = str(error).strip().splitlines()[0].rstrip(".")
        raise RayUnreachable(
            f"could not join the Ray cluster at {address}: {reason}. Check that the address is the head's "
            "GCS port (ray start --head prints it) and, on a token-auth cluster, that ~/.ray/auth_token or "
            "RAY_AUTH_TOKEN holds its token."
        ) from error
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    print(f"joined the Ray cluster at {address}: {nodes} node(s), {cpus:g} CPUs, {gpus:g} GPUs", flush=True)
    return True


def _start_local_cluster() -> None:
    """A private cluster for this run, without token authentication.

    Ray 2.60 turns token auth on for a new local cluster and writes ~/.ray/auth_token; from then on
    every `ray start` on the machine demands a token that drivers joining by address do not send.
    A throwaway loopback cluster needs none; an explicit RAY_AUTH_MODE still wins.
    """
    import ray

    set_here = "RAY_AUTH_MODE" not in os.environ
    if set_here:
        os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", runtime_env=_job_runtime_env())
    finally:  # set only for the start: later joins in this process decide afresh
        if set_here:
            del os.environ["RAY_AUTH_MODE"]


_WARNED: set[str] = set()  # warnings given by check_workers_fit in this process


def check_workers_fit(ray_config: RayConfig, address: str) -> None:
    """The training workers' resources against what the cluster has, once Ray is up.

    Ray Train waits for resources that never come on a local cluster (it retries the worker group's
    start every minute, without end), so there it is an error before any work. A cluster joined by
    address may add nodes on demand: there it is a warning.
    """
    import ray

    total = ray.cluster_resources()
    workers, cpus = ray_config.num_workers, ray_config.cpus_per_worker
    short = []
    if workers * cpus > (have := total.get("CPU", 0.0)):
        short.append(
            f"{workers * cpus:g} CPUs (ray.num_workers={workers} x ray.cpus_per_worker={cpus:g}) and the cluster "
            f"has {have:g}"
        )
    if ray_config.use_gpu and workers > (gpus := total.get("GPU", 0.0)):
        short.append(f"{workers} GPUs (ray.num_workers={workers}, ray.use_gpu=true) and the cluster has {gpus:g}")
    if not short:
        return
    needs = "; ".join(short)
    if address == "local":
        fixes = (
            "set ray.use_gpu=false to train on CPUs, lower ray.num_workers"
            if ray_config.use_gpu and workers > total.get("GPU", 0.0)
            else "lower ray.num_workers or ray.cpus_per_worker (fractions are allowed)"
        )
        raise ClusterTooSmall(f"the training workers need {needs}: {fixes}, or join a larger cluster with ray.address.")
    warning = (
        f"the Ray cluster at {address} cannot hold the training workers yet: they need {needs}; training waits "
        "until nodes join."
    )
    if warning not in _WARNED:  # run_pipeline checks before any stage, each training stage again
        _WARNED.add(warning)
        logging.getLogger(__name__).warning("%s", warning)
