"""The stage DAG with small stand-in stages: hashing, caching, atomic completion, retries, resume."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestration.dag import DagRunner, Stage, StageFailed, stage_hashes
from orchestration.rundir import RunDir, RunDirBusy


def make_stages(calls: list[str], lr: float = 1e-3, fail: dict[str, int] | None = None) -> list[Stage]:
    """tokenizer -> shards -> train -> report, each writing a file derived from its inputs."""
    fail = fail if fail is not None else {}

    def step(name: str, sources: tuple[str, ...]):
        def run(ctx):
            calls.append(name)
            (ctx.out_dir / "scratch.txt").open("a").write(f"attempt {ctx.attempt}\n")
            if fail.get(name, 0) > 0:
                fail[name] -= 1
                raise RuntimeError(f"{name} broke on purpose")
            text = name + "".join((ctx.inputs[s] / "out.txt").read_text() for s in sources)
            (ctx.out_dir / "out.txt").write_text(text)
            ctx.log_artifact(ctx.out_dir / "out.txt")

        return run

    return [
        Stage("tokenizer", step("tokenizer", ()), config={"vocab": 64}),
        Stage("shards", step("shards", ("tokenizer",)), config={"val": 0.1}, inputs=("tokenizer",)),
        Stage("train", step("train", ("shards",)), config={"lr": lr}, inputs=("shards",)),
        Stage("report", step("report", ("train", "tokenizer")), config={}, inputs=("train", "tokenizer")),
    ]


def test_hash_covers_own_config_and_inputs_only():
    base, changed = stage_hashes(make_stages([])), stage_hashes(make_stages([], lr=2e-3))
    assert base["tokenizer"] == changed["tokenizer"] and base["shards"] == changed["shards"]
    assert base["train"] != changed["train"] and base["report"] != changed["report"]
    assert all(len(digest) == 12 for digest in base.values())


def test_inputs_must_come_from_earlier_stages():
    stages = make_stages([])
    with pytest.raises(ValueError, match="'shards' needs \\['tokenizer'\\]"):
        stage_hashes(stages[1:])


def test_run_then_rerun_does_no_work_and_config_change_reruns_downstream(tmp_path: Path):
    run_dir = RunDir(tmp_path / "run")
    calls: list[str] = []
    outputs = DagRunner(run_dir).run(make_stages(calls), "demo", {"lr": 1e-3})
    assert calls == ["tokenizer", "shards", "train", "report"]
    assert (outputs["report"] / "out.txt").read_text() == "reporttrainshardstokenizertokenizer"
    for name, folder in outputs.items():
        assert (folder / "_SUCCESS").is_file() and folder.name.startswith(f"{name}-")
    assert not list(run_dir.root.glob("*.partial"))
    marker_times = {name: (folder / "_SUCCESS").stat().st_mtime_ns for name, folder in outputs.items()}

    calls.clear()
    assert DagRunner(run_dir).run(make_stages(calls), "demo", {"lr": 1e-3}) == outputs
    assert calls == []
    assert {name: (f / "_SUCCESS").stat().st_mtime_ns for name, f in outputs.items()} == marker_times

    reasons = {item.stage: item.reason for item in DagRunner(run_dir).plan(make_stages([], lr=2e-3))}
    assert reasons["train"] == "changed: lr 0.001 -> 0.002" and reasons["report"] == "new input: train"
    changed = DagRunner(run_dir).run(make_stages(calls, lr=2e-3), "demo", {"lr": 2e-3})
    assert calls == ["train", "report"]
    assert changed["tokenizer"] == outputs["tokenizer"] and changed["shards"] == outputs["shards"]
    assert changed["train"] != outputs["train"] and outputs["train"].is_dir()  # the old result is kept
    assert (outputs["shards"] / "_SUCCESS").stat().st_mtime_ns == marker_times["shards"]
    stage_record = json.loads((changed["train"] / "stage.json").read_text())
    assert stage_record["config"] == {"lr": 2e-3} and stage_record["inputs"] == {"shards": outputs["shards"].name}


def test_going_back_to_an_earlier_config_whose_folders_are_complete_describes_it_again(tmp_path: Path):
    """Nothing runs, and state.json names that config's folders, stage runs and parent run, in the store
    it was tracked in (after a run tracked elsewhere)."""
    from orchestration.tracking import MlflowTracker

    run_dir, calls = RunDir(tmp_path / "run"), []

    def run(lr: float, store: str) -> dict[str, Path]:
        tracker = MlflowTracker(f"sqlite:///{tmp_path / store}", "unit")
        outputs = DagRunner(run_dir, tracker, system_metrics_s=None).run(make_stages(calls, lr=lr), "demo", {"lr": lr})
        assert tracker.close(timeout_s=30) == 0
        return outputs

    first = run(1e-3, "a.db")
    first_state = run_dir.read_state()
    run(2e-3, "b.db")
    calls.clear()
    assert run(1e-3, "a.db") == first and calls == []
    state = run_dir.read_state()
    assert {name: entry["dir"] for name, entry in state["stages"].items()} == {n: f.name for n, f in first.items()}
    assert {entry["status"] for entry in state["stages"].values()} == {"cached"}
    for name in first:
        assert state["stages"][name]["mlflow_run_id"] == first_state["stages"][name]["mlflow_run_id"]
    assert state["stages"]["train"]["config"] == {"lr": 1e-3}
    assert state["parent_run_id"] == first_state["parent_run_id"]
    assert state["tracking_uri"] == first_state["tracking_uri"]


def test_a_folder_whose_success_marker_was_never_written_is_made_again(tmp_path: Path):
    """A crash between the folder's rename and its marker: the folder is not taken as done."""
    run_dir, calls = RunDir(tmp_path / "run"), []
    outputs = DagRunner(run_dir).run(make_stages(calls), "demo", {"lr": 1e-3})
    (outputs["train"] / "_SUCCESS").unlink()
    calls.clear()
    again = DagRunner(run_dir).run(make_stages(calls), "demo", {"lr": 1e-3})
    assert calls == ["train"] and again["train"] == outputs["train"]
    assert (again["train"] / "_SUCCESS").is_file()


