"""Shared by the training integration tests: real-text shards built once per session, tiny configs.

The corpus is a fixed subset of the running Python's standard library source (json, email, asyncio:
~0.9 MB, ~400k tokens with a 512-token BPE), tokenized in-process (about 2 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

_SHARDS: dict[int, Path] = {}


def stdlib_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shard directory of the stdlib subset; built on first use, reused for the session."""
    key = id(tmp_path_factory)
    if key not in _SHARDS:
        from pipeline.data_stages import tokenize_in_process, train_tokenizer
        from tokenization.config import DataConfig, TokenizerConfig

        root = tmp_path_factory.mktemp("stdlib-shards")
        corpus = root / "corpus"
        corpus.mkdir()
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for package in ("json", "email", "asyncio"):
            for path in sorted((stdlib / package).glob("*.py")):
                shutil.copy(path, corpus / f"{package}_{path.name}")
        data = DataConfig(paths=[str(corpus)], val_fraction=0.1)
        tokenizer = TokenizerConfig(vocab_size=512, sample_bytes=1 << 20)
        train_tokenizer(data, tokenizer, root / "tokenizer")
        _SHARDS[key] = tokenize_in_process(data, root / "tokenizer", root / "shards")
    return _SHARDS[key]


def tiny_config(path: Path, **train: object) -> Path:
    """A run config with a 2-layer, 64-wide RWKV-4 at ctx 64, fp32 ZeRO-2; `train` overrides fields."""
    train_section = {
        "ctx_len": 64,
        "micro_bsz": 4,
        "steps": 40,
        "lr_init": 3e-3,
        "lr_final": 1e-3,
        "warmup_steps": 5,
        "precision": "fp32",
        "zero_stage": 2,
        "log_every": 10,
        "val_every": 20,
        "val_batches": 2,
        "checkpoint_every": 10,
        "keep_checkpoints": 2,
        **train,
    }
    config = {"model": {"n_layer": 2, "n_embd": 64, "vocab_size": 512}, "train": train_section}
    path.write_text(yaml.safe_dump(config))
    return path


def single_thread_env() -> dict[str, str]:
    """One intra-op thread per process: multi-threaded CPU kernels are not bit-reproducible run to run."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train_command(config: Path, shards: Path, out: Path, nproc: int, *extra: str) -> list[str]:
    """The standalone entry point: under torchrun with `nproc` workers (gloo), or a plain process for 1."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    entry = ["-m", "orchestration.train", str(config), *extra, "--data", str(shards), "--out", str(out)]
    return [sys.executable, *launcher, *entry]


def run_ok(command: list[str], timeout: float = 180) -> str:
    """Run to completion with one thread per process; returns stdout, fails the test with the log tail."""
    done = subprocess.run(command, env=single_thread_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def step_records(out: Path) -> dict[int, dict]:
    """Per optimizer step, over every rank of a run with `train.sample_log`: the mean loss (every rank logs
    the all-reduced value) and the sorted global sample indices all ranks read; the last record of a
    step counts (a replayed step overwrites)."""
    per_rank = [
        {record["step"]: record for record in map(json.loads, path.read_text().splitlines())}
        for path in sorted((out / "samples").glob("rank_*.jsonl"))
    ]
    steps: dict[int, dict] = {}
    for step in per_rank[0]:
        losses = {ranked[step]["loss"] for ranked in per_rank}
        assert len(losses) == 1, f"step {step}: ranks logged different losses {losses}"
        steps[step] = {
            "loss": losses.pop(),
            "samples": sorted(i for ranked in per_rank for i in ranked[step]["samples"]),
        }
    return steps
