"""The Arrow shard format: one row per document, `tokens: list<uint16>` (uint32 past 65,535 ids).

    with ShardWriter(out_dir / "train-000003.arrow", info) as writer:
        writer.write([np.array([17, 42, 0], np.uint16)])      # each document ends with eod (0)
    record = writer.record                                    # name, documents, tokens, sha256
    verify_shard(out_dir / record.name, record, info)         # ShardError naming the file if not

Arrow IPC *file* format, uncompressed, so a shard memory-maps with zero copies. The schema carries
the format version, the tokenizer's sha256, the vocab size and the eod id. A shard is written under
a temporary name and renamed when complete, so a crash never leaves a partial shard under its name;
the writer's output depends only on the documents, so reruns are byte-identical.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from tokenization.tokenizer import TokenizerInfo

FORMAT_VERSION = 1
_HASH_CHUNK = 8 << 20


_DAMAGED_ADVICE = (
    "A finished tokenize folder is never made again by itself: if it was damaged after tokenization, delete the "
    "folder and rerun to tokenize again"
)


class ShardError(ValueError):
    """A shard directory that is not what its manifest says (a shard missing, or differing in sha256 or
    schema), or has no manifest; names the file."""

    retryable = False  # the bytes on disk are wrong: another attempt reads the same (orchestration/dag.py)

    def __init__(self, message: str, advice: str = _DAMAGED_ADVICE) -> None:
        super().__init__(f"{message}. {advice}" if advice else message)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_metadata(info: TokenizerInfo) -> dict[bytes, bytes]:
    return {
        b"format_version": str(FORMAT_VERSION).encode(),
        b"tokenizer_sha256": info.model_sha256.encode(),
        b"vocab_size": str(info.vocab_size).encode(),
        b"eod_id": str(info.eod_id).encode(),
    }


def shard_schema(info: TokenizerInfo) -> pa.Schema:
    value_type = pa.from_numpy_dtype(token_dtype(info.vocab_size))
    return pa.schema([pa.field("tokens", pa.list_(value_type), nullable=False)], metadata=shard_metadata(info))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardRecord:
    name: str  # file name inside the output directory
    split: str
    documents: int
    tokens: int
    sha256: str
    bytes: int


class ShardWriter:
    """Streams record batches of documents into one shard; renames it into place on a clean exit."""

    def __init__(self, path: Path, info: TokenizerInfo, split: str = "train") -> None:
        self.path, self.split, self.schema = Path(path), split, shard_schema(info)
        self.dtype = token_dtype(info.vocab_size)
        self.value_type = pa.from_numpy_dtype(self.dtype)
        self.temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.documents = self.tokens = 0
        self.record: ShardRecord | None = None

    def __enter__(self) -> ShardWriter:
        self.sink = pa.OSFile(str(self.temporary), "wb")
        self.writer = pa.ipc.new_file(self.sink, self.schema)
        return self

    def write(self, documents: list[np.ndarray]) -> None:
        """One record batch; each array is a document's ids, eod included."""
        if not documents:
            return
        lengths = np.fromiter((len(doc) for doc in documents), np.int64, len(documents))
        self.write_flat(np.concatenate(documents), lengths)

    def write_flat(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """One record batch of len(lengths) documents laid end to end in `values` (eods included)."""
        if not len(lengths):
            return
        offsets = np.zeros(len(lengths) + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.ascontiguousarray(values, dtype=self.dtype)
        # from_buffers, not pa.array: no pandas import in workers, no copies
        value_array = pa.Array.from_buffers(self.value_type, len(values), [None, pa.py_buffer(values)])
        list_type = self.schema.field(0).type
        tokens = pa.ListArray.from_buffers(
            list_type, len(lengths), [None, pa.py_buffer(offsets)], children=[value_array]
        )
        self.writer.write_batch(pa.record_batch([tokens], schema=self.schema))
        self.documents += len(lengths)
        self.tokens += int(offsets[-1])

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.record is not None or not self.temporary.exists():
            return  # already closed (a unit's cleanup may call this a second time)
        self.writer.close()
        self.sink.close()
        if exc_type is not None:
            self.temporary.unlink(missing_ok=True)
            return
        with open(self.temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self.temporary, self.path)
        self.record = ShardRecord(
            self.path.name, self.split, self.documents, self.tokens, sha256_file(self.path), self.path.stat().st_size
        )


def verify_shard(path: Path, expected: ShardRecord | dict, info: TokenizerInfo | None = None) -> None:
    """Raise ShardError naming `path` when it is missing or its sha256 or schema differs from `expected`."""
    want = expected if isinstance(expected, dict) else expected.__dict__
    if not Path(path).is_file():
        raise ShardError(f"shard {path} is missing (listed with sha256 {want['sha256'][:12]})")
    digest = sha256_file(Path(path))
    if digest != want["sha256"]:
        raise ShardError(f"shard {path}: sha256 {digest[:12]} differs from the manifest's {want['sha256'][:12]}")
    if info is not None:
        schema, wanted = read_schema(Path(path)), shard_schema(info)
        if not schema.equals(wanted, check_metadata=True):
            found = {key.decode(): value.decode() for key, value in (schema.metadata or {}).items()}
            expect = {key.decode(): value.decode() for key, value in (wanted.metadata or {}).items()}
            diff = {key: (found.get(key), expect[key]) for key in expect if found.get(key) != expect[key]}
            if schema.types != wanted.types:
                diff["types"] = (str(schema.types), str(wanted.types))
            raise ShardError(f"shard {path}: schema differs from the manifest (found, expected): {diff}")


def read_schema(path: Path) -> pa.Schema:
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).schema
    except pa.ArrowInvalid as exc:
        raise ShardError(f"shard {path} is not an Arrow IPC file: {exc}") from None


def open_tokens(path: Path) -> list[np.ndarray]:
    """Zero-copy views of a shard's flat token stream, one per record batch."""
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)
        return [
            reader.get_batch(i).column(0).flatten().to_numpy(zero_copy_only=True)
            for i in range(reader.num_record_batches)
        ]
    except pa.ArrowInvalid as exc:
        raise ShardError(f"shard {path} cannot be read: {exc}") from None


def shard_record_from_dict(record: dict) -> ShardRecord:
    return ShardRecord(**{key: record[key] for key in ShardRecord.__dataclass_fields__})
