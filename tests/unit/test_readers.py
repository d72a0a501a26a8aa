"""Corpus readers and work units: every format, record-boundary cuts, streaming memory, bad input."""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tokenization.config import DataConfig
from tokenization.readers import BadRecordError, ReadStats, read_segment
from tokenization.sources import CorpusError, resolve_sources
from tokenization.units import plan_units

TEXTS = ["first doc\n  indented\ttab", "second: 世界 😀", "third\n\n\nwith blank lines inside"]


def read_all(data: DataConfig) -> tuple[list[tuple[str, str]], ReadStats]:
    stats = ReadStats()
    docs = [
        (doc.id, doc.text)
        for unit in plan_units(data)
        for seg in unit.segments
        for doc in read_segment(seg, data, stats)
    ]
    return docs, stats


def jsonl_bytes(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": text, "meta": i}) + "\n" for i, text in enumerate(texts)).encode()


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst", ".json.gz", ".parquet"])
def test_record_formats_give_the_same_documents(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.table({"text": TEXTS}), path)
    else:
        payload = jsonl_bytes(TEXTS)
        compress = {".jsonl": bytes, ".jsonl.zst": zstandard.ZstdCompressor().compress, ".json.gz": gzip.compress}
        path.write_bytes(compress[suffix](payload))
    docs, stats = read_all(DataConfig(paths=[str(path)]))
    assert [text for _, text in docs] == TEXTS
    first = 0 if suffix == ".parquet" else 1  # parquet rows count from 0, lines from 1
    assert [doc_id for doc_id, _ in docs] == [f"corpus{suffix}:{first + i}" for i in range(3)]
    assert stats.documents == 3 and stats.bad_records == 0


def test_parquet_ids_are_file_rows_past_skipped_rows(tmp_path: Path) -> None:
    """A row without text is skipped and counted, and the rows after it keep their own row numbers as ids."""
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "f.parquet")
    docs, stats = read_all(DataConfig(paths=[str(tmp_path / "f.parquet")]))
    assert docs == [("f.parquet:0", "a"), ("f.parquet:2", "b")] and stats.missing_text == 1


