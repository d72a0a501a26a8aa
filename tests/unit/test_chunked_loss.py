"""Chunked BPTT (pipeline/chunked.py): loss and gradients equal the unchunked loss's."""

from __future__ import annotations

import pytest
import torch

from model import RWKV, ModelConfig, build_model
from model.loss import language_model_loss
from pipeline.chunked import chunked_loss

T = 48


def _model_and_batch() -> tuple[RWKV, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = RWKV(ModelConfig(n_layer=2, n_embd=32, vocab_size=64, wkv_backend="torch"))
    # The v4neo init zeroes some matrices; random weights make every gradient path non-trivial.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    tokens = torch.randint(0, 64, (2, T + 1))
    return model, tokens[:, :-1], tokens[:, 1:]


def _loss_and_grads(model: torch.nn.Module, loss: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _max_relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max(float((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-30)) for n in want)


@pytest.mark.parametrize("chunk_len", [16, 20, T])  # 20 does not divide T (chunks 20, 20, 8)
def test_chunked_loss_and_gradients_equal_unchunked(chunk_len: int):
    model, x_BT, y_BT = _model_and_batch()
    want_loss, want_grads = _loss_and_grads(model, language_model_loss(model(x_BT), y_BT))
    got_loss, got_grads = _loss_and_grads(model, chunked_loss(model, x_BT, y_BT, chunk_len))
    assert abs(got_loss - want_loss) <= 1e-5 * abs(want_loss)
    assert _max_relative_error(got_grads, want_grads) <= 1e-5


def test_the_gradient_through_the_state_is_what_makes_them_equal():
    """Detaching the state between chunks (truncated BPTT) changes the gradients: the check above can fail."""
    from model.rwkv import detach_state

    model, x_BT, y_BT = _model_and_batch()
    _, want_grads = _loss_and_grads(model, language_model_loss(model(x_BT), y_BT))

    class Truncated(torch.nn.Module):
        def forward_with_state(self, idx_BT, state=None):
            return model.forward_with_state(idx_BT, detach_state(state) if state is not None else None)

    _, got_grads = _loss_and_grads(model, chunked_loss(Truncated(), x_BT, y_BT, 16))
    assert _max_relative_error(got_grads, want_grads) > 1e-3


def test_a_model_without_state_is_refused():
    gpt = build_model(ModelConfig(arch="gpt", n_layer=1, n_embd=16, vocab_size=32))
    x_BT = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="chunked training needs a model with a state"):
        chunked_loss(gpt, x_BT, x_BT, 4)
