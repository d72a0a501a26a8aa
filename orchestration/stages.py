"""The pipeline's stages: tokenizer -> tokenize -> pretrain -> extend1..N -> evaluate -> export.

    stages = build_stages(load_config("configs/quickstart.yaml"))
    [stage.name for stage in stages]   # ['tokenizer', 'tokenize', 'pretrain', 'evaluate', 'export']

Each stage's `config` is what decides its output (what the folder hash covers); the stage
functions wire the real work: `pipeline.data_stages.train_tokenizer` (a Ray task),
`orchestration.data.tokenize_corpus` (Ray tasks per unit), `orchestration.ray_train.train_on_ray`
(a Ray Train job; rank 0's metrics come back to this driver and go to MLflow), and
`pipeline.eval_stage` for evaluation and export (Ray tasks). Settings that change nothing in a
stage's output (how often to log or checkpoint) are left out of its hash, so changing them
resumes a stage instead of restarting it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestration.config import RunConfig
from orchestration.dag import Stage, StageContext
from orchestration.metrics_log import append_metrics, metrics_by_step
from pipeline.config import ExtendStageConfig, TrainConfig

CHECKPOINT_MANIFEST = "checkpoint_manifest.json"  # a training stage's record: weights, sha256, model config
MAX_ARTIFACT_MB = 512  # an export up to this size is logged to MLflow whole; a larger one by its export.json

# Train settings that only change logging/checkpoint cadence, never the trained weights.
OPERATIONAL_TRAIN_FIELDS = {
    "log_every",
    "val_every",
    "val_batches",
    "checkpoint_every",
    "keep_checkpoints",
    "peak_tflops",
    "sample_log",
}


class PipelineSetupError(ValueError):
    """The config asks for something the pipeline cannot do (named in the message)."""

    retryable = False  # raised inside a stage: another attempt fails the same way


def corpus_fingerprint(config: RunConfig) -> str:
    """sha256 over the corpus files' ids, sizes and mtimes: an edited corpus is a new tokenizer input.

    Raises tokenization's CorpusError (naming the path) when a path does not exist, before any work, and
    PipelineSetupError when the corpus is whole-file documents of which none goes to validation.
    """
    from tokenization.sources import resolve_sources

    sources = resolve_sources(config.data.paths, config.data.root)
    _check_some_file_is_val(config, sources)
    digest = hashlib.sha256()
    for source in sources:
        digest.update(f"{source.rel}\0{source.size}\0{os.stat(source.path).st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _check_some_file_is_val(config: RunConfig, sources: list[Any]) -> None:
    """Where every file is one document (.txt, .py, .md without txt_split), the val split is known from the
    file names alone: say so before tokenizing when it would be empty (pretraining needs val tokens)."""
    from tokenization.units import split_of

    if config.data.txt_split != "file" or any(source.fmt != "txt" for source in sources):
        return
    documents = [source for source in sources if source.size > 0]
    if documents and not any(split_of(source.rel, config.data.val_fraction) == "val" for source in documents):
        raise PipelineSetupError(
            f"none of the corpus's {len(documents)} files goes to the val split at data.val_fraction="
            f"{config.data.val_fraction} (each file is one document, routed whole): raise data.val_fraction, or "
            "make each blank-line paragraph a document with data.txt_split: blank_lines."
        )


def on_ray(function: Callable[..., Any], *args: Any, num_cpus: float = 1) -> Any:
    """Run a pure function as one Ray task when Ray is up (so a cluster may place it), else here."""
    import ray

    if not ray.is_initialized():
        return function(*args)
    return ray.get(ray.remote(num_cpus=num_cpus, max_retries=0)(function).remote(*args))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value.model_dump(mode="json")


# Fields added after runs had been made, with the value those runs trained with: at that value a field is
# left out of its stage's hash, so the outputs of earlier runs keep their folders.
ADDED_LATER = {
    "train": {"chunk_len": 0},
    "model": {"fused_ln_mix": True},
    "extend": {"micro_bsz": 0, "grad_checkpointing": None},
}


def _identity(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """A config section as its stage hashes it: without the fields added later that hold their old value."""
    later = ADDED_LATER[section]
    return {key: value for key, value in values.items() if key not in later or value != later[key]}


def build_stages(config: RunConfig) -> list[Stage]:
    data = config.data.model_dump(mode="json")
    tokenizer_data = {key: value for key, value in data.items() if key != "val_fraction"}
    corpus = corpus_fingerprint(config)
    train = {k: v for k, v in config.train.model_dump(mode="json").items() if k not in OPERATIONAL_TRAIN_FIELDS}
    train = _identity("train", train)
    model = _identity("model", _jsonable(config.model))
    stages = [
        Stage(
            "tokenizer",
            tokenizer_stage(config),
            config={"data": tokenizer_data, "corpus": corpus, "tokenizer": _jsonable(config.tokenizer)},
            names={"corpus": "the corpus files"},
        ),
        Stage("tokenize", tokenize_stage(config), config={"data": data}, inputs=("tokenizer",)),
        Stage(
            "pretrain",
            pretrain_stage(config),
            config={"model": model, "train": train, "workers": config.ray.num_workers},
            inputs=("tokenize",),
            names={"workers": "ray.num_workers"},
        ),
    ]
    previous = "pretrain"
    for number, extension in enumerate(config.extend, start=1):
        name = f"extend{number}"
        stages.append(
            Stage(
                name,
                extend_stage(config, number, previous),
                config={"extend": _identity("extend", _jsonable(extension))},
                inputs=(previous, "tokenize"),
                names={"extend": f"extend.{number - 1}"},
            )
        )
        previous = name
    stages.append(
        Stage(
            "evaluate",
            evaluate_stage(config, previous),
            config={"eval": _jsonable(config.eval)},
            inputs=(previous, "tokenize", "tokenizer"),
            parent_metrics=evaluation_headline_metrics,
            version=2,  # 2: the training lengths in the report and marked on the loss-vs-position plot
        )
    )
    if config.model.arch == "rwkv4":  # the export is the official RWKV-4 checkpoint; the GPT baseline has none
        stages.append(Stage("export", export_stage(previous), config={}, inputs=(previous, "tokenizer")))
    return stages


# --- data ---------------------------------------------------------------------------------------


def tokenizer_stage(config: RunConfig) -> Callable[[StageContext], None]:
    def run(ctx: StageContext) -> None:
        from pipeline.data_stages import train_tokenizer

        on_ray(train_tokenizer, config.data, config.tokenizer, ctx.out_dir.resolve())
        info = json.loads((ctx.out_dir / "tokenizer.json").read_text())
        ctx.log_params({"tokenizer.vocab_size": info["vocab_size"], "tokenizer.model_sha256": info["model_sha256"]})
        ctx.log_artifact(ctx.out_dir / "tokenizer.model", "tokenizer")
        ctx.log_artifact(ctx.out_dir / "tokenizer.json", "tokenizer")

    return run


def tokenize_stage(config: RunConfig) -> Callable[[StageContext], None]:
    def run(ctx: StageContext) -> None:
        from orchestration.data import tokenize_corpus

        tokenize_corpus(
            config.data,
            ctx.inputs["tokenizer"],
            ctx.out_dir,
            ray_address=config.ray.address,
            num_workers=config.ray.data_workers,
            max_retries=config.ray.max_retries,
            on_progress=ctx.progress,
        )
        manifest = json.loads((ctx.out_dir / "manifest.json").read_text())
        totals = {k: v for k, v in manifest.get("totals", {}).items() if isinstance(v, int | float)}
        ctx.log_metrics({f"data/{key}": value for key, value in _flat_numbers(totals).items()}, step=0)
        ctx.log_artifact(ctx.out_dir / "manifest.json", "data")

    return run


def _flat_numbers(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


# --- training -----------------------------------------------------------------------------------


class MetricHistory:
    """Rank 0's metrics as they arrive: sent to MLflow and appended to metrics.jsonl for the plots."""

    def __init__(self, ctx: StageContext, total_steps: int) -> None:
        self.ctx, self.total_steps = ctx, total_steps
        self.path = ctx.out_dir / "metrics.jsonl"

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.ctx.log_metrics(metrics, step)
        append_metrics(self.path, step, metrics)
        self.ctx.progress(step, self.total_steps)

    def send_saved(self) -> None:
        """An earlier attempt's metrics.jsonl, sent again: a driver killed with points still in its tracking
        queue wrote them there first. The tracker skips the points the run already holds."""
        for step, metrics in metrics_by_step(self.path).items():
            self.ctx.log_metrics(metrics, step)

    def curves(self) -> dict[str, tuple[list[float], list[float]]]:
        """Loss and val loss by step; a resumed run's replayed steps keep their latest value."""
        by_step = metrics_by_step(self.path)
        curves = {}
        for key, label in (("loss", "train loss"), ("val_loss", "val loss")):
            steps = [step for step, values in by_step.items() if key in values]  # in step order
            if steps:
                curves[label] = ([float(s) for s in steps], [by_step[s][key] for s in steps])
        return curves


