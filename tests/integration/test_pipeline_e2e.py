"""The whole DAG through the real CLI, on a real Ray cluster and a real `mlflow server`.

One small run (two stdlib packages as the corpus, a 2-layer model, 30 steps on 2 Ray Train
workers) is shared by the tests of this module, which then rerun it, change it, kill it and take
its tracking server away. Each run is a `rwkv-pipeline` subprocess, so kill -9 hits a real driver.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import yaml

from orchestration.ray_train import RAY_CHECKPOINT_RECORD

# Whole pipeline runs: an outage test took 79 s on a busy 2-core machine; 300 s (pyproject) is too near.
pytestmark = pytest.mark.timeout(900)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
STAGES = ["tokenizer", "tokenize", "pretrain", "evaluate", "export"]


QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def tiny_config(workdir: Path, mlflow_uri: str, ray_address: str) -> Path:
    """configs/quickstart.yaml, shortened: two stdlib packages, a 2-layer model, 30 steps."""
    changes = {
        "name": "e2e",
        "workdir": str(workdir),
        "data": {
            "paths": [str(STDLIB / "json" / "*.py"), str(STDLIB / "email" / "*.py")],
            "val_fraction": 0.2,
            "unit_bytes": 200_000,
        },
        "tokenizer": {"vocab_size": 512, "sample_bytes": 300_000},
        "model": {"n_layer": 2, "n_embd": 32, "wkv_backend": "torch"},
        "train": {
            "ctx_len": 32,
            "micro_bsz": 4,
            "steps": 30,
            "log_every": 2,
            "val_every": 10,
            "val_batches": 2,
            "checkpoint_every": 10,
            "lr_init": 6e-4,
            "lr_final": 1e-5,
        },
        "eval": {"batches": 2, "sample_tokens": 8},
        "ray": {"address": ray_address, "num_workers": 2, "stage_retries": 0},
        "tracking": {"uri": mlflow_uri, "experiment": "e2e", "system_metrics_interval_s": 1, "flush_timeout_s": 120},
    }
    path = workdir / "e2e.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(merged(yaml.safe_load(QUICKSTART.read_text()), changes)))
    return path


def cli(*args: str, timeout_s: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestration.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=_env(),
    )


def start_run(config: Path, *overrides: str) -> subprocess.Popen:
    """`rwkv-pipeline run` in the background; read its console (stdout and stderr) with communicate()."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "run", str(config), *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return env | {"PYTHONUNBUFFERED": "1"}


def state_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def stage_dirs(run_dir: Path) -> dict[str, Path]:
    return {name: run_dir / stage["dir"] for name, stage in state_of(run_dir)["stages"].items()}


def markers(run_dir: Path) -> dict[str, int]:
    return {name: (path / "_SUCCESS").stat().st_mtime_ns for name, path in stage_dirs(run_dir).items()}


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint_registered(run_dir: Path, name: str):
    """True once Ray Train recorded checkpoint `name` (what a rerun of the driver resumes from)."""

    def check() -> bool:
        snapshots = list(run_dir.glob(f"pretrain-*.partial/ray/pretrain/{RAY_CHECKPOINT_RECORD}"))
        try:
            return any(name in path.read_text() for path in snapshots)
        except OSError:  # replaced while we read it
            return False

    return check


def nested_runs(uri: str, parent_id: str) -> dict[str, list]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    by_stage: dict[str, list] = {}
    for run in children:
        by_stage.setdefault(run.data.tags["mlflow.runName"], []).append(run)
    return by_stage


def assert_training_curves_whole(uri: str, run) -> None:
    """Every training metric at every step it is reported at, once: a kill or a Ctrl-C lost no point."""
    for key in run.data.metrics:
        steps = steps_of(uri, run.info.run_id, key)
        assert len(steps) == len(set(steps)), key  # no step stored twice, system metrics included
        if key.startswith("system/") or key == "stage_seconds":
            continue
        assert steps == ([10, 20, 30] if key == "val_loss" else list(range(2, 31, 2))), key


