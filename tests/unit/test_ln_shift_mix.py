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
    # Several programs per sequence even at small T, so rows cross the programs' chunk boundaries.
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
    "att, C 1536: more warps": (1, 5, 1536, 3, True, True),
    "ffn, C 2048 (MAX_CHANNELS)": (1, 6, 2048, 2, True, True),
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


def test_set_launch_settings_round_trips(monkeypatch):
    """The benchmarks' sweeps set the tuning constants from a list as the ops take them (0 for None)."""
    for name in ("FORWARD_WARPS", "BACKWARD_WARPS", "ROWS", "STAGES"):
        monkeypatch.setattr(lsm, name, getattr(lsm, name))  # restored afterwards
    lsm.set_launch_settings([8, 0, 32, 0])
    assert (lsm.FORWARD_WARPS, lsm.BACKWARD_WARPS, lsm.ROWS, lsm.STAGES) == (8, None, 32, None)
    assert lsm.launch_settings() == [8, 0, 32, 0]


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


def test_rows_wider_than_max_channels_take_the_reference(monkeypatch):
    """Past MAX_CHANNELS the entry point returns the PyTorch reference's values bit for bit (the
    kernels' differ in rounding)."""
    monkeypatch.setattr(lsm, "MAX_CHANNELS", 32)
    x, weight, bias, x_prev, mixes = make_inputs(1, 5, 48, 3, True, torch.float32)
    (outs, last), (want_outs, want_last) = (
        f(x, weight, bias, x_prev, mixes, 1e-5) for f in (lsm.ln_shift_mix, lsm.ln_shift_mix_reference)
    )
    assert all(torch.equal(a, b) for a, b in zip(outs, want_outs, strict=True)) and torch.equal(last, want_last)


@pytest.mark.parametrize(
    ("channels", "dtype", "shared_kb", "want"),
    [
        (768, torch.bfloat16, 227, (4, 4)),  # the tuned constants (an H200)
        (2048, torch.bfloat16, 227, (8, 4)),  # twice the columns, twice the warps
        (2048, torch.float32, 163, (8, 4)),  # an A100's shared memory holds the stages
        (2048, torch.float32, 99, (8, 3)),  # an sm_89 card's: one stage fewer
    ],
)
def test_launch_settings_for_the_row_width_and_device(monkeypatch, channels, dtype, shared_kb, want):
    monkeypatch.setattr(lsm, "_shared_memory_bytes", lambda device: shared_kb << 10)
    x = torch.empty(1, 64, channels, device="meta", dtype=dtype)
    mixes = torch.empty(3, channels, device="meta", dtype=dtype)
    settings = [4, 4, 64, 4]  # the module's, whatever the fixture above sets
    _, meta = lsm._launch_config(x, mixes, settings, backward=True)
    assert (meta["num_warps"], meta["STAGES"]) == want
    _, meta = lsm._launch_config(x, mixes, settings, backward=False)  # one row of x per stage: all fit
    assert (meta["num_warps"], meta["STAGES"]) == (want[0], 4)


# Compiles the kernels (no GPU needed) with the launch settings the module picks for an H200 (sm_90 and
# Triton's max_shared_mem there) at rows up to MAX_CHANNELS wide, and for an sm_89 card with 99 KB (three
# stages of fp32 rows at 2048 columns): no register spills, shared memory within the device and within
# stage_bytes' bound, which the choice of stages relies on. (At 4096 columns the backward spilled 168 bytes
# even at 16 warps: MAX_CHANNELS is 2048.) eps is typed fp64, as Inductor types a Python float argument
# (an eager launch and the interpreter type it fp32): the kernels once failed to compile that way
# ("ln_prev is fp64, redefined as fp32") on the GPU only.
COMPILE_WIDE_ROWS = """
import re, subprocess, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
import model.ln_shift_mix as lsm
from model import ln_shift_mix_kernels as kernels

H200, SM89 = (90, 232448), (89, 101376)  # compute capability, max_shared_mem
CASES = [  # device, columns, mixes, dtype, which kernels
    (H200, 768, 3, torch.bfloat16, "forward backward"), (H200, 1024, 2, torch.float32, "forward backward"),
    (H200, 2048, 3, torch.bfloat16, "forward backward"), (SM89, 2048, 3, torch.float32, "backward"),
]
for (capability, device_shared), channels, n_mix, dtype, which in CASES:
    lsm._shared_memory_bytes = lambda device: device_shared
    x = torch.empty(1, 64, channels, device="meta", dtype=dtype)
    mixes = torch.empty(n_mix, channels, device="meta", dtype=dtype)
    pointer = "*bf16" if dtype == torch.bfloat16 else "*fp32"
    for name in which.split():
        kernel, backward = getattr(kernels, name), name == "backward"
        _, meta = lsm._launch_config(x, mixes, lsm.launch_settings(), backward)
        warps = meta.pop("num_warps")
        constexprs = {"HAS_PREV": True, **meta, **({"HAS_GLAST": True} if backward else {})}
        signature = {
            arg: "constexpr" if arg in constexprs else {"T": "i32", "C": "i32", "eps": "fp64"}.get(
                arg, "*fp32" if arg in ("stats_ptr", "part_ptr") else pointer)
            for arg in kernel.arg_names
        }
        # as a launch specialises them: pointers 16-byte aligned, T and C multiples of 16
        aligned = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg, kind in signature.items()
                   if kind.startswith("*") or arg in ("T", "C")}
        source = ASTSource(kernel, signature=signature, constexprs=constexprs, attrs=aligned)
        target = GPUTarget("cuda", capability, 32)
        compiled = triton.compile(source, target=target, options={"num_warps": warps})
        arch = "sm_90a" if capability == 90 else f"sm_{capability}"
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
            ptx.write(compiled.asm["ptx"])
            ptx.flush()
            log = subprocess.run([get_ptxas(capability).path, f"-arch={arch}", "-v", ptx.name, "-o", "/dev/null"],
                                 capture_output=True, text=True, check=True).stderr
        spills = int(re.search(r"(\\d+) bytes spill stores", log).group(1))
        shared = compiled.metadata.shared
        where = f"sm_{capability}: {name} at C {channels}, M {n_mix}, {dtype}, {meta}, {warps} warps"
        print(f"{where}: {spills} bytes spilled, {shared} bytes of shared memory")
        assert spills == 0, where
        assert shared <= device_shared, where
        if (meta["STAGES"] or 1) > 1:
            stage = lsm.stage_bytes(meta["BLOCK_C"], n_mix, x.element_size(), backward)
            assert shared <= (meta["STAGES"] - 1) * stage + lsm._SCRATCH_BYTES, where
"""


def test_wide_rows_compile_without_spills_within_the_devices_shared_memory():
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_WIDE_ROWS], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
