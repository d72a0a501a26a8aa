"""Throughput metrics of a training run: model FLOPs, MFU, tokens/s and accelerator memory.

    flops = train_flops_per_token(vocab_size=50277, n_embd=768, n_layer=12)   # 7.84e8 (169M)
    mfu(tokens_per_s=300_000, flops_per_token=flops, peak_tflops=989.0, devices=1)  # 0.238

FLOPs per token follow reference/rwkv4.md §8.1: the forward pass is 2(VD + 13D²L) (matmuls only;
the WKV recurrence and element-wise work are O(D) per token and left out, as in the paper) and
training (forward + backward) is three times that, 6(VD + 13D²L).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


def train_flops_per_token(vocab_size: int, n_embd: int, n_layer: int) -> float:
    return 6.0 * (vocab_size * n_embd + 13.0 * n_embd * n_embd * n_layer)


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float, devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * devices)


def accelerator_memory_gib(device: torch.device) -> dict[str, float]:
    """Peak allocated and reserved memory since the last call (CUDA only; empty on CPU)."""
    if device.type != "cuda":
        return {}
    stats = {
        "gpu_mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "gpu_mem_reserved_gib": torch.cuda.memory_reserved(device) / 2**30,
    }
    torch.cuda.reset_peak_memory_stats(device)
    return stats


class Throughput:
    """Tokens per second over the steps since the last `rate()` call (a sliding report window)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (validation, checkpoints) does not count against training throughput."""
        started = time.perf_counter()
        yield
        self.start += time.perf_counter() - started

    def rate(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # count finished work, not queued kernels
        now = time.perf_counter()
        tokens_per_s = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0
        return tokens_per_s
