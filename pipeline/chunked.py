"""The training loss of long samples computed chunk by chunk, the RWKV state carried across chunks.

    loss = chunked_loss(model, x_BT, y_BT, chunk_len=512)   # same value and gradients as unchunked
    loss.backward()

Each chunk of `chunk_len` tokens (the last one may be shorter) runs `model.forward_with_state` from
the previous chunk's state, which is NOT detached: one backward on the sum sends gradient through
the states into earlier chunks (full BPTT, as RWKV-infctx does for RWKV-4; reference/long-context.md
§1.1). Each chunk's token losses are summed and divided by the sample's total token count, and its
L2Wrap term is averaged over the total count too, so loss and gradients equal the unchunked
`language_model_loss` up to float rounding. All chunks' graphs are kept until the one backward
(memory as unchunked); `model.checkpoint_blocks` keeps each block's share small.

Only RWKV has a state to carry; other architectures raise ValueError.

Legend: B batch, T ctx_len (whole sample), t one chunk's length, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.loss import l2wrap


def chunked_loss(model: torch.nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """Mean next-token loss of (B, T) inputs/targets, run `chunk_len` tokens at a time with state."""
    if not hasattr(model, "forward_with_state"):
        raise ValueError(
            f"chunk_len={chunk_len}: chunked training needs a model with a state (RWKV), not {type(model).__name__}"
        )
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    positions = y_BT.numel()  # B*T of the whole sample: every chunk's terms are normalised by it
    total, state = None, None
    for start in range(0, x_BT.shape[1], chunk_len):
        logits_BtV, state = model.forward_with_state(x_BT[:, start : start + chunk_len], state)
        y_Bt = y_BT[:, start : start + chunk_len]
        loss_sum = F.cross_entropy(logits_BtV.reshape(-1, logits_BtV.shape[-1]), y_Bt.reshape(-1), reduction="sum")
        part = l2wrap(loss_sum / positions, logits_BtV, positions)
        total = part if total is None else total + part
    assert total is not None, "empty sample"
    return total
