"""The fused head loss's CUDA row kernel against float64, and FusedHeadLoss with it against without it.

Legend: n rows, V vocabulary, N all rows, C n_embd. The kernel (cuda/head_loss.cu) turns bf16 logits
(n, V) into the bf16 gradient (softmax - onehot) * scale, each row's fp32 cross-entropy, and the
row max and first arg-max; one bf16 rounding of the gradient is the only expected difference from
float64 (plus fp32 summation in the loss).
"""

from __future__ import annotations

import pytest
import torch

import model.fused_loss as fused_loss
from model.fused_loss import fused_head_loss
from model.head_loss_cuda import head_loss_rows_op
from model.loss import language_model_loss

DEVICE = "cuda"


def reference(logits_nV: torch.Tensor, target_n: torch.Tensor, scale: float):
    x = logits_nV.double()
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(1, target_n[:, None]).squeeze(1)
    onehot = torch.nn.functional.one_hot(target_n, x.shape[1]).double()
    grad = (torch.exp(x - lse[:, None]) - onehot) * scale
    return grad, loss


@pytest.mark.parametrize("vocab", [50304, 1000, 1001, 7])  # 16-byte loads when V % 8 == 0; else scalar
def test_rows_match_float64(vocab):
    rows, scale = 37, 1.0 / 4096
    logits = (torch.randn(rows, vocab, device=DEVICE) * 4).bfloat16()
    target = torch.randint(0, vocab, (rows,), device=DEVICE)
    grad, loss, max_n, argmax_n = head_loss_rows_op(logits, target, scale)
    grad_ref, loss_ref = reference(logits, target, scale)
    # one bf16 rounding (half an ulp: 2^-9 relative) plus fp32 exp error
    assert ((grad.double() - grad_ref).abs() <= grad_ref.abs() * 2**-8 + 1e-30).all()
    assert torch.allclose(loss.double(), loss_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(max_n, logits.max(dim=-1).values)
    assert torch.equal(argmax_n, logits.float().argmax(dim=-1))  # first index of the max


def test_ties_take_the_first_index_and_nan_wins():
    vocab = 4096
    logits = torch.zeros(4, vocab, device=DEVICE, dtype=torch.bfloat16)
    logits[0, [5, 900, 4000]] = 3.0  # a three-way tie
    logits[1, [1234, 77]] = float("nan")  # the first NaN wins, whatever the other values
    logits[1, 3] = 100.0
    logits[2, :] = -float("inf")
    logits[2, 17] = 1.0
    target = torch.tensor([900, 3, 17, vocab], device=DEVICE)  # row 3: out of range
    grad, loss, max_n, argmax_n = head_loss_rows_op(logits, target, 1.0)
    assert argmax_n.tolist()[:3] == [5, 77, 17]
    assert max_n[0].item() == 3.0 and torch.isnan(max_n[1]) and max_n[2].item() == 1.0
    assert torch.isnan(loss[1]) and torch.isnan(loss[3])  # the loop's non-finite check sees both
    assert loss[2].item() == 0.0 and grad[2].abs().max().item() == 0.0  # a certain prediction
    assert torch.isfinite(grad[3]).all() and grad[3].float().sum().item() == pytest.approx(1.0, rel=1e-2)


def test_misaligned_and_empty_inputs():
    vocab = 512
    flat = (torch.randn(3 * vocab + 1, device=DEVICE) * 2).bfloat16()
    logits = flat[1:].view(3, vocab)  # 2-byte offset: the scalar path
    target = torch.tensor([0, 10, 511], device=DEVICE)
    grad, loss, _, argmax_n = head_loss_rows_op(logits, target, 0.5)
    grad_ref, loss_ref = reference(logits, target, 0.5)
    assert ((grad.double() - grad_ref).abs() <= grad_ref.abs() * 2**-8 + 1e-30).all()
    assert torch.allclose(loss.double(), loss_ref, rtol=1e-5, atol=1e-5)
    empty = head_loss_rows_op(logits[:0], target[:0], 0.5)
    assert [tuple(t.shape) for t in empty] == [(0, vocab), (0,), (0,), (0,)]


def test_fused_head_loss_with_the_kernel_equals_without(monkeypatch):
    rows, channels, vocab = 3 * 1024, 64, 50304
    hidden = torch.randn(rows, channels, device=DEVICE).bfloat16()
    weight = (torch.randn(vocab, channels, device=DEVICE) * 0.3).bfloat16()
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)

    def run(kernel):
        monkeypatch.setattr(fused_loss, "ROW_KERNEL", kernel)
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fused_head_loss(h, w, targets, 1024)
        loss.backward()
        return loss.detach().double(), h.grad.double(), w.grad.double()

    with_kernel, without = run("cuda"), run("torch")
    assert torch.allclose(with_kernel[0], without[0], rtol=1e-5)
    for got, want in zip(with_kernel[1:], without[1:], strict=True):
        assert (got - want).norm() / want.norm() < 1e-2
    # and the unfused bf16 head as the outside reference of the loss value
    unfused = language_model_loss((hidden @ weight.T).view(1, rows, vocab), targets.view(1, rows))
    assert abs(with_kernel[0].item() - unfused.item()) < 2e-2 * abs(unfused.item())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fused_head_loss_matches_float64(compiled):
    """The bf16 fused loss (chunks of 1024 rows, fp32 accumulation of grad_weight across chunks) against
    the same function in float64: the loss to 1e-3, both gradients to about one bf16 rounding; also called
    from torch.compile (torch 2.11 compiled it without the cross-entropy part of both gradients: relative
    error 1.0; it now runs outside the graph, model/fused_loss.py _apply_eagerly)."""
    rows, channels, vocab, chunk = 4 * 1024, 64, 50304, 1024
    hidden = torch.randn(rows, channels, device=DEVICE).bfloat16()
    weight = (torch.randn(vocab, channels, device=DEVICE) * 0.3).bfloat16()
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)

    def grads(dtype, fn):
        h = hidden.to(dtype, copy=True).requires_grad_(True)  # a fresh leaf per call
        w = weight.to(dtype, copy=True).requires_grad_(True)
        loss = fn(h, w, targets, chunk)
        loss.backward()
        return loss.detach().double(), h.grad.double(), w.grad.double()

    torch._dynamo.reset()
    fn = torch.compile(fused_head_loss) if compiled else fused_head_loss
    got, want = grads(torch.bfloat16, fn), grads(torch.float64, fused_head_loss)
    assert torch.allclose(got[0], want[0], rtol=1e-3)
    for name, g, r in zip(("grad_hidden", "grad_weight"), got[1:], want[1:], strict=True):
        assert ((g - r).norm() / r.norm()).item() < 5e-3, name