def _with_vocab(config: RunConfig, shard_dir: Path) -> RunConfig:
    from tokenization.manifest import read_manifest

    vocab = read_manifest(shard_dir)["tokenizer"]["vocab_size"]
    model = dataclasses.replace(config.model, vocab_size=vocab)  # the tokenizer decides; ids past it are never data
    return config.model_copy(update={"model": model})


def _train(ctx: StageContext, config: RunConfig, shard_dir: Path, init_weights: Path | None = None) -> None:
    from orchestration.ray_train import STORAGE_FOLDER, train_on_ray
    from pipeline.plots import line_chart

    history = MetricHistory(ctx, config.train.steps)
    history.send_saved()  # a resumed stage: what the killed driver had not sent yet
    extra = {"init_weights": init_weights} if init_weights is not None else {}
    # The stage's own recipe (an extension's length, steps and constant LR, not the parent's) and the
    # model it trains (vocab_size from the tokenizer), so stage runs compare on their own in MLflow.
    ctx.log_params(
        {
            **{f"train.{k}": v for k, v in config.train.model_dump().items()},
            **{f"model.{k}": v for k, v in dataclasses.asdict(config.model).items()},
        }
    )
    result = train_on_ray(
        config,
        shard_dir,
        ctx.out_dir,
        log_metrics=history,
        storage_path=ctx.out_dir / STORAGE_FOLDER,
        name=ctx.name,
        tracking_run_id=ctx.run.run_id,
        **extra,
    )
    curves = history.curves()
    if curves:
        line_chart(curves, "step", "loss (nats)", f"{ctx.name}: loss", ctx.out_dir / "loss_curve.png")
        ctx.log_artifact(ctx.out_dir / "loss_curve.png", "plots")
    from tokenization.shards import sha256_file

    weights = ctx.out_dir / "final_weights.pt"
    record = {
        "weights": weights.name,
        "sha256": sha256_file(weights),
        "checkpoint": _within(result.get("checkpoint"), ctx.out_dir),
        "model_config": dataclasses.asdict(config.model),
    }
    (ctx.out_dir / CHECKPOINT_MANIFEST).write_text(json.dumps(record, indent=2, default=str) + "\n")
    ctx.log_artifact(ctx.out_dir / CHECKPOINT_MANIFEST, "checkpoint")


