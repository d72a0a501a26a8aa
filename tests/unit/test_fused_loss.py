"""The fused head loss (model/fused_loss.py) against the unfused head + language_model_loss.

Function level: loss and gradients of hidden and head weight, fp64 to ~1e-12, fp32 to ~1e-6, bf16
within bf16 rounding; chunk sizes that do and do not divide N; ties at the arg-max (L2Wrap's rule);
an incoming gradient other than 1 (L2Wrap's part is not scaled by it). Model level: RWKV/GPT
`model(idx, targets=y)` against `language_model_loss(model(idx), y)`, also with chunk_len. Memory:
nothing (B, T, V)-sized is saved for backward. Engine level: DeepSpeed (ZeRO-2 with gradient
accumulation, ZeRO-3) steps with the fused loss equal the unfused steps.

Legend: N rows (B*T), C n_embd, V vocab.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import perturbed_rwkv

from model import GPT, ModelConfig, build_model
from model.fused_loss import fused_head_loss
from model.loss import language_model_loss
from model.memory import saved_storages

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


def _grads(loss_fn, hidden_NC, weight_VC, scale=0.25):
    """Loss and (grad hidden, grad weight) after backward of `scale * loss` (as DeepSpeed's 1/grad_accum)."""
    hidden, weight = hidden_NC.detach().requires_grad_(), weight_VC.detach().requires_grad_()
    loss = loss_fn(hidden, weight)
    (scale * loss).backward()
    return loss.detach(), hidden.grad, weight.grad


def _unfused(targets_N):
    return lambda hidden, weight: language_model_loss(hidden @ weight.T, targets_N)


def _fused(targets_N, chunk_rows):
    return lambda hidden, weight: fused_head_loss(hidden, weight, targets_N, chunk_rows)


def _inputs(rows, channels, vocab, dtype, logit_scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, channels, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, channels, generator=generator, dtype=torch.float64) * logit_scale / channels**0.5
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    return hidden.to(dtype), weight.to(dtype), targets


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_rows", [0, 1, 4, 5, 24, 100])  # N = 24: 4 divides it, 5 does not
def test_loss_and_gradients_equal_the_unfused_head(dtype, chunk_rows):
    hidden, weight, targets = _inputs(24, 16, 97, dtype)
    expected = _grads(_unfused(targets), hidden, weight)
    got = _grads(_fused(targets, chunk_rows), hidden, weight)
    tol = TOLERANCE[dtype]
    for name, ours, theirs in zip(("loss", "grad hidden", "grad weight"), got, expected, strict=True):
        assert ours.dtype == theirs.dtype, name
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol * theirs.abs().max().item(), msg=name)


def test_the_l2wrap_part_is_there_and_not_scaled_by_the_incoming_gradient():
    """Without L2Wrap (plain cross-entropy) the gradients differ by far more than the fp64 tolerance."""
    hidden, weight, targets = _inputs(24, 16, 97, torch.float64, logit_scale=20.0)
    _, fused_hidden, fused_weight = _grads(_fused(targets, 5), hidden, weight, scale=0.25)
    _, plain_hidden, plain_weight = _grads(lambda h, w: F.cross_entropy(h @ w.T, targets), hidden, weight, scale=0.25)
    assert (fused_hidden - plain_hidden).abs().max() > 1e-6 * plain_hidden.abs().max()
    assert (fused_weight - plain_weight).abs().max() > 1e-6 * plain_weight.abs().max()
    # scale 0 leaves exactly L2Wrap's term, as in the unfused graph.
    _, zero_hidden, zero_weight = _grads(_fused(targets, 5), hidden, weight, scale=0.0)
    _, ref_hidden, ref_weight = _grads(_unfused(targets), hidden, weight, scale=0.0)
    assert zero_hidden.abs().max() > 0
    torch.testing.assert_close(zero_hidden, ref_hidden, rtol=1e-12, atol=1e-18)
    torch.testing.assert_close(zero_weight, ref_weight, rtol=1e-12, atol=1e-18)


