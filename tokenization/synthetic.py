"""Shard directories of random tokens: benchmarks and tests that need data of a given size, not text.

    from tokenization.synthetic import write_synthetic_shards
    write_synthetic_shards(Path("/tmp/shards"), tokens=1 << 20, vocab_size=50277)
    TokenDataset(Path("/tmp/shards"), split="train")  # reads and verifies them like real shards

Documents are `doc_tokens` uniform random ids in [1, vocab_size) followed by the end-of-document id 0,
written by the real ShardWriter with a manifest, so the training loop cannot tell them from a
tokenized corpus except by the tokenizer's name ("synthetic-...").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tokenization.config import DataConfig
from tokenization.manifest import shard_name, write_manifest
from tokenization.readers import ReadStats
from tokenization.shards import ShardWriter
from tokenization.tokenizer import TokenizerInfo


def write_synthetic_shards(
    out_dir: Path,
    tokens: int,
    vocab_size: int,
    seed: int = 0,
    doc_tokens: int = 4096,
    val_tokens: int | None = None,
) -> Path:
    """Train and val shards of at least `tokens` / `val_tokens` tokens (default: max(tokens / 50, 32768))."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "synthetic", "vocab_size": vocab_size}
    info = TokenizerInfo(f"synthetic-{vocab_size}-{seed}", vocab_size, 0, -1, 1, "synthetic", config)
    rng = np.random.default_rng(seed)
    val_tokens = max(tokens // 50, 1 << 15) if val_tokens is None else val_tokens
    shards = []
    for split, count in (("train", tokens), ("val", val_tokens)):
        documents = [
            np.append(rng.integers(1, vocab_size, doc_tokens, dtype=np.uint32), 0)
            for _ in range(count // (doc_tokens + 1) + 1)
        ]
        with ShardWriter(out_dir / shard_name(split, 0), info, split=split) as writer:
            writer.write(documents)
        shards.append(writer.record.__dict__)
    # One work unit that wrote both shards and read no corpus: the manifest the tokenize stage writes,
    # totals included (what the training and evaluation checks read).
    counters = {**ReadStats().counters(), "documents": sum(shard["documents"] for shard in shards)}
    unit = {"unit": {"index": 0, "segments": []}, "shards": shards, **counters}
    write_manifest(out_dir, [unit], DataConfig(paths=["synthetic:"]), info)
    return out_dir
