"""Config sections owned by `pipeline/`: pretraining, context extension and evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(_Strict):
    """Pretraining recipe (reference/rwkv4.md section 4) and how it is run."""

    ctx_len: int = Field(256, ge=1, description="Tokens per training sample.")
    micro_bsz: int = Field(4, ge=1, description="Samples per worker per micro-step.")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    lr_init: float = Field(6e-4, gt=0, description="Peak learning rate.")
    lr_final: float = Field(1e-5, ge=0, description="Learning rate at the end of the decay.")
    lr_schedule: Literal["exponential", "cosine", "constant"] = Field("exponential", description="Decay shape.")
    warmup_steps: int = Field(0, ge=0, description="Steps of warmup from 0.2 * lr to lr.")
    beta1: float = Field(0.9, description="Adam beta1.")
    beta2: float = Field(0.99, description="Adam beta2.")
    adam_eps: float = Field(1e-8, description="Adam epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decay on matrices only; 0 = plain Adam.")
    grad_clip: float = Field(1.0, ge=0, description="Total-norm gradient clipping; 0 disables.")
    seed: int = Field(42, description="Seed of init and data order.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Training precision.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    offload: bool = Field(
        False, description="ZeRO CPU offload of optimizer state (DeepSpeedCPUAdam); needs zero_stage 1, 2 or 3."
    )
    grad_checkpointing: bool = Field(
        False,
        description="Recompute each block in backward: keeps each block's input and one block's activations. "
        "169M at 8 x 8192 on an H200: 6.9 instead of 31.0 GiB, -18 % tokens/s.",
    )
    chunk_len: int = Field(
        0,
        ge=0,
        description="RWKV only: run each sample in chunks of this many tokens, state carried; 0 = whole. With "
        "compile on, each chunk is compiled, not the whole model (RWKV.compile_chunks). Small chunks are "
        "slow (launch-bound): try grad_checkpointing first, then the largest chunk that fits.",
    )
    fused_loss_chunk: int = Field(
        0,
        ge=0,
        description="Fuse head + loss (cross-entropy, L2Wrap) over this many rows (tokens) at a time, never "
        "keeping the (B, T, V) logits; 0 = off (logits, then the loss). 8192 at 169M, micro-batch 128 on an "
        "H200: 489k -> 543k tokens/s, 117 -> 61 GiB (docs/benchmarks.md).",
    )
    log_every: int = Field(10, ge=1, description="Steps between metric reports.")
    val_every: int = Field(100, ge=1, description="Steps between validation passes.")
    val_batches: int = Field(8, ge=1, description="Batches per validation pass.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    max_bad_steps: int = Field(5, ge=1, description="Consecutive non-finite losses before stopping.")
    peak_tflops: float = Field(989.0, gt=0, description="Accelerator bf16 dense peak for MFU.")
    layerwise_lr: bool = Field(True, description="LR x2 on time_decay, x3 on time_first (reference 4.2).")
    compile: bool = Field(False, description="torch.compile the model inside the DeepSpeed engine.")
    sample_log: bool = Field(False, description="Append each step's sample indices and loss to out/samples/.")

    @field_validator("offload")
    @classmethod
    def _offload_needs_zero(cls, offload: bool, info: ValidationInfo) -> bool:
        # DeepSpeed offloads the optimizer state ZeRO partitions; at stage 0 it would ignore the setting unsaid.
        stage = info.data.get("zero_stage")  # absent when zero_stage itself is invalid (reported on its own)
        if offload and stage == 0:
            raise ValueError("train.offload=true needs train.zero_stage >= 1: at stage 0 DeepSpeed offloads nothing")
        return offload


class ExtendStageConfig(_Strict):
    """One context-extension fine-tune: continue from the previous stage at a longer ctx_len."""

    ctx_len: int = Field(..., ge=2, description="New context length.")
    steps: int = Field(100, ge=1, description="Optimizer steps at this length.")
    lr: float = Field(1e-5, gt=0, description="Constant learning rate of the fine-tune.")
    chunk_len: int = Field(
        0,
        ge=0,
        description="RWKV only: process each sample in chunks carrying state (full BPTT); 0 = whole (see "
        "train.chunk_len).",
    )
    micro_bsz: int = Field(
        0,
        ge=0,
        description="Samples per worker per micro-step at this length; 0 = train.micro_bsz. Longer samples at "
        "the same micro_bsz mean proportionally more tokens, time and activation memory per step.",
    )
    grad_checkpointing: bool | None = Field(
        None,
        description="Recompute each block in backward at this length; null = train.grad_checkpointing. The "
        "first thing to try where a length does not fit (see train.grad_checkpointing).",
    )


class EvalConfig(_Strict):
    """Held-out evaluation after training."""

    batches: int = Field(16, ge=1, description="Validation batches to average (4 windows each).")
    ctx_len: int = Field(
        0,
        ge=0,
        description="Window length of the evaluation (val loss, perplexity, loss vs position); 0 = the last "
        "training stage's ctx_len.",
    )
    sample_prompt: str = Field("def ", description="Prompt of the generated sample in the report.")
    sample_tokens: int = Field(64, ge=0, description="Tokens generated for the sample.")
