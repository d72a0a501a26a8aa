"""Deterministic work units: the corpus cut into pieces of about `unit_bytes`.

    units = plan_units(DataConfig(paths=["stdlib:"], unit_bytes=1 << 20))
    units[0].index, units[0].segments[0].rel, units[0].segments[0].start

Small files are grouped in path order until a unit holds `unit_bytes`; a large line-based file
(.jsonl, or .txt split on blank lines) is cut into byte ranges at record boundaries; a large
parquet file is cut at row groups; compressed files and whole-file documents are never cut. The
plan depends only on the files and the config, never on the number of workers, so unit `i` and
its shard names are the same on every run. Each segment carries the number of its first record
(line number, or row index for parquet) so document ids and error positions are file-global.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from tokenization.config import DataConfig
from tokenization.sources import CorpusError, SourceFile, resolve_sources

_SCAN_CHUNK = 8 << 20


@dataclass(frozen=True)
class Segment:
    rel: str  # id prefix of the file (path relative to the corpus root)
    path: str  # absolute path
    fmt: str  # reader format
    start: int  # first byte (or row group) of the segment
    end: int  # one past the last byte (or row group)
    first_record: int  # line number (1-based) or row index (0-based, parquet) at `start`


@dataclass(frozen=True)
class WorkUnit:
    index: int
    segments: tuple[Segment, ...]

    @property
    def bytes(self) -> int:
        return sum(seg.end - seg.start for seg in self.segments if seg.fmt != "parquet")

    def to_json(self) -> dict:
        """The unit as its record stores it: segments without the absolute path (the corpus may move).

        Spelled out rather than dataclasses.asdict, which deep-copies every field: on the stdlib corpus
        that was ~1 % of a unit's time, beside ~92 % in sentencepiece."""
        return {
            "index": self.index,
            "segments": [
                {"rel": s.rel, "fmt": s.fmt, "start": s.start, "end": s.end, "first_record": s.first_record}
                for s in self.segments
            ],
        }


def _splittable(source: SourceFile, data: DataConfig) -> bool:
    return source.fmt == "jsonl" or (source.fmt == "txt" and data.txt_split == "blank_lines")


def _count_newlines(handle, start: int, stop: int) -> int:
    handle.seek(start)
    count, left = 0, stop - start
    while left > 0:
        chunk = handle.read(min(_SCAN_CHUNK, left))
        if not chunk:
            break
        count += chunk.count(b"\n")
        left -= len(chunk)
    return count


def _next_boundary(handle, target: int, blank_lines: bool) -> tuple[int, int]:
    """(cut offset >= target at a record start, newlines between target-1 and the cut)."""
    handle.seek(target - 1)
    line = handle.readline()  # the rest of the line holding byte target-1 (just b"\n" if one ends there)
    cut, newlines = target - 1 + len(line), line.count(b"\n")
    while blank_lines:  # from this line start, a paragraph ends after the next whole blank line
        line = handle.readline()
        cut, newlines = cut + len(line), newlines + line.count(b"\n")
        if not line.strip():
            break
    return cut, newlines


def line_ranges(source: SourceFile, unit_bytes: int, blank_lines: bool) -> list[tuple[int, int, int]]:
    """Byte ranges (start, end, first_line) of about unit_bytes each, cut after a record's newline."""
    ranges: list[tuple[int, int, int]] = []
    start, line_no = 0, 1
    with open(source.path, "rb") as handle:
        while source.size - start > unit_bytes:
            target = start + unit_bytes
            skipped = _count_newlines(handle, start, target - 1)
            cut, newlines = _next_boundary(handle, target, blank_lines)
            if cut >= source.size:
                break
            ranges.append((start, cut, line_no))
            start, line_no = cut, line_no + skipped + newlines
    ranges.append((start, source.size, line_no))
    return ranges


def _parquet_ranges(source: SourceFile, data: DataConfig) -> list[tuple[int, int, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(source.path).metadata
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"{source.path}: not a readable parquet file ({exc})") from None
    if data.text_field not in meta.schema.names:
        raise CorpusError(f"{source.path}: no column '{data.text_field}' (data.text_field); has {meta.schema.names}")
    ranges, first, first_row, row, held = [], 0, 0, 0, 0
    for group in range(meta.num_row_groups):
        held += meta.row_group(group).total_byte_size
        row += meta.row_group(group).num_rows
        if held >= data.unit_bytes:
            ranges.append((first, group + 1, first_row))
            first, first_row, held = group + 1, row, 0
    if first < meta.num_row_groups or not ranges:
        ranges.append((first, meta.num_row_groups, first_row))
    return ranges


def _file_segments(source: SourceFile, data: DataConfig) -> list[Segment]:
    if source.fmt == "parquet":
        ranges = _parquet_ranges(source, data)
    elif _splittable(source, data) and source.size > data.unit_bytes:
        ranges = line_ranges(source, data.unit_bytes, data.txt_split == "blank_lines")
    else:
        ranges = [(0, source.size, 1)]
    return [Segment(source.rel, source.path, source.fmt, *r) for r in ranges]


def plan_units(data: DataConfig, sources: list[SourceFile] | None = None) -> list[WorkUnit]:
    """Cut the corpus into work units; every path is checked (CorpusError) before any work starts."""
    sources = resolve_sources(data.paths, data.root) if sources is None else sources
    groups: list[list[Segment]] = []
    pending: list[Segment] = []
    pending_bytes = 0
    for source in sources:
        segments = _file_segments(source, data)
        if len(segments) > 1 or source.size >= data.unit_bytes:
            if pending:
                groups.append(pending)
                pending, pending_bytes = [], 0
            groups.extend([seg] for seg in segments)
            continue
        pending.append(segments[0])
        pending_bytes += source.size
        if pending_bytes >= data.unit_bytes:
            groups.append(pending)
            pending, pending_bytes = [], 0
    if pending:
        groups.append(pending)
    return [WorkUnit(index, tuple(group)) for index, group in enumerate(groups)]


def split_of(doc_id: str, val_fraction: float) -> str:
    """'val' or 'train' from a stable hash of the document id: independent of workers and scheduling."""
    if val_fraction <= 0.0:
        return "train"
    draw = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "val" if draw < val_fraction else "train"
