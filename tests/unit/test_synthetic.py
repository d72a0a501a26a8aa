"""Synthetic shards carry the manifest the tokenize stage writes, so every reader of one accepts them."""

from __future__ import annotations

import json
from pathlib import Path

from tokenization.dataset import TokenDataset
from tokenization.synthetic import write_synthetic_shards


def test_synthetic_shards_have_a_full_manifest_that_matches_them(tmp_path: Path) -> None:
    shards = write_synthetic_shards(tmp_path, tokens=10_000, vocab_size=300, doc_tokens=999, val_tokens=3000)
    manifest = json.loads((shards / "manifest.json").read_text())
    totals = manifest["totals"]
    for split in ("train", "val"):
        assert totals[split]["tokens"] == TokenDataset(shards, split=split).num_tokens  # verified on load
    assert totals["train"]["documents"] == 11 and totals["val"]["documents"] == 4  # 1,000 tokens each
    assert totals["documents"] == 15 and manifest["token_dtype"] == "uint16"
