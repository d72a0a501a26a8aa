"""The training data: one split's shards, memory-mapped, read as one flat token stream.

    data = TokenDataset(Path("runs/quickstart/tokenize-1a2b3c4d5e6f"))        # verifies against the manifest
    sampler = WindowSampler(data.num_tokens, ctx_len=128, seed=0)
    window = data.window(sampler.start(global_index), 128 + 1)              # int64, shape (T+1,)
    x, y = window[:-1], window[1:]

As in the RWKV reference (binidx), documents are not boundaries: the shards' documents, each
ending with the eod id, are concatenated in manifest order and a window may span documents and
shards. Nothing is read until a window asks for it (zero-copy Arrow memory maps).
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np

from tokenization.manifest import read_manifest
from tokenization.shards import ShardError, open_tokens, shard_record_from_dict, verify_shard
from tokenization.tokenizer import TokenizerInfo


def _info_from_manifest(manifest: dict) -> TokenizerInfo:
    tokenizer = manifest["tokenizer"]
    return TokenizerInfo(
        model_sha256=tokenizer["sha256"],
        vocab_size=tokenizer["vocab_size"],
        eod_id=tokenizer["eod_id"],
        pad_id=tokenizer["pad_id"],
        unk_id=tokenizer.get("unk_id", 2),
        model_type=tokenizer["config"].get("model_type", "bpe"),
        config=tokenizer["config"],
    )


class TokenDataset:
    """Flat token stream over the `split` shards listed in `shard_dir/manifest.json`."""

    def __init__(self, shard_dir: Path, split: str = "train", verify: bool = True) -> None:
        self.shard_dir, self.split = Path(shard_dir), split
        manifest = read_manifest(self.shard_dir)
        info = _info_from_manifest(manifest)
        self.vocab_size, self.eod_id = info.vocab_size, info.eod_id
        self.shards = [shard for shard in manifest["shards"] if shard["split"] == split]
        self.pieces: list[np.ndarray] = []  # one zero-copy view per record batch
        for shard in self.shards:
            path = self.shard_dir / shard["name"]
            if verify:
                verify_shard(path, shard_record_from_dict(shard), info)
            views = open_tokens(path)
            if sum(len(view) for view in views) != shard["tokens"]:
                raise ShardError(f"shard {path}: holds {sum(map(len, views))} tokens, manifest says {shard['tokens']}")
            self.pieces.extend(view for view in views if len(view))
        self.starts = [0]  # token offset of each piece in the flat stream
        for piece in self.pieces:
            self.starts.append(self.starts[-1] + len(piece))
        self.num_tokens = self.starts[-1]

    def __getstate__(self) -> dict:
        # pickled into DataLoader workers or Ray tasks: send the location, not the mapped tokens
        return {"shard_dir": self.shard_dir, "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["shard_dir"], state["split"], verify=False)  # verified when first opened

    def __len__(self) -> int:
        return self.num_tokens

    def spread_starts(self, length: int, count: int) -> list[int]:
        """Starts of `count` windows of `length` tokens spread evenly from the stream's start to its end
        (fixed, so validation losses compare across steps and runs)."""
        span = self.num_tokens - length
        if span < 0:
            raise ValueError(
                f"the {self.split} split holds {self.num_tokens} tokens, fewer than one window of {length}"
            )
        return [(i * span) // max(count - 1, 1) for i in range(count)]

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, read across shard boundaries."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"window [{start}, {start + length}) outside the stream of {self.num_tokens} tokens")
        out = np.empty(length, dtype=np.int64)
        piece = bisect.bisect_right(self.starts, start) - 1
        filled = 0
        while filled < length:
            offset = start + filled - self.starts[piece]
            take = min(length - filled, len(self.pieces[piece]) - offset)
            out[filled : filled + take] = self.pieces[piece][offset : offset + take]
            filled += take
            piece += 1
        return out
