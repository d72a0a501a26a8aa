"""RWKV with `chunk_len` (state carried across chunks, full BPTT): loss and gradients equal whole windows',
and with chunk checkpointing the forward keeps only tokens, boundary states and the head's input.

Legend: B batch, T time, C n_embd, A dim_att, F dim_ffn, L n_layer.
"""

from __future__ import annotations

import pytest
import torch

from model import RWKV, ModelConfig
from model.loss import language_model_loss
from model.memory import PeakLiveBytes, saved_tensor_bytes
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


@pytest.mark.parametrize(
    "chunk_len, checkpoint_chunks, checkpoint_blocks",
    [(16, True, False), (20, True, False), (16, False, False), (20, True, True)],  # 20: chunks of 20, 20, 8
)
def test_chunked_loss_and_gradients_equal_whole_windows(
    chunk_len: int, checkpoint_chunks: bool, checkpoint_blocks: bool
):
    model, x_BT, y_BT = _model_and_batch()
    want_loss, want_grads = _loss_and_grads(model, x_BT, y_BT, 0)
    model.checkpoint_chunks, model.checkpoint_blocks = checkpoint_chunks, checkpoint_blocks
    got_loss, got_grads = _loss_and_grads(model, x_BT, y_BT, chunk_len)
    assert abs(got_loss - want_loss) <= 1e-5 * abs(want_loss)
    assert _max_relative_error(got_grads, want_grads) <= 1e-5


def test_compiled_chunks_give_the_loss_and_gradients_of_eager_chunks():
    """compile_chunks(): chunks of 20, 20, 8 (three graphs), the first call with gradients on. A dynamic
    graph for the short chunk once served an earlier chunk's recompute: a CheckpointError in backward."""
    model, x_BT, y_BT = _model_and_batch()
    want_loss, want_grads = _loss_and_grads(model, x_BT, y_BT, 20)
    model.compile_chunks()
    got_loss, got_grads = _loss_and_grads(model, x_BT, y_BT, 20)
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


# Memory: ctx 256 in chunks of 32 on a model whose block stack dominates what a forward keeps.
MEMORY_CONFIG = ModelConfig(n_layer=2, n_embd=32, vocab_size=64, wkv_backend="torch")
MEMORY_T, MEMORY_CHUNK, MEMORY_B = 256, 32, 2


def _saved_bytes(model: RWKV, x_BT: torch.Tensor, chunk_len: int) -> int:
    """Bytes of the distinct storages that `model(x_BT)` saves for backward, parameters left out."""
    model.chunk_len = chunk_len
    return saved_tensor_bytes(lambda: model(x_BT), exclude=model.parameters())


def test_chunk_checkpointing_keeps_only_tokens_boundary_states_and_the_head_input():
    torch.manual_seed(0)
    model, config = RWKV(MEMORY_CONFIG), MEMORY_CONFIG
    x_BT = torch.randint(0, config.vocab_size, (MEMORY_B, MEMORY_T))
    B, T, n_chunks = MEMORY_B, MEMORY_T, MEMORY_T // MEMORY_CHUNK
    C, A, F, L = config.n_embd, config.dim_att, config.dim_ffn, config.n_layer
    head_input = B * T * C * 4  # ln_out's output, fp32: the head (kept whole) saves it either way
    tokens = B * T * x_BT.element_size()  # each chunk's checkpoint saves its tokens (int64) to recompute
    states = (n_chunks - 1) * L * B * (2 * C + 3 * A) * 4  # per inner boundary, per layer: 2 x_prev + aa, bb, pp
    chunked = _saved_bytes(model, x_BT, MEMORY_CHUNK)
    whole = _saved_bytes(model, x_BT, 0)
    assert chunked == head_input + tokens + states  # 65536 + 4096 + 17920: nothing of the blocks' activations
    # Without chunk checkpointing each layer keeps at least LayerNorm inputs ln1 and ln2 (B, T, C) and
    # the ffn's squared-relu activation (B, T, F): 786432 bytes here, 35x the chunked block stack.
    assert whole - head_input >= L * B * T * (2 * C + F) * 4
    assert whole - head_input >= 30 * (chunked - head_input)


def _peak_step_bytes(model: RWKV, tokens_BT: torch.Tensor, chunk_len: int) -> int:
    model.zero_grad(set_to_none=True)
    model.chunk_len = chunk_len
    with PeakLiveBytes() as tracker:
        language_model_loss(model(tokens_BT[:, :-1]), tokens_BT[:, 1:]).backward()
    return tracker.peak


@pytest.mark.parametrize("chunk_len", [16, 32, 64])
def test_peak_memory_of_a_training_step_falls_with_chunk_len(chunk_len: int):
    """Everything live during forward + backward is counted, not only what saved-tensor hooks see."""
    torch.manual_seed(0)
    model = RWKV(MEMORY_CONFIG)
    tokens_BT = torch.randint(0, MEMORY_CONFIG.vocab_size, (MEMORY_B, MEMORY_T + 1))
    whole, chunked = (_peak_step_bytes(model, tokens_BT, n) for n in (0, chunk_len))
    blocks_whole = _saved_bytes(model, tokens_BT[:, :-1], 0) - MEMORY_B * MEMORY_T * MEMORY_CONFIG.n_embd * 4
    one_chunk = _saved_bytes(model, tokens_BT[:, :chunk_len], 0)  # what recomputing one chunk holds
    # The whole window's block activations give way to one chunk's recompute (gradients in flight are
    # smaller than the whole step's). Measured peaks: 5.29 MB whole; chunks of 64, 32, 16: 1.93, 1.44, 0.84 MB.
    assert chunked <= whole - blocks_whole + one_chunk
