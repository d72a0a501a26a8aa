"""Parameter groups and LR schedule against reference/rwkv4.md §4.2-4.3, computed independently here."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline.optim import decay_progress, learning_rate, param_groups, set_learning_rate


class _RwkvNames(nn.Module):
    """A stand-in with RWKV-4's parameter names and shapes (C = 8, vocab 16, 2 blocks)."""

    def __init__(self) -> None:
        super().__init__()
        C, V = 8, 16
        self.emb = nn.Embedding(V, C)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.ln1 = nn.LayerNorm(C)
            block.att = nn.Module()
            block.att.time_decay = nn.Parameter(torch.zeros(C))
            block.att.time_first = nn.Parameter(torch.zeros(C))
            block.att.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
            block.att.time_mix_v = nn.Parameter(torch.zeros(1, 1, C))
            block.att.key = nn.Linear(C, C, bias=False)
            block.ffn = nn.Module()
            block.ffn.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
            block.ffn.value = nn.Linear(4 * C, C, bias=False)
            self.blocks.append(block)
        self.head = nn.Linear(C, V, bias=False)


def _by_name(groups):
    return {group["name"]: group for group in groups}


def _names(model, params):
    ids = {id(p) for p in params}
    return sorted(name for name, p in model.named_parameters() if id(p) in ids)


def test_layerwise_groups_scales_and_no_decay():
    model = _RwkvNames()
    groups = _by_name(param_groups(model, weight_decay=0.0))
    assert set(groups) == {"other", "time_mix", "time_decay", "time_first"}
    assert {name: g["lr_scale"] for name, g in groups.items()} == {
        "other": 1.0,
        "time_mix": 1.0,
        "time_decay": 2.0,
        "time_first": 3.0,
    }
    assert all(g["weight_decay"] == 0.0 for g in groups.values())
    assert _names(model, groups["time_decay"]["params"]) == ["blocks.0.att.time_decay", "blocks.1.att.time_decay"]
    assert _names(model, groups["time_first"]["params"]) == ["blocks.0.att.time_first", "blocks.1.att.time_first"]
    assert len(groups["time_mix"]["params"]) == 6  # att k, v and ffn r in each of 2 blocks


def test_every_parameter_in_exactly_one_group():
    model = _RwkvNames()
    for weight_decay in (0.0, 0.1):
        groups = param_groups(model, weight_decay=weight_decay)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_weight_decay_on_matrices_only():
    model = _RwkvNames()
    groups = _by_name(param_groups(model, weight_decay=0.1))
    decayed = _names(model, groups["decay"]["params"])
    # All matrices incl. emb and head; never LayerNorm, time_* vectors or (1, 1, C) mixes.
    assert decayed == sorted(
        ["emb.weight", "head.weight"] + [f"blocks.{i}.{n}.weight" for i in range(2) for n in ("att.key", "ffn.value")]
    )
    assert groups["decay"]["weight_decay"] == 0.1 and groups["decay"]["lr_scale"] == 1.0
    assert all(g["weight_decay"] == 0.0 for name, g in groups.items() if name != "decay")


def test_layerwise_off_puts_time_params_at_scale_one():
    groups = param_groups(_RwkvNames(), layerwise_lr=False)
    assert [g["lr_scale"] for g in groups] == [1.0]


def _cfg(**kw):
    base = dict(steps=100, lr_init=6e-4, lr_final=1e-5, lr_schedule="exponential", warmup_steps=0)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("step", [0, 1, 17, 50, 98, 99])
def test_exponential_decay_formula(step):
    cfg = _cfg()
    progress = min(max((step + 1) / 100, 0.0), 1.0)
    expected = 6e-4 * math.exp(math.log(1e-5 / 6e-4) * progress)
    assert learning_rate(step, cfg) == pytest.approx(expected, rel=1e-12)


def test_exponential_reaches_lr_final_at_last_step_and_is_monotonic():
    cfg = _cfg()
    lrs = [learning_rate(s, cfg) for s in range(100)]
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-12)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))


def test_warmup_multiplies_from_20_percent():
    cfg = _cfg(warmup_steps=10)
    for step in range(10):
        # During warmup the decay progress is clamped to 0, so the base is lr_init.
        assert learning_rate(step, cfg) == pytest.approx(6e-4 * (0.2 + 0.8 * step / 10), rel=1e-12)
    assert learning_rate(0, cfg) == pytest.approx(0.2 * 6e-4)
    # First step after warmup: progress = (10 - 10 + 1) / (100 - 10).
    assert learning_rate(10, cfg) == pytest.approx(6e-4 * math.exp(math.log(1e-5 / 6e-4) / 90), rel=1e-12)
    assert decay_progress(99, 100, 10) == 1.0


@pytest.mark.parametrize("step", [0, 30, 60, 99])
def test_cosine_formula(step):
    cfg = _cfg(lr_schedule="cosine", warmup_steps=5)
    f = 1e-5 / 6e-4
    progress = min(max((step - 5 + 1) / 95, 0.0), 1.0)
    expected = 6e-4 * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * progress))
    if step < 5:
        expected *= 0.2 + 0.8 * step / 5
    assert learning_rate(step, cfg) == pytest.approx(expected, rel=1e-12)
    assert learning_rate(99, cfg) == pytest.approx(1e-5, rel=1e-12)


def test_constant_and_linear_fallbacks():
    assert learning_rate(50, _cfg(lr_schedule="constant")) == 6e-4
    assert learning_rate(50, _cfg(lr_final=6e-4)) == 6e-4  # lr_final == lr_init: constant (§4.3)
    # An end at 0 makes the exponential linear, as in the reference.
    assert learning_rate(49, _cfg(lr_final=0.0)) == pytest.approx(6e-4 * 0.5, rel=1e-12)


def test_set_learning_rate_applies_group_scales():
    model = _RwkvNames()
    optimizer = torch.optim.Adam(param_groups(model), lr=1.0, betas=(0.9, 0.99), eps=1e-8)
    set_learning_rate(optimizer, 1e-3)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {"other": 1e-3, "time_mix": 1e-3, "time_decay": 2e-3, "time_first": 3e-3}
    )
