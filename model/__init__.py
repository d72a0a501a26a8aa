"""The model package: RWKV-4, its init, the WKV op, RNN mode, checkpoint export, a GPT baseline.

Imports torch and the stdlib only (safetensors lazily, in `model.checkpoint`).

    >>> import torch
    >>> from model import ModelConfig, build_model
    >>> net = build_model(ModelConfig(n_layer=2, n_embd=32, vocab_size=50, wkv_backend="reference"))
    >>> net(torch.zeros(1, 4, dtype=torch.long)).shape
    torch.Size([1, 4, 50])

The names below load their module on first use (PEP 562): `model.config` is a stdlib dataclass that
the config loader and the CLI import, and importing the package eagerly cost them torch and
torch._dynamo (`rwkv-pipeline status` spent ~4 of its 7 s importing what it never ran). The WKV op is
`from model.wkv import wkv`: a package-level `wkv` would be the function or the submodule depending on
what was imported first.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "CheckpointFormatError": "model.checkpoint",
    "GPT": "model.gpt",
    "RWKV": "model.rwkv",
    "ModelConfig": "model.config",
    "ModelState": "model.rwkv",
    "build_model": "model.build",
    "detach_state": "model.rwkv",
    "generate": "model.rnn",
    "init_rwkv4_": "model.init",
    "language_model_loss": "model.loss",
    "load_rwkv4_pth": "model.checkpoint",
    "load_rwkv4_safetensors": "model.checkpoint",
    "rnn_step": "model.rnn",
    "save_rwkv4_pth": "model.checkpoint",
    "save_rwkv4_safetensors": "model.checkpoint",
}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
