"""Data-parallel training on 2 GPUs of one host: Ray Train + NCCL, ZeRO-2/3, kill -9 and exact resume,
checkpoints across world sizes (issue 7). A 2-layer, 128-wide RWKV-4 on byte-level real text, so the
whole file runs in a few minutes.

    python -m pytest tests/gpu/test_multi_gpu.py -v          # >= 2 CUDA GPUs, deepspeed and ray installed
    RWKV_MULTI_GPU_ON_CPU=1 python -m pytest --noconftest tests/gpu/test_multi_gpu.py -v   # same paths, gloo

Skipped, with the reason, unless there are >= 2 CUDA GPUs and deepspeed and ray import. The CPU mode
(opt-in, 2 gloo workers, torch WKV, fp32) runs the same code paths but NCCL, to debug this file without
a GPU machine; `--noconftest` because tests/conftest.py skips tests/gpu/ without CUDA.

What must hold (GPU: bf16, cuda WKV kernel, one Ray Train worker per GPU, NCCL):
* ZeRO-2 and ZeRO-3 runs train (loss falls), each rank on its own GPU with the NCCL process group, and
  every training worker process sees the three NVLink-multicast-off variables (read back in the worker).
* kill -9 of rank 1 mid-run: Ray Train restarts the group from the last checkpoint; every step after the
  restart has the loss of the uninterrupted run, to RESUME_RTOL (measured 0.0 with gloo on CPU and with
  NCCL on 2 H200s, docs/benchmarks.md "Multi-GPU scaling").
* The final checkpoint holds both ranks' ZeRO shards: `zero_pp_rank_*` in fp32, `bf16_zero_pp_rank_*`
  when DeepSpeed's bf16 mode wrote them (ZeRO-2 on the GPUs).
* The 2-GPU checkpoints (ZeRO-2 and ZeRO-3) export to consolidated fp32 weights whose bf16 rounding is the
  live bf16 weights exactly, and the exported model gives the live model's logits exactly on one GPU and on
  the CPU (after that rounding); fp32 logits of the export on GPU vs CPU agree to XDEVICE_RTOL.
* fp32 checkpoints move between world sizes: 1 GPU -> 2 GPUs and 2 GPUs -> 1 GPU (standalone entry,
  torchrun + NCCL): the first resumed step's loss equals the writer's to 1e-6 relative (the weights came
  back), the second to SECOND_STEP_RTOL (the first update used the restored Adam moments; one step of
  another reduction order: 2 ranks' all-reduce vs 2 accumulated micro-steps, which Adam amplifies on
  near-zero gradients), every later one the uninterrupted 1-GPU run's to PORT_RTOL (a resume that lost
  the optimizer state is off by ~1e-2: tests/integration/test_checkpoint_portability.py).
Set MULTI_GPU_REPORT=FILE to append the measured figures there as JSON lines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))  # the training test helpers
from train_fixtures import run_ok, step_records, train_command  # noqa: E402

ON_CPU = os.environ.get("RWKV_MULTI_GPU_ON_CPU") == "1"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback clusters only (as tests/conftest.py does)
# Ray Train's controller polls the workers (reports, failures) every 2 s by default; tiny GPU steps take
# milliseconds, so poll faster to register checkpoints (and notice the kill) well before the run ends.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def _missing() -> str | None:
    for module in ("deepspeed", "ray"):
        if importlib.util.find_spec(module) is None:
            return f"needs {module}"
    if not ON_CPU and torch.cuda.device_count() < 2:
        return f"needs >= 2 CUDA GPUs (found {torch.cuda.device_count()}); RWKV_MULTI_GPU_ON_CPU=1 runs it on CPU"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")

DEVICE = "cpu" if ON_CPU else "cuda"
PRECISION = "fp32" if ON_CPU else "bf16"
BACKEND = "torch" if ON_CPU else "cuda"
STEPS, EVERY, KILL_AFTER = 30, 6, 12  # kill once Ray holds the step-12 checkpoint
RESUME_RTOL = 1e-6
PORT_STEPS, PORT_K = 18, 6
PORT_RTOL, SECOND_STEP_RTOL = 2e-3, 2e-4  # CPU/gloo measured 4.8e-4 and 4.2e-5
XDEVICE_RTOL = 1e-4
DATA_VOCAB, MODEL_VOCAB = 257, 384  # bytes + 1 (0 is eod); the model pads to a multiple of 128


def record(**figures: object) -> None:
    """Print a measured figure and append it to $MULTI_GPU_REPORT (the device run's summary)."""
    print("MEASURED " + json.dumps(figures), flush=True)
    if os.environ.get("MULTI_GPU_REPORT"):
        with open(os.environ["MULTI_GPU_REPORT"], "a") as handle:
            handle.write(json.dumps(figures) + "\n")


def byte_shards(out_dir: Path) -> Path:
    """Real text without a tokenizer: stdlib sources (json, email, asyncio; ~0.9 MB) as bytes + 1, eod 0."""
    from tokenization.manifest import MANIFEST, shard_name
    from tokenization.shards import ShardWriter
    from tokenization.tokenizer import TokenizerInfo

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for package in ("json", "email", "asyncio") for path in (stdlib / package).glob("*.py"))
    documents = [np.append(np.frombuffer(path.read_bytes(), np.uint8).astype(np.uint16) + 1, 0) for path in files]
    config = {"model_type": "bytes", "vocab_size": DATA_VOCAB}
    info = TokenizerInfo("bytes-plus-one", DATA_VOCAB, 0, -1, 1, "bytes", config)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, (split, docs) in enumerate((("train", documents[8:]), ("val", documents[:8]))):
        with ShardWriter(out_dir / shard_name(split, index), info, split=split) as writer:
            writer.write(docs)
        shards.append(writer.record.__dict__)
    tokenizer = {"sha256": info.model_sha256, "vocab_size": DATA_VOCAB, "eod_id": 0, "pad_id": -1, "config": config}
    (out_dir / MANIFEST).write_text(json.dumps({"format_version": 1, "tokenizer": tokenizer, "shards": shards}))
    return out_dir