def test_txt_whole_file_and_blank_line_split(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("para one\nline two\n\n\npara two\n   \npara three")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("other file")
    whole, _ = read_all(DataConfig(paths=[str(tmp_path)]))
    assert whole == [("a.txt", "para one\nline two\n\n\npara two\n   \npara three"), ("sub/b.txt", "other file")]
    split, _ = read_all(DataConfig(paths=[str(tmp_path)], txt_split="blank_lines"))
    assert split == [
        ("a.txt:1", "para one\nline two\n"),
        ("a.txt:5", "para two\n"),
        ("a.txt:7", "para three"),
        ("sub/b.txt:1", "other file"),
    ]


@pytest.mark.parametrize("unit_bytes", [1, 7, 64, 1000, 1 << 20])
def test_cuts_fall_on_record_boundaries_and_ids_do_not_move(tmp_path: Path, unit_bytes: int) -> None:
    texts = [f"doc {i} " + "x" * (i * 13 % 50) for i in range(60)]
    (tmp_path / "big.jsonl").write_bytes(jsonl_bytes(texts))
    (tmp_path / "paras.txt").write_text("\n\n".join(texts) + "\n")
    data = DataConfig(paths=[str(tmp_path)], unit_bytes=unit_bytes, txt_split="blank_lines")
    docs, _ = read_all(data)
    reference, _ = read_all(data.model_copy(update={"unit_bytes": 1 << 30}))
    assert docs == reference
    assert [text for doc_id, text in docs if doc_id.startswith("big")] == texts
    assert [text.rstrip("\n") for doc_id, text in docs if doc_id.startswith("paras")] == texts
    if unit_bytes < 100:
        assert len(plan_units(data)) > 10


def test_stdlib_corpus_is_the_standard_library_without_tests() -> None:
    files = resolve_sources(["stdlib:"])
    assert len(files) > 500 and all(f.rel.startswith("stdlib:") and f.rel.endswith(".py") for f in files)
    assert not any("site-packages" in f.rel or "/test/" in f"/{f.rel[7:]}" for f in files)
    assert any(f.rel == "stdlib:json/__init__.py" for f in files)


def test_nonexistent_path_is_named_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("fine")
    missing = tmp_path / "nope" / "*.jsonl"
    with pytest.raises(CorpusError, match="nope"):
        plan_units(DataConfig(paths=[str(tmp_path / "ok.txt"), str(missing)]))


def test_hidden_files_and_folders_of_a_corpus_folder_are_left_out(tmp_path: Path) -> None:
    corpus = tmp_path / ".corpora" / "books"  # a hidden folder above the one named is fine
    for rel in ("a.txt", "sub/b.txt", ".git/notes.txt", ".cache/c.jsonl", ".draft.txt", "sub/.old/d.txt"):
        (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
        (corpus / rel).write_text("text")
    assert [source.rel for source in resolve_sources([str(corpus)])] == ["a.txt", "sub/b.txt"]


def test_a_symlinked_file_is_read_from_its_target_and_a_symlinked_folder_is_not_entered(tmp_path: Path) -> None:
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    for path in (corpus / "a.txt", corpus / "sub" / "b.txt", elsewhere / "c.txt", elsewhere / "d" / "e.txt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("text")
    (corpus / "c.txt").symlink_to(elsewhere / "c.txt")
    (corpus / "d").symlink_to(elsewhere / "d", target_is_directory=True)
    sources = resolve_sources([str(corpus)])
    assert [source.path for source in sources] == [
        str(corpus / "a.txt"),
        str(corpus / "sub" / "b.txt"),
        str(elsewhere / "c.txt"),
    ]


def test_a_folder_without_corpus_files_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(CorpusError, match=r"the folder '.*' holds no corpus file \(known suffixes: .*\.txt"):
        plan_units(DataConfig(paths=[str(tmp_path)]))


def test_invalid_utf8_is_replaced_and_counted(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe bytes")
    line = b'{"text": "caf\xe9 au lait"}\n'
    (tmp_path / "bad.jsonl").write_bytes(line + b'{"text": "clean"}\n')
    docs, stats = read_all(DataConfig(paths=[str(tmp_path)]))
    assert dict(docs) == {
        "bad.jsonl:1": "caf\ufffd au lait",
        "bad.jsonl:2": "clean",
        "bad.txt": "ok \ufffd\ufffd bytes",
    }
    assert stats.invalid_utf8_docs == 2


def test_empty_files_and_documents_are_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    (tmp_path / "docs.jsonl").write_text('{"text": ""}\n\n{"text": "  "}\n{"text": "real"}\n')
    docs, stats = read_all(DataConfig(paths=[str(tmp_path)]))
    assert docs == [("docs.jsonl:4", "real")]
    assert (stats.empty_files, stats.empty_docs, stats.documents) == (1, 4, 1)


def test_malformed_json_and_missing_field_skip_or_fail_with_file_line(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n{"body": "no text"}\n["list"]\n{"text": 5}\n{"text": "c"}\n')
    docs, stats = read_all(DataConfig(paths=[str(path)]))
    assert docs == [("mixed.jsonl:1", "a"), ("mixed.jsonl:6", "c")]
    assert (stats.bad_records, stats.missing_text) == (1, 3)
    with pytest.raises(BadRecordError, match=rf"{path}:2: malformed JSON"):
        read_all(DataConfig(paths=[str(path)], on_bad_record="fail"))
    path.write_text('{"text": "a"}\n{"body": "no text"}\n')
    with pytest.raises(BadRecordError, match=rf"{path}:2: record has no string field 'text'"):
        read_all(DataConfig(paths=[str(path)], on_bad_record="fail"))


def test_parquet_without_the_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(CorpusError, match=r"t\.parquet: no column 'text'"):
        plan_units(DataConfig(paths=[str(path)]))


def test_parquet_row_groups_become_units(tmp_path: Path) -> None:
    texts = [f"row {i} " + "y" * 200 for i in range(100)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet", row_group_size=10)
    data = DataConfig(paths=[str(tmp_path)], unit_bytes=2000)
    assert len(plan_units(data)) > 3
    docs, _ = read_all(data)
    assert [text for _, text in docs] == texts and docs[42][0] == "t.parquet:42"


def test_a_single_50mb_line(tmp_path: Path) -> None:
    long_text = "word " * (10 << 20)  # 50 MB in one JSON line, far over unit_bytes
    (tmp_path / "long.jsonl").write_text(
        json.dumps({"text": "before"}) + "\n" + json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "after"})
    )
    data = DataConfig(paths=[str(tmp_path)], unit_bytes=1 << 20)
    units = plan_units(data)
    assert len(units) == 2  # the cut after "before" and no cut inside the long line
    docs, stats = read_all(data)
    assert [doc_id for doc_id, _ in docs] == ["long.jsonl:1", "long.jsonl:2", "long.jsonl:3"]
    assert docs[1][1] == long_text and stats.documents == 3


def write_big(path: Path, lines: int) -> None:
    words = random.Random(0).choices(
        ["stream", "flat", "memory", "token", "shard", "unit", "ray", "byte"], k=lines * 150
    )
    records = (json.dumps({"text": " ".join(words[i * 150 : (i + 1) * 150])}) for i in range(lines))
    payload = "".join(record + "\n" for record in records).encode()  # ~1 KB a line, compresses like text
    if path.name.endswith(".zst"):
        payload = zstandard.ZstdCompressor().compress(payload)
    elif path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=1)
    path.write_bytes(payload)


@pytest.mark.parametrize("name", ["big.jsonl", "big.jsonl.zst", "big.json.gz"])
def test_reading_streams_with_flat_memory(tmp_path: Path, name: str) -> None:
    lines = 20_000  # ~20 MB of text
    write_big(tmp_path / name, lines)
    data = DataConfig(paths=[str(tmp_path)], unit_bytes=1 << 30)
    (segment,) = plan_units(data)[0].segments
    stats = ReadStats()
    tracemalloc.start()
    count = sum(1 for _ in read_segment(segment, data, stats))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == lines
    assert peak < 4 << 20, f"peak Python memory {peak / 1e6:.1f} MB while streaming ~20 MB"


@pytest.mark.parametrize("name", ["cut.json.gz", "cut.jsonl.zst", "cut.parquet"])
def test_a_truncated_compressed_file_is_named(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"text": ["x" * 1000] * 50}), path)
    else:
        write_big(path, 2000)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorpusError, match=name):
        read_all(DataConfig(paths=[str(path)]))


