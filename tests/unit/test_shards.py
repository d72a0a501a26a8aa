"""Arrow shards, the manifest and the token dataset, via the in-process tokenize stage."""

from __future__ import annotations

import json
import os
import pickle
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data_stages import tokenize_in_process, train_tokenizer
from tokenization.config import DataConfig, TokenizerConfig
from tokenization.dataset import TokenDataset
from tokenization.manifest import read_manifest, skipped_summary
from tokenization.readers import ReadStats, read_segment
from tokenization.shards import ShardError, ShardWriter, open_tokens, read_schema, verify_shard
from tokenization.tokenizer import TokenizerInfo, load_tokenizer
from tokenization.units import plan_units, split_of

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DATA = DataConfig(paths=[str(STDLIB / "json"), str(STDLIB / "email")], unit_bytes=48 << 10, val_fraction=0.2)


def fake_info(vocab_size: int) -> TokenizerInfo:
    return TokenizerInfo("ab" * 32, vocab_size, 0, 1, 2, "bpe", {})


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stage")
    tokenizer_dir = train_tokenizer(DATA, TokenizerConfig(vocab_size=400, sample_bytes=128 << 10), root / "tok")
    return tokenizer_dir, tokenize_in_process(DATA, tokenizer_dir, root / "shards")


@pytest.mark.parametrize(("vocab_size", "dtype"), [(400, pa.uint16()), (65536, pa.uint16()), (70000, pa.uint32())])
def test_shard_round_trip_and_dtype(tmp_path: Path, vocab_size: int, dtype: pa.DataType) -> None:
    docs = [np.array([5, 6, 7, 0]), np.array([vocab_size - 1, 0]), np.array([0])]
    with ShardWriter(tmp_path / "s.arrow", fake_info(vocab_size)) as writer:
        writer.write(docs[:2])
        writer.write(docs[2:])
    schema = read_schema(tmp_path / "s.arrow")
    assert schema.field("tokens").type == pa.list_(dtype)
    assert schema.metadata[b"eod_id"] == b"0" and schema.metadata[b"vocab_size"] == str(vocab_size).encode()
    assert np.concatenate(open_tokens(tmp_path / "s.arrow")).tolist() == np.concatenate(docs).tolist()
    assert (writer.record.documents, writer.record.tokens) == (3, 7)
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"


def test_shards_are_byte_identical_when_rewritten(tmp_path: Path) -> None:
    for name in ("a.arrow", "b.arrow"):
        with ShardWriter(tmp_path / name, fake_info(400)) as writer:
            writer.write([np.arange(1, 50), np.array([3, 0])])
    assert (tmp_path / "a.arrow").read_bytes() == (tmp_path / "b.arrow").read_bytes()


def test_a_failed_write_leaves_no_shard(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "s.arrow", fake_info(400)) as writer:
        writer.write([np.array([1, 0])])
        raise RuntimeError("worker died")
    assert list(tmp_path.iterdir()) == []


