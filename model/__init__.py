"""The model package: RWKV-4, its init, the WKV op, RNN mode, checkpoint export, a GPT baseline.

Imports torch and the stdlib only (safetensors lazily, in `model.checkpoint`).

    >>> import torch
    >>> from model import ModelConfig, build_model
    >>> net = build_model(ModelConfig(n_layer=2, n_embd=32, vocab_size=50, wkv_backend="reference"))
    >>> net(torch.zeros(1, 4, dtype=torch.long)).shape
    torch.Size([1, 4, 50])
"""

from model.build import build_model
from model.checkpoint import (
    CheckpointFormatError,
    load_rwkv4_pth,
    load_rwkv4_safetensors,
    save_rwkv4_pth,
    save_rwkv4_safetensors,
)
from model.config import ModelConfig
from model.gpt import GPT
from model.init import init_rwkv4_
from model.loss import language_model_loss
from model.rnn import generate, rnn_step
from model.rwkv import RWKV, ModelState, detach_state
from model.wkv import wkv

__all__ = [
    "CheckpointFormatError",
    "GPT",
    "RWKV",
    "ModelConfig",
    "ModelState",
    "build_model",
    "detach_state",
    "generate",
    "init_rwkv4_",
    "language_model_loss",
    "load_rwkv4_pth",
    "load_rwkv4_safetensors",
    "rnn_step",
    "save_rwkv4_pth",
    "save_rwkv4_safetensors",
    "wkv",
]
