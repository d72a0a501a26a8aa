"""What every Ray worker of our jobs sees in its environment: NVLink multicast off, Ray Train's print left alone,
"auto" pinned to its own cluster, Ray Train's placement-group cleaner kept to errors, its per-run INFO lines out."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from pipeline.distributed_env import NVLINK_MULTICAST_OFF

PROBE = """
import json, os, sys
import ray
from orchestration.cluster import start_ray

start_ray(sys.argv[1])
names = json.loads(sys.argv[2])


@ray.remote
def seen():
    import logging

    from orchestration.cluster import PLACEMENT_GROUP_CLEANER_LOGGER

    import ray.train._internal.storage as storage_v1
    import ray.train.v2._internal.execution.checkpoint.checkpoint_manager as manager
    import ray.train.v2._internal.execution.context as context
    import ray.train.v2._internal.execution.storage as storage

    return {
        "env": {name: os.environ.get(name) for name in names},
        "ray_address": os.environ.get("RAY_ADDRESS"),
        "cleaner_level": logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).getEffectiveLevel(),
        "report_info_kept": [
            bool(module.logger.filter(logging.LogRecord("ray", logging.INFO, "probe", 0, "report", None, None)))
            for module in (context, storage, storage_v1, manager)
        ],
        "manager_warning_kept": bool(
            manager.logger.filter(logging.LogRecord("ray", logging.WARNING, "probe", 0, "warning", None, None))
        ),
    }


print(json.dumps({"gcs_address": ray.get_runtime_context().gcs_address, **ray.get(seen.remote())}))
"""


def test_ray_tasks_get_multicast_off_unpatched_print_and_their_own_cluster(ray_address: str):
    names = [*NVLINK_MULTICAST_OFF, "RAY_TRAIN_ENABLE_PRINT_PATCH"]
    # The driver sets none of them itself; RAY_ADDRESS is left out so that only the workers' hook sets it.
    env = {k: v for k, v in os.environ.items() if k not in [*names, "RAY_ADDRESS"]}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, ray_address, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["env"] == {**NVLINK_MULTICAST_OFF, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    # Ray's state API looks for "auto" here, not in /tmp/ray/ray_current_cluster (often a dead cluster).
    assert seen["ray_address"] == seen["gcs_address"]
    assert seen["cleaner_level"] == logging.ERROR
    # Ray Train's per-report INFO lines, and its checkpoint manager's advice on a resume to delete the folder
    assert seen["report_info_kept"] == [False] * 4 and seen["manager_warning_kept"]


def test_a_value_already_set_is_kept(monkeypatch):
    from pipeline.distributed_env import keep_multicast_off, multicast_off_env

    for name in NVLINK_MULTICAST_OFF:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    keep_multicast_off()
    assert {name: os.environ[name] for name in NVLINK_MULTICAST_OFF} == NVLINK_MULTICAST_OFF
    monkeypatch.setenv("NVSHMEM_DISABLE_NVLS", "0")  # someone's explicit choice wins
    assert multicast_off_env()["NVSHMEM_DISABLE_NVLS"] == "0"