def test_multi_frame_zstd_is_read_to_the_end(tmp_path: Path) -> None:
    compressor = zstandard.ZstdCompressor()
    frames = compressor.compress(jsonl_bytes(TEXTS[:2])) + compressor.compress(jsonl_bytes(TEXTS[2:]))
    (tmp_path / "frames.jsonl.zst").write_bytes(frames)
    docs, _ = read_all(DataConfig(paths=[str(tmp_path)]))
    assert [text for _, text in docs] == TEXTS


def test_stdlib_corpus_skips_site_packages_and_tests_at_any_depth(tmp_path, monkeypatch):
    """`stdlib:` is the stdlib's own modules: installed packages and test suites are never walked into."""
    import sysconfig

    from tokenization import sources

    for rel in ("os.py", "json/decoder.py", "site-packages/pkg/mod.py", "test/test_os.py", "json/tests/x.py",
                "idlelib/idle_test/y.py", "json/test/z.py", "json/__pycache__/decoder.py", "notes.txt"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    root, files = sources.stdlib_files()
    assert root == tmp_path.resolve()
    assert [path.relative_to(root).as_posix() for path in files] == [
        "idlelib/idle_test/y.py",
        "json/decoder.py",
        "json/tests/x.py",
        "os.py",
    ]


def test_a_units_record_holds_every_segment_field_but_the_absolute_path(tmp_path: Path) -> None:
    """WorkUnit.to_json is spelled out for speed: it must keep up with Segment's fields (resume compares it)."""
    (tmp_path / "a.txt").write_text("one\n")
    (tmp_path / "b.txt").write_text("two\n")
    (unit,) = plan_units(DataConfig(paths=[str(tmp_path)], unit_bytes=1 << 20))
    expected = [{k: v for k, v in dataclasses.asdict(s).items() if k != "path"} for s in unit.segments]
    assert unit.to_json() == {"index": 0, "segments": expected}
    assert [list(s) for s in unit.to_json()["segments"]] == [list(s) for s in expected]  # same key order


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.json.gz", "bom.jsonl.zst", "bom.txt"])
def test_a_byte_order_mark_at_the_start_of_a_file_is_dropped(tmp_path: Path, name: str) -> None:
    payload = b"\xef\xbb\xbf" + (b"first line" if name.endswith(".txt") else jsonl_bytes(TEXTS))
    compress = {".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress}.get(Path(name).suffix, bytes)
    (tmp_path / name).write_bytes(compress(payload))
    docs, stats = read_all(DataConfig(paths=[str(tmp_path / name)]))
    assert [text for _, text in docs] == (["first line"] if name.endswith(".txt") else TEXTS)
    assert stats.bad_records == 0


def test_a_byte_order_mark_is_dropped_when_paragraphs_are_documents(tmp_path: Path) -> None:
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfpara one\n\npara two\n")
    docs, _ = read_all(DataConfig(paths=[str(tmp_path)], txt_split="blank_lines"))
    assert docs == [("bom.txt:1", "para one\n"), ("bom.txt:3", "para two\n")]


@pytest.mark.parametrize(
    ("name", "indent"),
    [("array.json", 2), ("array.json.gz", 2), ("array.json.zst", 2), ("array.jsonl", 2), ("array.jsonl", None)],
)
def test_a_json_array_in_any_json_file_is_named_as_not_json_lines(tmp_path: Path, name: str, indent: int) -> None:
    """Whatever the suffix: a `.jsonl` holding an array, on one line or many, is no JSON Lines either."""
    payload = json.dumps([{"text": text} for text in TEXTS], indent=indent).encode()
    compress = {".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress}.get(Path(name).suffix, bytes)
    (tmp_path / name).write_bytes(compress(b"\n  " + payload))
    with pytest.raises(CorpusError, match=rf"{name}: holds a JSON array.*JSON Lines \(one JSON object per line"):
        read_all(DataConfig(paths=[str(tmp_path / name)]))


def test_a_json_array_is_named_from_every_segment_of_a_large_file(tmp_path: Path) -> None:
    """A later segment alone holds only lines like `  {`: it looks at the file's start too."""
    (tmp_path / "array.json").write_text(json.dumps([{"text": f"doc {i}"} for i in range(200)], indent=2))
    data = DataConfig(paths=[str(tmp_path)], unit_bytes=500)
    last = plan_units(data)[-1].segments[-1]
    assert last.start > 0
    with pytest.raises(CorpusError, match="holds a JSON array"):
        list(read_segment(last, data, ReadStats()))


def test_malformed_json_names_the_reason_and_column_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "tab\there"}\n{"text": "open\n')
    with pytest.raises(BadRecordError, match=rf"{path}:2: malformed JSON \(Invalid control character, column 14\)"):
        read_all(DataConfig(paths=[str(path)], on_bad_record="fail"))
    path.write_text('{"text": "open')  # the last line, without a newline (itself a control character)
    with pytest.raises(BadRecordError, match=r"bad\.jsonl:1: malformed JSON \(Unterminated string, column 10\)"):
        read_all(DataConfig(paths=[str(path)], on_bad_record="fail"))


def test_bad_records_and_unreadable_corpora_are_not_retried(tmp_path: Path) -> None:
    """The stage retries (orchestration/dag.py) would read the same bytes and fail the same way."""
    from orchestration.dag import retryable

    (tmp_path / "bad.jsonl").write_text('{"text": "a"\n')
    with pytest.raises(BadRecordError) as bad_record:
        read_all(DataConfig(paths=[str(tmp_path / "bad.jsonl")], on_bad_record="fail"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(CorpusError) as no_column:
        plan_units(DataConfig(paths=[str(tmp_path / "t.parquet")]))
    (tmp_path / "cut.json.gz").write_bytes(gzip.compress(jsonl_bytes(TEXTS * 100))[:200])
    with pytest.raises(CorpusError) as truncated:
        read_all(DataConfig(paths=[str(tmp_path / "cut.json.gz")]))
    assert not any(retryable(error.value) for error in (bad_record, no_column, truncated))


def test_a_file_that_vanishes_after_planning_may_be_retried(tmp_path: Path) -> None:
    """An error of the OS (errno set) is not the file's content: another attempt may succeed."""
    from orchestration.dag import retryable

    (tmp_path / "gone.jsonl").write_bytes(jsonl_bytes(TEXTS))
    data = DataConfig(paths=[str(tmp_path)])
    segment = plan_units(data)[0].segments[0]
    (tmp_path / "gone.jsonl").unlink()
    with pytest.raises(CorpusError, match="gone.jsonl") as vanished:
        list(read_segment(segment, data, ReadStats()))
    assert retryable(vanished.value)


def test_a_missing_relative_path_says_where_it_was_looked_for(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    message = rf"'corpus\.jsonl' does not exist .* \(relative paths are read from the current directory, {tmp_path}\)"
    with pytest.raises(CorpusError, match=message):
        plan_units(DataConfig(paths=["corpus.jsonl"]))
    with pytest.raises(CorpusError, match=r"matches no file$"):
        plan_units(DataConfig(paths=[str(tmp_path / "corpus.jsonl")]))


def test_paths_joined_by_a_comma_are_shown_as_the_list_they_meant(tmp_path: Path) -> None:
    """`data.paths=/a,/b` on the command line is one YAML string; the error shows the list spelling."""
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_bytes(jsonl_bytes(TEXTS))
    joined = f"{tmp_path}/a.jsonl,{tmp_path}/b.jsonl"
    hint = rf"several paths are a YAML list: data.paths='\[{tmp_path}/a.jsonl, {tmp_path}/b.jsonl\]'$"
    with pytest.raises(CorpusError, match=hint):
        plan_units(DataConfig(paths=[joined]))
