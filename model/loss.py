"""The reference RWKV-4 loss: cross-entropy wrapped in L2Wrap (reference/rwkv4.md §2.5).

L2Wrap returns the loss unchanged; in backward it adds max_logit * 1e-4 / (B*T) to the logit
gradient at each position's arg-max. That is the gradient of 1e-4 * mean_positions(max_logit^2) / 2,
a z-loss-like pull that keeps logits near zero. As in the reference, the extra term is not scaled
by the incoming gradient (loss scaling or averaging over micro-batches does not shrink it).
model/fused_loss.py computes the same loss and gradients from the head's input, without the logits.

Legend: B batch, T time, V vocab.

    >>> import torch
    >>> logits = torch.randn(2, 3, 10, requires_grad=True)
    >>> language_model_loss(logits, torch.randint(0, 10, (2, 3))).backward()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2WRAP_FACTOR = 1e-4


class L2Wrap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss: torch.Tensor, logits_BTV: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits_BTV)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        (logits_BTV,) = ctx.saved_tensors
        positions = logits_BTV.numel() // logits_BTV.shape[-1]  # B*T
        max_logit, argmax = torch.max(logits_BTV, dim=-1, keepdim=True)
        grad_logits = torch.zeros_like(logits_BTV)
        grad_logits.scatter_(-1, argmax, max_logit * (L2WRAP_FACTOR / positions))
        return grad_loss, grad_logits


def l2wrap(loss: torch.Tensor, logits_BTV: torch.Tensor) -> torch.Tensor:
    """`loss` unchanged; backward also pushes each position's max logit towards 0."""
    return L2Wrap.apply(loss, logits_BTV)


def language_model_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all positions, wrapped in L2Wrap as the reference trains."""
    loss = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1))
    return l2wrap(loss, logits_BTV)
