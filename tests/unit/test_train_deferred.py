"""pipeline/train.py's deferred non-finite check (bf16 at ZeRO-0, the flag on the device) vs the synchronous one.

Both must give the same run: the same per-step losses and samples (sample log), the same final
weights, and on non-finite losses the same NonFiniteLoss message (same steps, same last checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pipeline.train
from model import ModelConfig
from pipeline.config import TrainConfig
from pipeline.train import NonFiniteLoss, train
from tokenization.synthetic import write_synthetic_shards

VOCAB = 64


def _shards(out_dir: Path) -> Path:
    """A shard directory of random documents (511 tokens + eod) that TokenDataset reads."""
    return write_synthetic_shards(out_dir, tokens=1 << 14, vocab_size=VOCAB, doc_tokens=511, val_tokens=2048)


def _run(tmp_path: Path, name: str, deferred: bool, monkeypatch: pytest.MonkeyPatch, **overrides):
    monkeypatch.setattr(pipeline.train, "DEFER_FINITE_CHECK", deferred)
    settings = dict(
        ctx_len=16, micro_bsz=2, grad_accum=2, steps=6, lr_init=3e-3, lr_final=1e-3, warmup_steps=2,
        precision="bf16", zero_stage=0, log_every=4, val_every=100, val_batches=1, checkpoint_every=3,
        sample_log=True,
    )  # fmt: skip
    cfg = TrainConfig(**{**settings, **overrides})
    model_cfg = ModelConfig(n_layer=1, n_embd=32, vocab_size=VOCAB, wkv_backend="torch")
    out = tmp_path / name
    shards = tmp_path / "shards" if (tmp_path / "shards").is_dir() else _shards(tmp_path / "shards")
    try:
        result, error = train(cfg, model_cfg, shards, out), None
    except NonFiniteLoss as stop:
        result, error = None, str(stop).replace(str(out), "OUT")
    records = [json.loads(line) for line in (out / "samples" / "rank_00000.jsonl").read_text().splitlines()]
    return result, error, records, out


def test_deferred_check_trains_exactly_like_the_synchronous_one(world_of_one, tmp_path, monkeypatch):
    sync = _run(tmp_path, "sync", False, monkeypatch)
    deferred = _run(tmp_path, "deferred", True, monkeypatch)
    assert sync[1] is None and deferred[1] is None
    assert [r["step"] for r in deferred[2]] == list(range(6))
    assert deferred[2] == sync[2]  # same samples and losses, step by step
    assert deferred[2][-1]["loss"] != deferred[2][0]["loss"]
    assert deferred[0].loss == sync[0].loss and deferred[0].bad_steps == sync[0].bad_steps == 0
    import torch

    a = torch.load(sync[3] / "final_weights.pt", weights_only=True)
    b = torch.load(deferred[3] / "final_weights.pt", weights_only=True)
    for name, tensor in a.items():
        assert torch.equal(b[name], tensor), name


def test_deferred_check_stops_on_nonfinite_losses_like_the_synchronous_one(world_of_one, tmp_path, monkeypatch):
    # An absurd LR without clipping: the weights blow up, later losses are NaN, the run stops after 3 bad steps.
    blow_up = {"lr_init": 1e5, "lr_final": 1e5, "warmup_steps": 0, "grad_clip": 0.0, "max_bad_steps": 3, "steps": 12}
    sync = _run(tmp_path, "sync", False, monkeypatch, **blow_up)
    deferred = _run(tmp_path, "deferred", True, monkeypatch, **blow_up)
    assert sync[1] is not None and "the loss was not finite for 3 steps in a row" in sync[1]
    assert deferred[1] == sync[1]  # the same steps and the same last good checkpoint named
    assert deferred[2] == sync[2]  # same samples, same losses (a bad step logs its finite part)
    # the third bad step raises before its sample-log line: the log ends at the second
    assert f"(steps {len(sync[2]) - 1}..{len(sync[2]) + 1})" in sync[1]


def test_skipping_the_one_rank_allreduce_changes_nothing(world_of_one, tmp_path, monkeypatch):
    """pipeline.train.SKIP_ONE_RANK_ALLREDUCE: DeepSpeed's all-reduce over one rank is the identity."""
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    calls = []
    real = DeepSpeedEngine.allreduce_gradients
    monkeypatch.setattr(DeepSpeedEngine, "allreduce_gradients", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(pipeline.train, "SKIP_ONE_RANK_ALLREDUCE", False)
    plain = _run(tmp_path, "plain", True, monkeypatch)
    made = len(calls)
    assert made >= 6  # at least once per optimizer step
    monkeypatch.setattr(pipeline.train, "SKIP_ONE_RANK_ALLREDUCE", True)
    skipped = _run(tmp_path, "skipped", True, monkeypatch)
    assert len(calls) == made  # none more
    assert skipped[2] == plain[2]
    a = torch.load(plain[3] / "final_weights.pt", weights_only=True)
    b = torch.load(skipped[3] / "final_weights.pt", weights_only=True)
    assert all(torch.equal(b[name], tensor) for name, tensor in a.items())
