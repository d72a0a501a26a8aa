"""Pretraining on Ray Train: 2 CPU workers (gloo), real DeepSpeed ZeRO-2, a real local Ray cluster, real text.

Checks the three things the launch must do: the loss falls well below its start, per-step metrics
reach the driver's callback from rank 0, and checkpoints (both ranks' ZeRO shards merged by Ray)
are written and pruned to `keep_checkpoints`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from train_fixtures import stdlib_shards, tiny_config

from orchestration.config import load_config

STEPS = 40
KILL_AFTER = 15


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stdlib_shards(tmp_path_factory)


@pytest.fixture
def ray_driver(ray_address: str) -> Iterator[str]:
    import ray

    from orchestration.cluster import start_ray

    started = start_ray(ray_address)  # sends the local auth token when the cluster wants one
    yield ray_address
    if started:
        ray.shutdown()


def test_two_workers_zero2_loss_falls_metrics_and_checkpoints(shards: Path, tmp_path: Path, ray_driver: str) -> None:
    from orchestration.ray_train import train_on_ray
    from pipeline.checkpoint import read_state

    config = load_config(
        tiny_config(tmp_path / "run.yaml", steps=STEPS, log_every=5, val_every=20, checkpoint_every=10),
        [f"ray.address={ray_driver}", "ray.num_workers=2", "ray.cpus_per_worker=1", "ray.use_gpu=false"],
    )
    out = tmp_path / "out"
    logged: list[tuple[int, dict[str, float]]] = []
    killed: list[int] = []

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        logged.append((step, metrics))
        if step == KILL_AFTER and not killed:
            # kill -9 a worker (rank 1) mid-run: Ray Train must restart the group from the last checkpoint.
            pid = int((out / "workers" / "rank_00001.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    result = train_on_ray(config, shards, out, log_metrics=log_metrics)
    assert killed

    # Metrics from rank 0 only, every log_every steps. After the restart the steps since the last
    # checkpoint are replayed, and with the same mean losses (exact resume under Ray Train).
    train_logs = [(step, metrics["loss"]) for step, metrics in logged if "loss" in metrics]
    steps = [step for step, _ in train_logs]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    before, after = dict(train_logs[:restart]), dict(train_logs[restart:])
    assert list(before) == list(range(5, max(before) + 1, 5)) and max(before) >= KILL_AFTER
    assert list(after) == list(range(min(after), STEPS + 1, 5)) and min(after) <= KILL_AFTER
    assert (min(after) - 5) % 10 == 0  # resumed from a checkpoint (every 10 steps)
    for step in set(before) & set(after):
        assert after[step] == before[step], (step, before[step], after[step])
    losses = [after.get(step, before.get(step)) for step in range(5, STEPS + 1, 5)]
    assert losses[-1] < losses[0] - 1.5, losses  # e.g. ~7.8 -> ~4.5 nats
    for _, metrics in logged:
        if "loss" in metrics:
            assert {"lr", "tokens_per_s", "tokens_seen", "mfu", "grad_norm"} <= metrics.keys()
    val = {step: metrics["val_loss"] for step, metrics in logged if "val_loss" in metrics}
    assert sorted(val) == [20, 40] and val[40] < losses[0]
    assert result["metrics"]["step"] == STEPS

    # Checkpoints: Ray kept the newest two, each complete with both ranks' ZeRO-2 optimizer shards.
    final = Path(result["checkpoint"])
    assert final.name == f"step_{STEPS:08d}"
    assert read_state(final)["step"] == STEPS
    assert (final / "COMPLETE").is_file()
    assert sorted(p.name for p in final.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert sorted(p.name for p in final.parent.glob("step_*")) == ["step_00000030", "step_00000040"]
    assert (out / "final_weights.pt").is_file()
