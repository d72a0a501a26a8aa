"""The training loop's pure parts: DeepSpeed config mapping, checkpoint bookkeeping, RNG round trip, MFU."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.checkpoint_files import prune
from pipeline.config import TrainConfig
from pipeline.engine import deepspeed_config
from pipeline.metrics import mfu, train_flops_per_token


def test_deepspeed_config_maps_train_config():
    cfg = TrainConfig(micro_bsz=8, grad_accum=4, zero_stage=2, precision="bf16", grad_clip=1.0, weight_decay=0.0)
    ds = deepspeed_config(cfg, world_size=2, device_type="cuda")
    assert ds["train_batch_size"] == 8 * 4 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    # bf16: no per-tensor overflow pass (the loop checks the loss); clipping stays.
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["reduce_bucket_size"] == 200_000_000
    assert ds["zero_optimization"]["overlap_comm"] is True  # two ranks on GPU: overlap
    assert deepspeed_config(cfg, world_size=1, device_type="cuda")["zero_optimization"]["overlap_comm"] is False
    # Reference §4.1: Adam (not AdamW) without weight decay, betas (0.9, 0.99), eps 1e-8; FusedAdam on GPU.
    assert ds["optimizer"] == {
        "type": "Adam",
        "params": {"lr": 6e-4, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0, "adam_w_mode": False},
    }


def test_deepspeed_config_cpu_torch_adam_adamw_and_offload():
    cpu = deepspeed_config(TrainConfig(weight_decay=0.1, precision="fp32"), world_size=1, device_type="cpu")
    assert cpu["optimizer"]["type"] == "AdamW"
    assert cpu["optimizer"]["params"]["adam_w_mode"] is True and cpu["optimizer"]["params"]["torch_adam"] is True
    assert cpu["bf16"] == {"enabled": False}
    offload = deepspeed_config(TrainConfig(offload=True, zero_stage=2), world_size=1, device_type="cuda")
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "torch_adam" not in offload["optimizer"]["params"]  # DeepSpeedCPUAdam with offload
    # Unvalidated (model_construct) offload at stage 0: neither an offload section nor a compiled FusedAdam.
    stage0 = deepspeed_config(TrainConfig.model_construct(offload=True, zero_stage=0), 1, "cpu")
    assert "offload_optimizer" not in stage0["zero_optimization"] and stage0["optimizer"]["params"]["torch_adam"]
    assert deepspeed_config(TrainConfig(zero_stage=3), 1, "cuda")["zero_optimization"] == {"stage": 3}


def test_check_shapes_names_every_mismatch(tmp_path):
    saved = {"emb.weight": [512, 64], "blocks.0.att.key.weight": [64, 64], "blocks.1.ln1.weight": [64]}
    model = {"emb.weight": [512, 128], "blocks.0.att.key.weight": [128, 128], "head.weight": [512, 128]}
    with pytest.raises(ckpt.CheckpointMismatch) as error:
        ckpt.check_shapes(saved, model, tmp_path)
    message = str(error.value)
    assert "emb.weight: checkpoint (512, 64) vs model (512, 128)" in message
    assert "blocks.0.att.key.weight: checkpoint (64, 64) vs model (128, 128)" in message
    assert "head.weight: missing from the checkpoint" in message
    assert "blocks.1.ln1.weight: in the checkpoint but not in the model" in message
    ckpt.check_shapes(saved, dict(saved), tmp_path)  # equal shapes pass


def _fake_checkpoint(root, step, complete=True):
    path = ckpt.step_dir(root, step)
    path.mkdir(parents=True)
    if complete:
        (path / ckpt.TRAIN_STATE).write_text(json.dumps({"step": step}))
        (path / ckpt.COMPLETE).write_text("ok\n")
    return path


def test_latest_complete_skips_unfinished_and_prune_keeps_newest(tmp_path):
    for step in (10, 20, 30):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 25, complete=False)  # a crash while saving: older than the newest
    _fake_checkpoint(tmp_path, 40, complete=False)  # being written now (or crashed): newest
    assert ckpt.latest_complete(tmp_path).name == "step_00000030"
    removed = prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step_00000010", "step_00000025"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000020", "step_00000030", "step_00000040"]
    assert ckpt.latest_complete(tmp_path / "missing") is None


_AGREE_ON_RESUME = """
import sys
import torch.distributed as dist
from pipeline import checkpoint as ckpt
dist.init_process_group("gloo", init_method=sys.argv[1], rank=int(sys.argv[2]), world_size=2)
print(ckpt.agreed_latest_complete(sys.argv[3]))
dist.destroy_process_group()
"""


def test_every_rank_resumes_rank_0s_choice_of_checkpoint(tmp_path):
    # Node-local checkpoint folders that differ: rank 1 alone sees a newer complete checkpoint.
    for rank, steps in ((0, (10, 20)), (1, (10, 20, 30))):
        for step in steps:
            _fake_checkpoint(tmp_path / f"node{rank}", step)
    store = f"file://{tmp_path / 'store'}"
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _AGREE_ON_RESUME, store, str(rank), str(tmp_path / f"node{rank}")],
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    chosen = [process.communicate(timeout=120)[0].strip() for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0]
    assert chosen == [str(tmp_path / "node0" / "step_00000020")] * 2


def test_rng_state_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_flops_and_mfu_match_reference_table():
    # reference/rwkv4.md §8.1: forward FLOPs/token 2.613e8 (169M) and 7.573e8 (430M); training is 3x.
    assert train_flops_per_token(50277, 768, 12) / 3 == pytest.approx(2.613e8, rel=1e-3)
    assert train_flops_per_token(50277, 1024, 24) / 3 == pytest.approx(7.573e8, rel=1e-3)
    assert mfu(1e5, 1e9, peak_tflops=100.0, devices=2) == pytest.approx(0.5)


def test_a_val_split_shorter_than_a_window_means_no_validation_and_says_so(tmp_path, capsys):
    from pipeline.train import _val_data
    from tokenization.synthetic import write_synthetic_shards

    shards = write_synthetic_shards(tmp_path / "shards", tokens=4096, vocab_size=64, val_tokens=99, doc_tokens=99)
    assert _val_data(shards, 100, announce=True).num_tokens == 100  # one document of 99 tokens and its eod
    assert _val_data(shards, 101, announce=False) is None and capsys.readouterr().out == ""
    assert _val_data(shards, 101, announce=True) is None
    assert "no validation during training: the val split holds 100 tokens, fewer than one window of 101" in (
        capsys.readouterr().out
    )