def _within(path: str | None, stage_dir: Path) -> str | None:
    """A path inside the stage folder relative to it: the folder loses its .partial name when complete."""
    if path is None:
        return None
    resolved, root = Path(path).resolve(), stage_dir.resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(resolved)


def pretrain_stage(config: RunConfig) -> Callable[[StageContext], None]:
    if config.train.chunk_len and config.model.arch != "rwkv4":
        raise PipelineSetupError(
            f"train.chunk_len={config.train.chunk_len}: training in chunks carries the RWKV state from chunk "
            f"to chunk, and model.arch={config.model.arch} has no state; set chunk_len: 0."
        )

    def run(ctx: StageContext) -> None:
        check_val_split(config, ctx.inputs["tokenize"])
        _train(ctx, _with_vocab(config, ctx.inputs["tokenize"]), ctx.inputs["tokenize"])

    return run


def check_val_split(config: RunConfig, shard_dir: Path) -> None:
    """Before training, not after it: the evaluate stage needs one window of its context from the val split.
    Every training stage checks (the ones before it may have been cached), and evaluate itself."""
    ctx_len = eval_ctx_len(config)
    from tokenization.manifest import read_manifest

    val = read_manifest(shard_dir)["totals"]["val"]
    if val["tokens"] < ctx_len + 1:
        raise PipelineSetupError(
            f"the val split of {shard_dir} holds {val['tokens']} tokens in {val['documents']} documents, fewer "
            f"than one evaluation window of {ctx_len + 1}: raise data.val_fraction (now {config.data.val_fraction}"
            "; documents are routed whole), split .txt files into more documents with data.txt_split: "
            "blank_lines, or lower eval.ctx_len."
        )


