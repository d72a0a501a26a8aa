"""The `cuda` WKV backend: the fused kernel in cuda/wkv.cu, built lazily and cached on disk.

    >>> import torch
    >>> from model.wkv_cuda import wkv_cuda
    >>> k = torch.randn(2, 100, 64, device="cuda"); v = torch.randn_like(k)
    >>> y, (aa, bb, pp) = wkv_cuda(torch.zeros(64, device="cuda"), torch.zeros(64, device="cuda"), k, v)

Legend: B batch, T time, C channels. Same contract as `model.wkv_reference`: time_decay and
time_first (C,) float32 raw parameters; k, v (B, T, C) float32 or bfloat16; state (aa, bb, pp)
each (B, C) float32 with pp the running maximum exponent; y comes back in k's dtype, the state in
float32. Gradients reach all five inputs, the state included, so chained calls equal one call.

The extension is compiled on first use with torch.utils.cpp_extension.load into torch's extension
cache (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR, which torch reads), under a name keyed
by the sources, flags and torch/CUDA versions, so a second process loads the built library without
compiling and an edited kernel gets a fresh build. If the build fails, the error says so and names
the `torch` backend (`model.wkv_backend=torch`) as the fallback.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from model.wkv_reference import State, zero_state

__all__ = ["wkv_cuda", "load_extension", "CudaBuildError", "SOURCE_DIR"]

SOURCES = ("wkv.cu", "wkv_binding.cpp")


def _source_dir() -> Path:
    """cuda/ of the checkout (editable installs, tests), else the copy a wheel installs under share/."""
    checkout = Path(__file__).resolve().parent.parent / "cuda"
    installed = Path(sys.prefix) / "share" / "rwkv-pipeline" / "cuda"
    return checkout if (checkout / SOURCES[0]).is_file() or not installed.is_dir() else installed


SOURCE_DIR = _source_dir()
NVCC_FLAGS = ["-O3", "-Xptxas", "-O3", "-std=c++17"]

_extension: ModuleType | None = None
POISON_OUTPUTS_FOR_TESTS = False
"""Test hook: the extension fills outputs and workspaces with NaN before each launch."""
_lock = threading.Lock()


class CudaBuildError(RuntimeError):
    """The WKV CUDA extension could not be built or loaded."""


def _source_digest() -> str:
    """Sources, flags and toolchain versions: a change of any of them gets a fresh build folder."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((SOURCE_DIR / name).read_bytes())
    h.update(" ".join(NVCC_FLAGS).encode())
    h.update(f"{torch.__version__} {torch.version.cuda}".encode())
    if torch.cuda.is_available():
        h.update(str(torch.cuda.get_device_capability()).encode())
    return h.hexdigest()[:16]


def load_extension() -> ModuleType:
    """The compiled extension, building it on first use (once per process, cached across processes)."""
    global _extension
    if _extension is not None:
        return _extension
    with _lock:
        if _extension is None:
            _extension = _build()
    return _extension


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    try:
        return load(
            name=f"wkv_cuda_{_source_digest()}",
            sources=[str(SOURCE_DIR / name) for name in SOURCES],
            extra_cuda_cflags=NVCC_FLAGS,
            extra_cflags=["-O3"],
            verbose=False,
        )
    except Exception as error:  # compiler missing, compile error, ABI mismatch: all say the same
        raise CudaBuildError(
            f"building the WKV CUDA kernel from {SOURCE_DIR} failed ({type(error).__name__}: {error}). "
            "Use the pure-PyTorch backend instead: set model.wkv_backend=torch "
            "(or call model.wkv.wkv(..., backend='torch'))."
        ) from error


class _WkvCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, time_decay, time_first, k, v, aa0, bb0, pp0):  # type: ignore[override]
        ext = load_extension()
        y, aa1, bb1, pp1, sub, lastwin = ext.forward(
            time_decay, time_first, k, v, aa0, bb0, pp0, POISON_OUTPUTS_FOR_TESTS
        )
        ctx.save_for_backward(time_decay, time_first, k, v, aa0, bb0, aa1, bb1, sub, lastwin)
        return y, aa1, bb1, pp1

    @staticmethod
    def backward(ctx, gy, gaa1, gbb1, gpp1):  # type: ignore[override]
        time_decay, time_first, k, v, aa0, bb0, aa1, bb1, sub, lastwin = ctx.saved_tensors
        gy = torch.zeros_like(k) if gy is None else gy.to(k.dtype).contiguous()
        gaa1, gbb1, gpp1 = (torch.zeros_like(aa1) if g is None else g.float().contiguous() for g in (gaa1, gbb1, gpp1))
        inputs = (time_decay, time_first, k, v, gy, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1, sub, lastwin)
        gk, gv, gtd, gtf, gaa0, gbb0, gpp0 = load_extension().backward(*inputs, POISON_OUTPUTS_FOR_TESTS)
        return gtd, gtf, gk, gv, gaa0, gbb0, gpp0


def wkv_cuda(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k_BTC: torch.Tensor,
    v_BTC: torch.Tensor,
    state: State | None = None,
) -> tuple[torch.Tensor, State]:
    """y (B, T, C) in k's dtype and the state (aa, bb, pp) after the last step, float32."""
    if not k_BTC.is_cuda:
        raise ValueError("the cuda WKV backend needs CUDA tensors; use backend='torch' on the CPU")
    if k_BTC.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"the cuda WKV backend takes float32 or bfloat16 k and v, got {k_BTC.dtype}")
    batch, steps, channels = k_BTC.shape
    if state is None:
        state = zero_state(batch, channels, k_BTC.device)
    aa0, bb0, pp0 = (s.float().contiguous() for s in state)
    if steps == 0:  # nothing to do: the state passes through unchanged (and so does its gradient)
        return k_BTC.new_zeros(batch, 0, channels), (aa0, bb0, pp0)
    time_decay_f, time_first_f = time_decay.float().contiguous(), time_first.float().contiguous()
    k = k_BTC.contiguous()
    v = v_BTC.to(k.dtype).contiguous()
    y, aa1, bb1, pp1 = _WkvCuda.apply(time_decay_f, time_first_f, k, v, aa0, bb0, pp0)
    return y, (aa1, bb1, pp1)
