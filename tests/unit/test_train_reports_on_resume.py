"""A resumed run reports again what it reported since its checkpoint: a killed driver may have lost it.

Under Ray Train the metrics travel rank 0 -> driver -> MLflow; a driver killed after a checkpoint was
written but before it passed on that checkpoint's reports would leave a hole in the curves, because
the resumed run goes on after the checkpoint. The tracker skips points it already holds
(orchestration/tracking_queue.py), so sending a report twice costs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model import ModelConfig
from pipeline.config import TrainConfig
from pipeline.train import train
from tokenization.synthetic import write_synthetic_shards

VOCAB = 64
# Figures a resume reproduces exactly (tokens_per_s, mfu and memory are measurements of the moment).
EXACT = ("loss", "lr", "tokens_seen", "bad_steps", "grad_norm", "val_loss")


class Crash(Exception):
    pass


def _train(out: Path, shards: Path, reports: list[tuple[int, dict]], crash_at: int | None = None) -> None:
    cfg = TrainConfig(
        ctx_len=16, micro_bsz=2, grad_accum=1, steps=12, lr_init=3e-3, lr_final=1e-3, warmup_steps=2,
        precision="fp32", zero_stage=0, log_every=2, val_every=4, val_batches=1, checkpoint_every=4,
    )  # fmt: skip
    model_cfg = ModelConfig(n_layer=1, n_embd=32, vocab_size=VOCAB, wkv_backend="torch")

    def on_step(step: int) -> None:
        if step == crash_at:
            raise Crash

    train(cfg, model_cfg, shards, out, log_metrics=lambda metrics, step: reports.append((step, metrics)),
          on_step=on_step)  # fmt: skip


def _points(reports: list[tuple[int, dict]]) -> dict[tuple[str, int], float]:
    return {(key, step): metrics[key] for step, metrics in reports for key in EXACT if key in metrics}


def test_a_resume_reports_again_what_a_killed_driver_never_passed_on(world_of_one, tmp_path):
    shards = write_synthetic_shards(tmp_path / "shards", tokens=1 << 14, vocab_size=VOCAB, doc_tokens=511,
                                    val_tokens=2048)  # fmt: skip
    uninterrupted: list[tuple[int, dict]] = []
    _train(tmp_path / "clean", shards, uninterrupted)

    before: list[tuple[int, dict]] = []
    with pytest.raises(Crash):  # after step 10 ran; the newest checkpoint is step 8's
        _train(tmp_path / "killed", shards, before, crash_at=10)
    saved = json.loads((tmp_path / "killed" / "checkpoints" / "step_00000008" / "train_state.json").read_text())
    assert [step for step, _ in saved["reports_since_previous_checkpoint"]] == [6, 8, 8]  # loss 6, loss 8, val 8
    passed_on = [(step, metrics) for step, metrics in before if step <= 4]  # the driver died after step 4's

    after: list[tuple[int, dict]] = []
    _train(tmp_path / "killed", shards, after)
    assert [step for step, _ in after] == [6, 8, 8, 10, 12, 12]
    assert _points(passed_on + after) == _points(uninterrupted)
