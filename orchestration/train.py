"""Standalone pretraining entry point: the training loop without Ray, for single-node work and benchmarks.

    python -m orchestration.train configs/quickstart.yaml train.steps=50 --data SHARD_DIR --out runs/solo
    torchrun --nproc-per-node 2 -m orchestration.train CONFIG --data SHARD_DIR --out DIR
    deepspeed --num_gpus 8 --module orchestration.train CONFIG --data SHARD_DIR --out DIR

Every process runs the same loop (pipeline/train.py); rank 0 prints metrics and writes the resolved
config. Rerunning with the same --out resumes from the newest complete checkpoint there. No Ray or
MLflow import happens here, so this runs on a machine with only torch, DeepSpeed and pyarrow.
Exit codes: 0 done; 2 a bad config, --data that is no (intact) shard directory, or a --resume /
--init-weights that is missing or incompatible; 3 stopped on non-finite losses.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from orchestration.config import ConfigError, RunConfig, dump_config, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestration.train", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="YAML run config (the train and model sections are used).")
    parser.add_argument("overrides", nargs="*", help="Dotted overrides, e.g. train.steps=100 model.n_layer=6.")
    parser.add_argument("--data", required=True, help="Shard directory (manifest.json + Arrow shards).")
    parser.add_argument("--out", required=True, help="Output directory: checkpoints, final weights, config.")
    parser.add_argument("--resume", default=None, help="A checkpoint directory to resume from (default: newest).")
    parser.add_argument("--init-weights", default=None, help="final_weights.pt to start from (no checkpoint yet).")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def resolve_config(config_path: str, overrides: list[str], data_dir: Path) -> RunConfig:
    """The run config with model.vocab_size raised to the data's vocabulary when it is smaller."""
    from tokenization.dataset import TokenDataset

    config = load_config(config_path, overrides)
    data_vocab = TokenDataset(data_dir, split="train", verify=False).vocab_size
    if config.model.vocab_size < data_vocab:  # a larger model vocab (padding to a multiple of 128) is kept
        config.model.vocab_size = data_vocab
    return config


def start_point_problem(resume: str | None, init_weights: str | None) -> str | None:
    """What is wrong with --resume / --init-weights, checked before any process group or model is made."""
    from pipeline.checkpoint import is_complete

    if resume is not None and not is_complete(Path(resume)):
        return f"--resume {resume}: not a complete training checkpoint (a step_* folder with COMPLETE)"
    if init_weights is not None and not Path(init_weights).is_file():
        return f"--init-weights {init_weights}: no such file (give an earlier run's final_weights.pt)"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.local_rank is not None:  # the `deepspeed` launcher passes --local_rank
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from pipeline.checkpoint import CheckpointMismatch
    from pipeline.train import NonFiniteLoss, train
    from tokenization.shards import ShardError

    out_dir = Path(args.out)
    try:
        config = resolve_config(args.config, args.overrides, Path(args.data))
    except (ConfigError, ShardError) as exc:  # ShardError: --data is no shard directory, or a damaged one
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = start_point_problem(args.resume, args.init_weights)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(config))
    try:
        result = train(
            config.train, config.model, args.data, out_dir, resume_from=args.resume, init_weights=args.init_weights
        )
    except (CheckpointMismatch, ShardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        # The last step's own loss: the `step N/N loss=` lines give the mean over the steps since the last one.
        last = f"last step's loss {result.loss:.4g}" if result.loss is not None else "no loss"
        val = f", val_loss {result.val_loss:.4g}" if result.val_loss is not None else ""
        print(f"done: step {result.step}, {last}{val}, checkpoint {result.checkpoint}")
    return 0


def exit_without_teardown(code: int) -> None:
    """Leave once everything is written and flushed, without the interpreter's teardown.

    The run's files are closed and the process group destroyed by then. What teardown would still do
    is destroy third-party C++ state, and there a rank of a finished 2-process ZeRO-3 run on CPU once
    aborted ("terminate called without an active exception", SIGABRT, after rank 0 printed "done"),
    which made torchrun report the successful run as failed.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
