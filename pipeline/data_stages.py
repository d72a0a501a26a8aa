"""The data stages as plain in-process functions: train the tokenizer, tokenize one unit, write the manifest.

    from pipeline.data_stages import train_tokenizer, tokenize_in_process
    data = DataConfig(paths=["stdlib:"], unit_bytes=1 << 20)
    tokenizer_dir = train_tokenizer(data, TokenizerConfig(sample_bytes=4 << 20), Path("out/tokenizer"))
    shard_dir = tokenize_in_process(data, tokenizer_dir, Path("out/shards"))

Where the work runs is not decided here: `orchestration/data.py` runs `tokenize_unit` as Ray tasks,
`tokenize_in_process` runs the same function in a loop (tests, machines without Ray). A unit writes
its shards (`train-000012.arrow`, `val-000012.arrow`) and then its record `units/unit-000012.json`,
each atomically; a unit whose record exists and whose shards match it is complete and never
redone. `manifest.json` is written last, from the records in unit order, and holds nothing that
depends on timing or worker count, so reruns and any worker count give byte-identical output.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tokenization.config import DataConfig, TokenizerConfig
from tokenization.manifest import (
    SPLITS,
    completed_record,
    record_path,
    remove_temporaries,
    shard_name,
    skipped_summary,
    write_manifest,
)
from tokenization.readers import ReadStats, read_segment
from tokenization.shards import ShardWriter, token_dtype
from tokenization.tokenizer import (
    TokenizerInfo,
    TokenizerTrainingError,
    load_tokenizer,
    read_info,
    train_sentencepiece,
    write_atomic,
)
from tokenization.units import WorkUnit, plan_units, split_of

_processors: dict[str, Any] = {}  # tokenizer per worker process, keyed by model sha256


# --- tokenizer training -------------------------------------------------------------------------


def _pieces(text: str, max_bytes: int) -> Iterator[str]:
    """Cut a document at line ends into pieces below sentencepiece's sentence limit (bytes)."""
    piece: list[str] = []
    held = 0
    for line in text.splitlines(keepends=True):
        size = len(line.encode("utf-8"))
        if held + size > max_bytes and piece:
            yield "".join(piece)
            piece, held = [], 0
        while size > max_bytes:  # a single over-long line: cut by characters (max_bytes // 4 is safe)
            step = max_bytes // 4
            yield line[:step]
            line = line[step:]
            size = len(line.encode("utf-8"))
        piece.append(line)
        held += size
    if piece:
        yield "".join(piece)


def _skipped_records(stats: ReadStats) -> int:
    return stats.missing_text + stats.bad_records


def _every_record_skipped(stats: ReadStats, text_field: str, example: str | None) -> str:
    """Why the sample is empty when records were there: the config (usually data.text_field) is the fix."""
    reasons = []
    if stats.missing_text:
        reasons.append(f"{stats.missing_text} without a string field '{text_field}'")
    if stats.bad_records:
        reasons.append(f"{stats.bad_records} malformed JSON")
    fix = (
        "set data.text_field to the field that holds the text"
        if stats.missing_text
        else "the files must be JSON Lines, one object per line"
    )
    return (
        f"the corpus sample for the tokenizer holds no text: all {_skipped_records(stats)} records read were "
        f"skipped ({' and '.join(reasons)}, e.g. in {example}); {fix}"
    )


def sample_text(data: DataConfig, tokenizer: TokenizerConfig, units: list[WorkUnit] | None = None) -> list[str]:
    """A deterministic sample of about `tokenizer.sample_bytes`: whole units in a seeded order.

    Raises TokenizerTrainingError when no text was found because every record was skipped (a
    missing text field, malformed JSON): sentencepiece alone would report an empty corpus.
    """
    units = plan_units(data) if units is None else units

    def rank(unit: WorkUnit) -> bytes:
        return hashlib.sha256(f"{tokenizer.seed}:{unit.index}".encode()).digest()

    sample: list[str] = []
    held = 0
    stats = ReadStats()
    skipped_in: str | None = None  # the first file with a skipped record, for the error's example
    bar = tqdm(total=tokenizer.sample_bytes, unit="B", unit_scale=True, desc="tokenizer sample", leave=False)
    for segment in (segment for unit in sorted(units, key=rank) for segment in unit.segments):
        skipped_before = _skipped_records(stats)
        for doc in read_segment(segment, data, stats):
            sample.extend(_pieces(doc.text, tokenizer.max_sentence_bytes))
            size = len(doc.text.encode("utf-8"))
            held += size
            bar.update(size)
            if held >= tokenizer.sample_bytes:
                bar.close()
                return sample
        if skipped_in is None and _skipped_records(stats) > skipped_before:
            skipped_in = segment.path
    bar.close()
    if not sample and _skipped_records(stats):
        raise TokenizerTrainingError(_every_record_skipped(stats, data.text_field, skipped_in))
    return sample


def train_tokenizer(data: DataConfig, tokenizer: TokenizerConfig, out_dir: Path) -> Path:
    """Train sentencepiece on a sample of the corpus; writes tokenizer.model + tokenizer.json into out_dir."""
    out_dir = Path(out_dir)
    sample = sample_text(data, tokenizer)
    sample_bytes = sum(len(piece.encode("utf-8")) for piece in sample)
    print(f"training {tokenizer.model_type} tokenizer (vocab {tokenizer.vocab_size}) on {sample_bytes / 1e6:.1f} MB")
    started = time.perf_counter()
    with tqdm(total=1, desc="sentencepiece training", unit="model", leave=False) as bar:
        info = train_sentencepiece(sample, tokenizer, out_dir)
        bar.update(1)
    elapsed = time.perf_counter() - started
    print(f"tokenizer trained in {elapsed:.1f} s: vocab {info.vocab_size}, sha256 {info.model_sha256[:12]}")
    return out_dir