def test_ties_at_the_max_logit_go_to_the_first_index_as_in_l2wrap():
    """Integer inputs make tied logits exact: L2Wrap's gradient goes to torch.max's (first) index."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randint(-3, 4, (12, 6), generator=generator).double()
    weight[7], weight[9] = 10.0, 10.0  # rows 7 and 9 tie at every position's max (positive hidden)
    hidden = torch.randint(0, 3, (10, 6), generator=generator).double() + 1
    targets = torch.randint(0, 12, (10,), generator=generator)
    logits = hidden @ weight.T
    assert (logits[:, 7] == logits.max(-1).values).all() and (logits[:, 7] == logits[:, 9]).all()
    expected = _grads(_unfused(targets), hidden, weight)
    for chunk_rows in (3, 10):
        got = _grads(_fused(targets, chunk_rows), hidden, weight)
        for ours, theirs in zip(got, expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)
    # The tie matters: row 7 (first) gets L2Wrap's pull, row 9 does not.
    _, _, weight_grad = _grads(_fused(targets, 3), hidden, weight, scale=0.0)
    assert weight_grad[7].abs().sum() > 0 and weight_grad[9].abs().sum() == 0


# bf16: both paths round the logits to bf16; ours keeps softmax, loss and grad_weight sums in fp32.
BF16_RTOL = 2e-2


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_within_bf16_rounding_of_the_unfused_head(autocast):
    """bf16 weights (DeepSpeed bf16) or fp32 weights under autocast: both near the fp64 truth as unfused."""
    hidden64, weight64, targets = _inputs(64, 32, 257, torch.float64)
    truth = _grads(_unfused(targets), hidden64, weight64)
    dtype = torch.float32 if autocast else torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = _grads(_fused(targets, 24), hidden64.to(dtype), weight64.to(dtype))
        unfused = _grads(_unfused(targets), hidden64.to(dtype), weight64.to(dtype))
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype  # fp32 loss; grads in the weight's dtype
    for name, ours, theirs, exact in zip(("loss", "grad hidden", "grad weight"), got, unfused, truth, strict=True):
        scale = exact.abs().max().item()
        ours_err = (ours.double() - exact).abs().max().item() / scale
        theirs_err = (theirs.double() - exact).abs().max().item() / scale
        assert ours_err < BF16_RTOL, (name, ours_err)
        assert ours_err <= 2 * theirs_err + 1e-3, (name, ours_err, theirs_err)  # not worse than unfused


def test_no_grad_gives_the_loss_without_gradient_buffers():
    hidden, weight, targets = _inputs(24, 16, 97, torch.float64)
    with torch.no_grad():
        loss = fused_head_loss(hidden, weight, targets, 5)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets), rtol=1e-12, atol=0)


def _all_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _fused_rwkv(chunk_len: int):
    model = perturbed_rwkv(ModelConfig(n_layer=2, n_embd=32, vocab_size=60)).double()
    model.chunk_len, model.head.fused_loss_chunk = chunk_len, 7  # N = 22: chunks of 7 rows, the last 1
    return model, 60, 11


def _fused_gpt():
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch="gpt", n_layer=1, n_embd=16, n_head=2, vocab_size=40)).double()
    model.head.fused_loss_chunk = 5
    return model, 40, 9


@pytest.mark.parametrize(
    "make", [lambda: _fused_rwkv(0), lambda: _fused_rwkv(4), _fused_gpt], ids=["rwkv", "rwkv-chunk4", "gpt"]
)
def test_model_targets_equal_language_model_loss_of_the_logits(make):
    model, vocab, steps = make()
    idx, targets = torch.randint(0, vocab, (2, steps)), torch.randint(0, vocab, (2, steps))
    expected_loss, expected = _all_grads(model, lambda: language_model_loss(model(idx), targets))
    loss, grads = _all_grads(model, lambda: model(idx, targets=targets))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("chunk_len", [0, 8])
def test_nothing_logits_sized_is_saved_for_backward(chunk_len):
    batch, steps, vocab = 4, 32, 1024
    model = build_model(ModelConfig(n_layer=1, n_embd=16, vocab_size=vocab, wkv_backend="torch"), lr_init=1e-3)
    model.chunk_len, model.head.fused_loss_chunk = chunk_len, 20
    idx, targets = torch.randint(0, vocab, (batch, steps)), torch.randint(0, vocab, (batch, steps))
    logits_bytes = batch * steps * vocab * 4
    unfused = saved_storages(lambda: language_model_loss(model(idx), targets))
    fused = saved_storages(lambda: model(idx, targets=targets))
    assert max(unfused.values()) >= logits_bytes  # the unfused graph keeps the logits (B, T, V)
    assert max(fused.values()) < logits_bytes / 2
    assert sum(fused.values()) < sum(unfused.values()) - logits_bytes


def test_the_fused_function_saves_gradients_hidden_and_two_vectors():
    """Exactly: grad_hidden x2 and hidden (N, C), fp32 grad_weight (V, C), arg-max and coefficient (N,)."""
    rows, channels, vocab = 96, 8, 300
    hidden, weight, targets = _inputs(rows, channels, vocab, torch.float32)
    hidden.requires_grad_(), weight.requires_grad_()
    saved = saved_storages(lambda: fused_head_loss(hidden, weight, targets, 10))
    expected = [3 * [rows * channels * 4], [vocab * channels * 4], [rows * 8], [rows * 4]]
    assert sorted(saved.values()) == sorted(sum(expected, []))


def _engine_steps(model, cfg, tokens_SBT1, fused_chunk):
    """Losses of DeepSpeed steps as pipeline/train.py takes them (fused: `engine(x, targets=y)`)."""
    from pipeline.engine import build_engine
    from pipeline.optim import set_learning_rate

    model.head.fused_loss_chunk = fused_chunk
    engine = build_engine(model, cfg, world_size=1, device_type="cpu")
    losses = []
    for x_BT, y_BT in zip(tokens_SBT1[:, :, :-1], tokens_SBT1[:, :, 1:], strict=True):
        set_learning_rate(engine.optimizer, cfg.lr_init)
        loss = engine(x_BT, targets=y_BT) if fused_chunk else language_model_loss(engine(x_BT), y_BT)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, {name: tensor.detach().clone() for name, tensor in engine.module.state_dict().items()}


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_steps_with_the_fused_loss_equal_unfused_steps(world_of_one, zero_stage):
    """fp32, grad_accum 2 (DeepSpeed scales the loss by 1/2, L2Wrap's part is not); ZeRO-3 gathers the head."""
    from pipeline.config import TrainConfig

    cfg = TrainConfig(precision="fp32", zero_stage=zero_stage, micro_bsz=2, grad_accum=2, ctx_len=12, lr_init=1e-2)
    model = build_model(ModelConfig(n_layer=1, n_embd=32, vocab_size=64, wkv_backend="torch"), lr_init=1e-2)
    tokens = torch.randint(0, 64, (6, 2, 13), generator=torch.Generator().manual_seed(5))
    unfused_losses, unfused_weights = _engine_steps(copy.deepcopy(model), cfg, tokens, 0)
    fused_losses, fused_weights = _engine_steps(copy.deepcopy(model), cfg, tokens, 7)  # N = 24 rows, 7 per chunk
    assert fused_losses == pytest.approx(unfused_losses, rel=1e-6)
    assert unfused_losses[-1] != unfused_losses[0]  # the weights moved (3 optimizer steps)
    # Adam turns fp32 rounding differences of small gradients into ~1e-6 weight differences (steps are 1e-2).
    for name, tensor in unfused_weights.items():
        torch.testing.assert_close(fused_weights[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
def test_train_with_fused_loss_chunk_logs_the_losses_of_the_unfused_loop(world_of_one, tmp_path, monkeypatch):
    """pipeline/train.py's call site: the same per-step losses and gradient norms with the fused loss."""
    import sysconfig
    from pathlib import Path

    import model.fused_loss
    from pipeline.config import TrainConfig
    from pipeline.data_stages import tokenize_in_process, train_tokenizer
    from pipeline.train import train
    from tokenization.config import DataConfig, TokenizerConfig

    data = DataConfig(paths=[str(Path(sysconfig.get_paths()["stdlib"]) / "json")], val_fraction=0.2)
    tokenizer = train_tokenizer(data, TokenizerConfig(vocab_size=400, sample_bytes=128 << 10), tmp_path / "tok")
    shards = tokenize_in_process(data, tokenizer, tmp_path / "shards")
    cfg = TrainConfig(
        ctx_len=24, micro_bsz=2, grad_accum=2, steps=2, lr_init=1e-3, lr_schedule="constant", precision="fp32",
        zero_stage=2, log_every=1, val_every=100, val_batches=1, checkpoint_every=100,
    )  # fmt: skip
    chunk_rows_seen = []  # which loss the loop took: the fused function is called with the configured chunk

    def counted(hidden_NC, weight_VC, targets_N, chunk_rows=0, row_kernel=None):
        chunk_rows_seen.append(chunk_rows)
        return fused_head_loss(hidden_NC, weight_VC, targets_N, chunk_rows, row_kernel)

    monkeypatch.setattr(model.fused_loss, "fused_head_loss", counted)
    runs = {}
    for chunk in (0, 20):  # N = 48 rows per micro-batch: chunks 20, 20, 8
        metrics: dict[int, dict[str, float]] = {}
        model_cfg = ModelConfig(n_layer=1, n_embd=32, vocab_size=400, wkv_backend="torch")
        train(
            cfg.model_copy(update={"fused_loss_chunk": chunk}), model_cfg, shards, tmp_path / f"run{chunk}",
            log_metrics=lambda m, step, metrics=metrics: metrics.setdefault(step, {}).update(m), checkpoints=False,
        )  # fmt: skip
        runs[chunk] = metrics
    assert chunk_rows_seen == [20] * 4  # 2 steps x 2 micro-steps, fused only when fused_loss_chunk is set
    assert sorted(runs[0]) == sorted(runs[20]) == [1, 2]
    for step, unfused in runs[0].items():
        for key in ("loss", "grad_norm", "val_loss"):
            if key in unfused:
                assert runs[20][step][key] == pytest.approx(unfused[key], rel=1e-5), (step, key)


def test_the_cuda_row_kernel_setting_leaves_cpu_logits_on_the_pytorch_path(monkeypatch):
    """ROW_KERNEL = "cuda" applies only to bf16 CUDA logits: on the CPU the result is the same, bit for bit."""
    import model.fused_loss as fused_loss

    hidden, weight = torch.randn(40, 8).bfloat16(), torch.randn(50, 8).bfloat16()
    targets = torch.randint(0, 50, (40,))

    def run():
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fused_head_loss(h, w, targets, chunk_rows=16)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    monkeypatch.setattr(fused_loss, "ROW_KERNEL", "torch")
    pytorch_ops = run()
    monkeypatch.setattr(fused_loss, "ROW_KERNEL", "cuda")
    assert all(torch.equal(a, b) for a, b in zip(run(), pytorch_ops, strict=True))


def test_an_unknown_row_kernel_is_refused_with_the_choices():
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"'triton'.*\('cuda', 'torch'\)"):
        fused_head_loss(hidden, weight, targets, row_kernel="triton")


@pytest.mark.parametrize("backend, uses_cuda_rows", [("auto", True), ("cuda", True), ("torch", False)])
def test_a_model_configured_without_cuda_kernels_never_asks_for_the_row_kernel(monkeypatch, backend, uses_cuda_rows):
    """wkv_backend torch (e.g. a GPU without nvcc) keeps the fused loss off the CUDA row kernel too.

    The row kernel is made to look available for these CPU logits and to fail when called, so the
    test sees which path the model's head takes.
    """
    import model.fused_loss as fused_loss

    def refuse(*args):
        raise RuntimeError("row kernel called")

    monkeypatch.setattr(fused_loss.head_loss_cuda, "supports", lambda logits: True)
    monkeypatch.setattr(fused_loss.head_loss_cuda, "head_loss_rows_op", refuse)
    config = ModelConfig(n_layer=1, n_embd=16, vocab_size=32, wkv_backend=backend)
    net = build_model(config)
    net.head.fused_loss_chunk = 8
    idx = torch.randint(0, 32, (2, 6))
    if uses_cuda_rows:
        with pytest.raises(RuntimeError, match="row kernel called"):
            net.head(torch.randn(2, 6, 16), idx)
    else:
        net.head(torch.randn(2, 6, 16), idx).backward()
    gpt = GPT(ModelConfig(n_layer=1, n_embd=16, vocab_size=32, wkv_backend=backend))
    assert gpt.head.row_kernel == (None if uses_cuda_rows else "torch")


def test_a_compiled_model_gets_the_eager_gradients_through_the_fused_loss():
    """The fused loss runs outside the compiled graph (torch 2.11 on the GPU compiled it without its
    cross-entropy gradient); the compiled model around it gets the eager gradients. The GPU check with
    Inductor and bf16 is tests/gpu/test_compiled_training.py."""

    def gradients(compiled: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(ModelConfig(n_layer=2, n_embd=32, vocab_size=97, wkv_backend="torch"))
        model.head.fused_loss_chunk = 16
        idx, targets = torch.randint(0, 97, (2, 2, 24), generator=torch.Generator().manual_seed(1))
        torch._dynamo.reset()
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        forward(idx, targets=targets).backward()
        return {name: p.grad for name, p in model.named_parameters()}

    eager, compiled = gradients(False), gradients(True)
    for name, want in eager.items():
        torch.testing.assert_close(compiled[name], want, rtol=1e-5, atol=1e-7, msg=name)
