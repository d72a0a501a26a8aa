"""What every Ray worker of our jobs sees in its environment: NVLink multicast off, Ray Train's print left alone."""

from __future__ import annotations

import json
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
print(json.dumps(ray.get(ray.remote(lambda: {name: os.environ.get(name) for name in names}).remote())))
"""


def test_ray_tasks_get_multicast_off_and_unpatched_print(ray_address: str):
    names = [*NVLINK_MULTICAST_OFF, "RAY_TRAIN_ENABLE_PRINT_PATCH"]
    env = {k: v for k, v in os.environ.items() if k not in names}  # the driver sets none of them itself
    done = subprocess.run(
        [sys.executable, "-c", PROBE, ray_address, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {**NVLINK_MULTICAST_OFF, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def test_a_value_already_set_is_kept(monkeypatch):
    from pipeline.distributed_env import keep_multicast_off, multicast_off_env

    for name in NVLINK_MULTICAST_OFF:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    keep_multicast_off()
    assert {name: os.environ[name] for name in NVLINK_MULTICAST_OFF} == NVLINK_MULTICAST_OFF
    monkeypatch.setenv("NVSHMEM_DISABLE_NVLS", "0")  # someone's explicit choice wins
    assert multicast_off_env()["NVSHMEM_DISABLE_NVLS"] == "0"
