"""The training loop with train.chunk_len (in-process DeepSpeed, world of one): same steps as whole windows."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from model import ModelConfig
from pipeline.config import TrainConfig
from pipeline.data_stages import tokenize_in_process, train_tokenizer
from pipeline.train import train
from tokenization.config import DataConfig, TokenizerConfig

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture
def single_process_world(monkeypatch: pytest.MonkeyPatch):
    """A gloo world of one for `train`, its env vars and process group gone afterwards."""
    from pipeline.engine import _free_port

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    yield
    import deepspeed.comm
    import torch.distributed as dist

    if dist.is_initialized():
        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups, which later tests rebuild


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chunked")
    data = DataConfig(paths=[str(STDLIB / "json")], val_fraction=0.2)
    tokenizer_dir = train_tokenizer(data, TokenizerConfig(vocab_size=400, sample_bytes=128 << 10), root / "tok")
    return tokenize_in_process(data, tokenizer_dir, root / "shards")


def _run(cfg: TrainConfig, shards: Path, out: Path) -> dict[int, dict[str, float]]:
    metrics: dict[int, dict[str, float]] = {}
    model = ModelConfig(n_layer=2, n_embd=32, vocab_size=400, wkv_backend="torch")
    train(cfg, model, shards, out, log_metrics=lambda m, step: metrics.setdefault(step, {}).update(m))
    return metrics


def test_chunked_steps_have_the_losses_and_gradient_norms_of_whole_windows(
    shards: Path, tmp_path: Path, single_process_world
):
    # grad_accum 2: the chunked micro-batches must be scaled and reduced by DeepSpeed like whole ones.
    cfg = TrainConfig(
        ctx_len=40, micro_bsz=2, grad_accum=2, steps=3, lr_init=1e-3, lr_schedule="constant", precision="fp32",
        zero_stage=2, log_every=1, val_every=100, val_batches=1, checkpoint_every=100,
    )  # fmt: skip
    whole = _run(cfg, shards, tmp_path / "whole")
    chunked = _run(cfg.model_copy(update={"chunk_len": 16}), shards, tmp_path / "chunked")  # chunks 16, 16, 8
    assert sorted(whole) == sorted(chunked) == [1, 2, 3]
    for step in whole:
        for key in ("loss", "grad_norm"):
            assert chunked[step][key] == pytest.approx(whole[step][key], rel=1e-5), (step, key)
    weights = [torch.load(tmp_path / run / "final_weights.pt") for run in ("whole", "chunked")]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_chunked_steps_have_the_losses_of_whole_windows(shards: Path, tmp_path: Path, single_process_world):
    """train.compile with chunk_len compiles each chunk (RWKV.compile_chunks), checkpoint and recompute included."""
    cfg = TrainConfig(
        ctx_len=40, micro_bsz=2, steps=2, lr_init=1e-3, lr_schedule="constant", precision="fp32", zero_stage=2,
        log_every=1, val_every=100, val_batches=1, checkpoint_every=100,
    )  # fmt: skip
    whole = _run(cfg, shards, tmp_path / "whole")
    compiled = _run(cfg.model_copy(update={"chunk_len": 16, "compile": True}), shards, tmp_path / "compiled")
    assert sorted(whole) == sorted(compiled) == [1, 2]
    for step in whole:
        for key in ("loss", "grad_norm"):
            assert compiled[step][key] == pytest.approx(whole[step][key], rel=1e-5), (step, key)


def test_chunk_len_with_the_gpt_baseline_is_refused(shards: Path, tmp_path: Path, single_process_world):
    gpt = ModelConfig(arch="gpt", n_layer=1, n_embd=16, vocab_size=400)
    with pytest.raises(ValueError, match="chunk_len=8 needs model.arch=rwkv4"):
        train(TrainConfig(ctx_len=32, steps=1, chunk_len=8), gpt, shards, tmp_path / "gpt")


QUICKSTART = str(Path(__file__).parents[2] / "configs" / "quickstart.yaml")
EXTENDED = ["extend=[{ctx_len: 256, steps: 10, lr: 1.0e-5, chunk_len: 64}]"]


def test_an_extend_stage_trains_with_its_chunk_len():
    from orchestration.config import load_config
    from orchestration.dag import stage_hashes
    from orchestration.stages import build_stages, extend_train_config

    config = load_config(QUICKSTART, EXTENDED)
    stages = build_stages(config)  # no longer refused
    train = extend_train_config(config, config.extend[0])
    assert (train.ctx_len, train.chunk_len, train.lr_init, train.lr_schedule) == (256, 64, 1e-5, "constant")
    whole = stage_hashes(build_stages(load_config(QUICKSTART, [*EXTENDED, "extend.0.chunk_len=0"])))
    assert [name for name, digest in stage_hashes(stages).items() if whole[name] != digest] == [
        "extend1",
        "evaluate",
        "export",
    ]


@pytest.mark.parametrize("key", ["extend.0.chunk_len", "train.chunk_len"])
def test_chunk_len_with_the_gpt_baseline_is_a_setup_error(key: str):
    from orchestration.config import load_config
    from orchestration.stages import PipelineSetupError, build_stages

    config = load_config(QUICKSTART, [*EXTENDED, "model.arch=gpt", f"{key}=32"])
    with pytest.raises(PipelineSetupError, match=r"chunk_len=32: .* model.arch=gpt has no state"):
        build_stages(config)
