"""The fused LayerNorm + token shift + mix kernels (model/ln_shift_mix.py) against the PyTorch
reference in float64: on a GPU compiled, without one through Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET); skipped, visibly, without Triton."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import model.ln_shift_mix as lsm

pytest.importorskip("triton", reason="Triton not installed: the fused LayerNorm-mix kernels are not run")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)", allow_module_level=True)


@pytest.fixture(autouse=True)
def small_programs(monkeypatch):
    # Several tiles per backward program and several programs per sequence even at small T.
    monkeypatch.setattr(lsm, "FORWARD_TILE", 2)
    monkeypatch.setattr(lsm, "BACKWARD_TILE", 2)
    monkeypatch.setattr(lsm, "ROWS", 4)


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()


def make_inputs(batch, steps, channels, n_mix, with_prev, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)

    x = randn(batch, steps, channels, scale=2.0, shift=0.5)  # a mean and a scale for LayerNorm to remove
    weight, bias = randn(channels, shift=1.0), randn(channels, scale=0.3)
    x_prev = randn(batch, channels) if with_prev else None
    mixes = torch.rand(n_mix, channels, generator=gen, dtype=torch.float64).to(dtype)
    return tuple(t.to(DEVICE) if t is not None else None for t in (x, weight, bias, x_prev, mixes))


def reference_with_grads(x, weight, bias, x_prev, mixes, g_out, g_last, eps=1e-5):
    leaves = [
        t.detach().double().requires_grad_(True) if t is not None else None for t in (x, weight, bias, x_prev, mixes)
    ]
    outs, last = lsm.ln_shift_mix_reference(*leaves, eps)
    out = torch.stack(outs)
    loss = (out * g_out.double()).sum() + ((last * g_last.double()).sum() if g_last is not None else 0)
    loss.backward()
    return out.detach(), last.detach(), [t.grad if t is not None else None for t in leaves]


CASES = {  # B, T, C, mixes, x_prev given, gradient into ln[:, -1]
    "att, mid-sequence chunk": (2, 9, 48, 3, True, True),
    "ffn, sequence start": (1, 8, 32, 2, False, False),
    "att, T < rows, C a power of two": (3, 3, 64, 3, False, True),
    "ffn, T = 1 with state": (2, 1, 40, 2, True, True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_match_float64_reference(case, dtype):
    batch, steps, channels, n_mix, with_prev, with_glast = CASES[case]
    x, weight, bias, x_prev, mixes = make_inputs(batch, steps, channels, n_mix, with_prev, dtype)
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(n_mix, batch, steps, channels, generator=gen).to(DEVICE, dtype)
    g_last = torch.randn(batch, channels, generator=gen).to(DEVICE, dtype) if with_glast else None

    outs, last, stats = lsm.forward_kernel_launch(x, weight, bias, x_prev, mixes, 1e-5)
    out = torch.stack(outs)
    gx, g_weight, g_bias, g_prev, g_mixes = lsm.backward_kernel_launch(
        g_out.unbind(0), g_last, x, weight, bias, x_prev, mixes, stats
    )
    want_out, want_last, (w_gx, w_gw, w_gb, w_gprev, w_gmix) = reference_with_grads(
        x, weight, bias, x_prev, mixes, g_out, g_last
    )

    tol = 1e-5 if dtype == torch.float32 else 1e-2
    got = {"out": out, "last": last, "gx": gx, "g_weight": g_weight, "g_bias": g_bias, "g_mixes": g_mixes}
    want = {"out": want_out, "last": want_last, "gx": w_gx, "g_weight": w_gw, "g_bias": w_gb, "g_mixes": w_gmix}
    if with_prev:
        got["g_x_prev"], want["g_x_prev"] = g_prev, w_gprev
    for name in got:
        assert got[name].dtype == dtype, name
        assert rel_l2(got[name], want[name]) <= tol, f"{name}: relative L2 {rel_l2(got[name], want[name]):.2e}"


def test_chained_chunks_equal_one_call():
    """Two chunks, the second given the first's last ln as x_prev, equal one call over both."""
    x, weight, bias, _, mixes = make_inputs(2, 10, 32, 3, False, torch.float32)
    whole, _, _ = lsm.forward_kernel_launch(x, weight, bias, None, mixes, 1e-5)
    first, last, _ = lsm.forward_kernel_launch(x[:, :6].contiguous(), weight, bias, None, mixes, 1e-5)
    second, _, _ = lsm.forward_kernel_launch(x[:, 6:].contiguous(), weight, bias, last, mixes, 1e-5)
    for a, b, w in zip(first, second, whole, strict=True):
        torch.testing.assert_close(torch.cat([a, b], dim=1), w, rtol=0, atol=0)


def test_cpu_tensors_take_the_reference_path(monkeypatch):
    monkeypatch.setattr(lsm, "INTERPRET", False)  # interpreted, CPU tensors take the kernels
    x, weight, bias, x_prev, mixes = (t.cpu() for t in make_inputs(1, 5, 16, 2, True, torch.float32))
    outs, last = lsm.ln_shift_mix(x, weight, bias, x_prev, mixes)
    want_outs, want_last = lsm.ln_shift_mix_reference(x, weight, bias, x_prev, mixes, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(outs, want_outs, strict=True)) and torch.equal(last, want_last)


