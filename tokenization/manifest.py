"""The manifest of a shard directory: every shard, every unit, the totals; written last.

    manifest = read_manifest(Path("runs/quickstart/tokenize-1a2b3c4d5e6f"))
    manifest["totals"]["train"]["tokens"], manifest["shards"][0]["sha256"]

Each work unit leaves `units/unit-000012.json` after its shards (both atomically); the manifest is
built from those records in unit order and holds nothing that depends on timing, hosts or worker
count, so reruns and any number of workers give the same bytes. A unit whose record and shards
verify is complete: a resumed stage skips it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenization.config import DataConfig
from tokenization.readers import ReadStats
from tokenization.shards import FORMAT_VERSION, ShardError, shard_record_from_dict, token_dtype, verify_shard
from tokenization.tokenizer import TokenizerInfo, write_atomic
from tokenization.units import WorkUnit

MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.arrow"


def record_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / "units" / f"unit-{index:06d}.json"


def completed_record(unit: WorkUnit, out_dir: Path, info: TokenizerInfo) -> dict[str, Any] | None:
    """The unit's record when its shards are complete and valid (resume), else None."""
    path = record_path(out_dir, unit.index)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record["unit"] != unit.to_json() or record["tokenizer_sha256"] != info.model_sha256:
            return None
        for shard in record["shards"]:
            verify_shard(Path(out_dir) / shard["name"], shard_record_from_dict(shard), info)
    except (ValueError, KeyError, ShardError):
        return None
    return record


def build_manifest(records: list[dict[str, Any]], data: DataConfig, info: TokenizerInfo) -> dict[str, Any]:
    """The manifest from unit records in unit order; no timings, hosts or worker counts (byte-identical)."""
    records = sorted(records, key=lambda record: record["unit"]["index"])
    counters = [key for key in ReadStats().counters()]
    shards = [
        {**shard_record_from_dict(shard).__dict__, "units": [record["unit"]["index"]]}
        for record in records
        for shard in record["shards"]
    ]
    splits = {
        split: {
            "shards": sum(1 for shard in shards if shard["split"] == split),
            "documents": sum(shard["documents"] for shard in shards if shard["split"] == split),
            "tokens": sum(shard["tokens"] for shard in shards if shard["split"] == split),
        }
        for split in SPLITS
    }
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": {
            "sha256": info.model_sha256,
            "vocab_size": info.vocab_size,
            "eod_id": info.eod_id,
            "pad_id": info.pad_id,
            "config": info.config,
        },
        "data_config": data.model_dump(mode="json"),
        "token_dtype": token_dtype(info.vocab_size).name,  # the dtype the shards hold
        "totals": {**splits, **{key: sum(record[key] for record in records) for key in counters}},
        "shards": shards,
        "units": [{**record["unit"], **{key: record[key] for key in counters}} for record in records],
    }


def skipped_summary(manifest: dict[str, Any]) -> str | None:
    """One line of what reading skipped or repaired, for the end of the tokenize stage; None when nothing was.

    The readers warn about the first few bad records mid-run, where progress bars bury them; the
    totals at the end say how much of the corpus did not become tokens, and which setting to look at.
    """
    totals, field = manifest["totals"], manifest["data_config"]["text_field"]
    reasons = [
        (totals.get("missing_text", 0), f"without the text field '{field}', see data.text_field"),
        (totals.get("bad_records", 0), "malformed JSON, see data.on_bad_record"),
        (totals.get("empty_docs", 0), "empty or whitespace only"),
    ]
    skipped = sum(count for count, _ in reasons)
    parts = []
    if skipped:
        parts.append(f"{skipped} records skipped ({'; '.join(f'{count} {why}' for count, why in reasons if count)})")
    if empty_files := totals.get("empty_files", 0):
        parts.append(f"{empty_files} empty files skipped")
    if invalid := totals.get("invalid_utf8_docs", 0):
        parts.append(f"{invalid} documents with invalid UTF-8 kept with U+FFFD in place of the bad bytes")
    return f"tokenize: {', '.join(parts)}" if parts else None


def write_manifest(
    out_dir: Path, records: list[dict[str, Any]], data: DataConfig, info: TokenizerInfo
) -> dict[str, Any]:
    """Write manifest.json (last, atomically); returns the manifest written."""
    manifest = build_manifest(records, data, info)
    write_atomic(Path(out_dir) / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def read_manifest(shard_dir: Path) -> dict[str, Any]:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(
            f"{path} not found",
            advice="Give a tokenize stage's folder (<run>/tokenize-<hash>); a tokenize stage writes manifest.json "
            "last, so a folder of shards without it did not complete",
        )
    return json.loads(path.read_text())


def remove_temporaries(out_dir: Path) -> None:
    """Drop `.name.<pid>.tmp` files that a killed worker or driver left; call once every unit is complete."""
    for pattern in (".*.tmp", "units/.*.tmp"):
        for path in out_dir.glob(pattern):
            path.unlink(missing_ok=True)
