"""bf16 at ZeRO-0: our optimizers (fp32 masters of bf16 weights, or fp32 weights under autocast) vs by-hand steps."""

from __future__ import annotations

import copy

import pytest
import torch

from model import ModelConfig, build_model
from model.loss import language_model_loss
from pipeline.config import TrainConfig
from pipeline.engine import build_engine, deepspeed_config, own_optimizer_mode
from pipeline.optim import MasterWeightAdam, clipped_adam, param_groups, set_learning_rate


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


def test_master_weight_adam_is_fp32_adam_rounded_to_bf16_and_resumes_exactly():
    torch.manual_seed(2)
    start = [torch.randn(6, 4), torch.randn(9)]
    weights = [torch.nn.Parameter(w.to(torch.bfloat16)) for w in start]
    masters = [torch.nn.Parameter(w.detach().float()) for w in weights]  # fp32 copies of the bf16 values
    groups = [{"params": weights[:1], "lr_scale": 1.0, "weight_decay": 0.0}, {"params": weights[1:], "lr_scale": 3.0}]
    optimizer = MasterWeightAdam(groups, lr=0.05, betas=(0.9, 0.99), eps=1e-8, max_norm=1.0)
    reference = torch.optim.Adam(
        [{"params": masters[:1], "lr": 0.05}, {"params": masters[1:], "lr": 0.15}], betas=(0.9, 0.99), eps=1e-8
    )
    set_learning_rate(optimizer, 0.05)
    for _ in range(3):
        grads = [4 * torch.randn_like(m) for m in masters]
        for w, m, g in zip(weights, masters, grads, strict=True):
            w.grad, m.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        expected_norm = torch.nn.utils.clip_grad_norm_(masters, 1.0)
        optimizer.step()
        reference.step()
        torch.testing.assert_close(optimizer._global_grad_norm, expected_norm, rtol=1e-6, atol=0)
        for w, m in zip(weights, masters, strict=True):
            assert w.dtype == torch.bfloat16 and optimizer.state[w]["master"].dtype == torch.float32
            torch.testing.assert_close(optimizer.state[w]["master"], m.detach(), rtol=1e-6, atol=1e-7)
            assert torch.equal(w.detach(), m.detach().to(torch.bfloat16))
    # A checkpoint round trip keeps the fp32 masters and moments (torch would cast them to bf16).
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    restored = MasterWeightAdam(
        [{"params": copies[:1], "weight_decay": 0.0}, {"params": copies[1:]}], lr=0.05, betas=(0.9, 0.99), eps=1e-8,
        max_norm=1.0,
    )  # fmt: skip
    restored.load_state_dict(optimizer.state_dict())
    for w, c in zip(weights, copies, strict=True):
        for key in ("master", "exp_avg", "exp_avg_sq", "step"):
            assert restored.state[c][key].dtype == torch.float32
            assert torch.equal(restored.state[c][key], optimizer.state[w][key])


@pytest.mark.parametrize(("adam_w", "decay"), [(False, 0.0), (False, 0.1), (True, 0.1)])
def test_master_weight_adam_decays_and_leaves_small_gradients_unclipped(adam_w: bool, decay: float):
    """Norms under max_norm (each step's differs, as Adam's first step hides a uniform scale) are not
    scaled; weight decay is L2 in the gradient for Adam and w (1 - lr wd) for AdamW, as torch's."""
    torch.manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(8, 5).to(torch.bfloat16))
    master = torch.nn.Parameter(weight.detach().float())
    optimizer = MasterWeightAdam(
        [{"params": [weight], "weight_decay": decay}], lr=0.05, betas=(0.9, 0.99), eps=1e-8, max_norm=1.0,
        adam_w=adam_w,
    )  # fmt: skip
    settings = {"lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": decay}
    reference = torch.optim.AdamW([master], **settings) if adam_w else torch.optim.Adam([master], **settings)
    for norm in (0.1, 0.02, 0.3):
        grad = torch.randn(8, 5)
        grad = (grad * (norm / grad.norm())).to(torch.bfloat16)
        weight.grad, master.grad = grad, grad.float()
        optimizer.step()
        reference.step()
        torch.testing.assert_close(optimizer.state[weight]["master"], master.detach(), rtol=1e-6, atol=1e-7)


