"""The model's section of the run config: a stdlib dataclass so `model/` needs only torch.

pydantic validates it when `orchestration.config` composes the root config (unknown keys and
wrong types are errors there); here `__post_init__` checks what the maths needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ModelConfig:
    """The network: RWKV-4 (or the same-size GPT baseline), its shape and which kernels run it."""

    arch: Literal["rwkv4", "gpt"] = "rwkv4"
    """Which network: RWKV-4, or the same-size GPT baseline (pre-LN, causal attention). The baseline
    trains and evaluates like RWKV-4; it has no export (the official checkpoint format is RWKV-4's) and no
    RNN-mode sample."""
    n_layer: int = 4
    """Number of blocks (L)."""
    n_embd: int = 128
    """Residual width (C)."""
    dim_att: int = 0
    """Width of the WKV channels; 0 means n_embd."""
    dim_ffn: int = 0
    """Hidden width of ChannelMix / the GPT MLP; 0 means 4 * n_embd."""
    vocab_size: int = 4096
    """Rows of the embedding and the head. `rwkv-pipeline run` trains with the tokenizer's vocabulary (the stage
    runs' model.vocab_size params show it), but this value is part of the pretrain stage's hash: changing it
    trains anew. The standalone trainer uses it when at least the data's vocabulary (smaller is an error)."""
    n_head: int = 4
    """GPT baseline only: attention heads."""
    wkv_backend: Literal["auto", "cuda", "torch", "reference"] = "auto"
    """WKV implementation: auto picks cuda for CUDA tensors (a failed build is an error naming torch) and
    torch otherwise. torch/reference also keep the fused head loss on PyTorch ops (no CUDA build at all)."""
    fused_ln_mix: bool = True
    """RWKV-4 on GPUs: each block's LayerNorm, token shift and time-mixes per branch in one Triton kernel
    (model/ln_shift_mix.py; the same values with fewer bytes moved: 169M training 2.8 % faster on an H200,
    then 1.4 % more with the current kernels; docs/benchmarks.md) for rows of up to
    model.ln_shift_mix.MAX_CHANNELS (2048) columns; false keeps the plain PyTorch blocks. CPU tensors, and
    wider rows, always take the plain PyTorch ops."""

    def __post_init__(self) -> None:
        if self.dim_att == 0:
            self.dim_att = self.n_embd
        if self.dim_ffn == 0:
            self.dim_ffn = 4 * self.n_embd
        if self.n_layer < 1 or self.n_embd < 1 or self.vocab_size < 2:
            raise ValueError("model.n_layer, model.n_embd must be >= 1 and model.vocab_size >= 2")
        if self.arch == "gpt" and self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")

    @property
    def cuda_kernels(self) -> bool:
        """Whether the project's CUDA kernels may be built for GPU tensors (WKV and the head loss's rows)."""
        return self.wkv_backend in ("auto", "cuda")
