"""Synthetic shards carry the manifest the tokenize stage writes, so every reader of one accepts them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_validation_windows_spread_from_the_first_token_to_the_last(tmp_path: Path) -> None:
    val = TokenDataset(write_synthetic_shards(tmp_path, tokens=4096, vocab_size=64, val_tokens=1000), split="val")
    starts = val.spread_starts(129, 4)
    assert starts[0] == 0 and starts[-1] == val.num_tokens - 129 and starts == sorted(set(starts))
    assert val.spread_starts(129, 1) == [0]
    with pytest.raises(ValueError, match=f"the val split holds {val.num_tokens} tokens, fewer than one window of"):
        val.spread_starts(val.num_tokens + 1, 2)