def train_section(**overrides: object) -> dict:
    return {
        "ctx_len": 128,
        "micro_bsz": 4,
        "steps": STEPS,
        "lr_init": 3e-3,
        "lr_final": 1e-3,
        "warmup_steps": 4,
        "precision": PRECISION,
        "log_every": 2,
        "val_every": STEPS,
        "val_batches": 2,
        "checkpoint_every": EVERY,
        "keep_checkpoints": 2,
        "sample_log": True,
        **overrides,
    }


def model_section() -> dict:
    return {"n_layer": 2, "n_embd": 128, "vocab_size": MODEL_VOCAB, "wkv_backend": BACKEND}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return byte_shards(tmp_path_factory.mktemp("bytes") / "shards")


def ray_run(shards: Path, out: Path, zero_stage: int, kill_rank1_after: int | None = None) -> dict:
    """Pretraining through Ray Train on 2 workers (one GPU each, NCCL; gloo in CPU mode); driver-side logs."""
    from orchestration.config import build_config
    from orchestration.ray_train import train_on_ray

    config = build_config(
        {
            "model": model_section(),
            "train": train_section(zero_stage=zero_stage),
            "ray": {"num_workers": 2, "use_gpu": not ON_CPU, "cpus_per_worker": 1, "max_retries": 1},
        }
    )
    import ray

    from orchestration.cluster import start_ray

    start_ray("local")  # what train_on_ray joins; fail fast (not hang waiting) if the workers cannot fit
    resources = ray.cluster_resources()
    assert resources.get("CPU", 0) >= 2 and resources.get("GPU", 0) >= (0 if ON_CPU else 2), resources
    logged: list[tuple[int, dict]] = []
    killed: list[int] = []
    stop = threading.Event()

    def kill_rank1() -> None:
        # kill -9 rank 1 as soon as Ray Train has registered a checkpoint at step >= kill_rank1_after (its
        # controller polls the workers; a checkpoint a worker wrote but Ray never registered is not resumed).
        from orchestration.ray_train import RAY_CHECKPOINT_RECORD

        snapshot = out / "ray" / "pretrain" / RAY_CHECKPOINT_RECORD
        while not stop.wait(0.01):
            registered = (
                [int(n) for n in re.findall(r"step_(\d{8})", snapshot.read_text())] if snapshot.is_file() else []
            )
            if max(registered, default=0) >= kill_rank1_after:
                pid = int((out / "workers" / "rank_00001.pid").read_text())
                os.kill(pid, signal.SIGKILL)  # as a crash would; Ray Train must restart the group
                killed.append(pid)
                return

    watcher = threading.Thread(target=kill_rank1, daemon=True)
    if kill_rank1_after is not None:
        watcher.start()
    try:
        result = train_on_ray(config, shards, out, log_metrics=lambda metrics, step: logged.append((step, metrics)))
    finally:
        stop.set()
    losses = [(step, metrics["loss"]) for step, metrics in logged if "loss" in metrics]
    return {"result": result, "losses": losses, "killed": killed, "out": out}


@pytest.fixture(scope="module")
def zero2_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return ray_run(shards, tmp_path_factory.mktemp("zero2") / "out", zero_stage=2)


