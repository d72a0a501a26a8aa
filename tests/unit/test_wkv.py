"""The vectorised `torch` WKV backend against the float64 `reference` loop, and chaining through the state.

Legend: B batch, T time, C channels. Inputs are float32 with |k| up to 20 and time_decay in [-8, 8],
starting from a random non-zero state. Losses depend on the state only through the true sums
a = aa*exp(pp), b = bb*exp(pp) (via a/b and log b), so they do not depend on how a backend
scales its state. Errors are relative L2: |x - ref| / |ref| over the whole tensor.
"""

from __future__ import annotations

import pytest
import torch

from model.wkv import wkv
from model.wkv_reference import wkv_reference
from model.wkv_torch import wkv_torch

TOL = 1e-5
INPUT_NAMES = ("time_decay", "time_first", "k", "v", "aa", "bb", "pp")


@pytest.fixture(autouse=True)
def _one_thread():
    """The reference loop runs ~10^5 tiny ops; on a busy 2-core machine each one entering a 2-thread
    parallel region can wait a scheduler slice (35 s instead of 1 s at T=2048). Nothing here is big."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(batch: int, steps: int, channels: int, seed: int = 0) -> list[torch.Tensor]:
    """time_decay, time_first, k, v, aa, bb, pp: random float32 with |k| <= 20 and a non-zero state."""
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape: int, low: float, high: float) -> torch.Tensor:
        return torch.rand(*shape, generator=g) * (high - low) + low

    return [
        uniform(channels, low=-8, high=8),
        torch.randn(channels, generator=g),
        uniform(batch, steps, channels, low=-20, high=20),
        torch.randn(batch, steps, channels, generator=g),
        torch.randn(batch, channels, generator=g),
        uniform(batch, channels, low=0.5, high=2.0),
        uniform(batch, channels, low=-5, high=5),
    ]


def representation_free_loss(y, state, weights) -> torch.Tensor:
    """sum(y*gy) plus a function of the true state sums: a/b = aa/bb and log b = log bb + pp."""
    gy, g_ratio, g_log = weights
    aa, bb, pp = (s.double() for s in state)
    return (y.double() * gy).sum() + (g_ratio * aa / bb).sum() + (g_log * (torch.log(bb) + pp)).sum()


def loss_weights(batch: int, steps: int, channels: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(123)
    return tuple(
        torch.randn(*shape, generator=g, dtype=torch.float64)
        for shape in ((batch, steps, channels),) + ((batch, channels),) * 2
    )


def run(fn, inputs, dtype, weights, **kwargs):
    """Outputs (y, aa/bb, log b, pp) and the gradients of the loss with respect to every input."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    y, state = fn(*leaves[:4], state=tuple(leaves[4:]), **kwargs)
    representation_free_loss(y, state, weights).backward()
    aa, bb, pp = (s.detach().double() for s in state)
    outputs = {"y": y.detach().double(), "a/b": aa / bb, "log b": torch.log(bb) + pp, "pp": pp}
    grads = {
        name: leaf.grad.double() if leaf.grad is not None else torch.zeros_like(leaf, dtype=torch.float64)
        for name, leaf in zip(INPUT_NAMES, leaves, strict=True)
    }
    return outputs, grads


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.norm()
    return float((x - ref).norm() / scale) if scale > 0 else float(x.norm())


def assert_close(got: dict, want: dict, tol: float) -> None:
    errors = {name: rel_err(got[name], want[name]) for name in want}
    bad = {name: f"{e:.2e}" for name, e in errors.items() if not e <= tol}
    assert not bad, f"relative L2 error above {tol:g}: {bad}"


@pytest.mark.parametrize(("steps", "batch", "channels"), [(1, 3, 64), (7, 3, 64), (256, 3, 32), (2048, 2, 16)])
def test_torch_backend_matches_float64_reference(steps, batch, channels):
    inputs = make_inputs(batch, steps, channels)
    weights = loss_weights(batch, steps, channels)
    want_out, want_grad = run(wkv_reference, inputs, torch.float64, weights)
    got_out, got_grad = run(wkv_torch, inputs, torch.float32, weights)
    assert_close(got_out, want_out, TOL)
    assert_close(got_grad, want_grad, TOL)


def test_float64_inputs_are_computed_in_float64():
    """The chunked algebra itself is exact: in float64 it matches the loop to rounding."""
    inputs = make_inputs(2, 100, 16, seed=1)
    weights = loss_weights(2, 100, 16)
    want_out, want_grad = run(wkv_reference, inputs, torch.float64, weights)
    got_out, got_grad = run(wkv_torch, inputs, torch.float64, weights)
    assert_close(got_out, want_out, 1e-12)
    assert_close(got_grad, want_grad, 1e-12)


