"""Fixtures shared by the unit tests that build DeepSpeed engines."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def world_of_one():
    """One gloo world for the module: DeepSpeed caches its groups, so it is not torn down between tests."""
    from pipeline.engine import _free_port, init_process_group

    with pytest.MonkeyPatch.context() as patch:
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
            patch.setenv(key, value)
        patch.setenv("MASTER_PORT", str(_free_port()))
        init_process_group("cpu")
        yield
    import deepspeed.comm
    import torch.distributed as dist

    if dist.is_initialized():
        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups, for later tests
