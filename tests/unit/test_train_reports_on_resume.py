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


def _train(out: Path, shards: Path, reports: list, cadence: tuple[int, int], crash_at: int | None = None) -> None:
    log_every, checkpoint_every = cadence
    cfg = TrainConfig(
        ctx_len=16, micro_bsz=2, grad_accum=1, steps=12, lr_init=3e-3, lr_final=1e-3, warmup_steps=2,
        precision="fp32", zero_stage=0, log_every=log_every, val_every=4, val_batches=1,
        checkpoint_every=checkpoint_every,
    )  # fmt: skip
    model_cfg = ModelConfig(n_layer=1, n_embd=32, vocab_size=VOCAB, wkv_backend="torch")

    def on_step(step: int) -> None:
        if step == crash_at:
            raise Crash

    train(cfg, model_cfg, shards, out, log_metrics=lambda metrics, step: reports.append((step, metrics)),
          on_step=on_step)  # fmt: skip


def _points(reports: list[tuple[int, dict]]) -> dict[tuple[str, int], float]:
    return {(key, step): metrics[key] for step, metrics in reports for key in EXACT if key in metrics}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"), tokens=1 << 14, vocab_size=VOCAB,
                                  doc_tokens=511, val_tokens=2048)  # fmt: skip


# (log_every, checkpoint_every), the step the run dies after, the last step whose reports reached the driver,
# the reports the resumed run sends first (the newest checkpoint's), and the checkpoint it resumes from
CASES = {
    "reports between checkpoints": ((2, 4), 10, 4, [2, 4, 4, 6, 8, 8], 8),
    "a checkpoint with no report since the previous one": ((4, 2), 11, 4, [4, 4, 8, 8], 10),
}


@pytest.mark.parametrize("case", CASES)
def test_a_resume_reports_again_what_a_killed_driver_never_passed_on(world_of_one, shards, tmp_path, case):
    cadence, crash_at, passed_on_through, resent, resumed_at = CASES[case]
    uninterrupted: list[tuple[int, dict]] = []
    _train(tmp_path / "clean", shards, uninterrupted, cadence)

    before: list[tuple[int, dict]] = []
    with pytest.raises(Crash):
        _train(tmp_path / "killed", shards, before, cadence, crash_at=crash_at)
    passed_on = [(step, metrics) for step, metrics in before if step <= passed_on_through]  # then the driver died

    after: list[tuple[int, dict]] = []
    _train(tmp_path / "killed", shards, after, cadence)
    result = json.loads((tmp_path / "killed" / "train_result.json").read_text())
    assert Path(result["resumed_from"]).name == f"step_{resumed_at:08d}"
    assert [step for step, _ in after][: len(resent)] == resent
    assert _points(passed_on + after) == _points(uninterrupted)