def test_failed_stage_is_retried_then_succeeds(tmp_path: Path):
    run_dir, calls = RunDir(tmp_path / "run"), []
    outputs = DagRunner(run_dir, stage_retries=2).run(make_stages(calls, fail={"shards": 2}), "demo")
    assert calls == ["tokenizer", "shards", "shards", "shards", "train", "report"]
    assert (outputs["shards"] / "scratch.txt").read_text() == "attempt 1\nattempt 2\nattempt 3\n"
    assert run_dir.read_state()["stages"]["shards"]["attempts"] == 3


def test_stage_failing_every_attempt_stops_the_run_naming_stage_error_and_log(tmp_path: Path):
    run_dir, calls = RunDir(tmp_path / "run"), []
    with pytest.raises(StageFailed) as failure:
        DagRunner(run_dir, stage_retries=1).run(make_stages(calls, fail={"train": 5}), "demo")
    message = str(failure.value)
    log_path = run_dir.log_path("train")
    assert "stage 'train' failed after 2 attempt(s)" in message
    assert "RuntimeError: train broke on purpose" in message and str(log_path) in message
    assert "Traceback" in log_path.read_text() and "train broke on purpose" in log_path.read_text()
    assert calls == ["tokenizer", "shards", "train", "train"]
    state = run_dir.read_state()["stages"]
    assert state["train"]["status"] == "failed" and state["report"]["status"] == "pending"  # listed, not run
    assert not list(run_dir.root.glob("train-????????????")) and len(list(run_dir.root.glob("train-*.partial"))) == 1


def test_an_error_a_retry_cannot_change_is_not_retried(tmp_path: Path):
    class BadConfig(ValueError):
        retryable = False

    def broken(ctx):
        raise BadConfig("model.n_layer=0: set it to at least 1.")

    run_dir = RunDir(tmp_path / "run")
    with pytest.raises(StageFailed, match="failed after 1 attempt.*BadConfig: model.n_layer=0") as failed:
        DagRunner(run_dir, stage_retries=3).run([Stage("train", broken, config={})], "demo")
    assert "at least 1. Full log: " in str(failed.value)  # one full stop after the error's own
    stage = run_dir.read_state()["stages"]["train"]
    assert stage["attempts"] == 1 and stage["error"] == "BadConfig: model.n_layer=0: set it to at least 1."


def test_rerun_after_failure_resumes_in_the_same_partial_folder(tmp_path: Path):
    run_dir, calls = RunDir(tmp_path / "run"), []
    with pytest.raises(StageFailed):
        DagRunner(run_dir).run(make_stages(calls, fail={"train": 1}), "demo")
    runner = DagRunner(run_dir)
    assert [item.action for item in runner.plan(make_stages([]))] == ["cached", "cached", "resume", "run"]
    run_dir.update_stage("train", progress=[3, 10])  # as a training stage reports its steps
    assert runner.plan(make_stages([]))[2].reason == "last reported 3/10; goes on from what it saved"
    calls.clear()
    outputs = runner.run(make_stages(calls), "demo")
    assert calls == ["train", "report"]
    assert (outputs["train"] / "scratch.txt").read_text() == "attempt 1\nattempt 1\n"  # saw the first try's file


