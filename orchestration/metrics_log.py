"""metrics.jsonl: a training stage's rank-0 metrics, one JSON object per report, appended as they arrive.

append_metrics(path, 100, {"loss": 3.2, "tokens_seen": 204800.0})
metrics_by_step(path)[100]["loss"]
"""

from __future__ import annotations

import json
from pathlib import Path


def append_metrics(path: Path, step: int, metrics: dict[str, float]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps({"step": step, **metrics}) + "\n")


def metrics_by_step(path: Path) -> dict[int, dict[str, float]]:
    """Every step's metrics, in step order. A resumed stage logs its replayed steps again: the latest
    values win. A line a killed writer cut short is skipped (the same points also went to MLflow)."""
    by_step: dict[int, dict[str, float]] = {}
    if not path.is_file():
        return by_step
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step.setdefault(record.pop("step"), {}).update(record)
    return dict(sorted(by_step.items()))
