"""Build the network a `ModelConfig` names: RWKV-4 or the same-size GPT baseline.

>>> from model import ModelConfig, build_model
>>> net = build_model(ModelConfig(arch="gpt", n_layer=2, n_embd=32, vocab_size=50))
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.gpt import GPT
from model.init import init_rwkv4_
from model.rwkv import RWKV


def build_model(config: ModelConfig, *, lr_init: float = 6e-4, generator: torch.Generator | None = None) -> nn.Module:
    """A freshly initialised model on the CPU in float32.

    lr_init is the run's initial learning rate: the RWKV-4 init draws the embedding from
    U(-lr_init, +lr_init) (reference/rwkv4.md §3); the GPT baseline ignores it.
    """
    if config.arch == "gpt":
        return GPT(config)
    if config.arch != "rwkv4":
        raise ValueError(f"unknown model.arch {config.arch!r}; choose 'rwkv4' or 'gpt'")
    with torch.device("meta"):  # skip the constructor's default init: it would be done twice
        model = RWKV(config)
    model.to_empty(device="cpu")
    return init_rwkv4_(model, lr_init=lr_init, generator=generator)
