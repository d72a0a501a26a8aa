"""The GPT baseline: shape, causality, same-size construction through build_model, checkpointing."""

from __future__ import annotations

import torch

from model import GPT, ModelConfig, build_model
from model.gpt import rotary

CONFIG = ModelConfig(arch="gpt", n_layer=2, n_embd=32, n_head=4, dim_ffn=64, vocab_size=41)


def test_build_model_picks_the_architecture():
    assert isinstance(build_model(CONFIG), GPT)
    assert type(build_model(ModelConfig(arch="rwkv4", n_layer=1, n_embd=16, vocab_size=10))).__name__ == "RWKV"


def test_logits_shape_and_untied_head():
    model = build_model(CONFIG)
    logits = model(torch.randint(0, CONFIG.vocab_size, (3, 9)))
    assert logits.shape == (3, 9, CONFIG.vocab_size) and logits.dtype == torch.float32
    assert model.head.weight.data_ptr() != model.emb.weight.data_ptr()
    assert model.blocks[0].mlp.fc.weight.shape == (CONFIG.dim_ffn, CONFIG.n_embd)


@torch.no_grad()
def test_a_future_token_does_not_change_earlier_logits():
    model = build_model(CONFIG)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % CONFIG.vocab_size
    before, after = model(idx), model(changed)
    assert (before[:, :7] - after[:, :7]).abs().max().item() <= 1e-6
    assert (before[:, 7:] - after[:, 7:]).abs().max().item() > 1e-4  # the change is visible from position 7 on


def test_rotary_preserves_norms_and_encodes_relative_position():
    q, k = torch.randn(1, 1, 6, 8, dtype=torch.float64), torch.randn(1, 1, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(rotary(q).norm(dim=-1), q.norm(dim=-1))
    # the same q and k vectors at every position: the score depends on the offset only
    q_same, k_same = q[:, :, :1].expand(1, 1, 6, 8), k[:, :, :1].expand(1, 1, 6, 8)
    scores = rotary(q_same) @ rotary(k_same).transpose(-1, -2)
    torch.testing.assert_close(scores[0, 0, 3, 1], scores[0, 0, 5, 3])


def test_block_checkpointing_gives_the_same_gradients():
    model, idx = build_model(CONFIG), torch.randint(0, CONFIG.vocab_size, (2, 8))
    plain = torch.autograd.grad(model(idx).square().mean(), list(model.parameters()))
    model.checkpoint_blocks = True
    checkpointed = torch.autograd.grad(model(idx).square().mean(), list(model.parameters()))
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