def check_trained(run: dict, zero_stage: int) -> None:
    """Loss fell; Ray holds the final checkpoint with both ranks' ZeRO shards; worker records as required."""
    out, losses = run["out"], dict(run["losses"])
    assert sorted(losses) == list(range(2, STEPS + 1, 2)), losses
    assert losses[STEPS] < losses[2] - 1.0, losses  # ~5.3 -> ~3 nats on bytes
    final = Path(run["result"]["checkpoint"])
    assert final.name == f"step_{STEPS:08d}" and (final / "COMPLETE").is_file()
    shard_kind = "model_states" if zero_stage == 3 else "optim_states"
    assert len(list(final.glob(f"*zero_pp_rank_*_mp_rank_00_{shard_kind}.pt"))) == 2
    workers = [json.loads((out / "workers" / f"rank_{rank:05d}.env.json").read_text()) for rank in (0, 1)]
    from pipeline.distributed_env import NVLINK_MULTICAST_OFF

    for worker in workers:
        assert worker["env"] == NVLINK_MULTICAST_OFF, worker  # read in the training worker process itself
        assert worker["backend"] == ("gloo" if ON_CPU else "nccl"), worker
    if not ON_CPU:
        assert [w["local_rank"] for w in workers] == [0, 1]
        assert workers[0]["gpu_uuid"] != workers[1]["gpu_uuid"], workers  # one GPU per worker
    record(
        test=f"ray_zero{zero_stage}",
        loss_first_window=losses[2],
        loss_last_window=losses[STEPS],
        workers=[{k: w[k] for k in ("env", "backend", "cuda_visible_devices", "gpu_uuid")} for w in workers],
    )


def test_ray_train_two_gpus_zero2(zero2_run: dict) -> None:
    check_trained(zero2_run, zero_stage=2)


def test_kill_one_worker_then_loss_curve_continues_exactly(zero2_run: dict, shards: Path, tmp_path: Path) -> None:
    killed = ray_run(shards, tmp_path / "out", zero_stage=2, kill_rank1_after=KILL_AFTER)
    assert killed["killed"], "no worker was killed"
    # The restarted group resumed from a checkpoint Ray held (rank 0's train_result.json names it), mid-run.
    resumed_from = json.loads((killed["out"] / "train_result.json").read_text())["resumed_from"]
    resumed_at = int(re.search(r"step_(\d{8})", resumed_from).group(1))
    assert resumed_at % EVERY == 0 and KILL_AFTER <= resumed_at < STEPS, resumed_from
    # Per-step losses (sample logs; a replayed step's last record counts) against the uninterrupted run.
    clean, resumed = step_records(zero2_run["out"]), step_records(killed["out"])
    assert sorted(resumed) == sorted(clean) == list(range(STEPS))
    errors = {s: abs(resumed[s]["loss"] - clean[s]["loss"]) / abs(clean[s]["loss"]) for s in range(resumed_at, STEPS)}
    for step in range(STEPS):
        assert resumed[step]["samples"] == clean[step]["samples"], step  # same global samples each step
    new_pids = {json.loads((killed["out"] / "workers" / f"rank_{r:05d}.env.json").read_text())["pid"] for r in (0, 1)}
    assert killed["killed"][0] not in new_pids  # the records are the restarted group's
    record(
        test="kill_resume",
        resumed_at_step=resumed_at,
        steps_compared=len(errors),
        max_rel_loss_diff=max(errors.values()),
        rtol=RESUME_RTOL,
    )
    assert max(errors.values()) <= RESUME_RTOL, errors
    check_trained(killed, zero_stage=2)


