"""The language-model head and its loss fused: cross-entropy + L2Wrap without the (B, T, V) logits.

`fused_head_loss(hidden_NC, weight_VC, targets_N, chunk_rows)` equals
`language_model_loss(hidden @ weight.T, targets)` (model/loss.py: mean cross-entropy wrapped in
L2Wrap) in value and in gradients, but only `chunk_rows` rows of logits exist at a time. The loss is
the last op of the model, so its gradients are computed in the forward, chunk by chunk, with the
same three matmuls per chunk as the unfused head (logits, grad_hidden, grad_weight) and no
recompute; backward only scales them. Saved for backward: grad_hidden (N, C) twice (the
cross-entropy part and the L2Wrap part), the fp32 grad_weight (V, C), the hidden states (N, C, the
tensor the unfused head saves too) and two (N,) vectors (each row's arg-max and L2Wrap coefficient).

Why two parts: L2Wrap's extra gradient is NOT scaled by the incoming gradient (model/loss.py; the
reference's behaviour), while the cross-entropy part is. DeepSpeed's `engine.backward` scales the
loss by 1/grad_accum, so backward computes `grad_output * ce_part + l2wrap_part`, as the unfused
graph does. The L2Wrap part of grad_weight is one row per position (at its arg-max): backward adds it
with an index_add from the saved hidden states instead of keeping a second (V, C) buffer.

Dtypes, as the unfused head: logits in the compute dtype (the hidden dtype, or the autocast dtype
when autocast is on), arg-max and max logit read from those logits, the L2Wrap coefficient
`max_logit * 1e-4 / N` rounded to the compute dtype. Softmax and the loss are accumulated in fp32
(fp64 for fp64 inputs); grad_weight is accumulated in fp32 over chunks (each chunk's matmul rounds
once to the compute dtype) and returned in the weight's dtype. The loss is returned in fp32 for
bf16/fp16 inputs (the unfused bf16 loss is itself bf16-rounded; that is the one intended difference).
Targets must be valid class indices (no ignore_index).

Legend: N rows (B*T), C n_embd, V vocab, n rows of one chunk.

    >>> import torch
    >>> hidden, weight = torch.randn(6, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    >>> loss = fused_head_loss(hidden, weight, torch.randint(0, 10, (6,)), chunk_rows=4)
    >>> loss.backward()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from model import head_loss_cuda
from model.loss import L2WRAP_FACTOR

ROW_KERNEL = "cuda"
"""How a chunk's logits become its loss, gradient, max and arg-max when they are bf16 on a GPU:
"cuda" (cuda/head_loss.cu through model/head_loss_cuda.py: one read of each row, one write; built on
first use like the WKV kernel) or "torch" (the PyTorch ops of `_chunk_grad_eager`). On an H200 (n 8192,
V 50304) the row kernel takes 0.610 ms against 1.054 ms for Inductor's best formulation of the same
work (bench/head_loss_rows.py, docs/benchmarks.md). Other logits (CPU, fp32) always take the PyTorch
ops. The default of `fused_head_loss(row_kernel=None)`; a model whose config says `wkv_backend: torch`
(or reference) passes "torch", so it never needs a CUDA build."""
ROW_KERNELS = ("cuda", "torch")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_grad_eager(
    logits_nV: torch.Tensor, target_n: torch.Tensor, scale: float, acc: torch.dtype, need_grads: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum of the chunk's token losses, d(mean CE)/d logits = (softmax - onehot) * scale) in few eager passes.

    log_softmax in one pass (acc dtype out of compute-dtype logits), exp and the one-hot in place, then
    the scale and the cast to the compute dtype in one pass (one rounding).
    """
    logp_nV = torch.log_softmax(logits_nV, dim=-1, dtype=acc)
    loss = -logp_nV.gather(1, target_n[:, None]).sum()
    if not need_grads:
        return loss, None
    grad_nV = logp_nV.exp_()
    grad_nV.scatter_add_(1, target_n[:, None], torch.full_like(grad_nV[:, :1], -1.0))
    if grad_nV.dtype == logits_nV.dtype:
        return loss, grad_nV.mul_(scale)
    return loss, torch.mul(grad_nV, scale, out=torch.empty_like(grad_nV, dtype=logits_nV.dtype))


class FusedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` with L2Wrap's gradient, in chunks of rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden_NC: torch.Tensor,
        weight_VC: torch.Tensor,
        targets_N: torch.Tensor,
        chunk_rows: int,
        compute_dtype: torch.dtype,
        row_kernel: str,
    ) -> torch.Tensor:
        rows, acc = hidden_NC.shape[0], _accumulation_dtype(compute_dtype)
        need_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        weight_c = weight_VC.to(compute_dtype)
        loss_sum = torch.zeros((), dtype=acc, device=hidden_NC.device)
        if need_grads:
            ce_grad_hidden_NC = torch.empty_like(hidden_NC)
            l2_grad_hidden_NC = torch.empty_like(hidden_NC)
            ce_grad_weight_VC = torch.zeros(weight_VC.shape, dtype=acc, device=weight_VC.device)
            argmax_N = torch.empty(rows, dtype=torch.long, device=hidden_NC.device)
            coef_N = torch.empty(rows, dtype=compute_dtype, device=hidden_NC.device)
        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            hidden_nC, target_n = hidden_NC[start:end].to(compute_dtype), targets_N[start:end]
            logits_nV = hidden_nC @ weight_c.T
            if need_grads and row_kernel == "cuda" and head_loss_cuda.supports(logits_nV):
                grad_nV, loss_n, max_logit_n, argmax_n = head_loss_cuda.head_loss_rows_op(
                    logits_nV, target_n, 1.0 / rows
                )
                chunk_loss = loss_n.sum()
            else:
                max_logit_n, argmax_n = torch.max(logits_nV, dim=-1)  # L2Wrap reads the compute-dtype logits
                chunk_loss, grad_nV = _chunk_grad_eager(logits_nV, target_n, 1.0 / rows, acc, need_grads)
            del logits_nV
            loss_sum += chunk_loss
            if grad_nV is None:
                continue
            ce_grad_hidden_NC[start:end] = grad_nV @ weight_c
            if compute_dtype == acc:  # into the accumulator, no (V, C) temporary
                ce_grad_weight_VC.addmm_(grad_nV.T, hidden_nC)
            else:  # the chunk's product rounds once to the compute dtype, then adds into fp32
                ce_grad_weight_VC += grad_nV.T @ hidden_nC
            # L2Wrap: the logit gradient max_logit * 1e-4 / N at the arg-max only, so d hidden = coef * W[argmax].
            coef_n = max_logit_n * (L2WRAP_FACTOR / rows)
            l2_grad_hidden_NC[start:end] = coef_n[:, None].to(acc) * weight_c[argmax_n].to(acc)
            argmax_N[start:end], coef_N[start:end] = argmax_n, coef_n
        if need_grads:
            ctx.save_for_backward(ce_grad_hidden_NC, l2_grad_hidden_NC, ce_grad_weight_VC, hidden_NC, argmax_N, coef_N)
            ctx.weight_dtype, ctx.compute_dtype = weight_VC.dtype, compute_dtype
        return (loss_sum / rows).to(torch.promote_types(compute_dtype, torch.float32))

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        ce_grad_hidden_NC, l2_grad_hidden_NC, ce_grad_weight_VC, hidden_NC, argmax_N, coef_N = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = ce_grad_hidden_NC * grad_loss + l2_grad_hidden_NC
        if ctx.needs_input_grad[1]:
            grad_weight = ce_grad_weight_VC * grad_loss.to(ce_grad_weight_VC.dtype)
            # L2Wrap's grad_weight: row argmax[n] gets coef[n] * hidden[n] (unscaled by grad_loss).
            rows_NC = coef_N[:, None].to(grad_weight.dtype) * hidden_NC.to(ctx.compute_dtype).to(grad_weight.dtype)
            grad_weight = grad_weight.index_add_(0, argmax_N, rows_NC).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def fused_head_loss(
    hidden_NC: torch.Tensor,
    weight_VC: torch.Tensor,
    targets_N: torch.Tensor,
    chunk_rows: int = 0,
    row_kernel: str | None = None,
) -> torch.Tensor:
    """`language_model_loss(hidden @ weight.T, targets)` with at most `chunk_rows` rows of logits live.

    chunk_rows: rows of logits per chunk; 0 = all rows at once. Under torch.autocast the matmuls run
    in the autocast dtype, as the unfused Linear head would, with fp32 gradients for fp32 weights.
    row_kernel: "cuda" or "torch" for bf16 GPU logits (see ROW_KERNEL, the default when None).
    """
    row_kernel = ROW_KERNEL if row_kernel is None else row_kernel
    if row_kernel not in ROW_KERNELS:
        raise ValueError(f"unknown head loss row kernel {row_kernel!r}; choose one of {ROW_KERNELS}")
    if hidden_NC.dim() != 2 or targets_N.shape != hidden_NC.shape[:1]:
        shapes = f"{tuple(hidden_NC.shape)} and {tuple(targets_N.shape)}"
        raise ValueError(f"hidden (N, C) and targets (N,) expected, got {shapes}")
    device_type = hidden_NC.device.type
    compute_dtype = hidden_NC.dtype
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    rows = hidden_NC.shape[0]
    chunk = chunk_rows if 0 < chunk_rows < rows else rows
    with torch.autocast(device_type, enabled=False):
        return _apply_eagerly(hidden_NC, weight_VC, targets_N.long(), chunk, compute_dtype, row_kernel)


@torch.compiler.disable
def _apply_eagerly(*args: Any) -> torch.Tensor:
    """FusedHeadLoss outside torch.compile's graph (a graph break in a compiled model).

    torch 2.11 on the GPU compiled it without the cross-entropy part of both gradients: only L2Wrap's
    part reached the head and the body (relative error 1.0 against float64, with either row kernel).
    That matches pytorch/pytorch#180642 (2.11: an in-place op in an autograd.Function's forward, here
    `loss_sum +=`, routes the incoming gradient to the wrong output; fixed for 2.12). Eager, it matches
    float64 (tests/gpu/test_head_loss_cuda.py, tests/gpu/test_compiled_training.py). A forward without
    any in-place op (the chunks' results joined by torch.cat, grad_weight summed out of place) was still
    compiled wrong on torch 2.11 (relative error 1.00, 2026-11-30), so the graph break stays until the
    GPU machine's torch has the fix."""
    return FusedHeadLoss.apply(*args)


class LMHead(nn.Linear):
    """The untied head Linear(C, V); called with targets it returns the fused loss instead of logits.

    The loss runs inside this module's forward so that ZeRO-3 gathers `weight` for it (its hooks
    gather a module's parameters around the module's own forward and backward). `fused_loss_chunk`
    is the rows of logits per chunk (0 = all at once). cuda_kernels=False keeps the loss on PyTorch
    ops on every device (no CUDA build), as a model configured with `wkv_backend: torch` asks.
    """

    def __init__(self, in_features: int, out_features: int, cuda_kernels: bool = True) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.fused_loss_chunk = 0
        self.row_kernel = None if cuda_kernels else "torch"

    def forward(self, x_BTC: torch.Tensor, targets_BT: torch.Tensor | None = None) -> torch.Tensor:
        if targets_BT is None:
            return super().forward(x_BTC)
        return fused_head_loss(
            x_BTC.flatten(0, -2), self.weight, targets_BT.flatten(), self.fused_loss_chunk, self.row_kernel
        )
