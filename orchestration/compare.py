"""Runs side by side from their run directories (`rwkv-pipeline compare RUN_DIR ...`), no MLflow needed.

    runs = [load_run(Path(path)) for path in ("runs/lr3e-4", "runs/lr6e-4")]
    print(differing_fields(runs))      # the config fields whose values differ, one row each
    print(results_table(runs))         # stages, tokens, last losses, evaluation, tokens/s
    plot_losses(runs, Path("compare.png"))

A run's training stages (pretrain, then extend1..N) are read from the metrics.jsonl each writes as it
trains (its `.partial` folder while it runs), so a run still training compares too. Losses are drawn
against tokens seen since the run began, each stage after the one before it, so runs with other batch
sizes or context lengths line up by data consumed rather than by step.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestration.metrics_log import metrics_by_step
from orchestration.rundir import RunDir
from orchestration.stages import is_training_stage
from orchestration.tracking import flatten
from pipeline.config import ExtendStageConfig
from pipeline.plots import mark, new_chart, save_chart


@dataclass
class StageCurve:
    """One training stage's logged points, tokens counted from the run's start."""

    stage: str
    ctx_len: int | None = None
    start_tokens: float = 0.0  # tokens the stages before it saw
    train: list[tuple[float, float]] = field(default_factory=list)  # (tokens seen, loss)
    val: list[tuple[float, float]] = field(default_factory=list)  # (tokens seen, val loss)
    tokens_per_s: list[float] = field(default_factory=list)
    steps: int = 0

    @property
    def end_tokens(self) -> float:
        """Tokens seen once its last logged point was reached (a validation point may come last)."""
        return max((tokens for tokens, _ in self.train + self.val), default=self.start_tokens)


@dataclass
class RunResult:
    label: str
    root: Path
    config: dict[str, Any]
    stages: list[StageCurve]
    evaluation: dict[str, Any] | None


def load_run(root: Path) -> RunResult:
    """The run at `root` (NotARunDirectory when it holds no state.json)."""
    run_dir = RunDir.existing(root)
    state = run_dir.read_state()
    config = yaml.safe_load(run_dir.config_path.read_text()) if run_dir.config_path.is_file() else {}
    stages, evaluation, tokens_before = [], None, 0.0
    for name, stage in state["stages"].items():
        folder = _stage_folder(run_dir, name, stage)
        if folder is None:
            continue
        if is_training_stage(name):
            curve = _read_curve(name, folder / "metrics.jsonl", tokens_before)
            curve.ctx_len = _stage_ctx_len(config, name)
            stages.append(curve)
            tokens_before = curve.end_tokens
        elif name == "evaluate" and (folder / "eval_report.json").is_file():
            evaluation = json.loads((folder / "eval_report.json").read_text())
    return RunResult(state.get("name") or Path(root).name, Path(root), config, stages, evaluation)


def _stage_folder(run_dir: RunDir, name: str, stage: dict[str, Any]) -> Path | None:
    """The stage's output folder, or its `.partial` folder while it runs."""
    if not stage.get("hash"):
        return None
    for folder in (run_dir.stage_dir(name, stage["hash"]), run_dir.partial_dir(name, stage["hash"])):
        if folder.is_dir():
            return folder
    return None


def _stage_ctx_len(config: dict[str, Any], stage: str) -> int | None:
    try:
        if stage == "pretrain":
            return config["train"]["ctx_len"]
        return config["extend"][int(stage.removeprefix("extend")) - 1]["ctx_len"]
    except (KeyError, IndexError, TypeError):
        return None


def _read_curve(stage: str, path: Path, tokens_before: float) -> StageCurve:
    curve = StageCurve(stage, start_tokens=tokens_before)
    by_step = metrics_by_step(path)
    # Validation points carry only their step: tokens per step from the stage's training points.
    per_step = next((m["tokens_seen"] / step for step, m in by_step.items() if step and "tokens_seen" in m), 0.0)
    for step, metrics in by_step.items():
        curve.steps = step
        tokens = tokens_before + metrics.get("tokens_seen", step * per_step)
        if "loss" in metrics:
            curve.train.append((tokens, metrics["loss"]))
        if "val_loss" in metrics:
            curve.val.append((tokens, metrics["val_loss"]))
        if metrics.get("tokens_per_s"):
            curve.tokens_per_s.append(metrics["tokens_per_s"])
    return curve


def label_runs(runs: list[RunResult]) -> None:
    """Runs of the same name (one name in two workdirs) are told apart by their folders."""
    names = [run.label for run in runs]
    for run in runs:
        if names.count(run.label) > 1:
            run.label = str(run.root)


