"""The one-pass master-weight Adam kernel (cuda/master_adam.cu) against MasterWeightAdam's PyTorch path.

Both paths run the same steps on the same bf16 weights: clipped and unclipped steps, a skipped step with
NaN gradients in the middle, two groups (one with weight decay), tensors from one element to many
chunks. Masters and moments agree to fp32 rounding, the bf16 weights to one rounding of that.
"""

from __future__ import annotations

import pytest
import torch

import pipeline.optim as optim
from pipeline.optim import MasterWeightAdam, set_learning_rate

DEVICE = "cuda"
SHAPES = [(50304, 64), (768,), (7,), (4097, 3), (1,)]


def run(kernel: str, adam_w: bool, monkeypatch) -> tuple[list, MasterWeightAdam, list]:
    monkeypatch.setattr(optim, "MASTER_ADAM_KERNEL", kernel)
    torch.manual_seed(0)
    weights = [torch.nn.Parameter((torch.randn(s, device=DEVICE) * 0.5).bfloat16()) for s in SHAPES]
    groups = [
        {"params": weights[:3], "weight_decay": 0.1, "lr_scale": 1.0},
        {"params": weights[3:], "weight_decay": 0.0, "lr_scale": 2.0},
    ]
    optimizer = MasterWeightAdam(groups, lr=6e-4, betas=(0.9, 0.99), eps=1e-8, max_norm=1.0, adam_w=adam_w)
    norms = []
    for step, (scale, skip) in enumerate([(1e-4, False), (10.0, False), (1.0, True), (1e-3, False), (5.0, False)]):
        for w in weights:
            g = torch.randn(w.shape, device=DEVICE) * scale
            w.grad = (g.masked_fill(torch.rand_like(g) < 0.2, float("nan")) if skip else g).bfloat16()
        set_learning_rate(optimizer, 6e-4 * (step + 1))
        optimizer.skip_step_if(torch.tensor(skip, device=DEVICE))
        optimizer.step()
        norms.append(optimizer._global_grad_norm.clone())
    return weights, optimizer, norms


@pytest.mark.parametrize("adam_w", [False, True], ids=["adam-l2", "adamw"])
def test_kernel_steps_match_the_torch_path(monkeypatch, adam_w):
    w_cuda, opt_cuda, norms_cuda = run("cuda", adam_w, monkeypatch)
    w_torch, opt_torch, norms_torch = run("torch", adam_w, monkeypatch)
    for got, want in zip(norms_cuda, norms_torch, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert norms_cuda[2].item() == 0.0  # the skipped step
    for a, b in zip(w_cuda, w_torch, strict=True):
        sa, sb = opt_cuda.state[a], opt_torch.state[b]
        assert sa["step"].item() == sb["step"].item() == 5
        for key in ("master", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-9, msg=key)
        assert torch.equal(a.detach(), sa["master"].bfloat16())  # the weight is its master, rounded
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=2**-7, atol=0)


def test_kernel_refuses_a_mismatched_state_by_name():
    from pipeline.master_adam_cuda import load_extension

    grad = torch.zeros(4, device=DEVICE, dtype=torch.bfloat16)
    wrong = torch.zeros(5, device=DEVICE)
    one = torch.ones((), device=DEVICE)
    with pytest.raises(RuntimeError, match=r"masters\[0\]|exp_avgs\[0\]|grads\[0\]"):
        load_extension().step(
            [grad], [grad.clone()], [torch.zeros(4, device=DEVICE)], [wrong], [torch.zeros(4, device=DEVICE)],
            [one], [1e-3], [0.0], 0.9, 0.99, 1e-8, False, one, None,
        )  # fmt: skip
