"""The fused head loss's row kernel (cuda/head_loss.cu) as the torch custom op `rwkv::head_loss_rows`.

    >>> import torch
    >>> from model.head_loss_cuda import head_loss_rows_op
    >>> logits = torch.randn(4, 50304, device="cuda").bfloat16()
    >>> grad, loss_n, max_n, argmax_n = head_loss_rows_op(logits, torch.randint(0, 50304, (4,), device="cuda"), 0.25)

Legend: n rows, V vocabulary. For bf16 logits (n, V) and int64 targets (n,): grad (n, V) bf16 =
(softmax - onehot) * scale, loss_n (n,) fp32 = logsumexp - the target's logit, max_n (n,) bf16 and
argmax_n (n,) int64 (first index; a NaN wins), what model/fused_loss.py's compiled formulation
computes, reading the logits about once instead of three times. No autograd: FusedHeadLoss calls it
inside its own forward. The extension is built on first use (model/cuda_extension.py).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from model.cuda_extension import ExtensionBuilds

__all__ = ["BUILDS", "head_loss_rows_op", "load_extension", "supports"]

BUILDS = ExtensionBuilds(
    "head_loss",
    ("head_loss.cu", "head_loss_binding.cpp"),
    fallback="Use the PyTorch ops instead: model.fused_loss.ROW_KERNEL = 'torch'.",
)


def load_extension() -> ModuleType:
    """The compiled extension, building it on first use (once per process, cached across processes)."""
    return BUILDS.load()


def supports(logits_nV: Tensor) -> bool:
    """Whether the kernel takes these logits: bf16 on a CUDA device."""
    return logits_nV.is_cuda and logits_nV.dtype == torch.bfloat16


@torch.library.custom_op("rwkv::head_loss_rows", mutates_args=())
def head_loss_rows_op(logits_nV: Tensor, target_n: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad (n, V) bf16, loss (n,) fp32, max (n,) bf16, argmax (n,) int64) of contiguous bf16 logits."""
    grad_nV, loss_n, max_n, argmax_n = load_extension().rows(logits_nV.contiguous(), target_n.contiguous(), scale)
    return grad_nV, loss_n, max_n, argmax_n


@head_loss_rows_op.register_fake
def _head_loss_rows_fake(logits_nV, target_n, scale):
    rows = logits_nV.shape[0]
    return (
        torch.empty_like(logits_nV),
        logits_nV.new_empty((rows,), dtype=torch.float32),
        logits_nV.new_empty((rows,)),
        logits_nV.new_empty((rows,), dtype=torch.int64),
    )
