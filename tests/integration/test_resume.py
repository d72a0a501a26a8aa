"""Exact resume: kill -9 a 2-process DeepSpeed run mid-way, rerun it, and get the uninterrupted run back.

Each run is `torchrun --nproc-per-node 2 -m orchestration.train` (gloo, ZeRO-2, fp32, real DeepSpeed)
on real text. `train.sample_log` makes every rank append {step, samples, loss} per optimizer step,
which is how we check the data: after the rerun, the last record of each step is the one that
counts, and those must read every global sample index exactly once and match the clean run.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from train_fixtures import single_thread_env, stdlib_shards, tiny_config

STEPS, WORLD, MICRO_BSZ = 40, 2, 4
KILL_AT = 25  # the newest complete checkpoint is then step 20: steps 21..25 are replayed


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stdlib_shards(tmp_path_factory)


def _command(config: Path, shards: Path, out: Path, nproc: int = WORLD) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "orchestration.train",
        str(config),
        "--data",
        str(shards),
        "--out",
        str(out),
    ]


def _run(command: list[str], timeout: float = 180) -> str:
    done = subprocess.run(command, env=single_thread_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _records(out: Path, rank: int) -> list[dict]:
    lines = (out / "samples" / f"rank_{rank:05d}.jsonl").read_text().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by kill -9
            pass
    return records


def _trajectory(out: Path, rank: int) -> dict[int, dict]:
    """The record that counts for each step: the last one written (a replayed step overwrites)."""
    return {record["step"]: record for record in _records(out, rank)}


def _kill_at_step(command: list[str], out: Path, step: int, timeout: float = 180) -> None:
    process = subprocess.Popen(
        command, env=single_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    log = out / "samples" / "rank_00000.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and sum(1 for _ in log.open()) >= step:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    # torchrun starts each worker in its own session, so collect the whole tree, then SIGKILL all of it.
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in tree:
        member.send_signal(signal.SIGKILL)
    process.wait()
    psutil.wait_procs(tree, timeout=30)


def test_kill9_then_rerun_equals_uninterrupted_run(shards: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "run.yaml", steps=STEPS, sample_log=True)
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    _run(_command(config, shards, clean))

    _kill_at_step(_command(config, shards, crashed), crashed, KILL_AT)
    assert not (crashed / "train_result.json").exists()
    killed_steps = len(_records(crashed, 0))
    assert KILL_AT <= killed_steps < STEPS
    stdout = _run(_command(config, shards, crashed))
    resumed = re.search(r"resumed from \S+/step_(\d+) at step (\d+)", stdout)
    assert resumed is not None, stdout[-2000:]
    resumed_at = int(resumed.group(2))
    # The newest complete checkpoint (every 10 steps); the one being written at the kill may be incomplete.
    assert resumed_at % 10 == 0 and killed_steps - 20 < resumed_at <= killed_steps

    # Per-step loss (the all-reduced mean, logged by every rank) and data: equal to the clean run.
    for rank in range(WORLD):
        clean_steps, crashed_steps = _trajectory(clean, rank), _trajectory(crashed, rank)
        assert sorted(crashed_steps) == sorted(clean_steps) == list(range(STEPS))
        for step in range(STEPS):
            a, b = clean_steps[step]["loss"], crashed_steps[step]["loss"]
            assert abs(a - b) <= 1e-6 * abs(a), f"rank {rank} step {step}: loss {b} after resume vs {a}"
            assert crashed_steps[step]["samples"] == clean_steps[step]["samples"]
        # Steps replayed after the kill re-read exactly what they read before it.
        for record in _records(crashed, rank)[:killed_steps]:
            if record["step"] >= resumed_at:
                assert record["samples"] == crashed_steps[record["step"]]["samples"]

    # No sample read twice or skipped: the counted steps cover indices 0..STEPS*WORLD*MICRO_BSZ-1 once.
    read = [i for rank in range(WORLD) for rec in _trajectory(crashed, rank).values() for i in rec["samples"]]
    assert sorted(read) == list(range(STEPS * WORLD * MICRO_BSZ))

    # Final weights equal.
    clean_weights = torch.load(clean / "final_weights.pt", weights_only=True)
    resumed_weights = torch.load(crashed / "final_weights.pt", weights_only=True)
    assert clean_weights.keys() == resumed_weights.keys()
    for name, tensor in clean_weights.items():
        error = (resumed_weights[name] - tensor).abs().max() / tensor.abs().max().clamp_min(1e-30)
        assert error <= 1e-6, f"{name}: relative difference {error:.2e}"
    # Old checkpoints were pruned to keep_checkpoints = 2.
    assert sorted(p.name for p in (crashed / "checkpoints").glob("step_*")) == ["step_00000030", "step_00000040"]


def test_nonfinite_losses_stop_with_message_and_keep_last_good_checkpoint(shards: Path, tmp_path: Path) -> None:
    # An absurd constant LR without clipping blows the weights up within two steps; every later loss
    # is NaN and, being skipped, leaves the weights as they were, so the run must stop after 3.
    config = tiny_config(
        tmp_path / "nan.yaml",
        steps=30,
        lr_init=1e5,
        lr_final=1e5,
        warmup_steps=0,
        grad_clip=0.0,
        checkpoint_every=1,
        log_every=1,
        max_bad_steps=3,
    )
    out = tmp_path / "nan"
    done = subprocess.run(
        [sys.executable, "-m", "orchestration.train", str(config), "--data", str(shards), "--out", str(out)],
        env=single_thread_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "the loss was not finite for 3 steps in a row" in done.stderr
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    last_good = checkpoints[-1]
    assert f"The last good checkpoint is {out / 'checkpoints' / last_good}" in done.stderr
    first_bad = int(last_good.removeprefix("step_")) + 1
    assert f"(steps {first_bad}..{first_bad + 2})" in done.stderr
    assert "bad_steps=3" not in done.stdout  # the run stopped before logging a third bad step

    # The same output directory with another model width: the checkpoint is refused, shapes named.
    wider = subprocess.run(
        [sys.executable, "-m", "orchestration.train", str(config), "model.n_embd=32", "--data", str(shards)]
        + ["--out", str(out)],
        env=single_thread_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert wider.returncode == 2, wider.stdout[-2000:] + wider.stderr[-2000:]
    assert "was written by a different model config" in wider.stderr
    assert "emb.weight: checkpoint (512, 64) vs model (512, 32)" in wider.stderr