def test_stage0_config_for_bf16_only():
    cfg = TrainConfig(precision="bf16", zero_stage=0, grad_clip=1.0)
    ds = deepspeed_config(cfg, world_size=1, device_type="cuda")  # default mode: master weights
    assert own_optimizer_mode(cfg) == "master" and "optimizer" not in ds and "torch_autocast" not in ds
    assert ds["bf16"] == {"enabled": False} and ds["gradient_clipping"] == 0.0  # our optimizer clips
    autocast = deepspeed_config(cfg, world_size=1, device_type="cuda", bf16_stage0="autocast")
    assert autocast["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "optimizer" not in autocast
    for other in (TrainConfig(precision="bf16", zero_stage=2), TrainConfig(precision="fp32", zero_stage=0)):
        assert own_optimizer_mode(other) is None and "optimizer" in deepspeed_config(other, 1, "cuda")
    with pytest.raises(ValueError, match="bf16 stage-0 mode"):
        own_optimizer_mode(cfg, "fp8")


@pytest.mark.parametrize("mode", ["master", "autocast"])
def test_engine_steps_equal_steps_by_hand(world_of_one, mode):
    """Two DeepSpeed steps on the stage-0 bf16 path = the same steps written out without DeepSpeed."""
    model_cfg = ModelConfig(n_layer=2, n_embd=32, vocab_size=64, wkv_backend="torch")
    cfg = TrainConfig(precision="bf16", zero_stage=0, micro_bsz=2, ctx_len=12, grad_clip=0.5, lr_init=1e-2)
    model = build_model(model_cfg, lr_init=cfg.lr_init)
    by_hand, initial = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    engine = build_engine(model, cfg, world_size=1, device_type="cpu", bf16_stage0=mode)
    settings = {"max_norm": 0.5, "lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8}
    if mode == "master":
        optimizer = MasterWeightAdam(param_groups(by_hand.to(torch.bfloat16)), **settings)
    else:
        optimizer = clipped_adam(param_groups(by_hand), **settings)
    tokens = torch.randint(0, 64, (2, 2, 13))
    for step in range(2):
        x_BT, y_BT = tokens[step, :, :-1], tokens[step, :, 1:]
        set_learning_rate(engine.optimizer, 1e-2)
        loss = language_model_loss(engine(x_BT), y_BT)
        engine.backward(loss)
        engine.step()
        set_learning_rate(optimizer, 1e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            logits = by_hand(x_BT)
        language_model_loss(logits, y_BT).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert logits.dtype == torch.bfloat16
    assert float(engine.get_global_grad_norm()) == pytest.approx(float(optimizer._global_grad_norm), rel=1e-6)
    weight_dtype = torch.bfloat16 if mode == "master" else torch.float32
    for (name, ours), theirs in zip(engine.module.state_dict().items(), by_hand.state_dict().values(), strict=True):
        assert ours.dtype == weight_dtype, name
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)
    head = engine.module.state_dict()["head.weight"]
    assert not torch.equal(head, initial["head.weight"].to(head.dtype))  # it trained


def test_deepspeed_checkpoint_resumes_master_path_exactly(world_of_one, tmp_path):
    """save_checkpoint -> fresh engine -> load_checkpoint: the next step equals the uninterrupted one."""
    model_cfg = ModelConfig(n_layer=1, n_embd=32, vocab_size=64, wkv_backend="torch")
    cfg = TrainConfig(precision="bf16", zero_stage=0, micro_bsz=2, ctx_len=12, lr_init=1e-2)
    tokens = torch.randint(0, 64, (3, 2, 13))

    def train_step(engine, step):
        set_learning_rate(engine.optimizer, 1e-2)
        engine.backward(language_model_loss(engine(tokens[step, :, :-1]), tokens[step, :, 1:]))
        engine.step()

    first = build_engine(build_model(model_cfg, lr_init=1e-2), cfg, world_size=1, device_type="cpu")
    for step in range(2):
        train_step(first, step)
    first.save_checkpoint(str(tmp_path), tag="step2")
    train_step(first, 2)
    resumed = build_engine(build_model(model_cfg, lr_init=1e-2), cfg, world_size=1, device_type="cpu")
    resumed.load_checkpoint(str(tmp_path), tag="step2", load_optimizer_states=True, load_lr_scheduler_states=False)
    master = next(iter(resumed.optimizer.state.values()))["master"]
    assert master.dtype == torch.float32
    train_step(resumed, 2)
    for (name, ours), theirs in zip(
        resumed.module.state_dict().items(), first.module.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), name


def test_skip_step_if_is_a_zero_gradient_step_at_lr_0_even_with_nan_gradients():
    """The deferred non-finite check's skip: what the synchronous one did (zero surrogate, LR 0), on a flag."""
    torch.manual_seed(3)
    start = [torch.randn(6, 4), torch.randn(9)]
    groups = lambda weights: [{"params": weights[:1], "weight_decay": 0.1}, {"params": weights[1:]}]  # noqa: E731
    settings = {"lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-8, "max_norm": 1.0}
    ours = [torch.nn.Parameter(w.to(torch.bfloat16)) for w in start]
    twin = [torch.nn.Parameter(w.to(torch.bfloat16)) for w in start]
    optimizer, reference = MasterWeightAdam(groups(ours), **settings), MasterWeightAdam(groups(twin), **settings)
    for flag in (False, True, False):  # a normal step, a skipped one with NaN/inf gradients, a normal one
        grads = [torch.randn_like(w, dtype=torch.float32) for w in start]
        for w, t, g in zip(ours, twin, grads, strict=True):
            w.grad = (g.masked_fill(torch.rand_like(g) < 0.3, float("nan")) if flag else g).to(torch.bfloat16)
            t.grad = torch.zeros_like(g, dtype=torch.bfloat16) if flag else g.to(torch.bfloat16)
        set_learning_rate(optimizer, 0.05)
        set_learning_rate(reference, 0.0 if flag else 0.05)
        before = [w.detach().clone() for w in ours]
        optimizer.skip_step_if(torch.tensor(flag))
        optimizer.step()
        reference.step()
        assert float(optimizer._global_grad_norm) == float(reference._global_grad_norm)
        for w, t, old in zip(ours, twin, before, strict=True):
            assert torch.equal(w, t)
            assert torch.equal(w, old) == flag  # a skipped step moves nothing
            for key in ("master", "exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(optimizer.state[w][key], reference.state[t][key]), key
    assert optimizer._skip is None  # the flag applies to one step only
