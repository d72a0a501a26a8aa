"""Streaming corpus readers: the documents of one work-unit segment, with bad-input counters.

    stats = ReadStats()
    for doc in read_segment(segment, DataConfig(paths=["corpus/"]), stats):
        doc.id, doc.text                     # "books/a.jsonl:17", "the text ..."

Formats: .txt (a file is a document, or `txt_split: blank_lines` makes each paragraph one),
.jsonl / .jsonl.zst / .json.gz (one JSON object per line, text in `data.text_field`) and .parquet
(column `data.text_field`). Reading is streaming (line by line, or parquet batch by batch), so
memory stays flat on multi-GB files; only a single document is ever held whole. A UTF-8 byte-order
mark at the start of a file is dropped (editors on Windows write one). A `.json` file is read as JSON
Lines too. A JSON file (whatever its suffix) that opens a JSON array (`[{...}, ...]`) raises `CorpusError`
saying so: read line by line, its every line would be skipped as malformed.

Bad input never stops the stage silently: invalid UTF-8 is replaced (U+FFFD) and counted, empty
files and whitespace-only documents are skipped and counted, and a malformed JSON line or a record
without the text field is skipped and counted, or raises `BadRecordError` naming file:line when
`data.on_bad_record` is `fail`. Neither error is retried by the pipeline's stage retries: the same
bytes fail the same way.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import BinaryIO

from tokenization.config import DataConfig
from tokenization.sources import CorpusError
from tokenization.units import Segment

log = logging.getLogger(__name__)
_PARQUET_BATCH_ROWS = 1024
_ZSTD_SLICE = 64 << 10
_WARN_LIMIT = 10  # skipped records reported per segment before going quiet (all are counted)
_BOM = b"\xef\xbb\xbf"
_HEAD_BYTES = 4096  # enough of a file's start to see whether it opens a JSON array


class BadRecordError(ValueError):
    """A record that cannot be read under `on_bad_record: fail`; the message starts with file:line."""

    retryable = False  # the same line fails the same way on another attempt (orchestration/dag.py)


@dataclass
class ReadStats:
    documents: int = 0  # documents yielded
    text_bytes: int = 0  # UTF-8 bytes of the yielded documents
    invalid_utf8_docs: int = 0  # documents in which invalid bytes were replaced by U+FFFD
    empty_files: int = 0  # files of zero bytes
    empty_docs: int = 0  # documents with no non-whitespace character, skipped
    bad_records: int = 0  # malformed JSON lines, skipped
    missing_text: int = 0  # records without a string text field, skipped
    warned: int = 0

    def counters(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "warned"}


@dataclass(frozen=True)
class Document:
    id: str  # file id + record position: "rel" (whole file) or "rel:N" (line N, or row N of parquet)
    text: str


def decode(raw: bytes, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8_docs += 1
        return raw.decode("utf-8", errors="replace")


def strip_bom(raw: bytes) -> bytes:
    """The bytes without a leading UTF-8 byte-order mark, which json.loads refuses and no text needs."""
    return raw[len(_BOM) :] if raw.startswith(_BOM) else raw


def _emit(doc_id: str, text: str, stats: ReadStats) -> Iterator[Document]:
    if not text.strip():
        stats.empty_docs += 1
        return
    stats.documents += 1
    stats.text_bytes += len(text.encode("utf-8"))
    yield Document(doc_id, text)


def _skip(where: str, problem: str, counter: str, data: DataConfig, stats: ReadStats) -> None:
    if data.on_bad_record == "fail":
        raise BadRecordError(f"{where}: {problem} (data.on_bad_record=fail)")
    setattr(stats, counter, getattr(stats, counter) + 1)
    if stats.warned < _WARN_LIMIT:
        stats.warned += 1
        log.warning("%s: %s; skipped (data.on_bad_record=skip)", where, problem)


def _zstd_chunks(path: str) -> Iterator[bytes]:
    """Decompressed chunks of a (multi-frame) zstd file; a truncated last frame raises EOFError.

    zstandard's stream_reader ends silently at a truncated frame, so frames are fed by hand.
    """
    import zstandard

    with open(path, "rb") as raw:
        frame, fed = zstandard.ZstdDecompressor().decompressobj(), False
        # small input slices bound the output of one call (text compresses ~3-10x; decompress has no limit)
        while chunk := raw.read(_ZSTD_SLICE):
            while chunk:
                fed = True
                if out := frame.decompress(chunk):
                    yield out
                chunk = b""
                if frame.eof:  # the next frame starts in unused_data
                    chunk = frame.unused_data
                    frame, fed = zstandard.ZstdDecompressor().decompressobj(), False
        if fed and not frame.eof:
            raise EOFError("truncated zstd frame at the end of the file")


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines (with their newline) from a stream of byte chunks; a long line is joined once."""
    partial: list[bytes] = []
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            partial.append(chunk[start : end + 1])
            yield b"".join(partial)
            partial, start = [], end + 1
        if start < len(chunk):
            partial.append(chunk[start:])
    if partial:
        yield b"".join(partial)


