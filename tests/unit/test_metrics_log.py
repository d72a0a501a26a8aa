"""metrics.jsonl, which the loss plots and `rwkv-pipeline compare` read back."""

from __future__ import annotations

from orchestration.metrics_log import append_metrics, metrics_by_step


def test_a_resumed_stage_replays_steps_and_the_latest_values_win(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step, loss in ((10, 5.0), (20, 4.0), (30, 3.5)):  # killed after step 30, resumed from step 20
        append_metrics(path, step, {"loss": loss})
    append_metrics(path, 20, {"val_loss": 4.2})
    for step, loss in ((30, 3.4), (40, 3.0)):
        append_metrics(path, step, {"loss": loss})
    assert metrics_by_step(path) == {
        10: {"loss": 5.0},
        20: {"loss": 4.0, "val_loss": 4.2},
        30: {"loss": 3.4},
        40: {"loss": 3.0},
    }


def test_a_line_cut_short_by_a_killed_writer_is_skipped_not_fatal(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, 10, {"loss": 5.0})
    with open(path, "a") as handle:
        handle.write('{"step": 20, "lo')  # killed mid-write; the resumed stage appends after it
    append_metrics(path, 20, {"loss": 4.0})
    append_metrics(path, 30, {"loss": 3.0})
    assert metrics_by_step(path) == {10: {"loss": 5.0}, 30: {"loss": 3.0}}
    assert metrics_by_step(tmp_path / "absent.jsonl") == {}
