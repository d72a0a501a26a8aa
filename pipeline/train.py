"""The pretraining loop: DeepSpeed engine, sampler windows, L2Wrap loss, metrics, validation, checkpoints.

    from pipeline.train import train
    result = train(cfg.train, cfg.model, data_dir="runs/q/tokenize-1a2b", out_dir="runs/q/pretrain",
                   log_metrics=lambda metrics, step: print(step, metrics))

Every rank runs this same function: under `torchrun`/`deepspeed` (orchestration/train.py), under Ray
Train (orchestration/ray_train.py, which passes `on_checkpoint` to report checkpoints to Ray), or
as a plain process (a world of one). `log_metrics` is called on rank 0 only.

Exact resume: the data order is a pure function of the global sample index (WindowSampler), the
per-step seed is a function of (seed, step, rank), the optimizer state and RNG states are
checkpointed, and the LR is a pure function of the step. A rerun after a crash therefore replays
exactly what an uninterrupted run would have done from the newest complete checkpoint on. The
metrics reported since the previous checkpoint (and the last few before it) are saved with each one and
reported again on resume, for a driver killed before it passed them on (the tracker skips the points it
already holds).

Another world size on resume (N workers wrote the checkpoint, M resume it): the global batch
(micro_bsz x grad_accum x world) is kept by rescaling grad_accum (e.g. 2 workers x 4 x 1 -> 1 worker
x 4 x 2), so step n still reads global samples [n * batch, (n + 1) * batch), only spread over other
ranks and micro-steps: no sample is read twice or skipped, and the LR schedule is unchanged. When
micro_bsz x M does not divide the batch, the resume is refused (CheckpointMismatch) naming the
numbers. ZeRO-1/2/3 optimizer shards are repartitioned through DeepSpeed's universal checkpoint
(pipeline/checkpoint.py). The loss curve then equals the N-worker run's up to reduction order.

Non-finite loss: every rank sees the all-reduced loss, so all take the same branch, and a bad step
changes no weight (Adam's moments decay by one step, as for a zero gradient). Two ways, the same run
(tests/unit/test_train_deferred.py: losses, samples, weights, the stop message), except the moments
after a bad step with grad_accum > 1 (below):
  * deferred (our stage-0 bf16 optimizer, `MasterWeightAdam.skip_step_if`): the loss and a bad flag
    stay on the device; backward runs as usual and the optimizer itself zeroes the step's gradients
    and LR when the all-reduced flag is set. The host reads the flag one step later (a pinned copy,
    by then long finished), so the device never waits for the host; a step's bookkeeping (bad-step
    count, loss log, sample log) is settled before the next log line or checkpoint, and before
    NonFiniteLoss is raised. With grad_accum > 1 the whole step's gradients are dropped, so the
    moments see zero, where the synchronous path still fed them the step's good micro-batches.
  * synchronous (DeepSpeed's optimizers): one all-reduce and host read per micro-step before
    backward; a bad micro-batch backpropagates an exactly-zero surrogate instead (keeping DeepSpeed's
    collectives and counters in step), and the optimizer step runs at LR 0.
After `max_bad_steps` bad steps in a row the run stops with NonFiniteLoss, without writing a
checkpoint of the bad state.

No other host sync per step: batches go up from pinned memory, and DeepSpeed's throughput timer
(which synchronises the device at every forward and step) is off.

Legend: B micro-batch, T ctx_len.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import ModelConfig, build_model
from model.loss import language_model_loss
from pipeline import checkpoint as ckpt
from pipeline.checkpoint_files import prune
from pipeline.config import TrainConfig
from pipeline.engine import build_engine, device_for_rank, init_process_group, merge_config
from pipeline.metrics import Throughput, accelerator_memory_gib, mfu, train_flops_per_token
from pipeline.optim import learning_rate, set_learning_rate
from tokenization.dataset import TokenDataset
from tokenization.sampler import WindowSampler

MetricsFn = Callable[[dict[str, float], int], None]
CheckpointFn = Callable[[Path, dict[str, Any]], None]

REPORTS_KEPT_PAST_A_CHECKPOINT = 4
"""Reports saved again with the checkpoint after the one that saved them (see `recent_reports` in train)."""
DEFER_FINITE_CHECK = True
"""Check the loss for NaN/inf on the device when the optimizer can skip a step itself (module docstring);
False forces the synchronous check (benchmarks compare the two)."""
DS_OVERRIDES: dict[str, Any] = {"timers": {"throughput": {"enabled": False}}}
"""Merged into every engine's DeepSpeed config: its throughput timer (on by default, `synchronized`)
calls torch.cuda.synchronize() at every forward and every step; we measure throughput ourselves."""
PIN_BATCHES = True
"""Copy each batch to the GPU from pinned memory (no wait for the device's queue to drain)."""
COMPILE_KWARGS: dict[str, Any] = {}
"""torch.compile arguments when train.compile is on, e.g. {"mode": "max-autotune-no-cudagraphs"} (benchmarks)."""
SKIP_ONE_RANK_ALLREDUCE = True
"""One process at ZeRO-0: skip DeepSpeed's gradient all-reduce, which even over one rank flattens every
gradient into a bucket, scales it by 1/1 and copies each back (~2 GB of copies per step at 169M). Exact
(tests/unit/test_train_deferred.py); +1.4 % tokens/s at 169M micro-batch 64 on an H200, +0.5 % at 128
(docs/benchmarks.md, "Training throughput")."""


class NonFiniteLoss(RuntimeError):
    """The loss was NaN/inf for `max_bad_steps` steps in a row."""


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    loss: float | None
    val_loss: float | None
    checkpoint: str | None
    bad_steps: int
    resumed_from: str | None
    tracking_run_id: str | None


def _batch(
    data: TokenDataset, starts: list[int], ctx_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, T) from windows of T + 1 tokens at the given token offsets."""
    tokens_BT1 = torch.from_numpy(np.stack([data.window(start, ctx_len + 1) for start in starts]))
    if device.type == "cuda" and PIN_BATCHES:  # from pageable memory the copy would wait for the device
        tokens_BT1 = tokens_BT1.pin_memory()
    tokens_BT1 = tokens_BT1.to(device, non_blocking=True)
    return tokens_BT1[:, :-1], tokens_BT1[:, 1:]


@dataclass
class _StepOutcome:
    """What one optimizer step left to account for; `stats` is settled on the host later (deferred check)."""

    step: int  # 0-based
    samples: list[int]
    stats: torch.Tensor  # (2,) float64: sum of the ranks' finite losses, number of non-finite ones
    ready: Any = None  # a CUDA event after the device-to-host copy of `stats`, or None (already on the host)

    def settle(self) -> tuple[float, bool]:
        """(sum of the ranks' losses, whether any was non-finite); waits for this step's copy only."""
        if self.ready is not None:
            self.ready.synchronize()
        total, bad = self.stats.tolist()
        return total, bad > 0


def _loss_stats(loss: torch.Tensor) -> torch.Tensor:
    """(finite loss or 0, 1 if non-finite) as a float64 device tensor: no host sync."""
    value = loss.detach().double()
    finite = torch.isfinite(value)
    return torch.stack([torch.where(finite, value, torch.zeros_like(value)), (~finite).double()])


def _global_loss(loss: torch.Tensor) -> tuple[float, bool]:
    """Sum of the ranks' losses, and whether any rank's loss is non-finite (same answer on every rank).

    One all-reduce and one host sync per micro-step: the skip decision must precede backward.
    """
    value = loss.detach().float()
    finite = torch.isfinite(value)
    stats = torch.stack([torch.where(finite, value, torch.zeros_like(value)), (~finite).float()])
    dist.all_reduce(stats)
    total, bad = stats.tolist()
    return total, bad > 0


def _zero_surrogate(module: torch.nn.Module) -> torch.Tensor:
    """A loss whose gradient is exactly zero for every parameter, whatever the activations held."""
    return sum((p.sum() * 0.0 for p in module.parameters() if p.requires_grad), torch.zeros(()))


def _val_data(data_dir: Path, min_tokens: int, announce: bool = False) -> TokenDataset | None:
    """The val split, or None (no validation during training) when there is none or it is shorter than a
    window; `announce` says so on the console when it is too short."""
    try:
        val = TokenDataset(data_dir, split="val")
    except (FileNotFoundError, ValueError, KeyError):
        return None
    if val.num_tokens < min_tokens:
        if announce:
            print(
                f"no validation during training: the val split holds {val.num_tokens} tokens, fewer than one "
                f"window of {min_tokens}",
                flush=True,
            )
        return None
    return val


@torch.no_grad()
def validation_loss(engine: Any, val: TokenDataset | None, cfg: TrainConfig, device: torch.device) -> float | None:
    """Mean next-token loss on `val_batches` fixed windows spread evenly over the val split."""
    if val is None:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    windows = cfg.val_batches * cfg.micro_bsz
    starts = val.spread_starts(cfg.ctx_len + 1, windows)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
    # Every rank runs the same number of forwards (ZeRO-3 gathers weights collectively); extras weigh 0.
    for round_index in range(math.ceil(cfg.val_batches / world)):
        batch = round_index * world + rank
        counted = batch < cfg.val_batches
        chunk = starts[(batch if counted else 0) * cfg.micro_bsz :][: cfg.micro_bsz]
        x_BT, y_BT = _batch(val, chunk, cfg.ctx_len, device)
        logits_BTV = engine(x_BT).float()
        loss_sum = F.cross_entropy(logits_BTV.flatten(0, 1), y_BT.flatten(), reduction="sum")
        if counted:
            totals += torch.stack([loss_sum.double(), torch.tensor(float(y_BT.numel()), device=device).double()])
    dist.all_reduce(totals)
    return float(totals[0] / totals[1])


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy a saved fp32 state dict (final_weights.pt) into the model; shapes must match."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = {**ckpt.parameter_shapes(model), **{name: list(b.shape) for name, b in model.named_buffers()}}
    ckpt.check_shapes({name: list(tensor.shape) for name, tensor in state.items()}, expected, path)
    model.load_state_dict(state)


def _save_weights(engine: Any, cfg: TrainConfig, path: Path) -> None:
    """Final weights as a plain fp32 state dict (our parameter names), written by rank 0."""
    if cfg.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective; full tensors on rank 0
    else:
        state = engine.module.state_dict()
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({name: tensor.detach().float().cpu() for name, tensor in state.items()}, path)


def keep_global_batch(cfg: TrainConfig, saved: dict[str, Any], world: int) -> TrainConfig:
    """`cfg` with grad_accum rescaled so micro_bsz x grad_accum x world equals the checkpoint's batch.

    Only a change of world size is absorbed this way; a batch that cannot be kept raises
    CheckpointMismatch (the data order per step, and so the run, would change).
    """
    batch, per_micro_step = saved["samples_per_step"], cfg.micro_bsz * world
    if cfg.micro_bsz * cfg.grad_accum * world == batch:
        return cfg
    if saved.get("world_size", world) != world and batch % per_micro_step == 0:
        return cfg.model_copy(update={"grad_accum": batch // per_micro_step})
    raise ckpt.CheckpointMismatch(
        f"the checkpoint was written with {batch} samples per step (micro_bsz x grad_accum x world, world "
        f"{saved.get('world_size')}); this run has micro_bsz {cfg.micro_bsz} x grad_accum {cfg.grad_accum} x "
        f"world {world} = {cfg.micro_bsz * cfg.grad_accum * world}, and no grad_accum keeps {batch} "
        f"(micro_bsz x world = {per_micro_step} must divide it): the batches would change"
    )


def train(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    log_metrics: MetricsFn | None = None,
    checkpoint_root: str | Path | None = None,
    resume_from: str | Path | None = None,
    on_checkpoint: CheckpointFn | None = None,
    tracking_run_id: str | None = None,
    init_weights: str | Path | None = None,
    checkpoints: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train to `cfg.steps` optimizer steps, resuming from the newest complete checkpoint if any.

    checkpoint_root: where checkpoints are written (default out_dir/checkpoints); the newest complete
        one there is resumed unless `resume_from` names a checkpoint directory.
    on_checkpoint(dir, metrics): called on every rank after each complete checkpoint (Ray reports it).
    init_weights: a `final_weights.pt` of an earlier run to start from (context extension); used only
        when there is no checkpoint to resume, with a fresh optimizer.
    checkpoints: False for benchmarks (no checkpoint, no final weights).
    on_step(step): called on every rank after each optimizer step has been queued (a profiler's step()).
    """
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    init_process_group(device_type)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = device_for_rank(int(os.environ.get("LOCAL_RANK", "0")))
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    root = Path(checkpoint_root) if checkpoint_root is not None else out_dir / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)

    # The reports since the previous checkpoint and the last few before it, saved with each checkpoint and
    # reported again on a resume: a driver killed before it passed them on loses them, and training goes
    # on after the checkpoint. The few before it cover a checkpoint with no report since the previous one
    # (log_every > checkpoint_every), when the report missing is older than that checkpoint.
    recent_reports: list[tuple[int, dict[str, float]]] = []

    def log(metrics: dict[str, float], step: int) -> None:
        recent_reports.append((step, metrics))
        if rank == 0 and log_metrics is not None:  # the one side effect of rank 0 only
            log_metrics(metrics, step)

    # Data: windows of ctx_len + 1 tokens at offsets from the sampler's deterministic walk.
    data = TokenDataset(data_dir, split="train")
    if model_cfg.vocab_size < data.vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} < the data's vocab size {data.vocab_size}")
    val = _val_data(data_dir, cfg.ctx_len + 1, announce=rank == 0)
    sampler = WindowSampler(data.num_tokens, cfg.ctx_len, cfg.seed)

    if cfg.chunk_len and model_cfg.arch != "rwkv4":
        raise ValueError(
            f"train.chunk_len={cfg.chunk_len} needs model.arch=rwkv4 (a state to carry), not {model_cfg.arch}"
        )

    # Model: the same init on every rank (same seed); DeepSpeed wraps it and builds the optimizer.
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, lr_init=cfg.lr_init)
    if cfg.chunk_len:  # RWKV runs each window chunk by chunk inside one forward: full BPTT, one backward
        model.chunk_len = cfg.chunk_len
    model.head.fused_loss_chunk = cfg.fused_loss_chunk  # rows of logits at a time when the loss is fused
    shapes = ckpt.parameter_shapes(model)
    resume = Path(resume_from) if resume_from is not None else ckpt.agreed_latest_complete(root)
    if init_weights is not None and resume is None:
        load_weights(model, Path(init_weights))

    # A checkpoint of another world size: keep its global batch, and let DeepSpeed repartition ZeRO state.
    ds_overrides: dict[str, Any] = {}
    saved = ckpt.read_complete_state(resume, shapes) if resume is not None else None
    repartition = False
    if saved is not None:
        fitted = keep_global_batch(cfg, saved, world)
        if fitted.grad_accum != cfg.grad_accum and rank == 0:
            print(
                f"{resume} was written by {saved['world_size']} workers: grad_accum {cfg.grad_accum} -> "
                f"{fitted.grad_accum} keeps its {saved['samples_per_step']} samples per step on {world}",
                flush=True,
            )
        cfg = fitted
        repartition = saved.get("world_size", world) != world and ckpt.has_zero_shards(resume)
        if repartition:
            ds_overrides = {"checkpoint": {"load_universal": True}}
    samples_per_step = cfg.micro_bsz * cfg.grad_accum * world

    flops_per_token = train_flops_per_token(model_cfg.vocab_size, model_cfg.n_embd, model_cfg.n_layer)
    engine = build_engine(model, cfg, world, device.type, merge_config(DS_OVERRIDES, ds_overrides))
    # The device-side non-finite check needs an optimizer that can skip a step on a device flag.
    deferred = DEFER_FINITE_CHECK and hasattr(engine.optimizer, "skip_step_if")
    if SKIP_ONE_RANK_ALLREDUCE and world == 1 and cfg.zero_stage == 0:
        engine.enable_backward_allreduce = False  # DeepSpeed's own switch; the identity over one rank
    if cfg.compile:
        # The blocks share one frame (RWKV applies ln0), so this is headroom, in case Dynamo still
        # specialises on a block's attributes: then it recompiles per layer instead of falling back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * model_cfg.n_layer)
        if cfg.chunk_len:  # the chunk, not the model: a whole chunked model crashed Inductor (see compile_chunks)
            model.compile_chunks(**COMPILE_KWARGS)
        else:
            engine.compile(compile_kwargs=dict(COMPILE_KWARGS))

    # Resume from the newest complete checkpoint (or the one named).
    # The data position is the global sample index: step n reads [first_sample + (n - first_step) x batch, ...).
    step, tokens_seen, bad_total, first_step, first_sample = 0, 0, 0, 0, 0
    if resume is not None:
        scratch = out_dir / "universal"  # DeepSpeed's universal layout of a checkpoint of another world size
        universal = ckpt.to_universal(resume, scratch) if repartition else None
        state = ckpt.load(engine, resume, shapes, universal=universal)
        if universal is not None:
            dist.barrier()  # every rank has read it
            if rank == 0:
                shutil.rmtree(scratch, ignore_errors=True)
        step, tokens_seen, bad_total = state["step"], state["tokens_seen"], state["bad_steps"]
        first_step, first_sample = step, state["sampler"]["next_sample"]
        tracking_run_id = tracking_run_id or state.get("tracking_run_id")
        if rank == 0:
            print(
                f"resumed from {resume} at step {step} (global sample {first_sample}; written by "
                f"{state.get('world_size')} workers, now {world})",
                flush=True,
            )
        for report_step, metrics in state.get("recent_reports", []):
            log(metrics, report_step)  # the tracker skips the points the run already holds (tracking_queue)

    def first_sample_of(n: int) -> int:
        """Global index of the first sample step n reads (also where a checkpoint after step n - 1 resumes)."""
        return first_sample + (n - first_step) * samples_per_step

    sample_log = None
    if cfg.sample_log:
        (out_dir / "samples").mkdir(exist_ok=True)
        sample_log = open(out_dir / "samples" / f"rank_{rank:05d}.jsonl", "a", buffering=1)  # noqa: SIM115

    # The losses since the last log line: a resume between two lines averages over the same steps.
    throughput, window_losses = Throughput(), list(state.get("window_losses", [])) if resume is not None else []
    bad_in_row, first_bad = 0, None
    loss_now = val_loss = None
    last_ckpt: Path | None = resume
    pending: deque[_StepOutcome] = deque()  # steps queued on the device whose loss the host has not read yet
    last_bad = False

    def account(outcome: _StepOutcome) -> None:
        """The host's bookkeeping of one finished step: bad-step counts (and the stop), losses, sample log."""
        nonlocal bad_total, bad_in_row, first_bad, loss_now, last_bad
        loss_sum, last_bad = outcome.settle()
        step_loss = loss_sum / (world * cfg.grad_accum)
        if last_bad:
            bad_total, bad_in_row = bad_total + 1, bad_in_row + 1
            first_bad = outcome.step + 1 if bad_in_row == 1 else first_bad  # steps count from 1 in logs
            if bad_in_row >= cfg.max_bad_steps:
                raise NonFiniteLoss(
                    f"stopping: the loss was not finite for {bad_in_row} steps in a row "
                    f"(steps {first_bad}..{outcome.step + 1}); those steps were skipped and the weights were not "
                    "updated. The last good checkpoint is "
                    f"{last_ckpt or 'none (no checkpoint was written yet)'}. Lower train.lr_init, or check the data."
                )
        else:
            bad_in_row, loss_now = 0, step_loss
            window_losses.append(step_loss)
        if sample_log is not None:
            sample_log.write(json.dumps({"step": outcome.step, "samples": outcome.samples, "loss": step_loss}) + "\n")

    def settle(keep: int) -> None:
        """Account for every pending step but the newest `keep` (those may still be running on the device)."""
        while len(pending) > keep:
            account(pending.popleft())

    while step < cfg.steps:
        # Seeds a function of (seed, step, rank): anything random replays identically after a resume.
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)
        lr = learning_rate(step, cfg)
        step_stats, step_bad, step_samples = None, False, []
        step_first_sample = first_sample_of(step)
        for micro in range(cfg.grad_accum):
            sample_ids = [step_first_sample + i for i in sampler.rank_indices(micro, cfg.micro_bsz, rank, world)]
            x_BT, y_BT = _batch(data, [sampler.start(i) for i in sample_ids], cfg.ctx_len, device)
            if cfg.fused_loss_chunk:  # the model returns the loss, its head fused with it (no logits)
                loss = engine(x_BT, targets=y_BT)
            else:
                loss = language_model_loss(engine(x_BT), y_BT)  # bf16 logits under bf16, as the reference
            if deferred:  # on the device; the optimizer skips the step if any rank's loss is non-finite
                stats = _loss_stats(loss)
            else:  # on the host, before backward: a bad micro-batch backpropagates a zero surrogate
                loss_sum, micro_bad = _global_loss(loss)
                stats = torch.tensor([loss_sum, float(micro_bad)], dtype=torch.float64)
                if micro_bad:
                    loss, step_bad = _zero_surrogate(engine.module).to(device), True
            step_stats = stats if step_stats is None else step_stats + stats
            engine.backward(loss)
            if micro == cfg.grad_accum - 1:  # DeepSpeed applies the update on the boundary micro-step
                if deferred:
                    if world > 1:
                        dist.all_reduce(step_stats)  # queued on the device; no host wait
                    engine.optimizer.skip_step_if(step_stats[1] > 0)
                set_learning_rate(engine.optimizer, 0.0 if step_bad else lr)
            engine.step()
            step_samples += list(sample_ids)

        outcome = _StepOutcome(step, step_samples, step_stats)
        if deferred and step_stats.is_cuda:  # a pinned copy the host reads a step later, without waiting
            outcome.stats = torch.empty(2, dtype=torch.float64, pin_memory=True).copy_(step_stats, non_blocking=True)
            outcome.ready = torch.cuda.Event()
            outcome.ready.record()
        pending.append(outcome)
        step += 1
        tokens_seen += samples_per_step * cfg.ctx_len
        throughput.add(samples_per_step * cfg.ctx_len)
        due_log = step % cfg.log_every == 0 or step == cfg.steps
        due_ckpt = checkpoints and (step % cfg.checkpoint_every == 0 or step == cfg.steps)
        settle(0 if (due_log or due_ckpt or not deferred) else 1)
        if on_step is not None:
            on_step(step)

        if due_log:
            tokens_per_s = throughput.rate(device)
            metrics = {
                "loss": sum(window_losses) / len(window_losses) if window_losses else float("nan"),
                "lr": lr,
                "tokens_seen": float(tokens_seen),
                "tokens_per_s": tokens_per_s,
                "mfu": mfu(tokens_per_s, flops_per_token, cfg.peak_tflops, world),
                "bad_steps": float(bad_total),
                **accelerator_memory_gib(device),
            }
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            window_losses = []
            log(metrics, step)
            if rank == 0:
                print(f"step {step}/{cfg.steps} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)

        if step % cfg.val_every == 0 or step == cfg.steps:
            with throughput.paused():
                val_loss = validation_loss(engine, val, cfg, device)
            if val_loss is not None:
                log({"val_loss": val_loss}, step)
                if rank == 0:
                    print(f"step {step}/{cfg.steps} val_loss={val_loss:.4g}", flush=True)

        if due_ckpt and not last_bad:
            state = {
                "step": step,
                "tokens_seen": tokens_seen,
                "sampler": {
                    "seed": cfg.seed,
                    "ctx_len": cfg.ctx_len,
                    "next_sample": first_sample_of(step),
                },
                "samples_per_step": samples_per_step,
                "world_size": world,
                "micro_bsz": cfg.micro_bsz,
                "grad_accum": cfg.grad_accum,
                "zero_stage": cfg.zero_stage,
                "bad_steps": bad_total,
                "loss": loss_now,
                "tracking_run_id": tracking_run_id,
                "model_config": asdict(model_cfg),
                "parameter_shapes": shapes,
                "recent_reports": list(recent_reports),
                "window_losses": list(window_losses),
            }
            last_ckpt = ckpt.step_dir(root, step)
            with throughput.paused():
                ckpt.save(engine, last_ckpt, state)
                del recent_reports[:-REPORTS_KEPT_PAST_A_CHECKPOINT]
                if rank == 0:
                    prune(root, cfg.keep_checkpoints)
                if on_checkpoint is not None:
                    on_checkpoint(last_ckpt, {"step": step, "loss": loss_now, "tokens_seen": tokens_seen})

    if sample_log is not None:
        sample_log.close()
    if checkpoints:
        _save_weights(engine, cfg, out_dir / "final_weights.pt")
    result = TrainResult(
        step=step,
        tokens_seen=tokens_seen,
        loss=loss_now,
        val_loss=val_loss,
        checkpoint=str(last_ckpt) if last_ckpt else None,
        bad_steps=bad_total,
        resumed_from=str(resume) if resume else None,
        tracking_run_id=tracking_run_id,
    )
    if rank == 0:
        (out_dir / "train_result.json").write_text(json.dumps(asdict(result), indent=1))
    return result
