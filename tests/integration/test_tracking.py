"""The MLflow tracker against a real `mlflow server`: nesting, resume without duplicate steps, outages."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from orchestration.tracking import MlflowTracker


def history(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow import MlflowClient

    return [metric.step for metric in MlflowClient(uri).get_metric_history(run_id, key)]


def test_parent_with_nested_runs_params_metrics_and_artifacts(mlflow_uri: str, tmp_path: Path):
    from mlflow import MlflowClient

    tracker = MlflowTracker(mlflow_uri, "test-tracking")
    parent = tracker.open_run("pipeline", params={"train.lr_init": "0.0006", "model.n_layer": "2"})
    child = tracker.open_run("pretrain", parent=parent)
    for step in range(50):
        tracker.log_metrics(child, {"train/loss": 5.0 - step * 0.01}, step)
    (tmp_path / "manifest.json").write_text("{}")
    tracker.log_artifact(child, tmp_path / "manifest.json", "data")
    tracker.close_run(child)
    tracker.close_run(parent)
    assert tracker.close(timeout_s=30) == 0

    client = MlflowClient(mlflow_uri)
    child_run, parent_run = client.get_run(child.run_id), client.get_run(parent.run_id)
    assert child_run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert parent_run.data.params == {"train.lr_init": "0.0006", "model.n_layer": "2"}
    assert (child_run.info.status, parent_run.info.status) == ("FINISHED", "FINISHED")
    assert history(mlflow_uri, child.run_id, "train/loss") == list(range(50))
    assert [item.path for item in client.list_artifacts(child.run_id, "data")] == ["data/manifest.json"]


def test_reopened_run_does_not_store_a_step_twice(mlflow_uri: str):
    first = MlflowTracker(mlflow_uri, "test-tracking")
    handle = first.open_run("pretrain")
    for step in range(10):
        first.log_metrics(handle, {"loss": float(step)}, step)
    first.close(timeout_s=30)  # like a driver killed before closing the run: status stays RUNNING

    second = MlflowTracker(mlflow_uri, "test-tracking")
    resumed = second.open_run("pretrain", run_id=handle.run_id)
    for step in range(6, 15):  # a resume from the checkpoint at step 6 replays 6..9
        second.log_metrics(resumed, {"loss": float(step)}, step)
    second.close_run(resumed)
    second.close(timeout_s=30)
    assert resumed.run_id == handle.run_id
    assert history(mlflow_uri, handle.run_id, "loss") == list(range(15))


def test_a_resumed_training_stage_sends_what_its_killed_driver_wrote_down_but_never_sent(mlflow_uri, tmp_path):
    from orchestration.dag import StageContext
    from orchestration.metrics_log import append_metrics
    from orchestration.stages import MetricHistory

    first = MlflowTracker(mlflow_uri, "test-tracking")
    handle = first.open_run("pretrain")
    for step in range(2, 19, 2):
        first.log_metrics(handle, {"loss": 1.0 / step}, step)
    first.close(timeout_s=30)
    for step in range(2, 21, 2):  # the driver wrote step 20 down too, and was killed before sending it
        append_metrics(tmp_path / "metrics.jsonl", step, {"loss": 1.0 / step})

    second = MlflowTracker(mlflow_uri, "test-tracking")
    resumed = second.open_run("pretrain", run_id=handle.run_id)
    ctx = StageContext("pretrain", tmp_path, {}, 1, logging.getLogger("test"), second, resumed)
    MetricHistory(ctx, total_steps=30).send_saved()
    second.close(timeout_s=30)
    assert history(mlflow_uri, handle.run_id, "loss") == list(range(2, 21, 2))


def test_outage_buffers_metrics_flushes_when_server_returns_and_counts_what_is_lost(own_mlflow_server, caplog):
    server = own_mlflow_server
    tracker = MlflowTracker(server.uri, "test-outage")
    handle = tracker.open_run("pretrain")
    for step in range(10):
        tracker.log_metrics(handle, {"loss": float(step)}, step)
    assert tracker.flush(timeout_s=30)

    server.stop()
    with caplog.at_level(logging.WARNING, logger="orchestration.tracking"):
        in_calls = 0.0
        for step in range(10, 40):  # training goes on: every call returns at once
            started = time.monotonic()
            tracker.log_metrics(handle, {"loss": float(step)}, step)
            in_calls += time.monotonic() - started
            time.sleep(0.05)
        assert in_calls < 1
        assert not tracker.flush(timeout_s=2)
        server.start()
        assert tracker.flush(timeout_s=60)
    unreachable = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    assert len(unreachable) == 1 and any("reachable again" in r.getMessage() for r in caplog.records)
    assert history(server.uri, handle.run_id, "loss") == list(range(40))

    # A second outage that outlasts the run: close() gives up after its timeout and says how much was lost.
    server.stop()
    caplog.clear()
    for step in range(40, 65):
        tracker.log_metrics(handle, {"loss": 1.0, "lr": 1e-3}, step)
    with caplog.at_level(logging.WARNING, logger="orchestration.tracking"):
        assert tracker.close(timeout_s=2) == 50
    assert any("50 metric points" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)


def test_a_step_reported_twice_during_an_outage_is_stored_once(own_mlflow_server):
    server = own_mlflow_server
    tracker = MlflowTracker(server.uri, "test-outage")
    handle = tracker.open_run("pretrain")
    tracker.log_metrics(handle, {"loss": 0.0}, 0)
    assert tracker.flush(timeout_s=30)
    server.stop()
    for step in [*range(1, 10), *range(5, 12)]:  # a restarted worker group reports steps 5..9 again
        tracker.log_metrics(handle, {"loss": float(step)}, step)
        time.sleep(0.002)  # another timestamp: MLflow would store the copy as a second point
    server.start()
    assert tracker.flush(timeout_s=60)  # all of it in one batch
    tracker.close(timeout_s=30)
    assert history(server.uri, handle.run_id, "loss") == list(range(12))


def test_run_ids_reach_state_json_when_the_server_answers_after_open_run_stopped_waiting(own_mlflow_server, tmp_path):
    """A server away at the start: the parent's and the stage's ids are written as soon as the runs exist,
    while the stage still runs, so that a driver killed then leaves them for the rerun to reopen."""
    from orchestration.dag import DagRunner, Stage
    from orchestration.rundir import RunDir

    server, run_dir = own_mlflow_server, RunDir(tmp_path / "run")
    server.stop()
    seen: dict[str, str] = {}

    def train(ctx) -> None:  # started once open_run gave up waiting (10 s) with no id
        assert ctx.run.run_id is None
        server.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = run_dir.read_state()
            if state["parent_run_id"] and state["stages"]["train"]["mlflow_run_id"]:
                seen.update(parent=state["parent_run_id"], train=state["stages"]["train"]["mlflow_run_id"])
                return
            time.sleep(0.2)

    tracker = MlflowTracker(server.uri, "test-late-ids")
    DagRunner(run_dir, tracker, system_metrics_s=None).run([Stage("train", train, config={})], "late", {})
    tracker.close(timeout_s=30)
    state = run_dir.read_state()
    assert seen == {"parent": state["parent_run_id"], "train": state["stages"]["train"]["mlflow_run_id"]}
    assert state["stage_runs"][state["stages"]["train"]["dir"]] == seen["train"]
