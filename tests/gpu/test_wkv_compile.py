"""The cuda WKV backend under torch.compile: one graph (fullgraph=True raises on any graph break)
whose outputs and gradients equal eager mode.

Legend: B batch, T time, C channels. The kernel is the custom op rwkv::wkv_forward (autograd
through rwkv::wkv_backward), so the compiled graph calls the same kernels as eager: results agree
up to the order of the surrounding elementwise ops, far below the kernel's own tolerance.
"""

from __future__ import annotations

import pytest
import torch

from model.wkv import wkv

DEVICE = "cuda"


def make_inputs(batch, steps, channels, dtype):
    bb = torch.rand(batch, channels, device=DEVICE) + 0.1
    return [
        torch.rand(channels, device=DEVICE) * 8 - 5,  # time_decay
        torch.randn(channels, device=DEVICE),  # time_first
        torch.randn(batch, steps, channels, device=DEVICE).to(dtype),  # k
        torch.randn(batch, steps, channels, device=DEVICE).to(dtype),  # v
        torch.randn(batch, channels, device=DEVICE) * bb,  # aa
        bb,
        torch.randn(batch, channels, device=DEVICE) * 4,  # pp
    ]


def two_chunks(td, tf, k, v, aa, bb, pp, gy):
    """A loss over two chained calls, so gradients also flow through state_out -> state_in."""
    half = k.shape[1] // 2
    y1, state = wkv(td, tf, k[:, :half], v[:, :half], (aa, bb, pp), backend="cuda")
    y2, (aa2, bb2, pp2) = wkv(td, tf, k[:, half:] * 0.5, v[:, half:], state, backend="cuda")
    y = torch.cat((y1, y2), dim=1).float()
    return (y * gy).sum() + aa2.sum() - bb2.sum() + 0.1 * pp2.sum()


def value_and_grads(fn, inputs, gy):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = fn(*leaves, gy)
    loss.backward()
    return [loss.detach(), *(leaf.grad for leaf in leaves)]


def assert_same(got, expected, tol):
    names = ("loss", "g_time_decay", "g_time_first", "gk", "gv", "gaa", "gbb", "gpp")
    for name, a, b in zip(names, got, expected, strict=True):
        assert a is not None and torch.isfinite(a.float()).all(), name
        err = (a.double() - b.double()).norm().item() / max(b.double().norm().item(), 1e-30)
        assert err <= tol, f"{name}: compiled vs eager relative L2 {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_fullgraph_equals_eager(dtype):
    torch._dynamo.reset()
    inputs = make_inputs(3, 300, 96, dtype)
    gy = torch.randn(3, 300, 96, device=DEVICE)
    compiled = torch.compile(two_chunks, fullgraph=True)
    expected = value_and_grads(two_chunks, inputs, gy)
    got = value_and_grads(compiled, inputs, gy)
    assert_same(got, expected, 1e-6 if dtype == torch.float32 else 1e-2)


def test_dynamic_shapes_trace_once_and_match_eager():
    """dynamic=True: the fake implementations size the workspaces from symbolic B, T, C."""
    torch._dynamo.reset()
    compiled = torch.compile(two_chunks, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, steps, channels in ((2, 100, 64), (1, 517, 40)):
        inputs = make_inputs(batch, steps, channels, torch.float32)
        gy = torch.randn(batch, steps, channels, device=DEVICE)
        assert_same(value_and_grads(compiled, inputs, gy), value_and_grads(two_chunks, inputs, gy), 1e-6)