# --- one work unit ------------------------------------------------------------------------------


def _processor(tokenizer_dir: Path) -> tuple[Any, TokenizerInfo]:
    info = read_info(tokenizer_dir)
    if info.model_sha256 not in _processors:
        _processors[info.model_sha256] = load_tokenizer(tokenizer_dir)
    return _processors[info.model_sha256]


class _UnitWriter:
    """Batches documents per split, encodes a batch in one sentencepiece call, appends it to the split's shard."""

    def __init__(self, processor: Any, info: TokenizerInfo, out_dir: Path, index: int, batch_bytes: int) -> None:
        self.processor, self.info, self.out_dir, self.index = processor, info, out_dir, index
        self.batch_bytes, self.dtype = batch_bytes, token_dtype(info.vocab_size)
        self.pending: dict[str, list[str]] = {split: [] for split in SPLITS}
        self.pending_chars = {split: 0 for split in SPLITS}  # against batch_bytes: characters, not UTF-8 bytes
        self.writers: dict[str, ShardWriter] = {}
        self.encode_s = self.write_s = 0.0

    def add(self, split: str, text: str) -> None:
        self.pending[split].append(text)
        self.pending_chars[split] += len(text)
        if self.pending_chars[split] >= self.batch_bytes:
            self.flush(split)

    def flush(self, split: str) -> None:
        texts = self.pending[split]
        if not texts:
            return
        started = time.perf_counter()
        encoded = self.processor.encode(texts, num_threads=1)  # one CPU per task: Ray schedules the parallelism
        lengths = np.fromiter((len(ids) + 1 for ids in encoded), np.int64, len(encoded))
        ends = np.cumsum(lengths)
        # Filled in place, a document at a time: np.fromiter over a plain list, straight into the shard's
        # dtype, is the fastest way found from Python ints to an array (16 ns a token against 20 into
        # int64, 24 chaining the eod onto each list, 35 for np.array of one flat list).
        values = np.empty(int(ends[-1]), self.dtype)
        for ids, end in zip(encoded, ends.tolist(), strict=True):
            values[end - 1 - len(ids) : end - 1] = np.fromiter(ids, self.dtype, len(ids))
        values[ends - 1] = self.info.eod_id
        self.encode_s += time.perf_counter() - started
        started = time.perf_counter()
        if split not in self.writers:
            self.writers[split] = ShardWriter(
                self.out_dir / shard_name(split, self.index), self.info, split
            ).__enter__()
        self.writers[split].write_flat(values, lengths)
        self.write_s += time.perf_counter() - started
        self.pending[split], self.pending_chars[split] = [], 0

    def close(self) -> list[dict[str, Any]]:
        records = []
        for split in SPLITS:
            self.flush(split)
            if split in self.writers:
                started = time.perf_counter()
                self.writers[split].__exit__(None, None, None)
                self.write_s += time.perf_counter() - started
                records.append(self.writers[split].record.__dict__)
        return records


def tokenize_unit(unit: WorkUnit, data: DataConfig, tokenizer_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Tokenize one unit into its shards, then write its record; returns the record (plus timings)."""
    out_dir = Path(out_dir)
    (out_dir / "units").mkdir(parents=True, exist_ok=True)
    processor, info = _processor(Path(tokenizer_dir))
    stats = ReadStats()
    writer = _UnitWriter(processor, info, out_dir, unit.index, data.batch_bytes)
    started, cpu_started, started_at = time.perf_counter(), time.process_time(), time.time()
    try:
        for segment in unit.segments:
            for doc in read_segment(segment, data, stats):
                writer.add(split_of(doc.id, data.val_fraction), doc.text)
        shards = writer.close()
    except BaseException:
        for shard in writer.writers.values():
            shard.__exit__(RuntimeError, None, None)  # drop temporary files
        raise
    record = {"unit": unit.to_json(), "tokenizer_sha256": info.model_sha256, "shards": shards, **stats.counters()}
    # One line: json's C encoder only runs without `indent` (the indented form cost ~1 % of a unit).
    write_atomic(record_path(out_dir, unit.index), (json.dumps(record) + "\n").encode())
    timing = {
        "seconds": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
        "encode_s": writer.encode_s,
        "write_s": writer.write_s,
        # Wall-clock ends and the process, so a caller can see each worker's idle time between units.
        "started_at": started_at,
        "finished_at": time.time(),
        "pid": os.getpid(),
    }
    return {**record, "timing": timing}


# --- in-process runner --------------------------------------------------------------------------


def tokenize_in_process(data: DataConfig, tokenizer_dir: Path, out_dir: Path) -> Path:
    """The tokenize stage in this process, unit by unit (same output as the Ray stage)."""
    out_dir = Path(out_dir)
    units = plan_units(data)
    info = read_info(tokenizer_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for unit in tqdm(units, desc="tokenize", unit="unit"):
        records.append(completed_record(unit, out_dir, info) or tokenize_unit(unit, data, tokenizer_dir, out_dir))
    remove_temporaries(out_dir)
    if summary := skipped_summary(write_manifest(out_dir, records, data, info)):
        print(summary)
    return out_dir
