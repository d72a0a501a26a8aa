"""Ray Train on one GPU (issue 7, point 3, on a one-GPU machine): kill -9 of the training worker mid-run,
and the restarted group continues the loss curve exactly, from the newest whole checkpoint in storage.

    python -m pytest tests/gpu/test_ray_train_one_gpu.py -v       # a CUDA GPU, deepspeed and ray installed
    RWKV_MULTI_GPU_ON_CPU=1 python -m pytest --noconftest tests/gpu/test_ray_train_one_gpu.py -v   # gloo, CPU

The worker is killed from the driver's metrics callback right after it logs step KILL_AFTER, which races
with that step's checkpoint and with Ray's record of it: steps of milliseconds outrun Ray's record, and
before the restarted group looked in storage itself it went back to step 0. Same model, data and
settings as tests/gpu/test_multi_gpu.py, one worker instead of two.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from test_multi_gpu import EVERY, ON_CPU, RESUME_RTOL, STEPS, byte_shards, model_section, train_section
from train_fixtures import step_records

KILL_AFTER = 12


def _missing() -> str | None:
    import importlib.util

    for module in ("deepspeed", "ray"):
        if importlib.util.find_spec(module) is None:
            return f"needs {module}"
    if not ON_CPU and not torch.cuda.is_available():
        return "needs a CUDA GPU; RWKV_MULTI_GPU_ON_CPU=1 runs it on CPU"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def one_worker_run(shards: Path, out: Path, kill_after: int | None) -> list[int]:
    """Pretraining through Ray Train on one worker; the pids killed (kill -9) once step `kill_after` is logged."""
    from orchestration.cluster import start_ray
    from orchestration.config import build_config
    from orchestration.ray_train import train_on_ray

    config = build_config(
        {
            "model": model_section(),
            "train": train_section(zero_stage=2),
            "ray": {"num_workers": 1, "use_gpu": not ON_CPU, "cpus_per_worker": 1, "max_retries": 1},
        }
    )
    start_ray("local")
    killed: list[int] = []

    def kill_on(metrics: dict, step: int) -> None:
        if step == kill_after and "loss" in metrics and not killed:
            pid = int((out / "workers" / "rank_00000.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    train_on_ray(config, shards, out, log_metrics=kill_on)
    return killed


def test_a_killed_worker_resumes_from_the_newest_whole_checkpoint_exactly(tmp_path: Path) -> None:
    shards = byte_shards(tmp_path / "shards")
    one_worker_run(shards, tmp_path / "clean", kill_after=None)
    killed = one_worker_run(shards, tmp_path / "killed", kill_after=KILL_AFTER)
    assert killed, "no worker was killed"
    out = tmp_path / "killed"
    resumed_from = json.loads((out / "train_result.json").read_text())["resumed_from"]
    resumed_at = int(re.search(r"step_(\d{8})", resumed_from).group(1))
    assert resumed_at % EVERY == 0 and 0 < resumed_at <= KILL_AFTER, resumed_from  # mid-run, not step 0
    clean, resumed = step_records(tmp_path / "clean"), step_records(out)
    assert sorted(resumed) == sorted(clean) == list(range(STEPS))
    for step in range(resumed_at, STEPS):
        assert resumed[step]["samples"] == clean[step]["samples"], step
        assert abs(resumed[step]["loss"] - clean[step]["loss"]) <= RESUME_RTOL * abs(clean[step]["loss"]), step
    # Ray kept the newest two of what it recorded; the driver pruned any it never recorded.
    assert sorted(p.name for p in (out / "ray" / "pretrain").glob("step_*")) == [
        f"step_{STEPS - EVERY:08d}",
        f"step_{STEPS:08d}",
    ]
    worker = json.loads((out / "workers" / "rank_00000.env.json").read_text())
    assert worker["pid"] != killed[0] and worker["node_id"] and worker["backend"] == ("gloo" if ON_CPU else "nccl")
    run_key = hashlib.sha256(str(out / "ray" / "pretrain").encode()).hexdigest()[:12]
    assert list(Path(tempfile.gettempdir()).glob(f"rwkv-ckpt-{run_key}-rank*")) == []  # the killed one's too