def test_launch_settings_are_an_argument_of_the_ops():
    """The tuning constants reach both custom ops as their last argument, so that torch.compile's graphs
    hold them (tests/gpu/test_ln_shift_mix_cuda.py checks the recompile; interpreted kernels cannot be
    traced with fake tensors on the CPU). Read inside the op, they were invisible to Dynamo's guards and
    to Inductor's on-disk cache keys."""
    for op in (torch.ops.rwkv.ln_shift_mix.default, torch.ops.rwkv.ln_shift_mix_backward.default):
        assert op._schema.arguments[-1].name == "settings", op._schema


def test_bad_mix_shape_is_named():
    x, weight, bias, _, _ = make_inputs(1, 4, 16, 2, False, torch.float32)
    with pytest.raises(ValueError, match=r"mixes must be \(2 or 3, 16\)"):
        lsm.forward_kernel_launch(x, weight, bias, None, torch.ones(4, 16, device=DEVICE), 1e-5)


@pytest.mark.parametrize("mode", ["one window", "two chunks with state", "chunk_len 4, checkpointed blocks"])
def test_model_with_fused_block_inputs_matches_unfused(monkeypatch, mode):
    """RWKV with ModelConfig.fused_ln_mix (the kernels, interpreted on CPU) against the plain blocks:
    the loss and every parameter's gradient, fp32; also with the kernels recomputed under activation
    checkpoints (each chunk's, and each block's inside it)."""
    import model.rwkv
    from model import RWKV, ModelConfig

    monkeypatch.setattr(model.rwkv, "LN_MIX_KERNEL_DEVICES", frozenset({DEVICE}))
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_embd=32, vocab_size=50, wkv_backend="torch")
    fused_net = RWKV(config).to(DEVICE)
    for name, param in fused_net.named_parameters():  # off the init's ones and zeros, so every term shows
        if "time_mix" in name or "ln" in name:
            param.data.uniform_(0.1, 0.9)
    plain_net = RWKV(dataclasses.replace(config, fused_ln_mix=False)).to(DEVICE)
    plain_net.load_state_dict(fused_net.state_dict())
    idx = torch.randint(0, 50, (2, 11), device=DEVICE)

    def loss_and_grads(fused: bool):
        net = fused_net if fused else plain_net
        if mode == "one window":
            loss = net(idx, targets=idx)
        elif mode.startswith("chunk_len"):
            net.chunk_len, net.checkpoint_blocks = 4, True
            loss = net(idx, targets=idx)
        else:
            logits_a, state = net.forward_with_state(idx[:, :6])
            logits_b, _ = net.forward_with_state(idx[:, 6:], state)
            logits = torch.cat([logits_a, logits_b], dim=1)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    loss_fused, grads_fused = loss_and_grads(True)
    loss_plain, grads_plain = loss_and_grads(False)
    assert abs(loss_fused.item() - loss_plain.item()) <= 1e-6 * abs(loss_plain.item())
    for name, grad in grads_plain.items():
        assert rel_l2(grads_fused[name], grad.double()) <= 1e-5, name


def test_cpu_models_keep_the_plain_blocks(monkeypatch):
    """fused_ln_mix is on by default, yet a model on CPU tensors never calls the kernels (interpreted
    there, they would make every CPU forward slow): the plain blocks run."""
    import model.rwkv
    from model import RWKV, ModelConfig

    def kernels_called(*args, **kwargs):
        raise AssertionError("the LayerNorm-mix kernels ran on CPU tensors")

    monkeypatch.setattr(model.rwkv, "ln_shift_mix", kernels_called)
    net = RWKV(ModelConfig(n_layer=1, n_embd=16, vocab_size=20, wkv_backend="torch"))
    assert net.config.fused_ln_mix
    net(torch.randint(0, 20, (1, 5))).sum().backward()


# Compiles both kernels for sm_90 (Triton's own compiler and ptxas; no GPU needed) with eps typed fp64, as
# Inductor types a Python float argument (an eager launch and the interpreter type it fp32): the kernels
# once failed to compile that way ("ln_prev is fp64, redefined as fp32") on the GPU only.
COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from model import ln_shift_mix_kernels as kernels

scalars = {"T": "i32", "C": "i32", "eps": "fp64"}
for kernel, floats, constexprs in (
    (kernels.forward, ("w_ptr", "b_ptr", "mix_ptr", "stats_ptr"),
     {"HAS_PREV": True, "M": 3, "TILE": 2, "BLOCK_C": 1024}),
    (kernels.backward, ("w_ptr", "b_ptr", "mix_ptr", "stats_ptr", "part_ptr"),
     {"HAS_PREV": True, "HAS_GLAST": True, "M": 3, "ROWS": 8, "TILE": 2, "BLOCK_C": 1024, "STAGES": 3}),
):
    signature = {
        name: "constexpr" if name in constexprs else scalars.get(name, "*fp32" if name in floats else "*bf16")
        for name in kernel.arg_names
    }
    source = ASTSource(kernel, signature=signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
"""


def test_kernels_compile_for_sm90_with_eps_typed_as_inductor_types_it():
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
