"""The `cuda` WKV backend: the fused kernel in cuda/wkv.cu, built lazily and cached on disk.

    >>> import torch
    >>> from model.wkv_cuda import wkv_cuda
    >>> k = torch.randn(2, 100, 64, device="cuda"); v = torch.randn_like(k)
    >>> y, (aa, bb, pp) = wkv_cuda(torch.zeros(64, device="cuda"), torch.zeros(64, device="cuda"), k, v)

Legend: B batch, T time, C channels. Same contract as `model.wkv_reference`: time_decay and
time_first (C,) float32 raw parameters; k, v (B, T, C) float32 or bfloat16; state (aa, bb, pp)
each (B, C) float32 with pp the running maximum exponent; y comes back in k's dtype, the state in
float32. Gradients reach all five inputs, the state included, so chained calls equal one call.
The kernel is registered as the torch custom ops `rwkv::wkv_forward` / `rwkv::wkv_backward`
(with fake implementations and autograd), so `torch.compile(fullgraph=True)` traces through it.

The extension is compiled on first use with torch.utils.cpp_extension.load into torch's extension
cache (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR, which torch reads), under a name keyed
by the sources, flags and torch/CUDA versions, so a second process loads the built library without
compiling and an edited kernel gets a fresh build. If the build fails, the error says so and names
the `torch` backend (`model.wkv_backend=torch`) as the fallback.
"""

from types import ModuleType

import torch
from torch import Tensor

from model.cuda_extension import CudaBuildError, ExtensionBuilds
from model.wkv_reference import State, zero_state

__all__ = ["wkv_cuda", "load_extension", "CudaBuildError", "BUILDS", "OP_DEFINES", "wkv_forward_op", "wkv_backward_op"]

BUILDS = ExtensionBuilds(
    "wkv_cuda",
    ("wkv.cu", "wkv_binding.cpp"),
    fallback="Use the pure-PyTorch backend instead: set model.wkv_backend=torch "
    "(or call model.wkv.wkv(..., backend='torch')).",
)
OP_DEFINES: tuple[str, ...] = ()
"""The build variant the ops below run: () is the default build; the GPU tests run a candidate
variant through everything with RWKV_WKV_TEST_DEFINES="NAME=VALUE ..." (tests/gpu/test_wkv_cuda.py)."""
POISON_OUTPUTS_FOR_TESTS = False
"""Test hook: the extension fills outputs and workspaces with NaN before each launch."""


def load_extension(defines: tuple[str, ...] = ()) -> ModuleType:
    """The compiled extension, building it on first use (once per process, cached across processes).

    `defines` ("WKV_SUB=8", ...) selects a build variant of cuda/wkv.cu's tuning macros.
    """
    return BUILDS.load(defines)


# The kernel as torch custom ops (namespace `rwkv`), so torch.compile sees one opaque node per call
# with shapes from the fake implementations instead of breaking the graph at the extension call.
# Forward returns the two workspaces the backward needs: `sub` (float32, the state at every
# sub-chunk start) and `lastwin` (int32, per segment the last step where k won the running max).


