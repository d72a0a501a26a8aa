"""The WKV recurrence step by step in float64: the oracle every faster backend is tested against.

Legend: B batch, T time, C channels. State = (aa, bb, pp), each (B, C): the true numerator and
denominator sums are a = aa * exp(pp) and b = bb * exp(pp); pp is the running maximum exponent,
pp_t = max(pp_{t-1} + w, k_t) with w = -exp(time_decay). Every backend returns this same pp, so states
from different backends compare element by element. The zero state is (0, 0, -1e38).

Gradients come from autograd through the loop, so they are exact for the float64 computation.
"""

from __future__ import annotations

import torch

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

EMPTY_EXPONENT = -1e38


def zero_state(batch: int, channels: int, device: torch.device | str = "cpu", dtype=torch.float32) -> State:
    aa = torch.zeros(batch, channels, device=device, dtype=dtype)
    return aa, torch.zeros_like(aa), torch.full_like(aa, EMPTY_EXPONENT)


def wkv_reference(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k_BTC: torch.Tensor,
    v_BTC: torch.Tensor,
    state: State | None = None,
) -> tuple[torch.Tensor, State]:
    """y (in k's dtype) and the state after the last step (float64 for float64 inputs, else float32)."""
    out_dtype, state_dtype = k_BTC.dtype, (torch.float64 if k_BTC.dtype == torch.float64 else torch.float32)
    w = -torch.exp(time_decay.double())
    u = time_first.double()
    k, v = k_BTC.double(), v_BTC.double()
    batch, steps, channels = k.shape
    if state is None:
        state = zero_state(batch, channels, k.device, torch.float64)
    aa, bb, pp = (s.double() for s in state)
    outputs = []
    for t in range(steps):
        kt, vt = k[:, t], v[:, t]
        q = torch.maximum(pp, u + kt)
        e1, e2 = torch.exp(pp - q), torch.exp(u + kt - q)
        outputs.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        q = torch.maximum(pp + w, kt)
        e1, e2 = torch.exp(pp + w - q), torch.exp(kt - q)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, q
    y = torch.stack(outputs, dim=1) if outputs else k.new_zeros(batch, 0, channels)
    return y.to(out_dtype), (aa.to(state_dtype), bb.to(state_dtype), pp.to(state_dtype))