def test_a_shard_appears_only_whole_fsynced_then_renamed(tmp_path: Path, monkeypatch) -> None:
    """A kill -9 mid-write leaves a temporary file, never a torn shard under its final name."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recorded_replace(source: Path, target: Path) -> None:
        events.append(("replace", str(source), str(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    path = tmp_path / "s.arrow"
    with ShardWriter(path, fake_info(400)) as writer:
        writer.write([np.array([1, 2, 0])])
        (temporary,) = tmp_path.glob(".*.tmp")
        assert not path.exists()
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))
    assert events == [("fsync", str(temporary)), ("replace", str(temporary), str(path))]


def test_every_document_is_its_sentencepiece_encoding_plus_eod(stage: tuple[Path, Path]) -> None:
    tokenizer_dir, shard_dir = stage
    processor, info = load_tokenizer(tokenizer_dir)
    expected: dict[str, list[list[int]]] = {"train": [], "val": []}
    for unit in plan_units(DATA):
        for segment in unit.segments:
            for doc in read_segment(segment, DATA, ReadStats()):
                expected[split_of(doc.id, DATA.val_fraction)].append(processor.encode(doc.text) + [info.eod_id])
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    for split in ("train", "val"):
        rows = []
        for shard in (s for s in manifest["shards"] if s["split"] == split):
            with pa.memory_map(str(shard_dir / shard["name"])) as source:
                rows += pa.ipc.open_file(source).read_all().column("tokens").to_pylist()
        assert rows == expected[split] and len(rows) == manifest["totals"][split]["documents"] > 0


def test_manifest_lists_shards_units_and_totals(stage: tuple[Path, Path]) -> None:
    tokenizer_dir, shard_dir = stage
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    _, info = load_tokenizer(tokenizer_dir)
    assert manifest["tokenizer"]["sha256"] == info.model_sha256 and manifest["token_dtype"] == "uint16"
    assert manifest["data_config"] == DATA.model_dump(mode="json")
    assert [unit["index"] for unit in manifest["units"]] == list(range(len(plan_units(DATA))))
    for shard in manifest["shards"]:
        verify_shard(shard_dir / shard["name"], shard, info)
    tokens = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "train")
    assert manifest["totals"]["train"]["tokens"] == tokens == TokenDataset(shard_dir).num_tokens


def test_dataset_windows_cross_shard_boundaries(stage: tuple[Path, Path]) -> None:
    _, shard_dir = stage
    dataset = TokenDataset(shard_dir)
    assert len(dataset.shards) > 2 and dataset.eod_id == 0 and dataset.vocab_size == 400
    flat = np.concatenate([np.concatenate(open_tokens(shard_dir / s["name"])) for s in dataset.shards]).astype(np.int64)
    assert len(flat) == dataset.num_tokens
    first_shard_tokens = dataset.shards[0]["tokens"]
    for start, length in [(0, 10), (first_shard_tokens - 5, 11), (dataset.num_tokens - 7, 7), (3, 20_000)]:
        window = dataset.window(start, length)
        assert window.dtype == np.int64 and np.array_equal(window, flat[start : start + length])
    with pytest.raises(IndexError):
        dataset.window(dataset.num_tokens - 3, 4)
    assert TokenDataset(shard_dir, split="val").num_tokens > 0
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(pickle.dumps(dataset)) < 1000 and np.array_equal(clone.window(5, 300), dataset.window(5, 300))


def test_a_corrupted_shard_is_named(stage: tuple[Path, Path], tmp_path: Path) -> None:
    _, shard_dir = stage
    copy = tmp_path / "shards"
    copy.mkdir()
    for path in shard_dir.glob("*.*"):
        (copy / path.name).write_bytes(path.read_bytes())
    victim = sorted(copy.glob("train-*.arrow"))[1]
    payload = bytearray(victim.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    victim.write_bytes(bytes(payload))
    with pytest.raises(ShardError, match=victim.name) as damaged:
        TokenDataset(copy)
    assert "delete the folder and rerun to tokenize again" in str(damaged.value) and not damaged.value.retryable
    victim.unlink()
    with pytest.raises(ShardError, match=f"{victim.name} is missing"):
        TokenDataset(copy)


def test_a_schema_that_differs_from_the_manifest_is_named(stage: tuple[Path, Path], tmp_path: Path) -> None:
    _, shard_dir = stage
    copy = tmp_path / "shards"
    copy.mkdir()
    for path in shard_dir.glob("*.*"):
        (copy / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64  # shards were written with another tokenizer
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"train-\d+\.arrow: schema differs .*tokenizer_sha256"):
        TokenDataset(copy)


def test_bad_input_is_counted_in_the_manifest(tmp_path: Path, stage: tuple[Path, Path]) -> None:
    tokenizer_dir, _ = stage
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "latin1.txt").write_bytes("caf\xe9 crème".encode("latin-1"))
    (corpus / "docs.jsonl").write_text('{"text": "good"}\n{"text": \n{"other": 1}\n{"text": " "}\n')
    data = DataConfig(paths=[str(corpus)])
    totals = json.loads((tokenize_in_process(data, tokenizer_dir, tmp_path / "out") / "manifest.json").read_text())
    counts = {key: totals["totals"][key] for key in ("documents", "invalid_utf8_docs", "empty_files", "empty_docs")}
    assert counts == {"documents": 2, "invalid_utf8_docs": 1, "empty_files": 1, "empty_docs": 1}
    assert (totals["totals"]["bad_records"], totals["totals"]["missing_text"]) == (1, 1)


def test_resume_redoes_only_units_without_a_valid_shard(stage: tuple[Path, Path], tmp_path: Path) -> None:
    tokenizer_dir, shard_dir = stage
    copy = tmp_path / "shards"
    (copy / "units").mkdir(parents=True)
    for path in shard_dir.rglob("*.*"):
        (copy / path.relative_to(shard_dir)).write_bytes(path.read_bytes())
    (copy / "manifest.json").unlink()  # as after a kill: units done, manifest not yet written
    victim = sorted(copy.glob("train-*.arrow"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])  # torn (as if written without the atomic rename)
    unit_of_victim = int(victim.stem.split("-")[1])
    records = {path.name: path.stat().st_mtime_ns for path in (copy / "units").iterdir()}
    tokenize_in_process(DATA, tokenizer_dir, copy)
    redone = {path.name for path in (copy / "units").iterdir() if path.stat().st_mtime_ns != records[path.name]}
    assert redone == {f"unit-{unit_of_victim:06d}.json"}
    assert {p.name: p.read_bytes() for p in copy.rglob("*.*")} == {
        p.name: p.read_bytes() for p in shard_dir.rglob("*.*")
    }


def test_a_unit_whose_corpus_part_changed_is_tokenized_again(stage: tuple[Path, Path], tmp_path: Path) -> None:
    """A finished unit is reused only for the same piece of the same corpus: after the file grows, a rerun
    in the same folder equals a fresh run over the new corpus."""
    tokenizer_dir, _ = stage
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)))
    data = DataConfig(paths=[str(corpus)])
    tokenize_in_process(data, tokenizer_dir, tmp_path / "out")
    with corpus.open("a") as handle:
        handle.write(json.dumps({"text": "one more"}) + "\n")
    tokenize_in_process(data, tokenizer_dir, tmp_path / "out")
    tokenize_in_process(data, tokenizer_dir, tmp_path / "fresh")
    assert read_manifest(tmp_path / "out")["totals"]["documents"] == 21
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*.*")} == {
        p.name: p.read_bytes() for p in (tmp_path / "fresh").rglob("*.*")
    }


def test_the_stage_ends_with_what_reading_skipped(stage: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    """The counts are in the manifest; the warnings mid-run are few and buried under progress bars."""
    tokenizer_dir, _ = stage
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "posts.jsonl").write_text(
        "".join(json.dumps({"content": f"post {i}"}) + "\n" for i in range(60)) + '{"content": "a"\n\n'
    )
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "latin1.txt").write_bytes(b"caf\xe9")
    data = DataConfig(paths=[str(corpus)], text_field="content")
    shard_dir = tokenize_in_process(data, tokenizer_dir, tmp_path / "shards")
    line = "tokenize: 2 records skipped (1 malformed JSON, see data.on_bad_record; 1 empty or whitespace only), "
    line += "1 empty files skipped, 1 documents with invalid UTF-8 kept with U+FFFD in place of the bad bytes"
    assert skipped_summary(read_manifest(shard_dir)) == line
    assert capsys.readouterr().out.splitlines()[-1] == line
    data = data.model_copy(update={"text_field": "text"})
    shard_dir = tokenize_in_process(data, tokenizer_dir, tmp_path / "other")
    assert skipped_summary(read_manifest(shard_dir)).startswith(
        "tokenize: 62 records skipped (60 without the text field 'text', see data.text_field; 1 malformed JSON"
    )


def test_a_clean_corpus_has_no_skipped_summary(stage: tuple[Path, Path]) -> None:
    _, shard_dir = stage
    manifest = read_manifest(shard_dir)
    manifest["totals"] = {**manifest["totals"], "empty_files": 0, "empty_docs": 0, "invalid_utf8_docs": 0}
    assert skipped_summary(manifest) is None