@pytest.mark.parametrize("chunk_len", [1, 5, 16, 64])
@pytest.mark.parametrize("steps", [1, 31, 33, 100])
def test_any_length_and_chunk_size_give_the_same_result(steps, chunk_len):
    """T need not divide by the chunk; odd B*C (3*5) too."""
    inputs = make_inputs(3, steps, 5, seed=2)
    weights = loss_weights(3, steps, 5)
    want_out, want_grad = run(wkv_reference, inputs, torch.float64, weights)
    got_out, got_grad = run(wkv_torch, inputs, torch.float32, weights, chunk_len=chunk_len)
    assert_close(got_out, want_out, TOL)
    assert_close(got_grad, want_grad, TOL)


def chained(fn, split: int):
    """wkv over [A; B] as two calls, the state after A fed into B."""

    def call(time_decay, time_first, k, v, state):
        y_a, state_a = fn(time_decay, time_first, k[:, :split], v[:, :split], state)
        y_b, state_b = fn(time_decay, time_first, k[:, split:], v[:, split:], state_a)
        return torch.cat([y_a, y_b], dim=1), state_b

    return call


@pytest.mark.parametrize(("backend", "dtype"), [("torch", torch.float32), ("reference", torch.float64)])
def test_chaining_through_the_state_equals_one_call(backend, dtype):
    """Outputs and gradients, including those reaching A's inputs through the state."""
    batch, steps, channels = 2, 150, 24
    fn = wkv_torch if backend == "torch" else wkv_reference
    inputs = make_inputs(batch, steps, channels, seed=3)
    weights = loss_weights(batch, steps, channels)
    whole_out, whole_grad = run(fn, inputs, dtype, weights)
    for split in (1, 45, 64):
        parts_out, parts_grad = run(chained(fn, split), inputs, dtype, weights)
        assert_close(parts_out, whole_out, TOL)
        assert_close(parts_grad, whole_grad, TOL)


def test_zero_state_default_and_dtypes():
    time_decay, time_first, k, v, *_ = make_inputs(2, 40, 8, seed=4)
    y, state = wkv_torch(time_decay, time_first, k, v)
    y_ref, state_ref = wkv_reference(time_decay, time_first, k, v)
    assert y.dtype == torch.float32 and all(s.dtype == torch.float32 for s in state)
    assert rel_err(y.double(), y_ref.double()) < TOL
    assert torch.allclose(state[2], state_ref[2], rtol=1e-6, atol=1e-5)  # pp: the same running max
    y16, state16 = wkv_torch(time_decay, time_first, k.bfloat16(), v.bfloat16())
    assert y16.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in state16)


def test_extreme_inputs_stay_finite_and_bounded():
    """y is a weighted mean of the v seen so far (and of aa/bb): it stays inside their range."""
    batch, steps, channels = 2, 200, 16
    time_decay = torch.linspace(-8, 8, channels, requires_grad=True)
    time_first = torch.linspace(-5, 5, channels, requires_grad=True)
    k = (torch.where(torch.rand(batch, steps, channels) < 0.5, -20.0, 20.0)).requires_grad_()
    v = torch.randn(batch, steps, channels, requires_grad=True)
    y, state = wkv_torch(time_decay, time_first, k, v)
    (y.sum() + sum(s.sum() for s in state[:2])).backward()
    for t in (y, *state, time_decay.grad, time_first.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    running_max = torch.cummax(v, dim=1).values
    running_min = -torch.cummax(-v, dim=1).values
    assert (y <= running_max + 1e-5).all() and (y >= running_min - 1e-5).all()


def test_op_dispatches_to_the_torch_backend():
    time_decay, time_first, k, v, *_ = make_inputs(1, 10, 4, seed=5)
    y, _ = wkv(time_decay, time_first, k, v, backend="torch")
    assert torch.equal(y, wkv_torch(time_decay, time_first, k, v)[0])


def test_non_contiguous_inputs():
    """k and v as strided views (every other channel of a wider tensor) give the same result as copies."""
    time_decay, time_first, k, v, *state = make_inputs(2, 70, 12, seed=6)
    wide_k, wide_v = (torch.stack((x, x + 1), dim=-1).flatten(2) for x in (k, v))
    y_view, state_view = wkv_torch(time_decay, time_first, wide_k[..., ::2], wide_v[..., ::2], tuple(state))
    y_copy, state_copy = wkv_torch(time_decay, time_first, k, v, tuple(state))
    assert torch.equal(y_view, y_copy) and all(torch.equal(a, b) for a, b in zip(state_view, state_copy, strict=True))
