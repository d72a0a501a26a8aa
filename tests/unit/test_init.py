"""The v4neo initialisation (reference/rwkv4.md §3), formula by formula, on a 4-layer model."""

from __future__ import annotations

import math

import pytest
import torch

from model import RWKV, ModelConfig, build_model, init_rwkv4_

N_LAYER, N_EMBD, DIM_ATT, VOCAB = 4, 32, 40, 100
CONFIG = ModelConfig(n_layer=N_LAYER, n_embd=N_EMBD, dim_att=DIM_ATT, vocab_size=VOCAB)
LR_INIT = 3e-4
LAST = N_LAYER - 1


@pytest.fixture(scope="module")
def model() -> RWKV:
    return build_model(CONFIG, lr_init=LR_INIT, generator=torch.Generator().manual_seed(0))


def close(actual: torch.Tensor, expected: float) -> bool:
    return abs(actual.item() - expected) < 1e-6


@pytest.mark.parametrize("layer, exponent", [(0, 0.7), (LAST, 2.0)])
@pytest.mark.parametrize("h", [0, 7, 25, DIM_ATT - 1])
def test_time_decay_curve(model, layer, exponent, h):
    expected = -5 + 8 * (h / (DIM_ATT - 1)) ** exponent
    assert close(model.blocks[layer].att.time_decay[h], expected)


def test_time_decay_runs_from_minus_5_to_3_in_the_middle_layer(model):
    decay = model.blocks[1].att.time_decay  # r01 = 1/3: exponent 0.7 + 1.3/3
    assert close(decay[0], -5.0) and close(decay[-1], 3.0)
    assert close(decay[20], -5 + 8 * (20 / (DIM_ATT - 1)) ** (0.7 + 1.3 / 3))


@pytest.mark.parametrize("layer", [0, LAST])
def test_time_first_zigzag(model, layer):
    first = model.blocks[layer].att.time_first
    zigzag = [0.0, 0.5, -0.5]
    for i in (0, 1, 2, 3, 22, DIM_ATT - 1):
        assert close(first[i], math.log(0.3) + zigzag[i % 3])


@pytest.mark.parametrize("i", [0, 1, 13, N_EMBD - 1])
def test_time_mix_first_and_last_layer(model, i):
    ddd = i / N_EMBD
    first, last = model.blocks[0], model.blocks[LAST]
    r10_last = 1 - LAST / N_LAYER  # 0.25; r01 = 1 for the last layer
    assert close(first.att.time_mix_k[i], ddd) and close(first.att.time_mix_v[i], ddd)
    assert close(first.att.time_mix_r[i], ddd**0.5)
    assert close(first.ffn.time_mix_k[i], ddd) and close(first.ffn.time_mix_r[i], ddd)
    assert close(last.att.time_mix_k[i], ddd**r10_last)
    assert close(last.att.time_mix_v[i], ddd**r10_last + 0.3)
    assert close(last.att.time_mix_r[i], ddd ** (0.5 * r10_last))
    assert close(last.ffn.time_mix_k[i], ddd**r10_last) and close(last.ffn.time_mix_r[i], ddd**r10_last)


def test_the_five_zero_matrices(model):
    for block in model.blocks:
        for weight in (block.att.key, block.att.receptance, block.att.output, block.ffn.value, block.ffn.receptance):
            assert weight.weight.abs().max().item() == 0.0


def gram(weight: torch.Tensor) -> torch.Tensor:
    """W^T W for tall matrices, W W^T otherwise: gain^2 * I for a scaled orthogonal matrix."""
    weight = weight.detach().double()
    return weight.T @ weight if weight.shape[0] >= weight.shape[1] else weight @ weight.T


@pytest.mark.parametrize(
    "name, gain",
    [
        ("blocks.0.att.value.weight", math.sqrt(DIM_ATT / N_EMBD)),  # (A, C) with A > C
        ("blocks.3.att.value.weight", math.sqrt(DIM_ATT / N_EMBD)),
        ("blocks.0.ffn.key.weight", 2.0),  # (4C, C)
        ("blocks.3.ffn.key.weight", 2.0),
        ("head.weight", 0.5 * math.sqrt(VOCAB / N_EMBD)),
    ],
)
def test_orthogonal_gains(model, name, gain):
    product = gram(model.get_parameter(name))
    torch.testing.assert_close(product, gain**2 * torch.eye(product.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_square_and_wide_matrices_get_gain_one_times_scale():
    small = build_model(ModelConfig(n_layer=1, n_embd=32, vocab_size=20))  # V < C: head gain 0.5 only
    torch.testing.assert_close(
        gram(small.blocks[0].att.value.weight), torch.eye(32, dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(gram(small.head.weight), 0.25 * torch.eye(20, dtype=torch.float64), atol=1e-5, rtol=0)


def test_embedding_is_uniform_within_lr_init(model):
    emb = model.emb.weight
    assert emb.abs().max().item() <= LR_INIT
    assert emb.max().item() > 0.95 * LR_INIT and emb.min().item() < -0.95 * LR_INIT
    assert abs(emb.mean().item()) < 0.05 * LR_INIT


def test_layer_norms_are_identity(model):
    norms = [model.ln_out, model.blocks[0].ln0] + [ln for b in model.blocks for ln in (b.ln1, b.ln2)]
    assert all(torch.all(ln.weight == 1) and torch.all(ln.bias == 0) for ln in norms)


def test_one_layer_model_is_initialised_as_a_first_layer():
    # the reference divides by L-1 = 0 here; we take r01 = 0 (documented in model/init.py).
    block = build_model(ModelConfig(n_layer=1, n_embd=8, vocab_size=10)).blocks[0]
    assert torch.isfinite(torch.cat([p.flatten() for p in block.parameters()])).all()
    assert close(block.att.time_decay[4], -5 + 8 * (4 / 7) ** 0.7)
    assert close(block.att.time_mix_v[3], 3 / 8)  # no +0.3 r01


def test_seeded_init_is_reproducible_and_default_construction_inits():
    config = ModelConfig(n_layer=2, n_embd=16, vocab_size=20)
    seeded = [build_model(config, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*(m.state_dict().values() for m in seeded), strict=True))
    constructed = RWKV(config)  # the constructor runs the same init with lr_init = 6e-4
    assert constructed.emb.weight.abs().max().item() <= 6e-4
    assert constructed.blocks[1].ffn.value.weight.abs().max().item() == 0.0
    init_rwkv4_(constructed, lr_init=1e-5)
    assert constructed.emb.weight.abs().max().item() <= 1e-5