def extend_stage(config: RunConfig, number: int, previous: str) -> Callable[[StageContext], None]:
    """Fine-tune at extend[number-1].ctx_len with a constant LR, from the previous stage's weights."""
    extension = config.extend[number - 1]
    if extension.chunk_len and config.model.arch != "rwkv4":
        raise PipelineSetupError(
            f"extend.{number - 1}.chunk_len={extension.chunk_len}: training in chunks carries the RWKV state "
            f"from chunk to chunk, and model.arch={config.model.arch} has no state; set chunk_len: 0."
        )

    def run(ctx: StageContext) -> None:
        check_val_split(config, ctx.inputs["tokenize"])  # pretraining may have been cached: check here too
        train = extend_train_config(config, extension)
        staged = _with_vocab(config.model_copy(update={"train": train}), ctx.inputs["tokenize"])
        _train(ctx, staged, ctx.inputs["tokenize"], init_weights=ctx.inputs[previous] / "final_weights.pt")

    return run


def extend_train_config(config: RunConfig, extension: ExtendStageConfig) -> TrainConfig:
    """The train section of an extension stage: the pretrain recipe at the new length, constant LR, and
    the stage's own chunking, micro-batch and block recompute where it sets them."""
    recompute = extension.grad_checkpointing
    return config.train.model_copy(
        update={
            "ctx_len": extension.ctx_len,
            "steps": extension.steps,
            "lr_init": extension.lr,
            "lr_final": extension.lr,
            "lr_schedule": "constant",
            "warmup_steps": 0,
            "chunk_len": extension.chunk_len,
            "micro_bsz": extension.micro_bsz or config.train.micro_bsz,
            "grad_checkpointing": config.train.grad_checkpointing if recompute is None else recompute,
        }
    )


# --- evaluate and export ------------------------------------------------------------------------


def trained_model_config(trained_dir: Path) -> Any:
    """The ModelConfig a training stage's folder was trained with (its checkpoint manifest)."""
    from model import ModelConfig

    record = json.loads((trained_dir / CHECKPOINT_MANIFEST).read_text())
    return ModelConfig(**record["model_config"])


def eval_ctx_len(config: RunConfig) -> int:
    """The evaluate stage's context: eval.ctx_len, else the last training stage's."""
    return config.eval.ctx_len or (config.extend[-1].ctx_len if config.extend else config.train.ctx_len)


EVAL_METRICS = (
    "val_loss",
    "perplexity",
    "loss_first_quarter",
    "loss_last_quarter",
    "loss_past_trained_ctx",
    "loss_within_trained_ctx",
)


def eval_metrics(report: dict[str, Any]) -> dict[str, float]:
    """An eval report's figures as MLflow metrics (the evaluate stage's, and `rwkv-pipeline eval`'s)."""
    return {key: report[key] for key in EVAL_METRICS if key in report}


def eval_headline(report: dict[str, Any]) -> str:
    """An eval report in one line, for the run's summary and `rwkv-pipeline eval`."""
    line = f"val loss {report['val_loss']:.4f} (perplexity {report['perplexity']:.1f}) at ctx {report['ctx_len']}"
    past, within = report.get("loss_past_trained_ctx"), report.get("loss_within_trained_ctx")
    if past is None:
        return line
    if within is None:  # a report from before the loss within was kept
        return f"{line}, {past:.4f} past the longest trained length"
    longest = max(report["trained_ctx"].values())
    return (
        f"{line}; positions {longest + 1}-{report['ctx_len']}, past the longest trained length: {past:.4f}, "
        f"against {within:.4f} at 1-{longest}"
    )


def is_training_stage(name: str) -> bool:
    """pretrain and extend1..N: the stages that train on Ray Train."""
    return name == "pretrain" or re.fullmatch(r"extend\d+", name) is not None


def training_stages(config: RunConfig) -> list[tuple[str, int, int]]:
    """(name, ctx_len, steps) of each training stage, in order: pretrain, extend1..N."""
    extensions = [(f"extend{number}", stage.ctx_len, stage.steps) for number, stage in enumerate(config.extend, 1)]
    return [("pretrain", config.train.ctx_len, config.train.steps), *extensions]


def trained_ctx_lens(config: RunConfig) -> dict[str, int]:
    """Each training stage's context length, in stage order: {"pretrain": 1024, "extend1": 4096}."""
    return {name: ctx_len for name, ctx_len, _ in training_stages(config)}


