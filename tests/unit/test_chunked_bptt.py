"""RWKV with `chunk_len` (state carried across chunks, full BPTT): loss and gradients equal whole windows'."""

from __future__ import annotations

import pytest
import torch

from model import RWKV, ModelConfig
from model.loss import language_model_loss
from model.rwkv import detach_state

T = 48


def _model_and_batch(model_class: type[RWKV] = RWKV) -> tuple[RWKV, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = model_class(ModelConfig(n_layer=2, n_embd=32, vocab_size=64, wkv_backend="torch"))
    # The v4neo init zeroes some matrices; random weights make every gradient path non-trivial.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    tokens = torch.randint(0, 64, (2, T + 1))
    return model, tokens[:, :-1], tokens[:, 1:]


def _loss_and_grads(model: RWKV, x_BT: torch.Tensor, y_BT: torch.Tensor, chunk_len: int):
    model.zero_grad()
    model.chunk_len = chunk_len
    loss = language_model_loss(model(x_BT), y_BT)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _max_relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max(float((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-30)) for n in want)


@pytest.mark.parametrize("chunk_len", [16, 20])  # 20 does not divide T: chunks of 20, 20, 8
def test_chunked_loss_and_gradients_equal_whole_windows(chunk_len: int):
    model, x_BT, y_BT = _model_and_batch()
    want_loss, want_grads = _loss_and_grads(model, x_BT, y_BT, 0)
    got_loss, got_grads = _loss_and_grads(model, x_BT, y_BT, chunk_len)
    assert abs(got_loss - want_loss) <= 1e-5 * abs(want_loss)
    assert _max_relative_error(got_grads, want_grads) <= 1e-5


class _Truncated(RWKV):
    """Detaches the state between chunks (truncated BPTT)."""

    def features(self, idx_BT, state=None):
        return super().features(idx_BT, detach_state(state) if state is not None else None)


def test_the_gradient_through_the_state_is_what_makes_them_equal():
    """With the state detached between chunks the gradients differ: the check above can fail."""
    model, x_BT, y_BT = _model_and_batch(_Truncated)
    want_loss, want_grads = _loss_and_grads(model, x_BT, y_BT, 0)
    got_loss, got_grads = _loss_and_grads(model, x_BT, y_BT, 16)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)  # the forward is the same
    assert _max_relative_error(got_grads, want_grads) > 1e-2