def test_second_driver_on_the_same_run_directory_is_refused(tmp_path: Path):
    run_dir = RunDir(tmp_path / "run")
    with run_dir.locked(), pytest.raises(RunDirBusy, match="in use by another"), RunDir(run_dir.root).locked():
        pass


def test_embedded_tracking_sqlite_in_workdir_with_artifacts_beside_it(tmp_path: Path, monkeypatch):
    from mlflow import MlflowClient

    from orchestration.tracking import MlflowTracker, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(None, tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    tracker = MlflowTracker(uri, "unit")
    run_dir = RunDir(tmp_path / "run")
    outputs = DagRunner(run_dir, tracker, system_metrics_s=None).run(make_stages([]), "demo", {"lr": 1e-3})
    assert tracker.close(timeout_s=30) == 0

    state = run_dir.read_state()
    client = MlflowClient(uri)
    children = client.search_runs(
        [client.get_experiment_by_name("unit").experiment_id], f"tags.mlflow.parentRunId = '{state['parent_run_id']}'"
    )
    assert sorted(run.data.tags["mlflow.runName"] for run in children) == ["report", "shards", "tokenizer", "train"]
    train_run = state["stage_runs"][outputs["train"].name]
    assert [item.path for item in client.list_artifacts(train_run)] == ["out.txt"]
    stored = tmp_path / "mlartifacts"
    assert [p.read_text() for p in stored.rglob("out.txt") if train_run in str(p)] == ["trainshardstokenizer"]


def test_pipeline_stage_graph_and_what_each_hash_covers():
    from orchestration.config import load_config
    from orchestration.stages import build_stages

    quickstart = str(Path(__file__).parents[2] / "configs" / "quickstart.yaml")
    extended = ["extend=[{ctx_len: 256, steps: 10, lr: 1.0e-5}]"]
    stages = build_stages(load_config(quickstart, extended))
    assert [(s.name, s.inputs) for s in stages] == [
        ("tokenizer", ()),
        ("tokenize", ("tokenizer",)),
        ("pretrain", ("tokenize",)),
        ("extend1", ("pretrain", "tokenize")),
        ("evaluate", ("extend1", "tokenize", "tokenizer")),
        ("export", ("extend1", "tokenizer")),
    ]
    base = stage_hashes(stages)
    new_lr = stage_hashes(build_stages(load_config(quickstart, [*extended, "extend.0.lr=2.0e-5"])))
    assert [name for name in base if base[name] != new_lr[name]] == ["extend1", "evaluate", "export"]
    cadence = stage_hashes(build_stages(load_config(quickstart, [*extended, "train.log_every=1"])))
    assert cadence == base  # logging cadence does not change what training produces
    val = stage_hashes(build_stages(load_config(quickstart, [*extended, "data.val_fraction=0.05"])))
    assert val["tokenizer"] == base["tokenizer"] and val["tokenize"] != base["tokenize"]
    trained = ["pretrain", "extend1", "evaluate", "export"]
    for change in ("train.seed=1", "ray.num_workers=4"):  # another sample order; another global batch
        changed = stage_hashes(build_stages(load_config(quickstart, [*extended, change])))
        assert [name for name in base if base[name] != changed[name]] == trained, change
    longer = stage_hashes(build_stages(load_config(quickstart, [*extended, "eval.ctx_len=512"])))
    assert [name for name in base if base[name] != longer[name]] == ["evaluate"]
    # model.fused_ln_mix (added later, on by default) enters the pretrain hash only when off, so runs
    # begun before it existed keep their folders
    pretrain = next(stage for stage in stages if stage.name == "pretrain")
    assert "fused_ln_mix" not in pretrain.config["model"]
    plain = stage_hashes(build_stages(load_config(quickstart, [*extended, "model.fused_ln_mix=false"])))
    assert [name for name in base if base[name] != plain[name]] == ["pretrain", "extend1", "evaluate", "export"]
    # extend.N.micro_bsz (added later) likewise enters the extension's hash only when set
    extension = next(stage for stage in stages if stage.name == "extend1")
    assert extension.config == {"extend": {"ctx_len": 256, "steps": 10, "lr": 1e-5, "chunk_len": 0}}
    smaller = stage_hashes(build_stages(load_config(quickstart, [*extended, "extend.0.micro_bsz=2"])))
    assert [name for name in base if base[name] != smaller[name]] == ["extend1", "evaluate", "export"]
    recomputed = stage_hashes(build_stages(load_config(quickstart, [*extended, "extend.0.grad_checkpointing=true"])))
    assert [name for name in base if base[name] != recomputed[name]] == ["extend1", "evaluate", "export"]


def test_a_corpus_file_edited_to_the_same_size_is_a_new_tokenizer_input(tmp_path: Path):
    from orchestration.config import load_config
    from orchestration.stages import build_stages

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "abc"}\n')
    quickstart = str(Path(__file__).parents[2] / "configs" / "quickstart.yaml")
    config = load_config(quickstart, [f"data.paths={corpus}"])
    before = stage_hashes(build_stages(config))
    corpus.write_text('{"text": "xyz"}\n')
    stat = corpus.stat()
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # past a coarse clock's tick
    after = stage_hashes(build_stages(config))
    assert before["tokenizer"] != after["tokenizer"] and before["tokenize"] != after["tokenize"]


