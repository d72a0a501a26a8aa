"""RNN mode: token-by-token logits equal GPT-mode logits, the states agree, generation is seeded."""

from __future__ import annotations

import functools

import pytest
import torch
from model_fixtures import perturbed_rwkv

from model import RWKV, ModelConfig
from model.rnn import generate, rnn_step, sample_token, zero_rnn_state
from model.rwkv import flatten_state, unflatten_state

CONFIG = ModelConfig(n_layer=3, n_embd=16, dim_att=24, dim_ffn=40, vocab_size=29, wkv_backend="reference")


BACKENDS = ["reference", "torch"]


@functools.cache  # one init per module; no test mutates the model
def perturbed_model(backend: str = "reference") -> RWKV:
    return perturbed_rwkv(CONFIG, backend)


def tokens(batch: int, steps: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (batch, steps), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_rnn_logits_equal_parallel_logits_token_by_token(backend):
    model, idx = perturbed_model(backend=backend), tokens(2, 40)
    parallel = model(idx)
    state = None
    for t in range(idx.shape[1]):
        step_logits, state = rnn_step(model, idx[:, t], state)
        assert (step_logits - parallel[:, t]).abs().max().item() <= 1e-5, f"token {t}"
    assert parallel.abs().max().item() > 1.0  # the comparison is not between near-zero logits


@torch.no_grad()
def test_rnn_state_equals_parallel_state_and_modes_continue_each_other():
    model, idx = perturbed_model(), tokens(2, 9)
    _, gpt_state = model.forward_with_state(idx[:, :6])
    state = zero_rnn_state(model, batch=2)
    for t in range(6):
        _, state = rnn_step(model, idx[:, t], state)
    assert len(state) == 5 * CONFIG.n_layer
    for got, expected in zip(state, flatten_state(gpt_state), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # RNN state -> GPT mode for the rest of the sequence
    tail = model(idx[:, 6:], unflatten_state(state))
    torch.testing.assert_close(tail, model(idx)[:, 6:], rtol=0, atol=1e-5)


def test_rnn_step_does_not_mutate_its_input_state():
    model = perturbed_model()
    state = zero_rnn_state(model)
    before = [t.clone() for t in state]
    rnn_step(model, torch.tensor([3]), state)
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))


def test_generate_is_seeded_and_greedy_at_temperature_zero():
    model = perturbed_model()
    prompt = [1, 5, 7]
    first = generate(model, prompt, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    assert first == generate(model, prompt, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    assert len(first) == 6 and all(0 <= tok < CONFIG.vocab_size for tok in first)
    greedy = generate(model, prompt, max_new_tokens=4, temperature=0.0)
    sequence = list(prompt)
    for _ in range(4):
        sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    assert greedy == sequence[len(prompt) :]


def test_generate_stops_at_stop_token():
    model = perturbed_model()
    greedy = generate(model, [1, 5, 7], max_new_tokens=4, temperature=0.0)
    assert generate(model, [1, 5, 7], max_new_tokens=4, temperature=0.0, stop_token=greedy[0]) == greedy[:1]


def test_top_p_samples_only_from_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps {0, 1}; top_p=0.45 keeps {0} only.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    generator = torch.Generator().manual_seed(0)
    drawn = {sample_token(logits, 1.0, 0.7, generator) for _ in range(300)}
    assert drawn == {0, 1}
    assert {sample_token(logits, 1.0, 0.45, generator) for _ in range(50)} == {0}
    assert {sample_token(logits, 1.0, 1.0, generator) for _ in range(500)} == {0, 1, 2, 3}
    # At the boundary: the first token's mass alone is exactly top_p, so the nucleus is that token.
    boundary = torch.tensor([1.0, 0.0, 0.0])
    top_p = torch.softmax(boundary.double(), dim=-1)[0].item()
    assert {sample_token(boundary, 1.0, top_p, generator) for _ in range(200)} == {0}


def test_generate_rejects_bad_arguments():
    model = perturbed_model()
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [], max_new_tokens=1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], max_new_tokens=1, top_p=0.0)
