"""Environment every training process gets before it talks NCCL: NVLink multicast off.

    from pipeline.distributed_env import keep_multicast_off
    keep_multicast_off()  # before the process group's first collective

NVLink SHARP / multicast (NCCL's NVLS algorithms, PyTorch's symmetric-memory multicast, NVSHMEM's
NVLS) can put a shared host's GPUs out of service when a program misuses it, and the data-parallel
all-reduces here gain little from it, so it stays off. The values are defaults: a variable already
set in the environment is kept. orchestration/cluster.py passes the same variables to every Ray
worker through the job's runtime environment, since Ray Train sets up the process group before the
training loop runs.
"""

from __future__ import annotations

import os

NVLINK_MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def multicast_off_env() -> dict[str, str]:
    """The three variables, with any value already set in this process's environment kept."""
    return {name: os.environ.get(name, value) for name, value in NVLINK_MULTICAST_OFF.items()}


def keep_multicast_off() -> None:
    """Set the variables in this process (inherited by the processes it starts)."""
    os.environ.update(multicast_off_env())