def test_an_extension_trains_at_its_own_micro_batch_or_the_pretraining_one():
    from orchestration.config import load_config
    from orchestration.stages import extend_train_config

    quickstart = str(Path(__file__).parents[2] / "configs" / "quickstart.yaml")
    config = load_config(quickstart, ["extend=[{ctx_len: 512, steps: 10}, {ctx_len: 1024, steps: 5, micro_bsz: 2}]"])
    assert [extend_train_config(config, extension).micro_bsz for extension in config.extend] == [8, 2]


def test_an_extension_recomputes_blocks_as_it_says_or_as_pretraining_does():
    from orchestration.config import load_config
    from orchestration.stages import extend_train_config

    quickstart = str(Path(__file__).parents[2] / "configs" / "quickstart.yaml")
    stages = (
        "extend=[{ctx_len: 512}, {ctx_len: 1024, grad_checkpointing: true}, {ctx_len: 2048, grad_checkpointing: false}]"
    )
    for pretraining, expected in [("false", [False, True, False]), ("true", [True, True, False])]:
        config = load_config(quickstart, [stages, f"train.grad_checkpointing={pretraining}"])
        assert [extend_train_config(config, stage).grad_checkpointing for stage in config.extend] == expected


def test_a_val_split_smaller_than_one_evaluation_window_stops_pretraining_before_it_starts(tmp_path: Path):
    from orchestration.config import load_config
    from orchestration.stages import PipelineSetupError, evaluate_stage, extend_stage, pretrain_stage

    quickstart = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
    config = load_config(quickstart, ["extend=[{ctx_len: 512}]"])  # evaluation windows of 513 tokens
    shards = tmp_path / "tokenize"
    shards.mkdir()
    totals = {"train": {"tokens": 10**6, "documents": 90}, "val": {"tokens": 300, "documents": 1}}
    (shards / "manifest.json").write_text(json.dumps({"totals": totals}))
    # pretrain, and the stages that run without it when it was cached: an extension added later, evaluate
    for run in (pretrain_stage(config), extend_stage(config, 1, "pretrain"), evaluate_stage(config, "extend1")):
        with pytest.raises(PipelineSetupError, match=r"holds 300 tokens in 1 documents, fewer than .* 513: raise data"):
            run(SimpleNamespace(inputs={"tokenize": shards}))  # what the stage reads of its context
    assert PipelineSetupError.retryable is False


def test_a_stage_log_holds_what_the_stage_printed_line_by_line(tmp_path: Path, capsys):
    import sys

    def noisy(ctx):
        print("step 10/30 loss=7.57")
        sys.stderr.write("tokenize:  10%|#         |\rtokenize: 100%|##########|\n")
        sys.stdout.write("\x1b[36m(worker pid=7)\x1b[0m rank 0 ready\nno newline at the end")
        (ctx.out_dir / "out.txt").write_text("done")

    run_dir = RunDir(tmp_path / "run")
    DagRunner(run_dir).run([Stage("train", noisy, config={})], "demo")
    log = run_dir.log_path("train").read_text()
    assert "stdout: step 10/30 loss=7.57" in log and "stderr: tokenize: 100%|##########|" in log
    assert "10%" not in log and "\x1b" not in log and "stdout: (worker pid=7) rank 0 ready" in log
    assert "stdout: no newline at the end" in log
    console = capsys.readouterr()
    assert "step 10/30 loss=7.57" in console.out and "tokenize:  10%" in console.err  # the console as before


