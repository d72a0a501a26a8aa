"""The tokenize stage on a real Ray cluster: byte-identical output, kill -9 and resume, exact tokens.

The corpus is a real part of the Python standard library (about 1.6 MB of source in ~16 units),
small enough for a few runs on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from orchestration.data import tokenize_corpus
from pipeline.data_stages import train_tokenizer
from tokenization.config import DataConfig, TokenizerConfig
from tokenization.readers import BadRecordError, ReadStats, read_segment
from tokenization.sources import CorpusError
from tokenization.tokenizer import load_tokenizer
from tokenization.units import plan_units, split_of

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SUBSET = ["json", "email", "asyncio", "concurrent", "importlib", "logging", "collections", "http"]
DATA = DataConfig(paths=[str(STDLIB / name) for name in SUBSET], unit_bytes=100 << 10, val_fraction=0.05)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes)."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(
        DATA, TokenizerConfig(vocab_size=1024, sample_bytes=512 << 10), tmp_path_factory.mktemp("tok")
    )


@pytest.fixture(scope="module")
def reference_run(tokenizer_dir: Path, ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tokenize_corpus(DATA, tokenizer_dir, tmp_path_factory.mktemp("run") / "a", ray_address, num_workers=2)


def test_reruns_and_worker_counts_give_identical_bytes(
    reference_run: Path, tokenizer_dir: Path, ray_address: str, tmp_path: Path
) -> None:
    again = tokenize_corpus(DATA, tokenizer_dir, tmp_path / "b", ray_address, num_workers=2)
    one_worker = tokenize_corpus(DATA, tokenizer_dir, tmp_path / "c", ray_address, num_workers=1)
    expected = tree(reference_run)
    assert len(plan_units(DATA)) >= 10 and sum(name.endswith(".arrow") for name in expected) >= 10
    assert tree(again) == expected
    assert tree(one_worker) == expected


def test_every_document_is_sentencepiece_encoding_plus_eod(reference_run: Path, tokenizer_dir: Path) -> None:
    import pyarrow as pa

    processor, info = load_tokenizer(tokenizer_dir)
    texts: dict[str, list[str]] = {"train": [], "val": []}
    for unit in plan_units(DATA):
        for segment in unit.segments:
            for doc in read_segment(segment, DATA, ReadStats()):
                texts[split_of(doc.id, DATA.val_fraction)].append(doc.text)
    manifest = json.loads((reference_run / "manifest.json").read_text())
    for split, split_texts in texts.items():
        rows = []
        for shard in (s for s in manifest["shards"] if s["split"] == split):
            with pa.memory_map(str(reference_run / shard["name"])) as source:
                rows += pa.ipc.open_file(source).read_all().column("tokens").to_pylist()
        expected = [ids + [info.eod_id] for ids in processor.encode(split_texts)]
        assert len(rows) == len(expected) > 0 and rows == expected


DRIVER = """
import json, sys
from pathlib import Path
from orchestration.data import tokenize_corpus
from tokenization.config import DataConfig
data = DataConfig.model_validate(json.loads(sys.argv[1]))
tokenize_corpus(data, Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], num_workers=1)
"""


def test_kill_9_of_the_driver_then_rerun(
    reference_run: Path, tokenizer_dir: Path, ray_address: str, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    command = [sys.executable, "-c", DRIVER, DATA.model_dump_json(), str(tokenizer_dir), str(out), ray_address]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "units").glob("unit-*.json"))) < 3 and time.monotonic() < deadline:
        assert driver.poll() is None, "the driver ended before it could be killed"
        time.sleep(0.02)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (out / "manifest.json").exists(), "killed too late: the stage had finished"
    before = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in (out / "units").glob("unit-*.json")}
    total = len(plan_units(DATA))
    assert 3 <= len(before) < total

    tokenize_corpus(DATA, tokenizer_dir, out, ray_address, num_workers=2)
    after = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in (out / "units").glob("unit-*.json")}
    assert {name: after[name] for name in before} == before, "a unit completed before the kill was redone"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [unit["index"] for unit in manifest["units"]] == list(range(total))
    pairs = [(shard["split"], shard["units"][0]) for shard in manifest["shards"]]
    assert len(pairs) == len(set(pairs)), "a unit's shard is listed twice"
    assert tree(out) == tree(reference_run)


def test_kill_9_of_a_worker_is_retried(
    reference_run: Path, tokenizer_dir: Path, ray_address: str, tmp_path: Path
) -> None:
    import psutil

    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for process in psutil.process_iter(["pid", "cmdline"]):
                if "ray::_tokenize_task" in " ".join(process.info["cmdline"] or []):  # a worker running a unit
                    os.kill(process.info["pid"], signal.SIGKILL)
                    killed.append(process.info["pid"])
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    out = tokenize_corpus(DATA, tokenizer_dir, tmp_path / "worker-killed", ray_address, num_workers=2)
    killer.join()
    assert killed, "no worker was seen running a unit"
    assert tree(out) == tree(reference_run)


def test_a_bad_record_under_fail_names_file_and_line(
    tokenizer_dir: Path, ray_address: str, tmp_path: Path, capsys
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": "broken\n')
    data = DataConfig(paths=[str(corpus)], on_bad_record="fail")
    with pytest.raises(BadRecordError, match=rf"{corpus}:2: malformed JSON"):
        tokenize_corpus(data, tokenizer_dir, tmp_path / "out", ray_address, num_workers=1)
    skipped = tokenize_corpus(
        data.model_copy(update={"on_bad_record": "skip"}), tokenizer_dir, tmp_path / "ok", ray_address
    )
    totals = json.loads((skipped / "manifest.json").read_text())["totals"]
    assert (totals["documents"], totals["bad_records"]) == (1, 1)
    assert "tokenize: 1 records skipped (1 malformed JSON, see data.on_bad_record)" in capsys.readouterr().out


def test_a_missing_path_fails_before_any_work(tokenizer_dir: Path, tmp_path: Path) -> None:
    data = DataConfig(paths=[str(STDLIB / "json"), str(tmp_path / "missing.jsonl")])
    with pytest.raises(CorpusError, match="missing.jsonl"):
        tokenize_corpus(data, tokenizer_dir, tmp_path / "out", ray_address="127.0.0.1:1")  # never contacted
    assert not (tmp_path / "out").exists()
