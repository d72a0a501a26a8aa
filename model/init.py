"""The RWKV-4 initialisation of the reference (v4neo), reference/rwkv4.md §3.

    >>> from model import ModelConfig, RWKV, init_rwkv4_
    >>> net = init_rwkv4_(RWKV(ModelConfig(n_layer=2, n_embd=32, vocab_size=50)), lr_init=4e-4)

Per layer l of L (r01 = l/(L-1), r10 = 1 - l/L, ddd_i = i/C):
  att.time_decay[h] = -5 + 8 (h/(A-1))^(0.7 + 1.3 r01)
  att.time_first[i] = ln 0.3 + 0.5 (((i+1) mod 3) - 1)
  att.time_mix_k = ddd^r10, att.time_mix_v = ddd^r10 + 0.3 r01, att.time_mix_r = ddd^(0.5 r10)
  ffn.time_mix_k = ffn.time_mix_r = ddd^r10
  LayerNorms: weight 1, bias 0
  emb ~ U(-lr_init, +lr_init)
  att.key, att.receptance, att.output, ffn.value, ffn.receptance = 0
  att.value, ffn.key, head: orthogonal with gain sqrt(out/in) if out > in else 1, times 0.5 for head

One layer (L = 1): the reference divides by zero in r01; here r01 = 0, i.e. the single layer is
initialised as a first layer (its r10 = 1 agrees with that).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from model.rwkv import RWKV

ZERO_MATRICES = ("att.key", "att.receptance", "att.output", "ffn.value", "ffn.receptance")
ORTHOGONAL_SCALES = {"att.value": 1.0, "ffn.key": 1.0}
HEAD_SCALE = 0.5


def layer_ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    """(r01, r10) of §3; r01 = 0 for a one-layer model instead of dividing by zero."""
    r01 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    return r01, 1.0 - layer_id / n_layer


def time_decay_init(dim_att: int, r01: float) -> torch.Tensor:
    h = torch.arange(dim_att, dtype=torch.float64) / max(dim_att - 1, 1)
    return -5 + 8 * h ** (0.7 + 1.3 * r01)


def time_first_init(dim_att: int) -> torch.Tensor:
    zigzag = (torch.arange(dim_att, dtype=torch.float64) + 1) % 3 - 1
    return math.log(0.3) + 0.5 * zigzag


def orthogonal_gain(weight: torch.Tensor, scale: float) -> float:
    out_features, in_features = weight.shape
    return scale * (math.sqrt(out_features / in_features) if out_features > in_features else 1.0)


@torch.no_grad()
def init_rwkv4_(model: RWKV, lr_init: float = 6e-4, generator: torch.Generator | None = None) -> RWKV:
    """Re-initialise every parameter of `model` in place as the reference does; returns the model.

    lr_init is the run's initial learning rate, which v4neo reuses as the embedding's half-range.
    Pass a seeded `generator` for a reproducible init independent of the global RNG.
    """
    n_layer = len(model.blocks)
    n_embd = model.emb.weight.shape[1]
    ddd = torch.arange(n_embd, dtype=torch.float64) / n_embd
    for layer_id, block in enumerate(model.blocks):
        r01, r10 = layer_ratios(layer_id, n_layer)
        att, ffn = block.att, block.ffn
        att.time_decay.copy_(time_decay_init(att.time_decay.numel(), r01))
        att.time_first.copy_(time_first_init(att.time_first.numel()))
        att.time_mix_k.copy_(ddd**r10)
        att.time_mix_v.copy_(ddd**r10 + 0.3 * r01)
        att.time_mix_r.copy_(ddd ** (0.5 * r10))
        ffn.time_mix_k.copy_(ddd**r10)
        ffn.time_mix_r.copy_(ddd**r10)
        for name in ZERO_MATRICES:
            block.get_submodule(name).weight.zero_()
        for name, scale in ORTHOGONAL_SCALES.items():
            weight = block.get_submodule(name).weight
            nn.init.orthogonal_(weight, gain=orthogonal_gain(weight, scale), generator=generator)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.uniform_(model.emb.weight, -lr_init, lr_init, generator=generator)
    nn.init.orthogonal_(model.head.weight, gain=orthogonal_gain(model.head.weight, HEAD_SCALE), generator=generator)
    return model