def test_runs_of_one_workdir_share_complete_stage_folders(tmp_path: Path):
    import shutil

    first, first_calls = RunDir(tmp_path / "lr1"), []
    DagRunner(first).run(make_stages(first_calls, lr=1e-3), "lr1")
    second, calls = RunDir(tmp_path / "lr2"), []
    runner = DagRunner(second)
    plan = runner.plan(make_stages([], lr=2e-3))
    assert [(item.stage, item.action) for item in plan] == [
        ("tokenizer", "shared"),
        ("shards", "shared"),
        ("train", "run"),
        ("report", "run"),
    ]
    outputs = runner.run(make_stages(calls, lr=2e-3), "lr2")
    assert calls == ["train", "report"]  # the corpus stages ran once, in the first run
    link = outputs["shards"]
    assert link.is_symlink() and os.readlink(link) == f"../lr1/{link.name}"
    assert (outputs["report"] / "out.txt").read_text() == "reporttrainshardstokenizertokenizer"
    assert second.read_state()["stages"]["tokenizer"]["status"] == "shared"

    shutil.rmtree(first.root)  # the shared folders' own run is deleted: the links dangle, the stages run again
    assert [item.action for item in runner.plan(make_stages([], lr=2e-3))] == ["run", "run", "cached", "cached"]
    calls.clear()
    outputs = runner.run(make_stages(calls, lr=2e-3), "lr2")
    assert calls == ["tokenizer", "shards"] and not outputs["shards"].is_symlink()


def test_a_change_that_alters_no_output_continues_the_mlflow_parent_run(tmp_path: Path):
    """Joining a cluster (ray.address) is not a new experiment: one parent run per set of outputs."""
    from mlflow import MlflowClient

    from orchestration.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = RunDir(tmp_path / "run")

    def run(lr: float, address: str) -> str:
        tracker = MlflowTracker(uri, "unit")
        DagRunner(run_dir, tracker, system_metrics_s=None).run(make_stages([], lr=lr), "demo", {"ray": address})
        assert tracker.close(timeout_s=30) == 0
        return run_dir.read_state()["parent_run_id"]

    first = run(1e-3, "local")
    assert run(1e-3, "10.0.0.1:6379") == first  # every stage cached, the same parent
    changed = run(2e-3, "10.0.0.1:6379")
    assert changed != first  # new outputs (train, report): a new parent
    client = MlflowClient(uri)
    parents = client.search_runs([client.get_experiment_by_name("unit").experiment_id], "tags.mlflow.runName = 'demo'")
    assert sorted(run.info.run_id for run in parents) == sorted([first, changed])


def test_a_parent_run_carries_its_stages_headline_metrics_whether_they_ran_or_were_cached(tmp_path: Path):
    """Tracking the same finished run elsewhere (another experiment or server) gives a parent that sorts by
    the evaluation like any other, though nothing ran."""
    import dataclasses

    from mlflow import MlflowClient

    from orchestration.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir, calls = RunDir(tmp_path / "run"), []

    def score(folder: Path) -> dict[str, float]:
        return {"eval/score": len((folder / "out.txt").read_text())}

    def run(experiment: str) -> dict[str, float]:
        stages = make_stages(calls)
        stages[-1] = dataclasses.replace(stages[-1], parent_metrics=score)
        tracker = MlflowTracker(uri, experiment)
        DagRunner(run_dir, tracker, system_metrics_s=None).run(stages, "demo", {"lr": 1e-3})
        assert tracker.close(timeout_s=30) == 0
        return MlflowClient(uri).get_run(run_dir.read_state()["parent_run_id"]).data.metrics

    assert run("unit") == {"eval/score": len("reporttrainshardstokenizertokenizer")}
    assert calls == ["tokenizer", "shards", "train", "report"]
    assert run("other") == {"eval/score": len("reporttrainshardstokenizertokenizer")} and len(calls) == 4


