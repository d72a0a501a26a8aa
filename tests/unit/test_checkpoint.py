"""Official RWKV-4 export: the `rwkv` package reproduces our logits; import round trips; bad files are named."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model import RWKV, ModelConfig, load_rwkv4_pth, save_rwkv4_pth
from model.checkpoint import (
    CheckpointFormatError,
    export_state_dict,
    load_rwkv4_safetensors,
    official_shapes,
    save_rwkv4_safetensors,
)

# dim_att == n_embd here: the `rwkv` package's CPU sequence path (att_seq) reuses an (T, n_embd)
# buffer for the WKV output and fails when dim_att differs; a separate test covers dim_att != n_embd.
CONFIG = ModelConfig(n_layer=3, n_embd=32, dim_ffn=80, vocab_size=61, wkv_backend="reference")
STEPS = 64

RWKV_PACKAGE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    assert os.environ["RWKV_JIT_ON"] == "0" and os.environ["RWKV_CUDA_ON"] == "0"
    import torch
    from rwkv.model import RWKV
    ids = torch.load(sys.argv[2]).tolist()
    model = RWKV(model=sys.argv[1], strategy="cpu fp32")
    logits, _ = model.forward(ids, None, full_output=True)
    torch.save(logits.float(), sys.argv[3])
    """
)


