"""The WKV operator of RWKV-4 and the choice of its backend.

    y_BTC, state = wkv(time_decay, time_first, k_BTC, v_BTC, state=None, backend="auto")

time_decay and time_first are (C,) raw parameters (the op applies w = -exp(time_decay) itself);
state is (aa, bb, pp), each (B, C) float32, as documented in `model.wkv_reference`. Gradients
flow to all inputs, the state included, so a long sequence can be processed chunk by chunk.

Backends: "reference" (float64 loop, tests only), "torch" (vectorised, CPU training) and "cuda"
(the fused kernel); "auto" picks cuda for CUDA tensors (a failed build is an error that names the
torch backend as the fallback), torch otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.wkv_reference import State, wkv_reference, zero_state

WkvFn = Callable[..., tuple[torch.Tensor, State]]

__all__ = ["State", "wkv", "zero_state", "backend_function", "BACKENDS"]

BACKENDS = ("auto", "cuda", "torch", "reference")


def backend_function(backend: str, device: torch.device) -> WkvFn:
    if backend not in BACKENDS:
        raise ValueError(f"unknown WKV backend {backend!r}; choose one of {BACKENDS}")
    if backend == "reference":
        return wkv_reference
    if backend == "cuda" or (backend == "auto" and device.type == "cuda"):
        from model.wkv_cuda import wkv_cuda  # built lazily on first use

        return wkv_cuda
    from model.wkv_torch import wkv_torch

    return wkv_torch


def wkv(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k_BTC: torch.Tensor,
    v_BTC: torch.Tensor,
    state: State | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, State]:
    return backend_function(backend, k_BTC.device)(time_decay, time_first, k_BTC, v_BTC, state)