def differing_fields(runs: list[RunResult]) -> str:
    """A Markdown table of the config fields whose values differ between the runs, named and shown as
    the runs' MLflow params are (`extend.0.ctx_len`).

    Where only some runs have an extension stage, its fields that defer to the pretrain recipe (0 or
    null: `chunk_len`, `micro_bsz`, `grad_checkpointing`) are left out while they hold that default:
    the stage's length, steps and LR tell the runs apart.
    """
    flat = [{key: value for key, value in flatten(run.config).items() if value != "[]"} for run in runs]
    keys = sorted({key for fields in flat for key in fields} - {"name"})
    rows = [[key, *(fields.get(key, "-") for fields in flat)] for key in keys]
    rows = [row for row in rows if len(set(row[1:])) > 1 and not _deferring_default(row)]
    settings = [row[0] for row in rows if _changes_no_result(row[0])]
    rows = [row for row in rows if row[0] not in settings]
    table = _markdown(["field", *(run.label for run in runs)], rows) if rows else "no config field differs"
    if settings:  # where and how the runs ran: no stage's output depends on them
        table += f"\n\nalso different, changing no result: {', '.join(settings)}"
    return table


# Settings that change no figure of the comparison: where a run was tracked, which cluster it joined, how
# often it retried and kept checkpoints. (Logging and validation cadence change the last losses shown, and
# the workers' CPUs or GPUs their tokens/s: those stay in the table.)
NO_RESULT_SETTINGS = {
    "workdir",
    "ray.address",
    "ray.max_retries",
    "ray.stage_retries",
    "ray.data_workers",
    "train.checkpoint_every",
    "train.keep_checkpoints",
}


def _changes_no_result(key: str) -> bool:
    return key in NO_RESULT_SETTINGS or key.startswith("tracking.")


def _deferring_default(row: list[str]) -> bool:
    """An extension field at a default that means "as train.*", in the runs that have the stage."""
    match = re.fullmatch(r"extend\.\d+\.(\w+)", row[0])
    info = ExtendStageConfig.model_fields.get(match.group(1)) if match else None
    if info is None or info.is_required() or info.default not in (0, None):
        return False
    return {value for value in row[1:] if value != "-"} == {str(info.default)}


def comparability_notes(runs: list[RunResult]) -> list[str]:
    """What makes the runs' losses not directly comparable, one line each."""
    notes = []
    vocabs = {run.label: run.config.get("tokenizer", {}).get("vocab_size") for run in runs}
    if len({size for size in vocabs.values() if size is not None}) > 1:
        sizes = ", ".join(f"{label} {size}" for label, size in vocabs.items())
        notes.append(
            f"note: the runs' tokenizers differ in vocabulary size ({sizes}): a loss is nats per token of its own "
            "tokenizer, so losses and perplexities of different tokenizers do not compare directly."
        )
    sections = ("data", "tokenizer")
    if len({json.dumps([run.config.get(key) for key in sections], sort_keys=True) for run in runs}) > 1:
        notes.append(
            "note: the runs differ in data.* or tokenizer.* (see the fields above): they are validated on different "
            "held-out text or tokens, so their val and eval losses are not measured on the same thing."
        )
    return notes


def results_table(runs: list[RunResult]) -> str:
    """A Markdown table: one row per run, what its training and evaluation reached."""
    header = [
        "run",
        "stages",
        "tokens seen",
        "train loss (mean of the last 3 logged or fewer)",
        "tokens/s (median)",
        "last val loss",
        "eval loss (ppl)",
    ]
    return _markdown(header, [_results_row(run) for run in runs])


def _results_row(run: RunResult) -> list[str]:
    trained = [stage for stage in run.stages if stage.train]
    last = trained[-1].train if trained else []
    rates = [rate for stage in run.stages for rate in stage.tokens_per_s]
    val = [point for stage in run.stages for point in stage.val]
    evaluation = run.evaluation or {}
    return [
        run.label,
        ", ".join(f"{stage.stage}{_at_ctx(stage)} ({stage.steps} steps)" for stage in trained) or "-",
        f"{trained[-1].end_tokens:,.0f}" if trained else "-",
        f"{statistics.fmean(loss for _, loss in last[-3:]):.4f}" if last else "-",
        f"{statistics.median(rates):,.0f}" if rates else "-",
        f"{val[-1][1]:.4f}" if val else "-",
        f"{evaluation['val_loss']:.4f} ({evaluation['perplexity']:.1f}) at ctx {evaluation['ctx_len']}"
        if "val_loss" in evaluation
        else "-",
    ]


def _at_ctx(stage: StageCurve) -> str:
    return f" ctx {stage.ctx_len}" if stage.ctx_len else ""


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot_losses(runs: list[RunResult], path: Path) -> None:
    """Training loss (lines) and validation loss (dashed, dots) of every run against tokens seen."""
    figure, axes = new_chart(8, 4.5)
    row = 0  # each marker's label a line lower than the one before: runs extend at similar token counts
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        train = [point for stage in run.stages for point in stage.train]
        val = [point for stage in run.stages for point in stage.val]
        if train:
            axes.plot(*zip(*train, strict=True), color=color, label=f"{run.label} train")
        if val:
            axes.plot(*zip(*val, strict=True), color=color, linestyle="--", marker="o", label=f"{run.label} val")
        for stage in run.stages[1:]:  # where each context extension began
            if stage.train:
                label = f"{stage.stage}{_at_ctx(stage)}"
                mark(axes, stage.start_tokens, label, color, "x-small", alpha=0.6, row=row % 8)
                row += 1
    axes.set(xlabel="tokens seen", ylabel="loss (nats)", title="loss by tokens seen")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    save_chart(figure, path)