def stage_details(config: RunConfig) -> dict[str, str]:
    """What `plan` shows beside a stage before a long run: lengths and steps of the training stages."""
    details = {"tokenizer": f"vocab {config.tokenizer.vocab_size}"}
    details.update({name: f"ctx {ctx_len}, {steps} steps" for name, ctx_len, steps in training_stages(config)})
    details["evaluate"] = f"ctx {eval_ctx_len(config)}"
    return details


def _evaluate_task(
    weights: Path,
    model_cfg: Any,
    shard_dir: Path,
    tokenizer_dir: Path,
    eval_cfg: Any,
    ctx_len: int,
    out_dir: Path,
    trained_ctx: dict[str, int],
) -> dict[str, Any]:
    from pipeline.eval_stage import evaluate, load_trained

    model = load_trained(weights, model_cfg)
    return evaluate(model, shard_dir, tokenizer_dir, eval_cfg, ctx_len, out_dir, trained_ctx)


def evaluation_params(eval_cfg: Any, ctx_len: int) -> dict[str, Any]:
    """An evaluation's MLflow params (the evaluate stage's, and `rwkv-pipeline eval`'s): eval.* as run."""
    return {**{f"eval.{key}": value for key, value in eval_cfg.model_dump().items()}, "eval.ctx_len": ctx_len}


def evaluation_headline_metrics(folder: Path) -> dict[str, float]:
    """The parent run's `eval/*` metrics, from an evaluate folder's report."""
    report = json.loads((folder / "eval_report.json").read_text())
    return {f"eval/{key}": report[key] for key in ("val_loss", "perplexity", "ctx_len")}


def evaluate_stage(config: RunConfig, trained: str) -> Callable[[StageContext], None]:
    ctx_len = eval_ctx_len(config)

    def run(ctx: StageContext) -> None:
        check_val_split(config, ctx.inputs["tokenize"])  # eval.ctx_len may have changed alone
        ctx.log_params(evaluation_params(config.eval, ctx_len))
        model_cfg = trained_model_config(ctx.inputs[trained])
        report = on_ray(
            _evaluate_task,
            (ctx.inputs[trained] / "final_weights.pt").resolve(),
            model_cfg,
            ctx.inputs["tokenize"].resolve(),
            ctx.inputs["tokenizer"].resolve(),
            config.eval,
            ctx_len,
            ctx.out_dir.resolve(),
            trained_ctx_lens(config),
        )
        ctx.log.info(
            "val loss %.4f (perplexity %.2f) over %d windows of %d tokens; a window's first / last quarter %.4f / %.4f",
            report["val_loss"],
            report["perplexity"],
            report["windows"],
            ctx_len,
            report["loss_first_quarter"],
            report["loss_last_quarter"],
        )
        ctx.log_metrics(eval_metrics(report), step=0)
        from pipeline.eval_stage import REPORT_FILES

        for name in REPORT_FILES:
            ctx.log_artifact(ctx.out_dir / name, "eval")

    return run


def _export_task(weights: Path, model_cfg: Any, tokenizer_dir: Path, out_dir: Path) -> dict[str, Any]:
    from pipeline.eval_stage import load_trained
    from pipeline.export import export

    return export(load_trained(weights, model_cfg), tokenizer_dir, out_dir, model_cfg)


def export_stage(trained: str) -> Callable[[StageContext], None]:
    def run(ctx: StageContext) -> None:
        from pipeline.export import EXPORT_RECORD

        model_cfg = trained_model_config(ctx.inputs[trained])
        record = on_ray(
            _export_task,
            (ctx.inputs[trained] / "final_weights.pt").resolve(),
            model_cfg,
            ctx.inputs["tokenizer"].resolve(),
            ctx.out_dir.resolve(),
        )
        total_mb = sum(item["bytes"] for item in record["files"].values()) / 1e6
        ctx.log.info("wrote %s (%.1f MB) for %s", ", ".join(record["files"]), total_mb, record["load_with"])
        if total_mb <= MAX_ARTIFACT_MB:  # big models: the manifest (paths, sha256) stands in for the weights
            for name in (*record["files"], EXPORT_RECORD):  # not the folder's _SUCCESS and stage.json
                ctx.log_artifact(ctx.out_dir / name, "model")
        else:
            ctx.log.info("over %g MB: MLflow gets export.json (sizes, sha256), the files stay here", MAX_ARTIFACT_MB)
            ctx.log_artifact(ctx.out_dir / EXPORT_RECORD, "model")

    return run