def test_the_gpt_baseline_runs_every_stage_but_the_rwkv4_export(tmp_path: Path):
    """model.arch=gpt trains and evaluates (no RNN-mode sample: it has no state); the official RWKV-4 export
    is not planned for it, rather than failing after the whole pretraining."""
    from model import ModelConfig, build_model
    from orchestration.config import load_config
    from orchestration.stages import build_stages
    from pipeline.config import EvalConfig
    from pipeline.eval_stage import evaluate
    from tokenization.synthetic import write_synthetic_shards

    quickstart = str(Path(__file__).parents[2] / "configs" / "quickstart.yaml")
    names = [stage.name for stage in build_stages(load_config(quickstart, ["model.arch=gpt"]))]
    assert names == ["tokenizer", "tokenize", "pretrain", "evaluate"]
    assert [stage.name for stage in build_stages(load_config(quickstart))][-1] == "export"

    shards = write_synthetic_shards(tmp_path / "shards", tokens=4096, vocab_size=64, val_tokens=2048)
    gpt = build_model(ModelConfig(arch="gpt", n_layer=1, n_embd=32, vocab_size=64)).eval()
    cfg = EvalConfig(batches=1, sample_tokens=8)  # the default asks for a sample
    report = evaluate(gpt, shards, tmp_path / "no-tokenizer", cfg, ctx_len=16, out_dir=tmp_path / "eval")
    assert report["sample"] == "" and math.isfinite(report["val_loss"])


def test_a_lost_training_worker_is_named_not_quoted_as_an_rpc_error():
    """Ray Train's error for a worker whose node died (text as Ray 2.60 raised it on a 2-node cluster)."""
    from orchestration.dag import describe

    class WorkerGroupError(RuntimeError):
        pass

    text = """Training failed due to worker errors:
[Rank 0 Error Snippet]:
A worker health check failed.
Worker info: Worker(
  actor=Actor(RayTrainWorker, e576ac8a6cf0d8f1ea29c0d403000000),
  metadata=ActorMetadata(
    hostname='gpu-node-7',
    node_id='1ac5bfde5cf2e279634ac0b2a7e5b2a23821c01aba0eba8b3daa67b9',
    node_ip='10.0.3.17',
    pid=17375,
  ),
)
The actor e576ac8a6cf0d8f1ea29c0d403000000 is unavailable: RpcError: failed to connect to all addresses"""
    assert describe(WorkerGroupError(text)) == (
        "WorkerGroupError: the training worker of rank 0 on host gpu-node-7 (node 10.0.3.17) stopped answering: "
        "its process or its node died or lost the network, and Ray Train's retries (ray.max_retries) were used "
        "up; the rerun resumes from the newest checkpoint"
    )
    other = "Training failed due to worker errors:\n[Rank 1 Error Snippet]:\nTraceback ...\n  File x\nValueError: bad"
    assert (
        describe(WorkerGroupError(other))
        == "WorkerGroupError: Training failed due to worker errors: ... ValueError: bad"
    )


def test_a_stage_made_anew_says_what_changed_and_closes_what_a_killed_driver_left_running(tmp_path: Path):
    """kill -9 of the driver mid-stage, then a rerun with another setting: the plan names the change and the
    unfinished folder it leaves, and the killed stage's MLflow run and parent stop being RUNNING."""
    from mlflow import MlflowClient

    from orchestration.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = RunDir(tmp_path / "run")
    tracker = MlflowTracker(uri, "unit")
    with pytest.raises(StageFailed):
        DagRunner(run_dir, tracker, system_metrics_s=None).run(make_stages([], fail={"train": 1}), "demo")
    assert tracker.close(timeout_s=30) == 0
    # What kill -9 leaves: the stage `running` in the state, its run and the parent RUNNING in MLflow.
    killed = run_dir.update_stage("train", status="running")
    client = MlflowClient(uri)
    old_train, old_parent = killed["stages"]["train"]["mlflow_run_id"], killed["parent_run_id"]
    for run_id in (old_train, old_parent):
        client.update_run(run_id, status="RUNNING")

    stages = make_stages([], lr=2e-3)
    plan = {item.stage: item for item in DagRunner(run_dir).plan(stages)}
    old_dir = killed["stages"]["train"]["dir"]
    assert plan["train"].reason == f"changed: lr 0.001 -> 0.002; the unfinished {old_dir}.partial stays as it is"
    assert plan["report"].reason == "an earlier stage's output or this stage's code changed"  # train's
    assert [plan[name].action for name in ("tokenizer", "shards")] == ["cached", "cached"]

    tracker = MlflowTracker(uri, "unit")
    DagRunner(run_dir, tracker, system_metrics_s=None).run(stages, "demo")
    assert tracker.close(timeout_s=30) == 0
    assert [client.get_run(run_id).info.status for run_id in (old_train, old_parent)] == ["KILLED", "KILLED"]
    assert client.get_run(run_dir.read_state()["parent_run_id"]).info.status == "FINISHED"
