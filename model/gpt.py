"""A GPT baseline of the same size as the RWKV-4 model: pre-LN, causal attention, untied head.

Legend: B batch, T time, C n_embd, H heads, D head dim (C / H), F dim_ffn, V vocab.

Same n_layer, n_embd, dim_ffn and vocab as the RWKV it is compared with; linear layers have no
bias, like RWKV's. Positions are rotary (RoPE) rather than a learned table, so the baseline has no
maximum length and goes through context extension like RWKV does.

    >>> import torch
    >>> from model import GPT, ModelConfig
    >>> net = GPT(ModelConfig(arch="gpt", n_layer=2, n_embd=32, n_head=4, vocab_size=50))
    >>> net(torch.zeros(1, 5, dtype=torch.long)).shape
    torch.Size([1, 5, 50])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig
from model.fused_loss import LMHead

ROPE_BASE = 10_000.0


def rotary(x_BHTD: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (d, d + D/2) by position-dependent angles (RoPE)."""
    steps, head_dim = x_BHTD.shape[-2], x_BHTD.shape[-1]
    half = head_dim // 2
    inv_freq = ROPE_BASE ** (-torch.arange(half, device=x_BHTD.device, dtype=torch.float32) / half)
    angle_TD = torch.arange(steps, device=x_BHTD.device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angle_TD.cos().to(x_BHTD.dtype), angle_TD.sin().to(x_BHTD.dtype)
    x1, x2 = x_BHTD[..., :half], x_BHTD[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated, x_BHTD[..., 2 * half :]], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        batch, steps, channels = x_BTC.shape
        q, k, v = self.qkv(x_BTC).split(channels, dim=-1)
        q, k, v = (t.view(batch, steps, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y_BHTD = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
        return self.proj(y_BHTD.transpose(1, 2).reshape(batch, steps, channels))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.dim_ffn, bias=False)
        self.proj = nn.Linear(config.dim_ffn, config.n_embd, bias=False)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x_BTC)))


class GPTBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        x_BTC = x_BTC + self.attn(self.ln1(x_BTC))
        return x_BTC + self.mlp(self.ln2(x_BTC))


class GPT(nn.Module):
    """Decoder-only transformer; `model(idx_BT)` returns logits (B, T, V). `checkpoint_blocks` as in RWKV."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_blocks = False
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(GPTBlock(config) for _ in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd)
        # nn.Linear(C, V), no bias; + fused loss (its CUDA row kernel unless the config avoids CUDA builds)
        self.head = LMHead(config.n_embd, config.vocab_size, cuda_kernels=config.cuda_kernels)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2L), LayerNorm (1, 0)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if param.dim() < 2:
                nn.init.ones_(param) if name.endswith("weight") else nn.init.zeros_(param)
            else:
                nn.init.normal_(param, std=residual_std if name.endswith("proj.weight") else 0.02)

    def forward(self, idx_BT: torch.Tensor, *, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V); with `targets` (B, T) the fused head loss instead, as RWKV.forward."""
        x_BTC = self.emb(idx_BT)
        for block in self.blocks:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x_BTC = checkpoint(block, x_BTC, use_reentrant=False)
            else:
                x_BTC = block(x_BTC)
        return self.head(self.ln_out(x_BTC), targets)