def _lines(segment: Segment) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of the segment's records; the file's first line loses a byte-order mark."""
    lines = _raw_lines(segment)
    if segment.start == 0:
        for line_no, line in lines:
            yield line_no, strip_bom(line)
            break
    yield from lines


def _raw_lines(segment: Segment) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of the segment's records, decompressing as a stream."""
    if segment.fmt == "jsonl.zst":
        yield from enumerate(_split_lines(_zstd_chunks(segment.path)), start=segment.first_record)
        return
    handle: BinaryIO = gzip.open(segment.path, "rb") if segment.fmt == "jsonl.gz" else open(segment.path, "rb")  # noqa: SIM115
    with handle:
        handle.seek(segment.start)
        position = segment.start
        for line_no, line in enumerate(handle, start=segment.first_record):
            yield line_no, line
            position += len(line)
            if segment.fmt in ("jsonl", "txt") and position >= segment.end:
                return


def _file_head(segment: Segment) -> bytes:
    """The first bytes of the segment's file, decompressed."""
    if segment.fmt == "jsonl.zst":
        chunks = _zstd_chunks(segment.path)
        try:
            return next(chunks, b"")[:_HEAD_BYTES]
        finally:
            chunks.close()  # closes the file now, not when the generator is collected
    opener = gzip.open if segment.fmt == "jsonl.gz" else open
    with opener(segment.path, "rb") as handle:
        return handle.read(_HEAD_BYTES)


def _refuse_json_array(segment: Segment, data: DataConfig) -> None:
    """A file holding one JSON array would otherwise be skipped line by line as malformed.

    JSON Lines records are objects, so a file that opens with `[` is an array whatever its name says
    (`.jsonl` included). Every segment of the file looks at the file's start: a later segment alone sees
    only lines like `  {`.
    """
    if strip_bom(_file_head(segment)).lstrip().startswith(b"["):
        raise CorpusError(
            f"{segment.path}: holds a JSON array, but JSON files are read as JSON Lines (one JSON object per "
            f"line, text in data.text_field '{data.text_field}'); convert it, e.g. jq -c '.[]' in.json > out.jsonl"
        )


def _json_problem(error: json.JSONDecodeError) -> str:
    """json's reason and column; its messages that end in "at" expect a position after them."""
    reason = re.sub(r"( starting)? at$", "", error.msg)
    return f"malformed JSON ({reason}, column {error.colno})"


def _read_jsonl(segment: Segment, data: DataConfig, stats: ReadStats) -> Iterator[Document]:
    _refuse_json_array(segment, data)
    for line_no, line in _lines(segment):
        where = f"{segment.path}:{line_no}"
        if not line.strip():
            stats.empty_docs += 1
            continue
        try:
            record = json.loads(decode(line, stats))
        except json.JSONDecodeError as exc:
            _skip(where, _json_problem(exc), "bad_records", data, stats)
            continue
        text = record.get(data.text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            _skip(where, f"record has no string field '{data.text_field}'", "missing_text", data, stats)
            continue
        yield from _emit(f"{segment.rel}:{line_no}", text, stats)


def _read_paragraphs(segment: Segment, stats: ReadStats) -> Iterator[Document]:
    paragraph: list[bytes] = []
    first_line = segment.first_record
    for line_no, line in _lines(segment):
        if line.strip():
            if not paragraph:
                first_line = line_no
            paragraph.append(line)
        elif paragraph:
            yield from _emit(f"{segment.rel}:{first_line}", decode(b"".join(paragraph), stats), stats)
            paragraph = []
    if paragraph:
        yield from _emit(f"{segment.rel}:{first_line}", decode(b"".join(paragraph), stats), stats)


def _read_parquet(segment: Segment, data: DataConfig, stats: ReadStats) -> Iterator[Document]:
    import pyarrow.parquet as pq

    row = segment.first_record
    parquet = pq.ParquetFile(segment.path)
    groups = list(range(segment.start, segment.end))
    batches = parquet.iter_batches(_PARQUET_BATCH_ROWS, row_groups=groups, columns=[data.text_field])
    for batch in batches:
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                _skip(
                    f"{segment.path}:row {row}", f"no string in column '{data.text_field}'", "missing_text", data, stats
                )
            else:
                yield from _emit(f"{segment.rel}:{row}", text, stats)
            row += 1


def read_segment(segment: Segment, data: DataConfig, stats: ReadStats) -> Iterator[Document]:
    """Documents of one segment in file order; counters go to `stats`.

    A file that cannot be read (truncated gzip, corrupt zstd or parquet, a JSON array in a JSON Lines file)
    raises CorpusError naming it.
    """
    import pyarrow as pa
    import zstandard

    try:
        yield from _read_segment(segment, data, stats)
    except (OSError, EOFError, zstandard.ZstdError, pa.ArrowException) as exc:
        error = CorpusError(f"{segment.path}: cannot be read as {segment.fmt} ({type(exc).__name__}: {exc})")
        # An error of the OS (errno set: EIO, a stale network mount) may pass on the stage's next attempt;
        # a corrupt or truncated file (gzip, zstd, parquet errors carry no errno) fails the same way again.
        error.retryable = isinstance(exc, OSError) and exc.errno is not None
        raise error from exc


def _read_segment(segment: Segment, data: DataConfig, stats: ReadStats) -> Iterator[Document]:
    if segment.fmt != "parquet" and segment.start == 0 and segment.end == 0:
        stats.empty_files += 1
        return
    if segment.fmt == "parquet":
        yield from _read_parquet(segment, data, stats)
    elif segment.fmt.startswith("jsonl"):
        yield from _read_jsonl(segment, data, stats)
    elif data.txt_split == "blank_lines":
        yield from _read_paragraphs(segment, stats)
    else:
        with open(segment.path, "rb") as handle:
            yield from _emit(segment.rel, decode(strip_bom(handle.read()), stats), stats)
