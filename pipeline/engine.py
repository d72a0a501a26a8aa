"""DeepSpeed from the typed train config: the process group, the JSON config and the engine.

    init_process_group(device)                    # no-op under Ray Train / torchrun when already set up
    ds_config = deepspeed_config(cfg, world_size=2, device_type="cpu")
    engine = build_engine(model, cfg, world_size=2, device_type="cpu")

The optimizer is Adam (or AdamW when weight decay is on) with the reference's betas and eps
(reference/rwkv4.md §4.1). DeepSpeed builds it from the config:
  * on GPU: FusedAdam;
  * with ZeRO CPU offload: DeepSpeedCPUAdam;
  * on CPU without offload: `torch.optim.Adam/AdamW` (`"torch_adam": true`), which needs no
    compiled op.
The LR schedule is ours (pipeline/optim.py), applied to the groups each step, so no DeepSpeed scheduler.

Why some DeepSpeed defaults are off (DeepSpeed 0.19.8; measured in docs/benchmarks.md, "Training throughput"):
  * `bf16.check_grad_overflow`: before each step DeepSpeed's ZeRO-1/2 optimizer tests every gradient
    tensor on its own (`has_overflow_partitioned_grads_serial`: amax, amin, isfinite... per tensor, ~7
    kernel launches x ~220 tensors at 169M), then all-reduces and `.item()`s the flag. bf16 has fp32's
    exponent range, so the check is for fp16 loss scaling; the training loop already skips a step whose
    loss is non-finite (pipeline/train.py). With it off, a non-finite *gradient* behind a finite loss
    is no longer skipped by DeepSpeed: it reaches the weights, the next loss is non-finite, and the
    loop's bad-step counter stops the run with the last good checkpoint kept.
  * `overlap_comm` with one rank: there is no communication to overlap, only a side stream and its
    synchronisations per bucket (on the H200 its effect was within noise; the overflow pass was ~29 ms
    of a 110 ms step at 169M).
Gradient clipping (global norm) and the fp32 master weights are unchanged.

bf16 at ZeRO stage 0 (one GPU, or plain data parallelism) takes our own optimizer path, because
DeepSpeed's stage-0 bf16 wrapper (`FP16_Optimizer` in bf16 mode) repeats the per-tensor overflow pass
and flattens/copies the gradients every step. DeepSpeed keeps the engine (data-parallel all-reduce,
accumulation, checkpoints); its bf16 mode and clipping are off, and ours does (BF16_STAGE0 picks):
  * "master" (default): the module's weights are cast to bf16, as DeepSpeed bf16 does, and
    `pipeline.optim.MasterWeightAdam` keeps the fp32 masters and moments: per step one foreach copy of
    the gradients to fp32, a foreach global-norm clip (DeepSpeed's formula), torch's fused Adam on the
    masters, one foreach copy back. The numerics of DeepSpeed bf16 (bf16 forward/backward, fp32 update
    of fp32 masters; gradients summed in bf16 `.grad` across accumulation micro-steps), in a few
    kernels instead of loops over ~220 tensors. Select per process with `build_engine(bf16_stage0=...)`
    or by setting `pipeline.engine.BF16_STAGE0` (no config field yet).
  * "autocast": the weights stay fp32 and DeepSpeed runs the forward under `torch.autocast(bf16)`
    (`"torch_autocast"`) with `pipeline.optim.clipped_adam` on the fp32 weights. More precise
    (fp32 residual stream and token-shift mixes) but slower in eager mode: on the H200 the fp32
    element-wise work and the per-forward weight casts cost more than the optimizer saves.
The grad norm is kept for `get_global_grad_norm` in both.
Measured in docs/benchmarks.md, "Training throughput".
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.distributed_env import keep_multicast_off
from pipeline.optim import MasterWeightAdam, clipped_adam, param_groups

# DeepSpeed's bucket sizes, as the reference sets them (ds_bucket_mb = 200).
BUCKET_BYTES = 200_000_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def import_deepspeed() -> Any:
    """DeepSpeed, told the accelerator where there is no CUDA: it would guess CPU and warn that it did, in
    every worker."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def init_process_group(device_type: str) -> None:
    """Join the process group torchrun/deepspeed/Ray set up, or make a world of one for a plain process."""
    deepspeed = import_deepspeed()
    import torch.distributed as dist

    keep_multicast_off()  # NCCL reads it when the first communicator is made, after this
    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python -m ...`: a single-process world
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if device_type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def offloads(cfg: TrainConfig) -> bool:
    """Whether DeepSpeed offloads the optimizer state to the CPU (DeepSpeedCPUAdam): ZeRO stage 1-3 only.
    TrainConfig rejects offload at stage 0; this keeps a config built without validation consistent too."""
    return cfg.offload and cfg.zero_stage > 0


def optimizer_config(cfg: TrainConfig, device_type: str) -> dict[str, Any]:
    decoupled = cfg.weight_decay > 0
    params: dict[str, Any] = {
        "lr": cfg.lr_init,
        "betas": [cfg.beta1, cfg.beta2],
        "eps": cfg.adam_eps,
        "weight_decay": cfg.weight_decay,
        # Explicit: DeepSpeed otherwise turns "Adam" into AdamW.
        "adam_w_mode": decoupled,
    }
    if device_type != "cuda" and not offloads(cfg):
        params["torch_adam"] = True
    return {"type": "AdamW" if decoupled else "Adam", "params": params}


def _bf16_config(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.precision != "bf16":
        return {"enabled": False}
    # No per-tensor overflow test before each step: see the module docstring (the loop checks the loss).
    return {"enabled": True, "check_grad_overflow": False}


BF16_STAGE0 = "master"
"""How bf16 runs at ZeRO stage 0: "master" (bf16 weights, our fp32 masters) or "autocast" (fp32 weights)."""
BF16_STAGE0_MODES = ("master", "autocast")


def own_optimizer_mode(cfg: TrainConfig, mode: str | None = None) -> str | None:
    """The stage-0 bf16 path ("master"/"autocast") when our optimizer replaces DeepSpeed's, else None."""
    mode = mode or BF16_STAGE0
    if mode not in BF16_STAGE0_MODES:
        raise ValueError(f"unknown bf16 stage-0 mode {mode!r}; choose one of {BF16_STAGE0_MODES}")
    return mode if cfg.precision == "bf16" and cfg.zero_stage == 0 else None


def deepspeed_config(
    cfg: TrainConfig, world_size: int, device_type: str, bf16_stage0: str | None = None
) -> dict[str, Any]:
    """The DeepSpeed JSON config of a TrainConfig (ZeRO stage, precision, accumulation, clipping, offload).

    On the stage-0 bf16 path (`own_optimizer_mode`) there is no "optimizer" section (build_engine passes
    ours), DeepSpeed's bf16 mode and clipping are off (ours clips at cfg.grad_clip), and "autocast" turns
    on DeepSpeed's torch_autocast.
    """
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2):
        zero.update(
            allgather_bucket_size=BUCKET_BYTES,
            reduce_bucket_size=BUCKET_BYTES,
            contiguous_gradients=True,
            # Overlapping communication with backward needs streams; on CPU it only adds threads, and
            # with one rank there is nothing to overlap.
            overlap_comm=device_type == "cuda" and world_size > 1,
        )
    if offloads(cfg):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_bsz,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_bsz * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": _bf16_config(cfg),
        "optimizer": optimizer_config(cfg, device_type),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    mode = own_optimizer_mode(cfg, bf16_stage0)
    if mode is not None:
        del config["optimizer"]
        config.update(gradient_clipping=0.0, bf16={"enabled": False})
        if mode == "autocast":
            config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


def merge_config(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `overrides` merged in, section by section (nested dicts merge, values replace)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_engine(
    model: nn.Module,
    cfg: TrainConfig,
    world_size: int,
    device_type: str,
    ds_overrides: dict[str, Any] | None = None,
    bf16_stage0: str | None = None,
) -> Any:
    """Wrap the model in a DeepSpeed engine with our parameter groups; returns the engine.

    ds_overrides: DeepSpeed config keys merged over `deepspeed_config` (benchmarks compare settings).
    bf16_stage0: "master" or "autocast" for bf16 at ZeRO-0 (default BF16_STAGE0; module docstring).
    """
    deepspeed = import_deepspeed()

    # Activation checkpointing per block: both model classes recompute each block in backward when asked.
    model.checkpoint_blocks = cfg.grad_checkpointing
    config = merge_config(deepspeed_config(cfg, world_size, device_type, bf16_stage0), ds_overrides or {})
    mode = own_optimizer_mode(cfg, bf16_stage0) if "optimizer" not in config else None
    if mode == "master":
        model.to(torch.bfloat16)  # what DeepSpeed bf16 would do; our optimizer keeps the fp32 masters
    groups = param_groups(model, weight_decay=cfg.weight_decay, layerwise_lr=cfg.layerwise_lr)
    adam = optimizer_config(cfg, device_type)["params"]
    settings = {"lr": adam["lr"], "betas": tuple(adam["betas"]), "eps": adam["eps"], "adam_w": adam["adam_w_mode"]}

    def own_optimizer(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        # DeepSpeed calls this once the model is on its device.
        if mode == "master":
            return MasterWeightAdam(groups, max_norm=cfg.grad_clip, **settings)
        return clipped_adam(groups, max_norm=cfg.grad_clip, **settings)

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, optimizer=own_optimizer if mode else None, config=config
    )
    return engine


def device_for_rank(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
