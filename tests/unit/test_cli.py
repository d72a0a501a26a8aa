"""CLI errors a user can fix: one paragraph naming the cause, no traceback (unless --debug); --help everywhere."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestration.cli import build_parser, main
from orchestration.tracking import NullTracker, make_tracker

QUICKSTART = str(Path(__file__).parents[2] / "configs" / "quickstart.yaml")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_the_cli_and_the_config_loader_import_no_torch():
    """`rwkv-pipeline status`, `plan` and `print-config` start without torch (and its compiler, ~4 s on 2
    cores): it loads only where a command builds a model."""
    heavy = "{'torch', 'deepspeed', 'ray'}"
    probe = f"import sys, orchestration.cli, orchestration.config; print(sorted({heavy} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("args", "cause"),
    [
        (["train.lr_innit=3e-4"], "train.lr_innit: unknown field"),
        (["model.n_layer=zero"], "model.n_layer"),
        (["train.lr_init"], "not of the form key=value"),
        (["data.paths=[/no/such/corpus]"], "data.paths: '/no/such/corpus' does not exist"),
        (["extend=[{ctx_len: 512}, {ctx_len: 256}]"], "extend.1.ctx_len=256 is not longer than extend.0.ctx_len=512"),
        (["extend=[{ctx_len: 64}]"], "extend.0.ctx_len=64 is not longer than train.ctx_len=128"),
        ([f"ray.address=127.0.0.1:{closed_port()}"], "cannot reach the Ray cluster at 127.0.0.1:"),
        ([f"ray.address=ray://127.0.0.1:{closed_port()}"], "cannot reach the Ray cluster at ray://127.0.0.1:"),
        (["name=../elsewhere"], "name: '../elsewhere' is not a folder name"),
    ],
)
def test_user_errors_are_one_paragraph_without_traceback(capsys, tmp_path: Path, args: list[str], cause: str):
    code, err = run_cli(capsys, "run", QUICKSTART, f"workdir={tmp_path}", *args)
    assert code == 2 and cause in err and err.startswith("error: ")
    assert "Traceback" not in err and "\n\n" not in err.strip()
    assert not (tmp_path / "quickstart").exists()  # stopped before any work


def test_more_training_workers_than_the_local_cluster_holds_stop_before_any_stage(capsys, tmp_path: Path):
    cpus = os.cpu_count() or 1  # two workers of all the machine's CPUs each: never fits, on any machine
    args = ("ray.address=local", "ray.num_workers=2", f"ray.cpus_per_worker={cpus}")
    code, err = run_cli(capsys, "run", QUICKSTART, f"workdir={tmp_path}", *args)
    last = err.strip().splitlines()[-1]  # after the local MLflow store's first-use lines
    assert code == 2 and last.startswith("error: the training workers need ") and "Traceback" not in err
    assert f"ray.num_workers=2 x ray.cpus_per_worker={cpus}" in last
    assert not (tmp_path / "quickstart").exists() and not (tmp_path / "mlflow.db").exists()  # nothing left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
def test_a_gpu_config_on_a_machine_without_gpus_says_to_train_on_cpus(capsys, tmp_path: Path):
    code, err = run_cli(capsys, "run", QUICKSTART, f"workdir={tmp_path}", "ray.address=local", "ray.use_gpu=true")
    last = err.strip().splitlines()[-1]
    assert code == 2 and "need 2 GPUs (ray.num_workers=2, ray.use_gpu=true) and the cluster has 0" in last
    assert "set ray.use_gpu=false to train on CPUs" in last and "cpus_per_worker" not in last
    assert not (tmp_path / "quickstart").exists()  # no run directory left behind


@pytest.mark.parametrize(
    ("args", "cause"),
    [
        (["generate", "m.pth", "--prompt", "x", "--top-p", "2"], "argument --top-p: 2 is outside (0, 1]"),
        (["generate", "m.pth", "--prompt", "x", "--temperature", "-1"], "--temperature: -1 is outside [0, inf)"),
        (["generate", "m.pth", "--prompt", "x", "--tokens", "-5"], "--tokens: -5 is outside [1, inf)"),
        (["eval", "runs/x", "--ctx-len", "-4"], "argument --ctx-len: -4 is outside [0, inf)"),
        (["eval", "runs/x", "--batches", "many"], "argument --batches: 'many' is not an int"),
        (["eval", "runs/x", "--batches", "0"], "argument --batches: 0 is outside [1, inf)"),
        (["print-config"], "the following arguments are required: config\n"),  # overrides are optional
    ],
)
def test_out_of_range_options_are_named_by_the_parser(capsys, args: list[str], cause: str):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and cause in capsys.readouterr().err


@pytest.mark.parametrize("command", [["eval"], ["export", "--out", "out"]])
def test_eval_and_export_of_something_that_is_not_a_run_directory(capsys, tmp_path: Path, command: list[str]):
    code, err = run_cli(capsys, command[0], str(tmp_path / "nope"), *command[1:])
    assert code == 2 and "is not a run directory" in err


def test_missing_config_file_and_debug_traceback(capsys, tmp_path: Path):
    code, err = run_cli(capsys, "plan", str(tmp_path / "missing.yaml"))
    assert code == 2 and "config file not found" in err
    debug = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "--debug", "plan", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_status_of_something_that_is_not_a_run_directory(capsys, tmp_path: Path):
    code, err = run_cli(capsys, "status", str(tmp_path))
    assert code == 2 and "is not a run directory" in err


def test_status_tells_a_killed_driver_and_a_deleted_folder_from_current_state(capsys, tmp_path: Path):
    from orchestration.rundir import RunDir

    run_dir = RunDir(tmp_path / "run")
    (run_dir.root / "tokenizer-abc").mkdir(parents=True)
    run_dir.update(
        stages={
            "tokenizer": {"status": "done", "dir": "tokenizer-abc"},
            "tokenize": {"status": "cached", "dir": "tokenize-def"},  # deleted since
            "pretrain": {"status": "running", "dir": "pretrain-123", "progress": [40, 60]},
        }
    )
    code = main(["status", str(run_dir.root)])
    out = capsys.readouterr().out
    shown = [line.split()[:2] for line in out.splitlines() if line.startswith("  ") and line[2] != " "]
    assert code == 0 and shown == [["tokenizer", "done"], ["tokenize", "missing"], ["pretrain", "stopped"]]
    assert "rerun the run's command" in out
    with run_dir.locked():  # a live driver
        main(["status", str(run_dir.root)])
        assert "  pretrain   running" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command",
    [["eval"], ["export", "--out", "out"], ["export", "--checkpoint", "step_1", "--out", "out"], ["generate"]],
)
def test_commands_on_a_run_whose_finished_stage_folder_is_gone_say_so(capsys, tmp_path: Path, command: list[str]):
    """A shared stage whose own run was deleted: `status` shows it missing; the commands say the same, no traceback."""
    from orchestration.rundir import SUCCESS, RunDir

    run_dir = RunDir(tmp_path / "run")
    for folder in ("tokenize-def", "pretrain-123", "export-456"):
        (run_dir.root / folder).mkdir(parents=True)
        (run_dir.root / folder / SUCCESS).write_text("")
    (run_dir.root / "tokenizer-abc").symlink_to(tmp_path / "deleted-run" / "tokenizer-abc")
    run_dir.update(
        stages={
            "tokenizer": {"status": "shared", "dir": "tokenizer-abc"},
            "tokenize": {"status": "done", "dir": "tokenize-def"},
            "pretrain": {"status": "done", "dir": "pretrain-123"},
            "export": {"status": "done", "dir": "export-456"},
        }
    )
    code, err = run_cli(
        capsys, command[0], str(run_dir.root), *command[1:], *(["--prompt", "x"] * (command == ["generate"]))
    )
    assert code == 2 and "the tokenizer stage's folder" in err and "is missing" in err, err
    assert "Traceback" not in err


def test_generate_from_a_gpt_baseline_run_says_it_has_no_export(capsys, tmp_path: Path):
    from orchestration.config import dump_config, load_config
    from orchestration.rundir import RunDir

    run_dir = RunDir(tmp_path / "run")
    run_dir.write_config(dump_config(load_config(QUICKSTART, ["model.arch=gpt"])))
    run_dir.update(stages={})
    code, err = run_cli(capsys, "generate", str(run_dir.root), "--prompt", "x")
    assert code == 2 and "trained the GPT baseline: no export" in err, err


def test_a_run_still_training_points_export_and_generate_at_its_newest_checkpoint(capsys, tmp_path: Path):
    from orchestration.config import dump_config, load_config
    from orchestration.rundir import RunDir

    run_dir = RunDir(tmp_path / "run")
    run_dir.write_config(dump_config(load_config(QUICKSTART)))
    run_dir.update(stages={"pretrain": {"dir": "pretrain-0123456789ab", "status": "running"}})
    for folder, step in (("pretrain-0123456789ab.partial", 10), ("pretrain-ba9876543210.partial", 30)):
        checkpoint = run_dir.root / folder / "ray" / "pretrain" / f"step_{step:08d}"  # the second: another config's
        checkpoint.mkdir(parents=True)
        (checkpoint / "train_state.json").write_text("{}")
        (checkpoint / "COMPLETE").write_text("")
    checkpoint = run_dir.root / "pretrain-0123456789ab.partial" / "ray" / "pretrain" / "step_00000010"
    hint = f"export its newest checkpoint now: rwkv-pipeline export {run_dir.root} --checkpoint {checkpoint} --out DIR"
    code, err = run_cli(capsys, "export", str(run_dir.root), "--out", str(tmp_path / "out"))
    assert code == 2 and "no finished training stage yet" in err and hint in err, err
    code, err = run_cli(capsys, "generate", str(run_dir.root), "--prompt", "x")
    assert code == 2 and "no finished export stage yet" in err and f"{hint}, then generate from DIR" in err, err
    code, err = run_cli(capsys, "generate", str(checkpoint), "--prompt", "x")
    exporting = f"{checkpoint} is a training checkpoint: export it first with `rwkv-pipeline export {run_dir.root} "
    assert code == 2 and exporting in err, err


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them here
    assert {"run", "plan", "status", "generate", "eval", "export", "print-config"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as shown:
            main([name, "--help"])
        assert shown.value.code == 0 and "usage: rwkv-pipeline" in capsys.readouterr().out


def test_plan_lists_every_stage_without_running(capsys, tmp_path: Path):
    assert main(["plan", QUICKSTART, f"workdir={tmp_path}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        [stage, "run"] for stage in ("tokenizer", "tokenize", "pretrain", "evaluate", "export")
    ]
    assert not (tmp_path / "quickstart").exists()


def test_plan_shows_each_training_stage_length_and_steps(capsys, tmp_path: Path):
    extension = "extend=[{ctx_len: 256, steps: 10}]"
    assert main(["plan", QUICKSTART, f"workdir={tmp_path}", "train.steps=60", "train.ctx_len=128", extension]) == 0
    shown = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert " ctx 128, 60 steps " in shown["pretrain"] and " ctx 256, 10 steps " in shown["extend1"]
    assert " ctx 256 " in shown["evaluate"]  # the last stage's length


def test_tracker_falls_back_to_null_without_mlflow(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` sees when it is not installed
    tracker = make_tracker("sqlite:///unused.db", "x")
    assert type(tracker) is NullTracker and "not installed" in caplog.text
    handle = tracker.open_run("stage")
    tracker.log_metrics(handle, {"loss": 1.0}, 0)
    assert tracker.close(1) == 0


def test_the_run_summary_gives_the_loss_past_the_trained_length_when_evaluated_beyond_it(tmp_path: Path):
    from orchestration.run import RunSummary

    report = {"val_loss": 3.5, "perplexity": 33.1, "ctx_len": 256}
    within = RunSummary(tmp_path, {}, None, None, report).describe()
    assert "val loss 3.5000 (perplexity 33.1) at ctx 256\n" in within and "past the longest" not in within
    older = RunSummary(tmp_path, {}, None, None, {**report, "loss_past_trained_ctx": 3.25}).describe()
    assert "at ctx 256, 3.2500 past the longest trained length" in older  # a report of an earlier version
    beyond = {**report, "loss_past_trained_ctx": 3.25, "loss_within_trained_ctx": 3.75, "trained_ctx": {"pretrain": 64}}
    assert "at ctx 256; positions 65-256, past the longest trained length: 3.2500, against 3.7500 at 1-64" in (
        RunSummary(tmp_path, {}, None, None, beyond).describe()
    )


def test_debug_may_come_anywhere_on_the_line_and_shows_the_traceback(tmp_path: Path):
    from orchestration.config import ConfigError

    with pytest.raises(ConfigError, match="model.n_layer"):  # between the config and its overrides
        main(["run", QUICKSTART, "--debug", f"workdir={tmp_path}", "model.n_layer=zero"])


def test_version(capsys):
    with pytest.raises(SystemExit) as shown:
        main(["--version"])
    assert shown.value.code == 0 and capsys.readouterr().out.startswith("rwkv-pipeline ")


def test_whole_file_documents_none_of_which_is_val_stop_before_tokenizing(capsys, tmp_path: Path):
    from tokenization.sources import resolve_sources
    from tokenization.units import split_of

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("alpha", "beta", "gamma"):
        (corpus / f"{name}.txt").write_text(f"{name} text\n\n{name} more text\n")
    assert all(split_of(s.rel, 0.01) == "train" for s in resolve_sources([str(corpus)], None))  # the premise
    code, err = run_cli(capsys, "plan", QUICKSTART, f"workdir={tmp_path}", f"data.paths={corpus}")
    assert code == 2 and "none of the corpus's 3 files goes to the val split at data.val_fraction=0.01" in err
    assert (
        run_cli(capsys, "plan", QUICKSTART, f"workdir={tmp_path}", f"data.paths={corpus}", "data.val_fraction=0.9")[0]
        == 0
    )
    paragraphs = ("data.txt_split=blank_lines",)  # then the split is per paragraph, known only once read
    assert run_cli(capsys, "plan", QUICKSTART, f"workdir={tmp_path}", f"data.paths={corpus}", *paragraphs)[0] == 0


def test_an_extension_longer_than_the_val_split_stops_plan_when_the_shards_are_made(capsys, tmp_path: Path):
    """Added to a finished run, an extension (and the evaluation at its length) would find out at its start."""
    from orchestration.config import load_config
    from orchestration.run import plan_pipeline

    args = ("plan", QUICKSTART, f"workdir={tmp_path}")
    config = load_config(QUICKSTART, [f"workdir={tmp_path}"])
    for item in plan_pipeline(config)[:2]:  # tokenizer and shards made, with a val split of 600 tokens
        item.folder.mkdir(parents=True)
        totals = {"train": {"tokens": 10**6, "documents": 90}, "val": {"tokens": 600, "documents": 2}}
        (item.folder / "manifest.json").write_text(json.dumps({"totals": totals}))
        (item.folder / "_SUCCESS").write_text("")
    assert run_cli(capsys, *args)[0] == 0  # pretraining and evaluation at 128 (quickstart)
    code, err = run_cli(capsys, *args, "extend=[{ctx_len: 1024, steps: 10, lr: 1.0e-5}]")
    assert code == 2 and "holds 600 tokens in 2 documents, fewer than one evaluation window of 1025" in err


def test_output_into_a_reader_that_stopped_ends_quietly(tmp_path: Path):
    """`rwkv-pipeline print-config ... | head -1`: the reader is gone before the buffered output is written."""
    import subprocess

    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    command = f"{sys.executable} -m orchestration.cli print-config {QUICKSTART} 2>{tmp_path / 'err'} | true"
    subprocess.run(command, shell=True, env=env, check=True, cwd=Path(__file__).parents[2])
    assert (tmp_path / "err").read_text() == ""
