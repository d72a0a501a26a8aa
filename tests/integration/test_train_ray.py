"""Pretraining on Ray Train: 2 CPU workers (gloo), real DeepSpeed ZeRO-2, a real local Ray cluster, real text.

Checks the three things the launch must do: the loss falls well below its start, per-step metrics
reach the driver's callback from rank 0, and checkpoints (both ranks' ZeRO shards merged by Ray)
are written and pruned to `keep_checkpoints`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
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

    # Metrics from rank 0 only, every log_every steps. After the restart the group reports again what
    # its checkpoint holds (a driver may have lost it), then replays the steps since, with the same mean
    # losses (exact resume under Ray Train).
    train_logs = [(step, metrics["loss"]) for step, metrics in logged if "loss" in metrics]
    steps = [step for step, _ in train_logs]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    before, after = dict(train_logs[:restart]), dict(train_logs[restart:])
    assert list(before) == list(range(5, max(before) + 1, 5)) and max(before) >= KILL_AFTER
    assert list(after) == list(range(min(after), STEPS + 1, 5)) and min(after) <= KILL_AFTER
    # Resumed from the newest whole checkpoint, not from scratch: step 10, or step 20 when the driver passed
    # step 15 on only after that one was whole. These steps take milliseconds: Ray's record can lag the
    # kill, and then the restarted group finds the checkpoint whole in storage (orchestration/ray_train.py,
    # newer_stored_checkpoint; before that it started at step 0). It first reports again what the
    # checkpoint holds, up to its own step, then goes on.
    resumed_from = json.loads((out / "train_result.json").read_text())["resumed_from"]
    resumed_at = int(re.search(r"step_(\d{8})", resumed_from).group(1))
    assert resumed_at in (10, 20), resumed_from
    replayed = list(itertools.takewhile(lambda step: step <= resumed_at, steps[restart:]))
    assert replayed[-2:] == [resumed_at - 5, resumed_at], steps
    assert steps[restart + len(replayed)] == resumed_at + 5, steps
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

    # Where each rank ran; and no rank's staging folder is left on this node, not even the killed one's.
    worker = json.loads((out / "workers" / "rank_00001.env.json").read_text())
    assert worker["hostname"] == socket.gethostname() and worker["node_id"]
    run_key = hashlib.sha256(str(out / "ray" / "pretrain").encode()).hexdigest()[:12]
    assert list(Path(tempfile.gettempdir()).glob(f"rwkv-ckpt-{run_key}-rank*")) == []


WAIT_PROBE = """
import sys
from orchestration.config import load_config
from orchestration.ray_train import train_on_ray

config, shards, out, address = sys.argv[1:]
overrides = [f"ray.address={address}", "ray.num_workers=3", "ray.cpus_per_worker=1", "ray.use_gpu=false"]
train_on_ray(load_config(config, overrides), shards, out)
"""


def test_waiting_for_a_joined_cluster_to_grow_is_one_line_a_round(shards: Path, tmp_path: Path, ray_address: str):
    """Three 1-CPU workers on the 2-CPU test cluster: Ray Train waits in rounds, which the driver's
    environment shortens to 2 s here; each round is one line, not two tracebacks; Ctrl-C stops the wait."""
    config = tiny_config(tmp_path / "run.yaml")
    console = tmp_path / "console.log"
    env = dict(os.environ, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="2", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-c", WAIT_PROBE, str(config), str(shards), str(tmp_path / "out"), ray_address]
    with open(console, "wb") as sink:
        driver = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while console.read_text(errors="replace").count("still waiting for the cluster") < 2:
            assert driver.poll() is None and time.monotonic() < deadline, console.read_text()[-3000:]
            time.sleep(0.5)
        driver.send_signal(signal.SIGINT)
        driver.wait(timeout=60)
    output = console.read_text(errors="replace")
    assert "still waiting for the cluster to hold 3 training workers; Ray Train tries again" in output
    assert output.count("cannot hold the training workers yet: they need 3 CPUs") == 1, output[-3000:]
    assert "WorkerGroupStartupTimeoutError" not in output and "Error in control loop" not in output, output[-3000:]


def test_told_to_stop_the_metrics_pump_hands_on_what_is_queued_and_does_not_wait_for_more(ray_driver: str):
    """Ctrl-C: the workers may go on reporting until Ray ends them; the driver must not wait for a pause."""
    import threading

    from ray.util.queue import Queue

    from orchestration.ray_train import _pump

    queue = Queue(actor_options={"num_cpus": 0})
    delivered: list[int] = []
    stop, pump_done, put = threading.Event(), threading.Event(), []

    def worker() -> None:  # reports every 50 ms until the pump is gone (or 60 s)
        deadline = time.monotonic() + 60
        while not pump_done.is_set() and time.monotonic() < deadline:
            queue.put(({"loss": 1.0}, len(put)))
            put.append(len(put))
            time.sleep(0.05)

    producer = threading.Thread(target=worker)
    producer.start()

    def driver() -> None:
        _pump(queue, lambda metrics, step: delivered.append(step), stop)
        pump_done.set()

    pump = threading.Thread(target=driver)
    pump.start()
    while len(put) < 10:
        time.sleep(0.01)
    queued_at_stop = len(put)
    stop.set()
    pump.join(30)
    producer.join(70)
    assert pump_done.is_set(), "the pump waited for the reports to pause"
    assert delivered[:queued_at_stop] == list(range(queued_at_stop))  # nothing queued before the stop lost
    assert len(put) < 500  # it stopped well before the producer's 60 s ran out