def steps_of(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow import MlflowClient

    return [metric.step for metric in MlflowClient(uri).get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, mlflow_uri: str, ray_address: str):
    workdir = tmp_path_factory.mktemp("e2e")
    config = tiny_config(workdir, mlflow_uri, ray_address)
    done = cli("run", str(config))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return config, workdir / "e2e", done


def test_full_run_has_parent_nested_stage_runs_step_metrics_and_artifacts(first_run, mlflow_uri: str):
    from mlflow import MlflowClient

    config, run_dir, done = first_run
    assert "val loss" in done.stdout and "sample:" in done.stdout and "MLflow" in done.stdout
    console = done.stdout + done.stderr
    assert console.count("step 10/30 loss=") == 1, console[-3000:]  # rank 0's line, forwarded once by Ray
    # Ray Train's placement-group cleaner, without a state API to ask, warned every second (or died with
    # a traceback when /tmp/ray/ray_current_cluster named another cluster): orchestration.cluster.
    assert "PlacementGroupCleaner" not in console, console[-3000:]
    assert console.count("joined the Ray cluster at 127.0.0.1:") == 1  # which cluster, how big, said once
    assert (
        "View run" not in console and "Setting accelerator to CPU" not in console
    )  # MLflow's two lines per finished run on a server; the summary links the parent
    # Rank 0's line per stored checkpoint, not each rank's Ray Train report lines with `.partial` paths.
    assert console.count("checkpoint step_00000010 stored") == 1, console[-3000:]
    assert "TrainingReport" not in console and "Checkpoint successfully created" not in console, console[-3000:]
    state = state_of(run_dir)
    assert [name for name in state["stages"]] == STAGES
    assert all(stage["status"] == "done" for stage in state["stages"].values())
    assert "stdout: " in (run_dir / "logs" / "pretrain.log").read_text()  # what the stage printed, Ray's relay too
    assert "step 10/30 loss=" in (run_dir / "logs" / "pretrain.log").read_text()
    # Stages whose Ray tasks print nothing still say what they did in their logs.
    assert re.search(
        r"val loss [0-9.]+ \(perplexity [0-9.]+\) over \d+ windows", (run_dir / "logs" / "evaluate.log").read_text()
    )
    assert "wrote model.pth, model.safetensors" in (run_dir / "logs" / "export.log").read_text()
    manifest = json.loads((stage_dirs(run_dir)["pretrain"] / "checkpoint_manifest.json").read_text())
    assert (stage_dirs(run_dir)["pretrain"] / manifest["checkpoint"] / "COMPLETE").is_file()  # valid once renamed

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["train.lr_init"] == "0.0006"
    assert [item.path for item in client.list_artifacts(parent.info.run_id)] == ["config.yaml"]
    runs = nested_runs(mlflow_uri, parent.info.run_id)
    assert sorted(runs) == sorted(STAGES) and all(len(found) == 1 for found in runs.values())
    pretrain = runs["pretrain"][0]
    assert steps_of(mlflow_uri, pretrain.info.run_id, "loss") == list(range(2, 31, 2))
    assert steps_of(mlflow_uri, pretrain.info.run_id, "val_loss") == [10, 20, 30]
    assert any(key.startswith("system/cpu") for key in pretrain.data.metrics)

    def listed(stage: str, folder: str) -> set[str]:
        return {item.path for item in client.list_artifacts(runs[stage][0].info.run_id, folder)}

    assert listed("tokenizer", "tokenizer") == {"tokenizer/tokenizer.model", "tokenizer/tokenizer.json"}
    assert listed("tokenize", "data") == {"data/manifest.json"}
    assert "plots/loss_curve.png" in listed("pretrain", "plots")
    assert {"eval/eval_report.json", "eval/loss_vs_position.png"} <= listed("evaluate", "eval")
    exported = ("model.pth", "model.safetensors", "tokenizer.model", "tokenizer.json", "export.json")
    assert listed("export", "model") == {f"model/{name}" for name in exported}  # not _SUCCESS, stage.json
    report = json.loads(
        Path(client.download_artifacts(runs["evaluate"][0].info.run_id, "eval/eval_report.json")).read_text()
    )
    assert runs["evaluate"][0].data.metrics["val_loss"] == pytest.approx(report["val_loss"])
    assert runs["evaluate"][0].data.params["eval.ctx_len"] == str(report["ctx_len"])
    assert runs["tokenizer"][0].data.params["tokenizer.vocab_size"] == "512"
    assert pretrain.data.params["model.vocab_size"] == "512"  # stage runs compare without their parent
    assert parent.data.metrics["eval/val_loss"] == pytest.approx(report["val_loss"])  # runs sort by it in MLflow


def test_status_generate_and_export_commands_on_the_finished_run(first_run, tmp_path: Path, mlflow_uri: str):
    from model import load_rwkv4_pth

    _, run_dir, _ = first_run
    status = cli("status", str(run_dir))
    assert status.returncode == 0 and "MLflow" in status.stdout
    assert all(f"{stage}" in status.stdout for stage in STAGES) and status.stdout.count(" done ") == len(STAGES)
    generated = cli("generate", str(stage_dirs(run_dir)["export"]), "--prompt", "def ", "--tokens", "8")
    assert generated.returncode == 0 and generated.stdout.startswith("def "), generated.stderr[-2000:]
    from_run = cli("generate", str(run_dir), "--prompt", "def ", "--tokens", "8")  # the run's export stage
    assert from_run.returncode == 0 and from_run.stdout == generated.stdout, from_run.stderr[-2000:]
    exported = cli("export", str(run_dir), "--out", str(tmp_path / "exported"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    model = load_rwkv4_pth(tmp_path / "exported" / "model.pth")
    assert model.emb.weight.shape == (512, 32) and (tmp_path / "exported" / "tokenizer.model").is_file()
    compared = cli("compare", str(run_dir), "--out", str(tmp_path / "compare.png"))
    assert compared.returncode == 0, compared.stderr[-2000:]
    report = json.loads((stage_dirs(run_dir)["evaluate"] / "eval_report.json").read_text())
    assert f"| {report['val_loss']:.4f} ({report['perplexity']:.1f}) at ctx {report['ctx_len']} |" in compared.stdout
    assert "| e2e | pretrain ctx " in compared.stdout and (tmp_path / "compare.png").stat().st_size > 0
    longer = cli("eval", str(run_dir), "--ctx-len", "64", "--out", str(tmp_path / "eval64"))
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "positions 33-64, past the longest trained length: " in longer.stdout
    report64 = json.loads((tmp_path / "eval64" / "eval_report.json").read_text())
    assert report64["trained_ctx"] == {"pretrain": 32} and report64["ctx_len"] == 64
    assert report64["loss_past_trained_ctx"] > 0  # positions 33..64, which pretraining never saw
    assert report64["loss_within_trained_ctx"] > 0  # positions 1..32, beside it
    tracked = nested_runs(mlflow_uri, state_of(run_dir)["parent_run_id"])["eval-ctx64"]  # beside the stage runs
    assert len(tracked) == 1 and tracked[0].data.metrics["val_loss"] == pytest.approx(report64["val_loss"])
    assert tracked[0].data.metrics["loss_past_trained_ctx"] == pytest.approx(report64["loss_past_trained_ctx"])
    assert tracked[0].data.params["eval.ctx_len"] == "64" and "eval.batches" in tracked[0].data.params  # as the stage's
    assert f"MLflow: {mlflow_uri}" in longer.stdout
    in_run = cli("eval", str(run_dir), "--ctx-len", "48")  # into <run>/eval-ctx48, which status lists
    assert in_run.returncode == 0 and "eval-ctx48 val loss " in cli("status", str(run_dir)).stdout
    too_long = cli("eval", str(run_dir), "--ctx-len", "100000000")
    assert too_long.returncode == 2 and "fewer than one window of 100000001" in too_long.stderr, too_long.stderr
    onto_a_file = cli("export", str(run_dir), "--out", str(tmp_path / "compare.png"))
    assert onto_a_file.returncode == 2 and "is a file: give a folder" in onto_a_file.stderr, onto_a_file.stderr


def test_rerun_of_a_finished_run_does_no_work(first_run):
    config, run_dir, _ = first_run
    before, folders = markers(run_dir), sorted(p.name for p in run_dir.iterdir())
    again = cli("run", str(config))
    assert again.returncode == 0, again.stderr[-3000:]
    assert markers(run_dir) == before and sorted(p.name for p in run_dir.iterdir()) == folders
    plan = cli("plan", str(config))
    assert [line.split()[1] for line in plan.stdout.splitlines()] == ["cached"] * len(STAGES)
    with socket.socket() as sock:  # a cluster that is gone: nothing is left to run, so nothing needs it
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    gone = cli("run", str(config), f"ray.address=127.0.0.1:{closed}")
    assert gone.returncode == 0 and markers(run_dir) == before, gone.stderr[-3000:]


def test_lr_change_killed_mid_pretrain_resumes_reusing_tokenizer_and_shards(first_run, mlflow_uri: str):
    config, run_dir, _ = first_run
    before_dirs, before_markers = stage_dirs(run_dir), markers(run_dir)
    plan = cli("plan", str(config), "train.lr_init=0.001")
    assert [line.split()[1] for line in plan.stdout.splitlines()] == ["cached", "cached", "run", "run", "run"]

    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "run", str(config), "train.lr_init=0.001"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    try:
        wait_for(checkpoint_registered(run_dir, "step_00000010"), 300, "checkpoint 10 registered with Ray Train")
        assert driver.poll() is None, "the run ended before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    partial = next(run_dir.glob("pretrain-*.partial"))
    assert state_of(run_dir)["stages"]["pretrain"]["status"] == "running"

    resumed = cli("run", str(config), "train.lr_init=0.001")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = stage_dirs(run_dir)
    assert after["tokenizer"] == before_dirs["tokenizer"] and after["tokenize"] == before_dirs["tokenize"]
    assert markers(run_dir)["tokenize"] == before_markers["tokenize"]
    assert after["pretrain"] != before_dirs["pretrain"] and after["pretrain"].name == partial.name[: -len(".partial")]
    result = json.loads((after["pretrain"] / "train_result.json").read_text())
    assert result["step"] == 30 and result["resumed_from"] is not None

    runs = nested_runs(mlflow_uri, state_of(run_dir)["parent_run_id"])
    assert {name: len(found) for name, found in runs.items()} == {"pretrain": 1, "evaluate": 1, "export": 1}
    pretrain = runs["pretrain"][0]
    assert_training_curves_whole(mlflow_uri, pretrain)


def test_ctrl_c_mid_pretrain_stops_the_stage_and_the_rerun_resumes_from_the_newest_whole_checkpoint(
    first_run, mlflow_uri: str
):
    """Ctrl-C reaches Ray Train's own SIGINT handler (it aborts the run, then exits the process); the
    run reports an interrupt, not a failure. Ray had not recorded the checkpoints (its snapshot is
    removed here, as when the stop falls between an upload and the record): the rerun resumes from
    the newest whole checkpoint in Ray's storage folder, not from step 0."""
    from pipeline.checkpoint_files import newest_intact

    config, run_dir, _ = first_run
    overrides = ["train.lr_init=0.0015"]
    driver = start_run(config, *overrides)
    try:
        wait_for(checkpoint_registered(run_dir, "step_00000010"), 300, "checkpoint 10 registered with Ray Train")
        assert driver.poll() is None, "the run ended before it could be interrupted"
        driver.send_signal(signal.SIGINT)
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, output[-3000:]
    assert "interrupted: rerun the same command to resume" in output
    pretrain = state_of(run_dir)["stages"]["pretrain"]
    assert pretrain["status"] == "killed", pretrain

    storage = next(run_dir.glob("pretrain-*.partial/ray/pretrain"))
    (storage / RAY_CHECKPOINT_RECORD).unlink()
    newest = newest_intact(storage)
    assert newest is not None and newest.name >= "step_00000010"

    resumed = cli("run", str(config), *overrides)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    result = json.loads((stage_dirs(run_dir)["pretrain"] / "train_result.json").read_text())
    # The stopped job's workers may still finish an upload after `newest` was read: a newer one is as good.
    assert result["step"] == 30 and Path(result["resumed_from"]).name >= newest.name, result
    runs = nested_runs(mlflow_uri, state_of(run_dir)["parent_run_id"])
    assert len(runs["pretrain"]) == 1
    assert_training_curves_whole(mlflow_uri, runs["pretrain"][0])


def test_training_finishes_through_a_tracking_outage_and_the_metrics_arrive(first_run, own_mlflow_server):
    config, run_dir, _ = first_run
    server = own_mlflow_server
    overrides = [f"tracking.uri={server.uri}", "train.lr_init=0.002"]
    driver = start_run(config, *overrides)
    try:
        pretrain_state = lambda: state_of(run_dir)["stages"].get("pretrain", {})  # noqa: E731
        wait_for(
            lambda: pretrain_state().get("status") == "running" and pretrain_state().get("mlflow_run_id"),
            120,
            "pretrain to start",
        )
        run_id = pretrain_state()["mlflow_run_id"]
        server.stop()  # down before the first training step is logged
        wait_for(lambda: pretrain_state().get("status") == "done", 300, "pretrain to finish without MLflow")
        server.start()
        output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-3000:]
    assert output.count("is unreachable") == 1 and "reachable again" in output
    assert steps_of(server.uri, run_id, "loss") == list(range(2, 31, 2))


def test_context_extension_stage_continues_from_pretrain_at_the_longer_length(first_run, mlflow_uri: str):
    """`extend` adds a stage that starts from pretrain's weights: cached pretrain, trained extension, new eval."""
    import torch

    config, run_dir, _ = first_run
    extension = ["extend=[{ctx_len: 64, steps: 8, lr: 3.0e-4, chunk_len: 32}]"]
    plan = cli("plan", str(config), *extension)
    assert [line.split()[:2] for line in plan.stdout.splitlines()] == [
        ["tokenizer", "cached"],
        ["tokenize", "cached"],
        ["pretrain", "cached"],
        ["extend1", "run"],
        ["evaluate", "run"],
        ["export", "run"],
    ], plan.stdout
    done = cli("run", str(config), *extension)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    dirs = stage_dirs(run_dir)
    result = json.loads((dirs["extend1"] / "train_result.json").read_text())
    assert result["step"] == 8
    runs = nested_runs(mlflow_uri, state_of(run_dir)["parent_run_id"])
    extend = runs["extend1"][0]
    assert extend.data.params["train.ctx_len"] == "64" and extend.data.params["train.chunk_len"] == "32"
    assert extend.data.params["train.lr_schedule"] == "constant"
    assert extend.data.params["model.vocab_size"] == "512" and extend.data.params["model.n_layer"] == "2"

    from mlflow import MlflowClient

    def losses(run_id: str) -> list[float]:
        return [metric.value for metric in MlflowClient(mlflow_uri).get_metric_history(run_id, "loss")]

    pretrain_id = state_of(run_dir)["stage_runs"][dirs["pretrain"].name]  # the run that made the cached folder
    pretrain_losses, extend_losses = losses(pretrain_id), losses(extend.info.run_id)
    # Started from the trained weights, not from a fresh init: the extension's first logged loss is
    # near where pretraining ended (~5.6 for this tiny run), below where it started (~6.3, ln 512 = 6.2).
    assert extend_losses[0] < pretrain_losses[0] - 0.4, (pretrain_losses, extend_losses)
    assert abs(extend_losses[0] - pretrain_losses[-1]) < 0.3, (pretrain_losses, extend_losses)

    from model import load_rwkv4_pth

    before = torch.load(dirs["pretrain"] / "final_weights.pt", map_location="cpu", weights_only=True)
    after = torch.load(dirs["extend1"] / "final_weights.pt", map_location="cpu", weights_only=True)
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    report = json.loads((dirs["evaluate"] / "eval_report.json").read_text())
    assert report["ctx_len"] == 64 and report["trained_ctx"] == {"pretrain": 32, "extend1": 64}  # the last stage's
    exported = load_rwkv4_pth(dirs["export"] / "model.pth")  # the extension's weights, not pretrain's
    assert torch.equal(exported.emb.weight.float(), after["emb.weight"].float())
