"""bf16 at ZeRO-0: fp32 weights under torch.autocast with our clipped Adam, checked against a by-hand step."""

from __future__ import annotations

import copy

import pytest
import torch

from model import ModelConfig, build_model
from model.loss import language_model_loss
from pipeline.config import TrainConfig
from pipeline.engine import build_engine, deepspeed_config, uses_autocast
from pipeline.optim import clipped_adam, param_groups, set_learning_rate


def test_clipped_adam_equals_clip_then_adam():
    """Same update as torch's clip_grad_norm_ followed by Adam, and the pre-clip norm is kept."""
    torch.manual_seed(1)
    weights = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    grads = [3 * torch.randn_like(w) for w in weights]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = clipped_adam([{"params": ours, "lr_scale": 2.0}], max_norm=1.0, lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    reference = torch.optim.Adam(theirs, lr=0.2, betas=(0.9, 0.99), eps=1e-8)
    set_learning_rate(optimizer, 0.1)  # lr_scale 2 -> 0.2
    for p, q, g in zip(ours, theirs, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    optimizer.step()
    reference.step()
    assert expected_norm > 1.0  # the clip did something
    torch.testing.assert_close(optimizer._global_grad_norm, expected_norm, rtol=1e-12, atol=0)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)


def test_clipped_adamw_decouples_weight_decay():
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = clipped_adam([{"params": [weight], "weight_decay": 0.5}], max_norm=0.0, lr=0.1, adam_w=True)
    weight.grad = torch.zeros(4)
    optimizer.step()  # zero gradient: only the decoupled decay moves the weight, by lr * wd
    torch.testing.assert_close(weight.detach(), torch.full((4,), 1 - 0.1 * 0.5))


def test_config_autocast_only_for_bf16_at_zero_0():
    cfg = TrainConfig(precision="bf16", zero_stage=0, grad_clip=1.0)
    ds = deepspeed_config(cfg, world_size=1, device_type="cuda")
    assert uses_autocast(cfg) and "optimizer" not in ds
    assert ds["bf16"] == {"enabled": False} and ds["gradient_clipping"] == 0.0  # our optimizer clips
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    for other in (TrainConfig(precision="bf16", zero_stage=2), TrainConfig(precision="fp32", zero_stage=0)):
        assert not uses_autocast(other) and "torch_autocast" not in deepspeed_config(other, 1, "cuda")


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch):
    from pipeline.engine import _free_port, init_process_group

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    init_process_group("cpu")
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def test_engine_step_equals_autocast_step_by_hand(world_of_one):
    """Two DeepSpeed steps (weights fp32, forward under bf16 autocast) = the same steps written out."""
    model_cfg = ModelConfig(n_layer=2, n_embd=32, vocab_size=64, wkv_backend="torch")
    cfg = TrainConfig(precision="bf16", zero_stage=0, micro_bsz=2, ctx_len=12, grad_clip=0.5, lr_init=1e-2)
    model = build_model(model_cfg, lr_init=cfg.lr_init)
    by_hand, initial = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    engine = build_engine(model, cfg, world_size=1, device_type="cpu")
    optimizer = clipped_adam(param_groups(by_hand), max_norm=0.5, lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    tokens = torch.randint(0, 64, (2, 2, 13))
    for step in range(2):
        x_BT, y_BT = tokens[step, :, :-1], tokens[step, :, 1:]
        set_learning_rate(engine.optimizer, 1e-2)
        loss = language_model_loss(engine(x_BT), y_BT)
        engine.backward(loss)
        engine.step()
        set_learning_rate(optimizer, 1e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = by_hand(x_BT)
        language_model_loss(logits, y_BT).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert logits.dtype == torch.bfloat16
    assert float(engine.get_global_grad_norm()) == pytest.approx(float(optimizer._global_grad_norm), rel=1e-6)
    for (name, ours), theirs in zip(engine.module.state_dict().items(), by_hand.state_dict().values(), strict=True):
        assert ours.dtype == torch.float32, name
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(engine.module.state_dict()["head.weight"], initial["head.weight"])  # it trained
