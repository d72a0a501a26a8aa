"""`rwkv-pipeline compare`: runs read from their run directories (the files the pipeline writes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestration.cli import main
from orchestration.compare import comparability_notes, differing_fields, label_runs, load_run, results_table


def write_run(root: Path, lr: float, *, extension_running: bool = False) -> Path:
    """A run directory as the pipeline leaves it: pretrain (4 steps of 1000 tokens), one extension
    (2 steps of 2000 tokens, its own count from 0) and an evaluation."""
    root.mkdir(parents=True)
    config = {"name": root.name, "train": {"lr_init": lr, "ctx_len": 100}, "extend": [{"ctx_len": 200}]}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    extend_dir = "extend1-bbb" + (".partial" if extension_running else "")
    state = {
        "name": root.name,
        "stages": {
            "tokenizer": {"status": "done", "dir": "tokenizer-000", "hash": "000"},
            "pretrain": {"status": "done", "dir": "pretrain-aaa", "hash": "aaa"},
            "extend1": {"status": "running" if extension_running else "done", "dir": "extend1-bbb", "hash": "bbb"},
            "evaluate": {"status": "done", "dir": "evaluate-ccc", "hash": "ccc"},
        },
    }
    (root / "state.json").write_text(json.dumps(state))
    pretrain = [
        {"step": s, "loss": 6.0 - s * lr * 100, "tokens_seen": 1000.0 * s, "tokens_per_s": 50.0 + s}
        for s in (1, 2, 3, 4)
    ]
    pretrain.insert(2, {"step": 2, "val_loss": 5.5})
    extension = [{"step": 1, "loss": 5.0, "tokens_seen": 2000.0, "tokens_per_s": 40.0}, {"step": 2, "val_loss": 4.9}]
    for folder, records in (("pretrain-aaa", pretrain), (extend_dir, extension)):
        (root / folder).mkdir()
        (root / folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "evaluate-ccc").mkdir()
    report = {"val_loss": 4.87654, "perplexity": 131.2, "ctx_len": 200}
    (root / "evaluate-ccc" / "eval_report.json").write_text(json.dumps(report))
    return root


def test_stages_follow_one_another_in_tokens_seen_and_a_running_stage_is_read_from_its_partial_folder(tmp_path):
    run = load_run(write_run(tmp_path / "a", 1e-3, extension_running=True))
    assert [stage.stage for stage in run.stages] == ["pretrain", "extend1"]
    pretrain, extension = run.stages
    assert [tokens for tokens, _ in pretrain.train] == [1000, 2000, 3000, 4000]
    assert pretrain.val == [(2000, 5.5)]  # step 2 at 1000 tokens a step
    # the extension counts its own tokens from 0: drawn after pretrain's 4000
    assert extension.train == [(6000, 5.0)] and extension.val == [(8000, 4.9)]
    assert run.evaluation["val_loss"] == 4.87654 and pretrain.steps == 4 and extension.steps == 2
    assert (pretrain.ctx_len, extension.ctx_len, extension.start_tokens) == (100, 200, 4000)


def test_only_the_fields_that_differ_are_listed_and_a_missing_one_shows_as_a_dash(tmp_path):
    runs = [load_run(write_run(tmp_path / name, lr)) for name, lr in (("a", 1e-3), ("b", 2e-3))]
    runs[1].config["train"]["grad_checkpointing"] = True
    table = differing_fields(runs).splitlines()
    assert table[0] == "| field | a | b |"
    assert table[2:] == ["| train.grad_checkpointing | - | True |", "| train.lr_init | 0.001 | 0.002 |"]
    runs[1].config["extend"][0]["ctx_len"] = 400  # an extension stage's field, named as in MLflow's params
    assert "| extend.0.ctx_len | 200 | 400 |" in differing_fields(runs).splitlines()
    assert differing_fields(runs[:1] * 2) == "no config field differs"
    runs[1].config["tracking"] = {"uri": "http://127.0.0.1:5000"}  # where it was tracked: no other result
    runs[1].config["train"]["checkpoint_every"] = 5
    runs[1].config["train"]["log_every"] = 5  # which losses the table's last-logged mean takes: a row
    shown = differing_fields(runs)
    assert shown.endswith("\n\nalso different, changing no result: tracking.uri, train.checkpoint_every")
    assert "| tracking.uri |" not in shown and "| train.log_every | - | 5 |" in shown


def test_the_results_table_holds_the_last_losses_rate_and_evaluation(tmp_path):
    run = load_run(write_run(tmp_path / "a", 1e-3))
    row = results_table([run]).splitlines()[2]
    # extension's only training point 5.0; median tokens/s over 51, 52, 53, 54, 40; val 4.9; the report
    assert row == (
        "| a | pretrain ctx 100 (4 steps), extend1 ctx 200 (2 steps) | 8,000 | 5.0000 | 52 | 4.9000 "
        "| 4.8765 (131.2) at ctx 200 |"
    )


def test_runs_of_one_name_are_told_apart_by_their_folders(tmp_path):
    runs = [load_run(write_run(tmp_path / workdir / "same", 1e-3)) for workdir in ("w1", "w2")]
    label_runs(runs)
    assert [run.label for run in runs] == [str(tmp_path / "w1" / "same"), str(tmp_path / "w2" / "same")]


def test_the_command_prints_both_tables_and_draws_the_chart(tmp_path, capsys):
    a, b = write_run(tmp_path / "a", 1e-3), write_run(tmp_path / "b", 2e-3)
    chart = tmp_path / "out" / "compare.png"
    assert main(["compare", str(a), str(b), "--out", str(chart)]) == 0
    printed = capsys.readouterr().out
    assert "| train.lr_init | 0.001 | 0.002 |" in printed and "| b | pretrain ctx 100 (4 steps)" in printed
    assert chart.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("make", [lambda p: p, lambda p: (p.mkdir(), p)[1]], ids=["missing", "no-state"])
def test_a_path_that_is_not_a_run_directory_is_named(tmp_path, capsys, make):
    path = make(tmp_path / "nothing")
    assert main(["compare", str(path)]) == 2
    assert f"{path} is not a run directory" in capsys.readouterr().err


def test_an_extension_only_one_run_has_shows_its_length_not_the_defaults_that_defer_to_train(tmp_path):
    runs = [load_run(write_run(tmp_path / name, 1e-3)) for name in ("a", "b")]
    runs[0].config["extend"] = []  # as config.yaml holds a run without extensions
    runs[1].config["extend"] = [{"ctx_len": 200, "steps": 10, "lr": 1e-5, "chunk_len": 0, "micro_bsz": 0}]
    runs[1].config["extend"][0]["grad_checkpointing"] = None
    assert differing_fields(runs).splitlines()[2:] == [
        "| extend.0.ctx_len | - | 200 |",
        "| extend.0.lr | - | 1e-05 |",
        "| extend.0.steps | - | 10 |",
    ]
    runs[1].config["extend"][0]["chunk_len"] = 64  # set: it tells the runs apart
    assert "| extend.0.chunk_len | - | 64 |" in differing_fields(runs).splitlines()


def test_runs_with_tokenizers_of_different_sizes_get_a_note(tmp_path, capsys):
    a, b = write_run(tmp_path / "a", 1e-3), write_run(tmp_path / "b", 1e-3)
    for root, size in ((a, 512), (b, 4096)):
        config = yaml.safe_load((root / "config.yaml").read_text())
        (root / "config.yaml").write_text(yaml.safe_dump({**config, "tokenizer": {"vocab_size": size}}))
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c.png")]) == 0
    assert "vocabulary size (a 512, b 4096)" in capsys.readouterr().out
    assert comparability_notes([load_run(a), load_run(a)]) == []


def test_runs_on_different_corpora_get_a_note(tmp_path):
    runs = [load_run(write_run(tmp_path / name, 1e-3)) for name in ("a", "b")]
    assert comparability_notes(runs) == []
    runs[1].config["data"] = {"paths": ["/other/corpus"]}
    assert [note.split(":")[0] for note in comparability_notes(runs)] == ["note"]
    assert "differ in data.* or tokenizer.*" in comparability_notes(runs)[0]


def test_a_chart_name_matplotlib_cannot_write_is_refused_before_any_work(tmp_path, capsys):
    a = write_run(tmp_path / "a", 1e-3)
    assert main(["compare", str(a), str(a), "--out", str(tmp_path / "c.txt")]) == 2
    assert "c.txt: the chart's name must end in one of " in capsys.readouterr().err
    assert not (tmp_path / "c.txt").exists()