def check_export(run: dict, label: str) -> None:
    """Consolidated export of the run's final 2-worker checkpoint vs the live weights (final_weights.pt)."""
    from model import ModelConfig, build_model
    from model.checkpoint import load_rwkv4_pth
    from pipeline.checkpoint import consolidated_state_dict, export_rwkv4_pth, read_state

    checkpoint = Path(run["result"]["checkpoint"])
    merged = consolidated_state_dict(checkpoint)  # offline, no process group: fp32 masters
    live = torch.load(run["out"] / "final_weights.pt", weights_only=True)  # the engine's module weights
    assert merged.keys() == live.keys()
    live_dtype = torch.bfloat16 if PRECISION == "bf16" else torch.float32
    for name, tensor in live.items():  # bf16 training: the module holds the masters rounded to bf16
        assert torch.equal(merged[name].to(live_dtype).float(), tensor), name
    pth = run["out"] / f"export-{label}.pth"
    export_rwkv4_pth(checkpoint, pth)

    config = ModelConfig(**{**read_state(checkpoint)["model_config"], "wkv_backend": "auto"})
    tokens_BT = torch.randint(1, DATA_VOCAB, (2, 96), generator=torch.Generator().manual_seed(0))
    figures: dict[str, float] = {}
    fp32_logits = {}
    for device in ["cpu"] + ([] if ON_CPU else ["cuda:0"]):  # the CPU and one GPU
        live_model = build_model(config).eval()
        live_model.load_state_dict(live)
        exported = load_rwkv4_pth(pth).eval()
        with torch.no_grad():
            fp32_logits[device] = exported.to(device)(tokens_BT.to(device)).float().cpu()
            for p in exported.parameters():
                p.copy_(p.to(live_dtype).float())  # the documented rounding, nothing else
            got = exported(tokens_BT.to(device)).cpu()
            expected = live_model.to(device)(tokens_BT.to(device)).cpu()
        assert torch.equal(got, expected), f"{label} on {device}: {(got - expected).abs().max()}"
        figures[f"logits_max_abs_diff_vs_live_{device}"] = float((got - expected).abs().max())
    if "cuda:0" in fp32_logits:
        a, b = fp32_logits["cuda:0"].double(), fp32_logits["cpu"].double()
        figures["fp32_export_gpu_vs_cpu_rel_l2"] = float((a - b).norm() / b.norm())
        assert figures["fp32_export_gpu_vs_cpu_rel_l2"] <= XDEVICE_RTOL, figures
    record(test=f"export_{label}", **figures)


def test_zero2_two_gpu_checkpoint_exports_to_one_gpu_and_cpu(zero2_run: dict) -> None:
    check_export(zero2_run, "zero2")


def test_ray_train_two_gpus_zero3_and_export(shards: Path, tmp_path: Path) -> None:
    run = ray_run(shards, tmp_path / "out", zero_stage=3)
    check_trained(run, zero_stage=3)
    check_export(run, "zero3")


def standalone(config: Path, shards: Path, out: Path, gpus: int, *extra: str) -> str:
    """The standalone entry point on `gpus` devices: a plain process on GPU 0, or torchrun (NCCL)."""
    env = {} if ON_CPU else {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
    os.environ.update(env)
    try:
        return run_ok(train_command(config, shards, out, gpus, *extra), timeout=300)
    finally:
        for name in env:
            del os.environ[name]


def test_fp32_checkpoints_move_one_gpu_to_two_and_back(shards: Path, tmp_path: Path) -> None:
    import yaml

    train = train_section(
        steps=PORT_STEPS, checkpoint_every=PORT_K, log_every=PORT_K, precision="fp32", zero_stage=2, keep_checkpoints=3
    )
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": model_section(), "train": train}))
    batch = 8  # micro_bsz 4 x grad_accum 2 x 1 GPU = micro_bsz 4 x grad_accum 1 x 2 GPUs
    one = tmp_path / "one-gpu"
    standalone(config, shards, one, 1, "train.grad_accum=2")
    two = tmp_path / "two-gpus"
    stdout = standalone(
        config, shards, two, 2, "train.grad_accum=2", "--resume", str(one / "checkpoints" / f"step_{PORT_K:08d}")
    )
    assert "was written by 1 workers: grad_accum 2 -> 1" in stdout, stdout[-2000:]
    back = tmp_path / "back-on-one"
    stdout = standalone(config, shards, back, 1, "--resume", str(two / "checkpoints" / f"step_{2 * PORT_K:08d}"))
    assert "was written by 2 workers: grad_accum 1 -> 2" in stdout, stdout[-2000:]

    reference, on_two, on_one = step_records(one), step_records(two), step_records(back)
    figures = {}
    for label, resumed, start in (("1->2", on_two, PORT_K), ("2->1", on_one, 2 * PORT_K)):
        assert sorted(resumed) == list(range(start, PORT_STEPS))
        for step in resumed:
            assert resumed[step]["samples"] == list(range(step * batch, (step + 1) * batch))
        writer = reference if label == "1->2" else on_two
        first = abs(resumed[start]["loss"] - writer[start]["loss"]) / writer[start]["loss"]
        second = abs(resumed[start + 1]["loss"] - writer[start + 1]["loss"]) / writer[start + 1]["loss"]
        later = max(abs(resumed[s]["loss"] - reference[s]["loss"]) / reference[s]["loss"] for s in resumed)
        figures[label] = {"first_step": first, "second_step": second, "max_vs_uninterrupted_1gpu": later}
        assert first <= 1e-6 and second <= SECOND_STEP_RTOL and later <= PORT_RTOL, (label, figures)
    record(test="fp32_world_size_change", rtol={"second": SECOND_STEP_RTOL, "later": PORT_RTOL}, **figures)