def _workspace_numels(batch, steps, channels):
    """Elements of `sub` and `lastwin` (ints or SymInts), from the build's step counts."""
    ext = load_extension(OP_DEFINES)
    sub_steps, segment_steps = ext.sub_steps(), ext.segment_steps()
    n_sub = batch * ((steps + sub_steps - 1) // sub_steps) * 3 * channels
    n_segment = batch * ((steps + segment_steps - 1) // segment_steps) * channels
    return n_sub, n_segment


@torch.library.custom_op("rwkv::wkv_forward", mutates_args=())
def wkv_forward_op(
    time_decay: Tensor,
    time_first: Tensor,
    k: Tensor,
    v: Tensor,
    aa0: Tensor,
    bb0: Tensor,
    pp0: Tensor,
    poison: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, aa1, bb1, pp1, sub, lastwin); inputs as ext.forward takes them (contiguous, fp32 state)."""
    y, aa1, bb1, pp1, sub, lastwin = load_extension(OP_DEFINES).forward(
        time_decay, time_first, k, v, aa0, bb0, pp0, poison
    )
    return y, aa1, bb1, pp1, sub, lastwin


@wkv_forward_op.register_fake
def _wkv_forward_fake(time_decay, time_first, k, v, aa0, bb0, pp0, poison):
    batch, steps, channels = k.shape
    n_sub, n_segment = _workspace_numels(batch, steps, channels)
    state = [k.new_empty((batch, channels), dtype=torch.float32) for _ in range(3)]
    sub = k.new_empty((n_sub,), dtype=torch.float32)
    lastwin = k.new_empty((n_segment,), dtype=torch.int32)
    return torch.empty_like(k), *state, sub, lastwin


@torch.library.custom_op("rwkv::wkv_backward", mutates_args=())
def wkv_backward_op(
    time_decay: Tensor,
    time_first: Tensor,
    k: Tensor,
    v: Tensor,
    gy: Tensor,
    aa0: Tensor,
    bb0: Tensor,
    aa1: Tensor,
    bb1: Tensor,
    gaa1: Tensor,
    gbb1: Tensor,
    gpp1: Tensor,
    sub: Tensor,
    lastwin: Tensor,
    poison: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(gk, gv, g_time_decay, g_time_first, gaa0, gbb0, gpp0)."""
    inputs = (time_decay, time_first, k, v, gy, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1, sub, lastwin)
    gk, gv, gtd, gtf, gaa0, gbb0, gpp0 = load_extension(OP_DEFINES).backward(*inputs, poison)
    return gk, gv, gtd, gtf, gaa0, gbb0, gpp0


@wkv_backward_op.register_fake
def _wkv_backward_fake(time_decay, time_first, k, v, gy, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1, sub, lastwin, poison):
    sequence_grads = [torch.empty_like(k) for _ in range(2)]
    state_grads = [torch.empty_like(aa0) for _ in range(3)]
    return *sequence_grads, torch.empty_like(time_decay), torch.empty_like(time_first), *state_grads


def _setup_context(ctx, inputs, output):
    time_decay, time_first, k, v, aa0, bb0, _pp0, poison = inputs
    _y, aa1, bb1, _pp1, sub, lastwin = output
    ctx.save_for_backward(time_decay, time_first, k, v, aa0, bb0, aa1, bb1, sub, lastwin)
    ctx.poison = poison


def _backward(ctx, gy, gaa1, gbb1, gpp1, _g_sub, _g_lastwin):
    time_decay, time_first, k, v, aa0, bb0, aa1, bb1, sub, lastwin = ctx.saved_tensors
    gy = torch.zeros_like(k) if gy is None else gy.to(k.dtype).contiguous()
    gaa1, gbb1, gpp1 = (torch.zeros_like(aa1) if g is None else g.float().contiguous() for g in (gaa1, gbb1, gpp1))
    grads = wkv_backward_op(
        time_decay, time_first, k, v, gy, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1, sub, lastwin, ctx.poison
    )
    gk, gv, gtd, gtf, gaa0, gbb0, gpp0 = grads
    return gtd, gtf, gk, gv, gaa0, gbb0, gpp0, None


wkv_forward_op.register_autograd(_backward, setup_context=_setup_context)


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
    return _wkv_op(time_decay, time_first, k_BTC, v_BTC, state)


def _wkv_op(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k_BTC: torch.Tensor,
    v_BTC: torch.Tensor,
    state: State | None,
) -> tuple[torch.Tensor, State]:
    """wkv_cuda without the device check: the inputs brought to the op's layout, then the op."""
    batch, steps, channels = k_BTC.shape
    if state is None:
        state = zero_state(batch, channels, k_BTC.device)
    aa0, bb0, pp0 = (s.float().contiguous() for s in state)
    if steps == 0:  # nothing to do: the state passes through unchanged (and so does its gradient)
        return k_BTC.new_zeros(batch, 0, channels), (aa0, bb0, pp0)
    time_decay_f, time_first_f = time_decay.float().contiguous(), time_first.float().contiguous()
    k = k_BTC.contiguous()
    v = v_BTC.to(k.dtype).contiguous()
    y, aa1, bb1, pp1, _sub, _lastwin = wkv_forward_op(
        time_decay_f, time_first_f, k, v, aa0, bb0, pp0, POISON_OUTPUTS_FOR_TESTS
    )
    return y, (aa1, bb1, pp1)
