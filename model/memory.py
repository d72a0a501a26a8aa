"""Activation-memory probes: what a forward keeps for backward, and the peak bytes of a whole step.

    from model.memory import PeakLiveBytes, saved_tensor_bytes
    kept = saved_tensor_bytes(lambda: model(x_BT), exclude=model.parameters())
    with PeakLiveBytes() as tracker:
        loss_fn(model(x_BT), y_BT).backward()
    print(kept, tracker.peak)

Both count distinct storages, so views and tensors saved twice count once. They work on any device;
`PeakLiveBytes` intercepts every op, so it slows the step down and belongs in tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


def saved_storages(forward: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> dict[int, int]:
    """Bytes of each distinct storage that `forward()` saves for backward (keyed by address), `exclude`d left out."""
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return storages


def saved_tensor_bytes(forward: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages that `forward()` saves for backward, `exclude`d tensors left out."""
    return sum(saved_storages(forward, exclude).values())


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops create while active (autograd's backward included)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.total = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in self.live:
                storage = tensor.untyped_storage()
                self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                self.total += storage.nbytes()
        if self.total > self.peak:  # only then can the live total be a new peak: drop freed storages
            self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
            self.total = sum(size for _, size in self.live.values())
            self.peak = max(self.peak, self.total)
        return out