def perturbed_model(config: ModelConfig = CONFIG, scale: float = 0.2) -> RWKV:
    model = RWKV(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[RWKV, Path, torch.Tensor, torch.Tensor]:
    model = perturbed_model()
    path = tmp_path_factory.mktemp("export") / "rwkv4-tiny.pth"
    save_rwkv4_pth(model, path)
    ids = torch.randint(0, CONFIG.vocab_size, (STEPS,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids[None])[0]
    return model, path, ids, logits


def test_export_has_exactly_the_official_keys_shapes_and_dtype(exported):
    _, path, _, _ = exported
    state = torch.load(path, weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == official_shapes(CONFIG)
    assert state["blocks.2.att.time_mix_k"].shape == (1, 1, CONFIG.n_embd)
    assert all(v.dtype == torch.float32 for v in state.values())


def test_rwkv_package_reproduces_our_logits(exported, tmp_path):
    _, path, ids, logits = exported
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0", "RWKV_V7_ON": "0"}
    args = [sys.executable, "-c", RWKV_PACKAGE_SCRIPT, str(path), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")]
    subprocess.run(args, env=env, check=True, timeout=120)
    theirs = torch.load(tmp_path / "out.pt")
    assert theirs.shape == (STEPS, CONFIG.vocab_size)
    assert (theirs - logits).abs().max().item() <= 1e-4
    assert logits.abs().max().item() > 1.0  # not a comparison of near-zero logits


def test_pth_import_gives_identical_logits_and_sizes(exported):
    model, path, ids, logits = exported
    loaded = load_rwkv4_pth(path, wkv_backend="reference")
    assert loaded.config == CONFIG
    with torch.no_grad():
        assert torch.equal(loaded(ids[None])[0], logits)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in loaded.parameters())
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name


def test_safetensors_round_trip_is_identical(exported, tmp_path):
    model, _, ids, logits = exported
    save_rwkv4_safetensors(model, tmp_path / "model.safetensors")
    from safetensors.torch import load_file

    on_disk = load_file(str(tmp_path / "model.safetensors"))
    expected = export_state_dict(model)
    assert on_disk.keys() == expected.keys() and all(torch.equal(on_disk[k], expected[k]) for k in expected)
    loaded = load_rwkv4_safetensors(tmp_path / "model.safetensors", wkv_backend="reference")
    with torch.no_grad():
        assert torch.equal(loaded(ids[None])[0], logits)
    save_rwkv4_pth(model, tmp_path / "model.pth")
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.glob("model.*")}
    assert modes == dict.fromkeys(["model.pth", "model.safetensors"], 0o666 & ~mask)  # as open() makes files


def test_sizes_are_inferred_from_shapes_with_dim_att_unlike_n_embd(tmp_path):
    config = ModelConfig(n_layer=2, n_embd=16, dim_att=24, dim_ffn=40, vocab_size=23, wkv_backend="reference")
    model, ids = perturbed_model(config), torch.randint(0, 23, (2, 7))
    save_rwkv4_pth(model, tmp_path / "wide-att.pth")
    loaded = load_rwkv4_pth(tmp_path / "wide-att.pth", wkv_backend="reference")
    assert loaded.config == config
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_squeezed_time_mix_is_accepted_like_the_rwkv_package_does(exported, tmp_path):
    model, path, ids, logits = exported
    state = {k: v.squeeze() if ".time_" in k else v for k, v in torch.load(path, weights_only=True).items()}
    torch.save(state, tmp_path / "squeezed.pth")
    with torch.no_grad():
        assert torch.equal(load_rwkv4_pth(tmp_path / "squeezed.pth", "reference")(ids[None])[0], logits)


def rewritten(path: Path, tmp_path: Path, edit) -> Path:
    state = torch.load(path, weights_only=True)
    edit(state)
    out = tmp_path / "edited.pth"
    torch.save(state, out)
    return out


def error_for(path: Path) -> str:
    with pytest.raises(CheckpointFormatError) as info:
        load_rwkv4_pth(path)
    return str(info.value)


def test_v5_v6_v7_keys_are_listed(exported, tmp_path):
    def make_later(state):
        state["blocks.0.att.ln_x.weight"] = torch.ones(CONFIG.dim_att)
        state["blocks.1.att.gate.weight"] = torch.ones(CONFIG.dim_att, CONFIG.n_embd)
        state["blocks.1.att.time_maa_x"] = torch.ones(1, 1, CONFIG.n_embd)
        state["blocks.2.att.time_faaaa"] = state.pop("blocks.2.att.time_first").reshape(4, -1)
        state["blocks.2.att.w0"] = torch.ones(1, 1, CONFIG.dim_att)

    message = error_for(rewritten(exported[1], tmp_path, make_later))
    for key in ("blocks.0.att.ln_x.weight", "blocks.1.att.gate.weight", "blocks.1.att.time_maa_x"):
        assert key in message
    assert "blocks.2.att.time_faaaa" in message and "blocks.2.att.w0 (RWKV-7)" in message
    assert "missing keys (1): blocks.2.att.time_first" in message


def test_missing_keys_are_listed(exported, tmp_path):
    def drop(state):
        del state["blocks.1.ln2.bias"], state["blocks.0.ln0.weight"], state["head.weight"]

    message = error_for(rewritten(exported[1], tmp_path, drop))
    assert "missing keys (3)" in message
    assert all(k in message for k in ("blocks.1.ln2.bias", "blocks.0.ln0.weight", "head.weight"))


def test_wrong_shapes_and_unexpected_keys_are_listed(exported, tmp_path):
    def damage(state):
        state["blocks.1.att.time_decay"] = torch.zeros(4, CONFIG.dim_att // 4)  # a v5.2-style 2-D decay
        state["blocks.2.ffn.value.weight"] = torch.zeros(CONFIG.n_embd, CONFIG.dim_ffn + 1)
        state["blocks.0.pos_emb_x"] = torch.zeros(1, 4, CONFIG.n_embd)

    message = error_for(rewritten(exported[1], tmp_path, damage))
    assert f"blocks.1.att.time_decay (4, {CONFIG.dim_att // 4}) expected ({CONFIG.dim_att},)" in message
    assert f"blocks.2.ffn.value.weight (32, {CONFIG.dim_ffn + 1}) expected (32, {CONFIG.dim_ffn})" in message
    assert "unexpected keys (1): blocks.0.pos_emb_x" in message


def test_a_file_without_the_size_keys_or_not_a_dict_is_refused(tmp_path):
    torch.save({"blocks.0.att.ln_x.weight": torch.ones(3)}, tmp_path / "v5.pth")
    message = error_for(tmp_path / "v5.pth")
    assert "emb.weight" in message and "blocks.0.att.ln_x.weight" in message
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    assert "expected a flat dict" in error_for(tmp_path / "list.pth")


def test_a_state_dict_exports_like_its_model_and_a_prefixed_one_is_refused(exported, tmp_path):
    model, path, _, _ = exported
    save_rwkv4_pth(model.state_dict(), tmp_path / "from-dict.pth")
    assert (
        torch.load(tmp_path / "from-dict.pth", weights_only=True).keys() == torch.load(path, weights_only=True).keys()
    )
    prefixed = {f"_forward_module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointFormatError, match="_forward_module.emb.weight"):
        save_rwkv4_pth(prefixed, tmp_path / "prefixed.pth")


def test_saving_a_gpt_is_refused(tmp_path):
    from model import build_model

    with pytest.raises(TypeError, match="RWKV-4"):
        save_rwkv4_pth(build_model(ModelConfig(arch="gpt", n_layer=1, n_embd=16, vocab_size=10)), tmp_path / "g.pth")
