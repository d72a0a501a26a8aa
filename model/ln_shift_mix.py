"""LayerNorm, token shift and time-mix in one pass: the input side of each RWKV-4 branch.

Legend: B batch, T time, C n_embd, M mixes (3 for TimeMix: k, v, r; 2 for ChannelMix: k, r).

    ln = LayerNorm(x)                              x (B, T, C), weight and bias (C,)
    xx[:, t] = ln[:, t-1],  xx[:, 0] = x_prev      x_prev (B, C): the previous chunk's last ln (None: zeros)
    out[m] = ln * mixes[m] + xx * (1 - mixes[m])   mixes (M, C)

returns the M outputs (B, T, C) in x's dtype (separate tensors, so that their gradients need no
stacking) and ln[:, -1] (B, C), the next chunk's x_prev.

Why one pass: the unfused graph (model/rwkv.py) writes the LayerNorm output, rereads it for each mix,
saves it for the mix gradients, and in backward sums those gradients over all B*T rows in kernels of
their own (Inductor cannot fuse a column sum into the LayerNorm-backward kernel that produces its
input). On an H200 the five time_mix gradients alone cost 4.2 % of the 169M training step
(docs/benchmarks.md, "where the Triton kernels' bytes go"). Here the forward reads x once and writes
the M mixes (and each row's LayerNorm mean and rstd, 8 bytes a row); the backward reads x, those
statistics and the M output gradients once, writes x's gradient, and keeps the
column sums (mixes, LayerNorm weight and bias) of ROWS consecutive rows of one sequence in registers,
one partial per program, summed afterwards in a fixed order. Both walk ROWS rows of one sequence per
program, one row at a time (model/ln_shift_mix_kernels.py).

`ln_shift_mix` is the entry point: the Triton kernels for CUDA tensors (as the custom op
`rwkv::ln_shift_mix`, which torch.compile traces into), the PyTorch reference otherwise. The kernels
are built on first use; under TRITON_INTERPRET=1 they also run on CPU tensors (the tests do that).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor

# Tuning (docs/benchmarks.md, session 14): warps per program of each kernel (None: about 8 elements of a
# row per thread, at most 8 warps); rows of one sequence per program (the backward writes one partial of
# the column sums per program); software-pipelining stages of both kernels' row loops (loads for the
# next rows issued while one is computed; None: Triton's default, which leaves the loop unpipelined).
FORWARD_WARPS, BACKWARD_WARPS = 4, 4
ROWS = 64
STAGES = 4
# The warps above are tuned for rows of up to 1024 columns (C 768 and 1024); wider rows get
# proportionally more (as many elements per thread), and each kernel keeps only the pipelining stages its
# device's shared memory holds (`_stages_that_fit`). Rows wider than MAX_CHANNELS take the PyTorch
# reference: the backward carries ~18 row vectors per thread, and at 4096 columns (3B and up) it spills
# registers even at 16 warps (168 bytes on sm_90) and measured slower than the kernels before it
# (docs/benchmarks.md, session 14).
MAX_CHANNELS = 2048
# Decided once, not on every call in the model's forward (where torch.compile would also have to trace
# the import and the environment lookup): whether Triton is installed, and whether its kernels run
# interpreted (TRITON_INTERPRET=1, which Triton itself reads when it defines a kernel), so CPU tensors
# may take them too.
TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def ln_shift_mix_reference(
    x: Tensor, weight: Tensor, bias: Tensor, x_prev: Tensor | None, mixes: Tensor, eps: float
) -> tuple[tuple[Tensor, ...], Tensor]:
    """The same computation in PyTorch ops (and the definition the kernels are tested against)."""
    ln = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    first = torch.zeros_like(ln[:, :1]) if x_prev is None else x_prev.unsqueeze(1).to(ln.dtype)
    xx = torch.cat([first, ln[:, :-1]], dim=1)
    return tuple(ln * m + xx * (1 - m) for m in mixes.to(ln.dtype)), ln[:, -1]


def _kernels():
    """(forward, backward) Triton kernels, imported on first use (see model/ln_shift_mix_kernels.py)."""
    from model import ln_shift_mix_kernels as kernels

    return kernels.forward, kernels.backward


def launch_settings() -> list[int]:
    """The tuning constants above as the custom ops take them (0 for None): [FORWARD_WARPS, BACKWARD_WARPS,
    ROWS, STAGES].

    They are an argument of the ops, not read inside them, so that torch.compile sees them: Dynamo then
    guards on them (changing one recompiles), and Inductor's on-disk caches key compiled graphs by them.
    Read inside the op they were invisible to both, and a process could run kernels compiled for other
    settings by an earlier one (the kernels' source is in the cache key, the launch settings were not).
    """
    return [FORWARD_WARPS or 0, BACKWARD_WARPS or 0, ROWS, STAGES or 0]


def set_launch_settings(settings: list[int]) -> None:
    """Set the tuning constants above from a list as launch_settings() returns it (the benchmarks' sweeps)."""
    global FORWARD_WARPS, BACKWARD_WARPS, ROWS, STAGES
    fwd_warps, bwd_warps, ROWS, stages = settings
    FORWARD_WARPS, BACKWARD_WARPS, STAGES = fwd_warps or None, bwd_warps or None, stages or None


def _launch_config(x: Tensor, mixes: Tensor, settings: list[int], backward: bool) -> tuple[tuple[int, int], dict]:
    import triton

    batch, steps, channels = x.shape
    if mixes.shape[0] not in (2, 3) or mixes.shape[1] != channels:
        raise ValueError(f"mixes must be (2 or 3, {channels}), got {tuple(mixes.shape)}")
    fwd_warps, bwd_warps, rows, stages = settings
    warps = bwd_warps if backward else fwd_warps
    block = triton.next_power_of_2(channels)
    # Tuned warps for rows of up to 1024 columns, as many elements per thread for wider ones; the default
    # already scales with the row.
    warps = warps * max(1, block // 1024) if warps else max(1, min(8, block // 256))
    if stages:
        per_stage = stage_bytes(block, mixes.shape[0], x.element_size(), backward)
        stages = _stages_that_fit(stages, per_stage, _shared_memory_bytes(x.device))
    meta = {"M": mixes.shape[0], "ROWS": rows, "BLOCK_C": block, "STAGES": stages or None, "num_warps": warps}
    return (batch, triton.cdiv(steps, rows)), meta


def stage_bytes(block: int, n_mix: int, x_bytes: int, backward: bool) -> int:
    """Shared memory that one pipelining stage of a kernel's row loop takes, at most: a row of x, and in the
    backward a row of each mix's output gradient and of ln[:, -1]'s, in x's dtype, plus the row's statistics
    (under 1 KB). An upper bound of what Triton allocates for sm_90 (tests/unit/test_ln_shift_mix.py
    compiles to check it)."""
    return block * x_bytes * (2 + n_mix if backward else 1) + 1024


# Shared memory a kernel uses besides its pipelining buffers (the cross-warp sums' scratch): left free when
# choosing stages.
_SCRATCH_BYTES = 16 << 10


def _stages_that_fit(stages: int, per_stage: int, available: int) -> int:
    """The most stages, up to `stages`, whose buffers (Triton keeps stages - 1 rows' loads in flight in
    shared memory: (stages - 1) x per_stage, as compiled) and scratch fit in `available` bytes; 1 (no
    pipelining) at the least."""
    while stages > 1 and (stages - 1) * per_stage + _SCRATCH_BYTES > available:
        stages -= 1
    return stages


def _shared_memory_bytes(device: torch.device) -> int:
    """Shared memory one program may use on `device` (as Triton checks it at launch); unlimited for the
    interpreter on CPU tensors."""
    if device.type != "cuda":
        return 1 << 62
    return _cuda_shared_memory_bytes(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_shared_memory_bytes(index: int) -> int:
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(index)["max_shared_mem"]


def forward_kernel_launch(x, weight, bias, x_prev, mixes, eps, settings=None, launch=None):
    """Run the forward kernel: (the M outputs (B, T, C), last (B, C), stats (B, T, 2): each row's LayerNorm
    mean and rstd in fp32, which the backward takes). `settings`: launch_settings() when None; `launch`
    wraps the kernel (the custom op passes torch.library.wrap_triton)."""
    kernel, _ = _kernels()
    kernel = launch(kernel) if launch else kernel
    grid, meta = _launch_config(x, mixes, settings or launch_settings(), backward=False)
    _, steps, channels = x.shape
    outs = tuple(torch.empty_like(x) for _ in range(mixes.shape[0]))
    last = x.new_empty((x.shape[0], channels))
    stats = torch.empty((x.shape[0], steps, 2), device=x.device, dtype=torch.float32)
    # Placeholders for absent tensors (never touched, by the HAS_PREV and M switches): x.
    prev = x_prev if x_prev is not None else x
    out2 = outs[2] if len(outs) > 2 else x
    kernel[grid](
        x, weight, bias, prev, mixes, outs[0], outs[1], out2, last, stats, steps, channels, eps,
        HAS_PREV=x_prev is not None, **meta,
    )  # fmt: skip
    return outs, last, stats


def backward_kernel_launch(g_outs, g_last, x, weight, bias, x_prev, mixes, stats, settings=None, launch=None):
    """Run the backward kernel on the M outputs' gradients (None: zeros), with the forward's row `stats`:
    (gx, g_weight, g_bias, g_x_prev or an empty tensor, g_mixes). `settings`, `launch`: as forward's."""
    _, kernel = _kernels()
    kernel = launch(kernel) if launch else kernel
    grid, meta = _launch_config(x, mixes, settings or launch_settings(), backward=True)
    _, steps, channels = x.shape
    g = [t.contiguous() if t is not None else torch.zeros_like(x) for t in g_outs]
    gx = torch.empty_like(x)
    g_prev = torch.empty_like(x_prev) if x_prev is not None else x.new_empty(0)
    parts = torch.empty((grid[0] * grid[1], mixes.shape[0] + 2, channels), device=x.device, dtype=torch.float32)
    # Placeholders for absent tensors (never touched, by the HAS_* and M switches): x to read, gx to write.
    kernel[grid](
        x, weight, bias, x_prev if x_prev is not None else x, mixes, stats, g[0], g[1], g[2] if len(g) > 2 else x,
        g_last.contiguous() if g_last is not None else x, gx, g_prev if x_prev is not None else gx, parts,
        steps, channels, HAS_PREV=x_prev is not None, HAS_GLAST=g_last is not None, **meta,
    )  # fmt: skip
    sums = parts.sum(0)  # a fixed-order reduction over the programs' partials: deterministic
    m = mixes.shape[0]
    # Copies, not views of `sums`: a custom op's outputs may not alias one another.
    g_weight, g_bias, g_mixes = (
        t.to(p.dtype, copy=True) for t, p in ((sums[m], weight), (sums[m + 1], bias), (sums[:m], mixes))
    )
    return gx, g_weight, g_bias, g_prev, g_mixes


# The kernels as torch custom ops (namespace `rwkv`), so torch.compile traces them as Triton kernels
# of its own graph (torch.library.triton_op) instead of breaking the graph.
# The op's outputs are fixed in number: three mixes' (an empty third for two), ln[:, -1] and the row
# statistics the backward takes (no gradient).
@torch.library.triton_op("rwkv::ln_shift_mix", mutates_args=())
def ln_shift_mix_op(
    x: Tensor, weight: Tensor, bias: Tensor, x_prev: Tensor | None, mixes: Tensor, eps: float, settings: list[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    outs, last, stats = forward_kernel_launch(x, weight, bias, x_prev, mixes, eps, settings, torch.library.wrap_triton)
    return outs[0], outs[1], outs[2] if len(outs) > 2 else x.new_empty(0), last, stats


@torch.library.triton_op("rwkv::ln_shift_mix_backward", mutates_args=())
def ln_shift_mix_backward_op(
    g0: Tensor | None,
    g1: Tensor | None,
    g2: Tensor | None,
    g_last: Tensor | None,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    x_prev: Tensor | None,
    mixes: Tensor,
    stats: Tensor,
    settings: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    g_outs = (g0, g1, g2)[: mixes.shape[0]]
    return backward_kernel_launch(
        g_outs, g_last, x, weight, bias, x_prev, mixes, stats, settings, torch.library.wrap_triton
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, x_prev, mixes, _eps, settings = inputs  # the backward takes the forward's statistics
    ctx.save_for_backward(x, weight, bias, x_prev, mixes, output[-1])
    ctx.mark_non_differentiable(output[-1])
    ctx.settings = settings


def _backward(ctx, g0, g1, g2, g_last, _g_stats):
    x, weight, bias, x_prev, mixes, stats = ctx.saved_tensors
    gx, g_weight, g_bias, g_prev, g_mixes = torch.ops.rwkv.ln_shift_mix_backward(
        g0, g1, g2, g_last, x, weight, bias, x_prev, mixes, stats, ctx.settings
    )
    return gx, g_weight, g_bias, g_prev if x_prev is not None else None, g_mixes, None, None


torch.library.register_autograd("rwkv::ln_shift_mix", _backward, setup_context=_setup_context)


def ln_shift_mix(
    x: Tensor, weight: Tensor, bias: Tensor, x_prev: Tensor | None, mixes: Tensor, eps: float = 1e-5
) -> tuple[tuple[Tensor, ...], Tensor]:
    """The M outputs and ln[:, -1] as the module docstring defines them: the fused kernels for
    CUDA tensors (or any, under TRITON_INTERPRET=1) of at most MAX_CHANNELS columns when Triton is
    installed, the PyTorch reference otherwise."""
    if TRITON and (x.is_cuda or INTERPRET) and x.shape[-1] <= MAX_CHANNELS:
        x_prev = x_prev.contiguous() if x_prev is not None else None
        *outs, last, _ = torch.ops.rwkv.ln_shift_mix(
            x.contiguous(), weight, bias, x_prev, mixes.contiguous(), eps, launch_settings()
        )
        return tuple(outs[: mixes.shape[0]]), last
    return ln_shift_mix_reference(x, weight, bias, x_prev, mixes, eps)
