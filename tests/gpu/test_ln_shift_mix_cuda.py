"""The fused LayerNorm + token shift + mix kernels (ModelConfig.fused_ln_mix) in the model on the GPU:
compiled and eager, every parameter's gradient against the plain blocks. (The kernels themselves are
checked against float64 by tests/unit/test_ln_shift_mix.py, which runs them on the GPU here.)"""

from __future__ import annotations

import pytest
import torch

from model import ModelConfig, build_model

pytest.importorskip("triton", reason="Triton not installed: the fused LayerNorm-mix kernels are not run")
DEVICE = "cuda"


def loss_and_gradients(fused: bool, compiled: bool, dtype: torch.dtype):
    torch.manual_seed(1)
    config = ModelConfig(n_layer=2, n_embd=256, vocab_size=1024, wkv_backend="cuda", fused_ln_mix=fused)
    net = build_model(config).to(DEVICE, dtype)
    for name, param in net.named_parameters():  # off the init's ones and zeros, so every term shows
        if "time_mix" in name or ".ln" in name:
            param.data.uniform_(0.1, 0.9)
    net.head.fused_loss_chunk = 1024
    generator = torch.Generator(DEVICE).manual_seed(2)
    idx, targets = torch.randint(0, 1024, (2, 4, 300), device=DEVICE, generator=generator)
    torch._dynamo.reset()
    forward = torch.compile(net) if compiled else net
    loss = forward(idx, targets=targets)
    loss.backward()
    return loss.double(), {name: p.grad.double() for name, p in net.named_parameters()}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_block_inputs_match_plain_blocks(compiled, dtype):
    loss_plain, plain = loss_and_gradients(False, compiled, dtype)
    loss_fused, fused = loss_and_gradients(True, compiled, dtype)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert abs(loss_fused - loss_plain) <= tol * abs(loss_plain)
    for name, want in plain.items():
        error = ((fused[name] - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert error <= tol, f"{name}: relative L2 {error:.2e}"


def test_changed_launch_settings_recompile(monkeypatch):
    """Changing a tuning constant of model/ln_shift_mix.py recompiles with the new value: the settings are
    an argument of the traced op (before, they were read inside it, and a process could reuse graphs that
    Inductor had cached on disk for other settings)."""
    import model.ln_shift_mix as lsm

    seen = []

    op = torch.ops.rwkv.ln_shift_mix  # Dynamo's graph holds the overload packet the model calls

    def capture(gm, example_inputs):
        seen.extend(list(n.args[-1]) for n in gm.graph.nodes if n.target in (op, op.default))
        return gm.forward

    x = torch.randn(2, 64, 256, device=DEVICE)
    weight, bias, mixes = (
        torch.ones(256, device=DEVICE),
        torch.zeros(256, device=DEVICE),
        torch.rand(2, 256, device=DEVICE),
    )
    torch._dynamo.reset()
    fused = torch.compile(lambda x: lsm.ln_shift_mix(x, weight, bias, None, mixes)[0][0], backend=capture)
    first = fused(x)
    monkeypatch.setattr(lsm, "ROWS", 2 * lsm.ROWS)
    second = fused(x)
    torch._dynamo.reset()
    assert [settings[2] for settings in seen] == [lsm.ROWS // 2, lsm.ROWS], seen
    torch.testing.assert_close(first, second)  # the same rows, in programs of another length
