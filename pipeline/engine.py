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

bf16 at ZeRO stage 0 (one GPU, or plain data parallelism) takes another path, because DeepSpeed's
stage-0 bf16 wrapper (`FP16_Optimizer` in bf16 mode) repeats the per-tensor overflow pass and
flattens/copies the gradients every step. Instead:
  * the weights stay fp32 and DeepSpeed runs the forward under `torch.autocast(bfloat16)`
    (`"torch_autocast"`): the matmuls run in bf16 (Linear weights cast per forward), LayerNorm and
    the residual stream in fp32; the fp32 weights *are* the master weights, so no copy exists;
  * the optimizer is ours (`pipeline.optim.clipped_adam`): torch's fused Adam/AdamW on the fp32
    weights, after a foreach global-norm clip (DeepSpeed's formula); DeepSpeed's own clipping is off
    for it (it would loop over the tensors once more), and the norm is kept for `get_global_grad_norm`.
What differs from DeepSpeed bf16: activations between matmuls are fp32 where the reference keeps
bf16 (the residual stream, the token-shift mixes), i.e. slightly more precise, not less; the
optimizer maths (Adam, betas, eps, L2 or decoupled decay, clip at the global norm) is the same.
Measured in docs/benchmarks.md, "Training throughput".
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.optim import clipped_adam, param_groups

# DeepSpeed's bucket sizes, as the reference sets them (ds_bucket_mb = 200).
BUCKET_BYTES = 200_000_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(device_type: str) -> None:
    """Join the process group torchrun/deepspeed/Ray set up, or make a world of one for a plain process."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python -m ...`: a single-process world
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if device_type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


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
    if device_type != "cuda" and not cfg.offload:
        params["torch_adam"] = True
    return {"type": "AdamW" if decoupled else "Adam", "params": params}


def _bf16_config(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.precision != "bf16":
        return {"enabled": False}
    # No per-tensor overflow test before each step: see the module docstring (the loop checks the loss).
    return {"enabled": True, "check_grad_overflow": False}


def uses_autocast(cfg: TrainConfig) -> bool:
    """bf16 without ZeRO: fp32 weights under torch.autocast and our fused optimizer (module docstring)."""
    return cfg.precision == "bf16" and cfg.zero_stage == 0


def deepspeed_config(cfg: TrainConfig, world_size: int, device_type: str) -> dict[str, Any]:
    """The DeepSpeed JSON config of a TrainConfig (ZeRO stage, precision, accumulation, clipping, offload).

    With `uses_autocast(cfg)` there is no "optimizer" section (build_engine passes ours) and DeepSpeed's
    clipping is 0 (ours clips at cfg.grad_clip).
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
    if cfg.offload and cfg.zero_stage > 0:
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
    if uses_autocast(cfg):
        del config["optimizer"]
        config.update(
            gradient_clipping=0.0,
            bf16={"enabled": False},
            torch_autocast={"enabled": True, "dtype": "bfloat16"},
        )
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
) -> Any:
    """Wrap the model in a DeepSpeed engine with our parameter groups; returns the engine.

    ds_overrides: DeepSpeed config keys merged over `deepspeed_config` (benchmarks compare settings).
    """
    import deepspeed

    # Activation checkpointing per block: both model classes recompute each block in backward when asked.
    model.checkpoint_blocks = cfg.grad_checkpointing
    groups = param_groups(model, weight_decay=cfg.weight_decay, layerwise_lr=cfg.layerwise_lr)
    config = merge_config(deepspeed_config(cfg, world_size, device_type), ds_overrides or {})
    optimizer = None
    if "optimizer" not in config:  # the autocast path: DeepSpeed calls this once the model is on its device
        opt = optimizer_config(cfg, device_type)["params"]

        def optimizer(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            betas = tuple(opt["betas"])
            return clipped_adam(
                groups, max_norm=cfg.grad_clip, lr=opt["lr"], betas=betas, eps=opt["eps"], adam_w=opt["adam_w_mode"]
            )

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer, config=config)
    return engine


def device_for_rank(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
