"""RWKV-4 in GPT mode: shapes, the step-0 identity of the init, chunked state, checkpointing, L2Wrap."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import perturbed_rwkv

from model import RWKV, ModelConfig, build_model, detach_state
from model.loss import L2WRAP_FACTOR, language_model_loss

CONFIG = ModelConfig(n_layer=2, n_embd=16, dim_ffn=48, vocab_size=37, wkv_backend="reference")
BACKENDS = ["reference", "torch"]


@functools.cache  # one init per module: orthogonal init (QR) is the slow part of these tests
def perturbed_model(backend: str = "reference") -> RWKV:
    return perturbed_rwkv(CONFIG, backend)


def tokens(batch: int, steps: int, vocab: int = CONFIG.vocab_size, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, steps), generator=torch.Generator().manual_seed(seed))


def test_logits_shape_and_dtype():
    logits = RWKV(CONFIG)(tokens(3, 5))
    assert logits.shape == (3, 5, CONFIG.vocab_size)
    assert logits.dtype == torch.float32


def test_at_init_every_residual_branch_is_zero():
    # §3 consequence: att.output and ffn.value are zero, so logits = head(ln_out(ln0(emb))).
    model = build_model(CONFIG)
    idx = tokens(2, 6)
    expected = model.head(model.ln_out(model.blocks[0].ln0(model.emb(idx))))
    torch.testing.assert_close(model(idx), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_forward_equals_one_call(backend):
    model, idx = perturbed_model(backend), tokens(2, 11)
    full = model(idx)
    first, state = model.forward_with_state(idx[:, :4])
    second, state = model.forward_with_state(idx[:, 4:9], state)
    third, _ = model.forward_with_state(idx[:, 9:], state)
    chunked = torch.cat([first, second, third], dim=1)
    assert (chunked - full).abs().max().item() <= 1e-5


def test_gradients_flow_through_the_carried_state():
    model, idx = perturbed_model(), tokens(2, 10)
    # loss on the second half only: with the state carried (not detached) the first half's
    # contribution through the recurrence must arrive in the gradients.
    full_loss = model(idx)[:, 5:].square().mean()
    full_grads = torch.autograd.grad(full_loss, list(model.parameters()))
    _, state = model.forward_with_state(idx[:, :5])
    chunk_loss = model(idx[:, 5:], state).square().mean()
    chunk_grads = torch.autograd.grad(chunk_loss, list(model.parameters()))
    for (name, _), g_full, g_chunk in zip(model.named_parameters(), full_grads, chunk_grads, strict=True):
        torch.testing.assert_close(g_chunk, g_full, rtol=1e-4, atol=1e-6, msg=name)
    # detaching cuts exactly that path: the embedding of first-half-only tokens gets no gradient.
    _, state = model.forward_with_state(idx[:, :5])
    detached_loss = model(idx[:, 5:], detach_state(state)).square().mean()
    detached_grads = torch.autograd.grad(detached_loss, list(model.parameters()))
    difference = max((a - b).abs().max().item() for a, b in zip(detached_grads, full_grads, strict=True))
    assert difference > 1e-4


def test_block_checkpointing_gives_the_same_loss_and_gradients():
    model, idx = copy.deepcopy(perturbed_model()), tokens(2, 6)
    targets = tokens(2, 6, seed=3)
    plain = language_model_loss(model(idx), targets)
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    model.checkpoint_blocks = True
    checkpointed = language_model_loss(model(idx), targets)
    ckpt_grads = torch.autograd.grad(checkpointed, list(model.parameters()))
    assert checkpointed.item() == plain.item()
    for g_plain, g_ckpt in zip(plain_grads, ckpt_grads, strict=True):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-6, atol=1e-7)


def test_time_mix_parameters_are_flat_vectors():
    # torch.compile needs (C,) time_mix parameters (platform.md); export writes (1, 1, C).
    shapes = {name: tuple(p.shape) for name, p in RWKV(CONFIG).named_parameters()}
    assert shapes["blocks.1.att.time_mix_k"] == (CONFIG.n_embd,)
    assert shapes["blocks.1.ffn.time_mix_r"] == (CONFIG.n_embd,)
    assert shapes["blocks.1.att.time_decay"] == (CONFIG.dim_att,)


@pytest.mark.parametrize("batch, steps", [(2, 5), (1, 1)])
def test_l2wrap_loss_value_and_gradient(batch, steps):
    logits = (3 * torch.randn(batch, steps, 11, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 11, (batch, steps))
    loss = language_model_loss(logits, targets)
    (grad,) = torch.autograd.grad(loss, [logits])
    # forward: plain cross-entropy; backward: CE gradient + grad of 1e-4 * mean(max_logit^2) / 2.
    plain_logits = logits.detach().clone().requires_grad_()
    ce = F.cross_entropy(plain_logits.reshape(-1, 11), targets.reshape(-1))
    aux = L2WRAP_FACTOR * plain_logits.max(dim=-1).values.square().mean() / 2
    (expected,) = torch.autograd.grad(ce + aux, [plain_logits])
    assert loss.item() == ce.item()
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-15)
    # the extra term sits at the arg-max only: elsewhere the gradient is the softmax one.
    plain_logits.grad = None
    (ce_grad,) = torch.autograd.grad(F.cross_entropy(plain_logits.reshape(-1, 11), targets.reshape(-1)), [plain_logits])
    extra = grad - ce_grad
    argmax = logits.detach().argmax(-1, keepdim=True)
    expected_at_max = logits.detach().gather(-1, argmax) * L2WRAP_FACTOR / (batch * steps)
    torch.testing.assert_close(extra.gather(-1, argmax), expected_at_max, rtol=1e-9, atol=1e-15)
    assert extra.scatter(-1, argmax, 0.0).abs().max().item() < 1e-15
