"""The `rwkv-pipeline` command line.

    rwkv-pipeline run configs/quickstart.yaml                  # the whole DAG; reruns reuse what is done
    rwkv-pipeline plan configs/quickstart.yaml train.lr_init=3e-4   # what would run, what is cached
    rwkv-pipeline status runs/quickstart                        # stages, progress, MLflow links
    rwkv-pipeline compare runs/a runs/b --out compare.png       # differing fields, results, loss chart
    rwkv-pipeline generate runs/quickstart/export-<hash> --prompt "def "
    rwkv-pipeline eval runs/quickstart --ctx-len 512            # evaluate the run's model again
    rwkv-pipeline export runs/quickstart --out exported/        # official .pth + safetensors + tokenizer
    rwkv-pipeline print-config configs/quickstart.yaml train.lr_init=3e-4
    rwkv-pipeline reference-config                              # every field, default and meaning

Errors a user can fix (a config typo, a missing corpus path, an unreachable Ray address, a failed
stage) print one paragraph naming the cause; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from orchestration.config import ConfigError, RunConfig, dump_config, load_config
from pipeline.config import EvalConfig

FINISHED = ("done", "cached", "shared")  # stage statuses whose folder is complete


class UsageError(ValueError):
    """A command-line argument that names something unusable."""


def _number(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: `kind` within [low, high] ((low, high] with low_open); argparse names the option."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n int' if kind is int else ' number'}") from None
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bounds = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        return value

    return parse


def _print_config(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _reference_config(args: argparse.Namespace) -> int:
    from orchestration.config_reference import reference_yaml

    print(reference_yaml(), end="")
    return 0


def _run(args: argparse.Namespace) -> int:
    from orchestration.run import run_pipeline

    config = load_config(args.config, args.overrides)
    summary = run_pipeline(config)
    print("\n" + summary.describe())
    return 0


def _plan(args: argparse.Namespace) -> int:
    from orchestration.run import plan_pipeline
    from orchestration.stages import stage_details

    config = load_config(args.config, args.overrides)
    details = stage_details(config)
    for item in plan_pipeline(config):
        reason = f"  ({item.reason})" if item.reason else ""
        print(
            f"{item.stage:<10} {item.action:<7} {details.get(item.stage, ''):<24} {item.source or item.folder}{reason}"
        )
    return 0


def _status(args: argparse.Namespace) -> int:
    from orchestration.run import mlflow_hints
    from orchestration.rundir import RunDir

    run_dir = RunDir.existing(Path(args.run_dir))
    state = run_dir.read_state()
    driver = run_dir.driver_running()
    print(f"run {state.get('name', run_dir.root.name)} in {run_dir.root} (updated {state.get('updated_at')})")
    for name, stage in state["stages"].items():
        progress = stage.get("progress")
        shown = f"{progress[0]}/{progress[1]}" if progress else ""
        seconds = f"{stage['seconds']:.0f} s" if stage.get("seconds") is not None else ""
        status = stage.get("status", "?")
        if status == "running" and not driver:
            status = "stopped"  # its driver was killed: the state could not say so
        elif status in FINISHED and not (run_dir.root / stage.get("dir", "")).exists():
            status = "missing"  # deleted since, or a shared folder whose run was deleted
        print(
            f"  {name:<10} {status:<9} {shown:>11} {seconds:>7}  {stage.get('dir', '')}"
            f"  mlflow {stage.get('mlflow_run_id') or '-'}"
        )
        if status == "failed":
            attempts = f" (attempt {stage['attempts']})" if stage.get("attempts") else ""
            print(f"             error{attempts}: {stage.get('error')}\n             log: {stage.get('log')}")
        if status in ("stopped", "missing"):
            print("             rerun the run's command to resume (or make it again)")
    for report_path in sorted(run_dir.root.glob("eval-ctx*/eval_report.json")):  # `rwkv-pipeline eval`'s
        report = json.loads(report_path.read_text())
        print(
            f"  {report_path.parent.name:<10} val loss {report['val_loss']:.4f} (perplexity "
            f"{report['perplexity']:.1f}) at ctx {report['ctx_len']}"
        )
    url = None
    if state.get("tracking_uri") and state.get("parent_run_id"):
        try:
            from orchestration.tracking import MlflowTracker, RunHandle

            url = MlflowTracker(state["tracking_uri"], "rwkv-pipeline").run_url(
                RunHandle("parent", run_id=state["parent_run_id"])
            )
        except ImportError:
            pass
    print("\n".join(mlflow_hints(state.get("tracking_uri"), url)))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from orchestration.compare import (
        comparability_notes,
        differing_fields,
        label_runs,
        load_run,
        plot_losses,
        results_table,
    )
    from pipeline.plots import chart_formats

    formats = chart_formats()
    if Path(args.out).suffix.lstrip(".").lower() not in formats:
        raise UsageError(f"--out {args.out}: the chart's name must end in one of .{', .'.join(sorted(formats))}")
    runs = [load_run(Path(path)) for path in args.run_dirs]
    label_runs(runs)
    print(differing_fields(runs), end="\n\n")
    print(results_table(runs), end="\n\n")
    for note in comparability_notes(runs):
        print(note, end="\n\n")
    plot_losses(runs, Path(args.out))
    print(f"loss curves: {args.out}")
    return 0


def _finished_stages(run_dir: Path) -> dict[str, Path]:
    """The folders of a run's finished stages, in order. A stage the state calls finished whose folder is
    gone (deleted, or shared from a run deleted since: `status` shows it `missing`) is a UsageError."""
    from orchestration.rundir import RunDir

    stages = RunDir.existing(run_dir).read_state()["stages"]
    done = {name: run_dir / s["dir"] for name, s in stages.items() if s.get("status") in FINISHED}
    for name, folder in done.items():
        if not folder.exists():  # as `status` tells it
            raise UsageError(
                f"{run_dir}: the {name} stage's folder {folder} is missing (deleted, or shared from a run deleted "
                "since): rerun the run's command to make it again"
            )
    return done


def _checkpoint_files(path: Path, tokenizer: str | None) -> tuple[Path, Path]:
    """(official .pth, tokenizer dir) from an export folder, a .pth with its tokenizer beside it, or a
    run directory (its export stage's folder)."""
    if path.is_dir() and not (path / "model.pth").is_file() and (path / "state.json").is_file():
        export = _finished_stages(path).get("export")
        if export is None and load_config(path / "config.yaml").model.arch != "rwkv4":
            raise UsageError(f"{path} trained the GPT baseline: no export, and no RNN mode to generate in")
        if export is None:
            raise UsageError(
                f"{path} has no finished export stage yet: run `rwkv-pipeline run CONFIG` to the end"
                + _checkpoint_hint(path, "then generate from DIR")
            )
        path = export
    weights = path / "model.pth" if path.is_dir() else path
    if not weights.is_file():
        from pipeline.checkpoint_files import is_complete

        run_dir = path.parents[3] if len(path.parents) > 3 else Path("RUN_DIR")  # RUN/stage/ray/stage/step_N
        training = f" is a training checkpoint: export it first with `rwkv-pipeline export {run_dir} --checkpoint "
        raise UsageError(
            f"{path}{training}{path} --out DIR`, then generate from DIR"
            if path.is_dir() and is_complete(path)
            else f"{weights} not found: give an exported model.pth, the export folder holding it, or a run directory"
        )
    tokenizer_dir = Path(tokenizer) if tokenizer else weights.parent
    if not (tokenizer_dir / "tokenizer.model").is_file():
        raise UsageError(f"no tokenizer.model in {tokenizer_dir}: pass --tokenizer DIR (a tokenizer stage folder)")
    return weights, tokenizer_dir


def _generate(args: argparse.Namespace) -> int:
    from model import load_rwkv4_pth
    from pipeline.eval_stage import sample

    weights, tokenizer_dir = _checkpoint_files(Path(args.model), args.tokenizer)
    model = load_rwkv4_pth(weights).eval()
    print(sample(model, tokenizer_dir, args.prompt, args.tokens, args.temperature, args.top_p, args.seed))
    return 0


def _trained_stage(run_dir: Path) -> tuple[Path, Path, Path]:
    """(last training stage folder, tokenize folder, tokenizer folder) of a finished run."""
    from orchestration.stages import is_training_stage

    done = _finished_stages(run_dir)
    trained = [name for name in done if is_training_stage(name)]
    if not trained or "tokenize" not in done or "tokenizer" not in done:
        raise UsageError(
            f"{run_dir} has no finished training stage yet: run `rwkv-pipeline run CONFIG` first"
            + _checkpoint_hint(run_dir)
        )
    return done[trained[-1]], done["tokenize"], done["tokenizer"]


def _checkpoint_hint(run_dir: Path, then: str = "") -> str:
    """How to use the newest checkpoint of the run's current training stages now, for a run that has not
    finished (or ''). Folders of the run's earlier configs are left out."""
    from orchestration.ray_train import STORAGE_FOLDER
    from orchestration.rundir import RunDir
    from orchestration.stages import is_training_stage
    from pipeline.checkpoint_files import is_complete

    stages = RunDir(run_dir).read_state()["stages"]
    training = {name: entry["dir"] for name, entry in stages.items() if is_training_stage(name)}
    found = [
        step
        for name, folder in training.items()
        for where in (folder, f"{folder}.partial")
        for step in (run_dir / where / STORAGE_FOLDER / name).glob("step_*")
        if is_complete(step)
    ]
    if not found:
        return ""
    newest = max(found, key=lambda step: step.stat().st_mtime)
    return f"; or export its newest checkpoint now: rwkv-pipeline export {run_dir} --checkpoint {newest} --out DIR" + (
        f", {then}" if then else ""
    )


def _load_run_model(run_dir: Path):  # -> (model, model_config, shard_dir, tokenizer_dir)
    from orchestration.stages import trained_model_config
    from pipeline.eval_stage import load_trained

    trained, shards, tokenizer = _trained_stage(run_dir)
    model_cfg = trained_model_config(trained)
    return load_trained(trained / "final_weights.pt", model_cfg), model_cfg, shards, tokenizer


def _eval(args: argparse.Namespace) -> int:
    from orchestration.stages import eval_ctx_len, eval_headline, trained_ctx_lens
    from pipeline.eval_stage import evaluate
    from tokenization.manifest import read_manifest

    run_dir = Path(args.run_dir)
    model, model_cfg, shards, tokenizer = _load_run_model(run_dir)
    config = load_config(run_dir / "config.yaml")
    ctx_len = args.ctx_len or eval_ctx_len(config)
    val_tokens = read_manifest(shards)["totals"]["val"]["tokens"]
    if val_tokens < ctx_len + 1:
        raise UsageError(
            f"--ctx-len {ctx_len}: the val split holds {val_tokens} tokens, fewer than one window of {ctx_len + 1} "
            f"(the longest window it allows is --ctx-len {val_tokens - 1})"
        )
    eval_cfg = EvalConfig(**{**config.eval.model_dump(), "batches": args.batches or config.eval.batches})
    out = Path(args.out) if args.out else run_dir / f"eval-ctx{ctx_len}"
    report = evaluate(model, shards, tokenizer, eval_cfg, ctx_len, out, trained_ctx_lens(config))
    print(f"{eval_headline(report)}; report and loss-vs-position plot in {out}")
    tracked = _track_evaluation(run_dir, config, eval_cfg, report, out)
    if tracked:
        from orchestration.run import mlflow_hints

        print("\n".join(mlflow_hints(*tracked)))
    return 0


def _track_evaluation(
    run_dir: Path, config: RunConfig, eval_cfg: EvalConfig, report: dict, out: Path
) -> tuple[str, str | None] | None:
    """The evaluation as a nested run `eval-ctx<N>` of the run's MLflow parent, beside its stage runs, with
    the evaluate stage's params, so evaluations at other lengths compare in MLflow. Returns the tracking URI
    and the run's link (None: the run is not tracked)."""
    from orchestration.rundir import RunDir
    from orchestration.stages import eval_metrics, evaluation_params
    from orchestration.tracking import RunHandle, make_tracker
    from pipeline.eval_stage import REPORT_FILES

    state = RunDir.existing(run_dir).read_state()
    if not state.get("tracking_uri") or not state.get("parent_run_id"):
        return None
    tracker = make_tracker(state["tracking_uri"], config.tracking.experiment)
    parent = RunHandle("parent", run_id=state["parent_run_id"])
    params = {**evaluation_params(eval_cfg, report["ctx_len"]), "eval.windows": report["windows"]}
    handle = tracker.open_run(
        f"eval-ctx{report['ctx_len']}", parent=parent, params=params, tags={"rwkv.eval_dir": str(out.resolve())}
    )
    tracker.log_metrics(handle, eval_metrics(report), step=0)
    for name in REPORT_FILES:
        tracker.log_artifact(handle, out / name, "eval")
    tracker.close_run(handle)
    tracker.close(timeout_s=min(config.tracking.flush_timeout_s, 60))
    return state["tracking_uri"], tracker.run_url(handle)


def _load_checkpoint_model(run_dir: Path, checkpoint: Path):  # -> (model, model_config, tokenizer_dir)
    """A training checkpoint's weights (any ZeRO stage and worker count, merged offline) and the run's tokenizer."""
    from model import ModelConfig, build_model
    from pipeline.checkpoint import consolidated_state_dict, is_complete, read_state

    tokenizer = _finished_stages(run_dir).get("tokenizer")
    if tokenizer is None:
        raise UsageError(f"{run_dir} has no finished tokenizer stage: give the run directory the checkpoint belongs to")
    if not is_complete(checkpoint):
        raise UsageError(f"{checkpoint} is not a complete training checkpoint (a step_* folder with COMPLETE)")
    model_cfg = ModelConfig(**read_state(checkpoint)["model_config"])
    model = build_model(model_cfg)
    model.load_state_dict(consolidated_state_dict(checkpoint))
    return model.eval(), model_cfg, tokenizer


def _export(args: argparse.Namespace) -> int:
    from pipeline.export import export

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file: give a folder (it is created if missing)")

    if args.checkpoint:
        model, model_cfg, tokenizer = _load_checkpoint_model(Path(args.run_dir), Path(args.checkpoint))
    else:
        model, model_cfg, _, tokenizer = _load_run_model(Path(args.run_dir))
    if model_cfg.arch != "rwkv4":
        raise UsageError(
            f"{args.run_dir} trained model.arch={model_cfg.arch}: only RWKV-4 models export (official .pth)"
        )
    export(model, tokenizer, Path(args.out), model_cfg)
    print(
        f"wrote {Path(args.out) / 'model.pth'}, model.safetensors and the tokenizer; load with "
        f"rwkv.model.RWKV(model='{Path(args.out) / 'model.pth'}', strategy='cpu fp32')"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkv-pipeline", description="RWKV-4 pretraining pipeline.")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks on errors (anywhere on the line).")
    parser.add_argument("--version", action="version", version=f"rwkv-pipeline {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, help_text: str) -> argparse.ArgumentParser:
        # main() moves --debug ahead of the command wherever it is given, so commands need no own copy
        return commands.add_parser(name, help=help_text, description=help_text)

    def with_config(name: str, help_text: str, handler) -> None:
        command = add_command(name, help_text)
        command.add_argument("config", help="YAML run config.")
        # default=[]: without one argparse names an empty `*` positional among the required arguments
        command.add_argument(
            "overrides",
            nargs="*",
            default=[],
            help="key=value, values read as YAML: train.lr_init=3e-4, data.paths=[/a,/b], "
            "'extend=[{ctx_len: 2048, steps: 500, lr: 1.0e-5}]', extend.0.steps=800 (an item that exists).",
        )
        command.set_defaults(handler=handler)

    with_config("run", "Run the stage DAG; complete stages are reused, an interrupted one resumes.", _run)
    with_config("plan", "Show which stages would run and which are cached, without running anything.", _plan)
    with_config("print-config", "Print the resolved config (YAML plus overrides).", _print_config)

    reference = add_command(
        "reference-config", "Print every config field with its default and what it does (configs/reference.yaml)."
    )
    reference.set_defaults(handler=_reference_config)

    status = add_command("status", "Stages, progress and MLflow links of a run directory.")
    status.add_argument("run_dir", help="<workdir>/<run name>, e.g. runs/quickstart")
    status.set_defaults(handler=_status)

    compare = add_command("compare", "Runs side by side: the config fields that differ, results, one loss chart.")
    compare.add_argument("run_dirs", nargs="+", help="<workdir>/<run name> of each run, e.g. runs/a runs/b")
    compare.add_argument("--out", default="compare.png", help="Chart of the losses (default compare.png).")
    compare.set_defaults(handler=_compare)

    gen = add_command("generate", "Sample text from an exported model (RNN mode).")
    gen.add_argument(
        "model",
        metavar="MODEL",
        help="An exported model.pth, the export folder holding it, or a run directory (its export stage's model).",
    )
    gen.add_argument("--prompt", required=True, help="Text to continue.")
    gen.add_argument(
        "--tokens",
        type=_number(int, 1),
        default=100,
        help="Tokens to generate at most; <eod> stops early (default 100).",
    )
    gen.add_argument("--temperature", type=_number(float, 0), default=1.0, help="0 = greedy (default 1.0).")
    gen.add_argument(
        "--top-p", type=_number(float, 0, 1, low_open=True), default=0.85, help="Nucleus sampling mass (default 0.85)."
    )
    gen.add_argument("--seed", type=int, default=0, help="Sampling seed (default 0).")
    gen.add_argument("--tokenizer", default=None, help="Folder with tokenizer.model (default: beside the model).")
    gen.set_defaults(handler=_generate)

    ev = add_command("eval", "Evaluate a run's trained model: val loss, perplexity, loss vs position.")
    ev.add_argument("run_dir", help="<workdir>/<run name> of a run whose training finished.")
    ev.add_argument(
        "--ctx-len",
        type=_number(int, 0),
        default=0,
        help="Window length, up to the val split's tokens less one (default, or 0: the evaluate stage's).",
    )
    ev.add_argument(
        "--batches", type=_number(int, 1), default=None, help="Batches of 4 windows (default: eval.batches)."
    )
    ev.add_argument("--out", default=None, help="Report folder (default: <run_dir>/eval-ctx<N>).")
    ev.set_defaults(handler=_eval)

    ex = add_command("export", "Write a run's model as official RWKV-4 .pth + safetensors + tokenizer.")
    ex.add_argument("run_dir", help="<workdir>/<run name> of a run whose training finished.")
    ex.add_argument("--out", required=True, help="Folder to write model.pth, model.safetensors, tokenizer.*.")
    ex.add_argument(
        "--checkpoint",
        default=None,
        help="A training checkpoint (step_* folder) to export instead of the final weights; any ZeRO stage "
        "and worker count (the run need not have finished).",
    )
    ex.set_defaults(handler=_export)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says what to fix: printed as one paragraph, no traceback."""
    from orchestration.cluster import ClusterTooSmall, RayUnreachable
    from orchestration.dag import StageFailed
    from orchestration.rundir import NotARunDirectory, RunDirBusy
    from orchestration.shared_workdir import WorkdirNotShared
    from orchestration.stages import PipelineSetupError
    from tokenization.shards import ShardError
    from tokenization.sources import CorpusError

    errors: list[type[BaseException]] = [
        ConfigError,
        UsageError,
        NotARunDirectory,
        CorpusError,
        ShardError,
        RayUnreachable,
        ClusterTooSmall,
        RunDirBusy,
        StageFailed,
        PipelineSetupError,
        WorkdirNotShared,
    ]
    try:
        from model import CheckpointFormatError
        from tokenization.tokenizer import TokenizerError

        errors += [CheckpointFormatError, TokenizerError]
    except ImportError:
        pass
    return tuple(errors)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rwkv-pipeline")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # argparse takes an option between a command's positionals for one of them
        argv = ["--debug", *(arg for arg in argv if arg != "--debug")]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().handlers[0].setLevel(logging.WARNING)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # here, not at exit: a reader that stopped early is an error caught below
        return code
    except user_errors() as exc:
        if args.debug:
            raise
        print(f"error: {' '.join(str(exc).split())}" if "\n  " not in str(exc) else f"error: {exc}", file=sys.stderr)
        from orchestration.dag import StageFailed

        return 1 if isinstance(exc, StageFailed) else 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output piped into a reader that stopped (`| head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 141


if __name__ == "__main__":
    sys.exit(main())
