"""The tokenize stage on Ray: one task per deterministic work unit, results merged in unit order.

    from orchestration.data import tokenize_corpus
    tokenize_corpus(DataConfig(paths=["stdlib:"], unit_bytes=1 << 20), Path("tok"), Path("shards"))

Why plain Ray tasks and not Ray Data (reference/platform.md): Ray Data's actor pools can hang on a
2-core machine, it has no Arrow IPC writer, its file names are random per run and a failed write
leaves duplicates. A task per unit writes one set of named shards atomically, so a retried or
resumed unit simply rewrites the same bytes, and the manifest is merged in unit order by the driver.

Resume: units whose record and shards verify are skipped (`completed_record`), so rerunning after
kill -9 of the driver or of a worker redoes only the missing units; a worker that dies mid-unit is
retried by Ray (`max_retries`). At most `num_workers` tasks run at once (0 = every CPU of the
cluster); each task takes one CPU and encodes with one sentencepiece thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestration.cluster import ray_address_from, start_ray
from pipeline.data_stages import tokenize_unit
from tokenization.config import DataConfig
from tokenization.manifest import completed_record, remove_temporaries, skipped_summary, write_manifest
from tokenization.tokenizer import read_info
from tokenization.units import WorkUnit, plan_units


def _tokenize_task(unit: WorkUnit, data: DataConfig, tokenizer_dir: str, out_dir: str) -> dict[str, Any]:
    return tokenize_unit(unit, data, Path(tokenizer_dir), Path(out_dir))


class _Progress:
    """tqdm over units with MB/s and tokens/s of the units finished in this run."""

    def __init__(self, total: int, done: int, on_progress: Callable[[int, int], None] | None = None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, desc="tokenize", unit="unit")
        self.started, self.text_bytes, self.tokens = time.perf_counter(), 0, 0
        self.on_progress = on_progress or (lambda done, total: None)
        self.on_progress(done, total)

    def update(self, record: dict[str, Any]) -> None:
        self.text_bytes += record["text_bytes"]
        self.tokens += sum(shard["tokens"] for shard in record["shards"])
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(
            f"{self.text_bytes / elapsed / 1e6:.2f} MB/s, {self.tokens / elapsed / 1e3:.0f}k tok/s"
        )
        self.bar.update(1)
        self.on_progress(self.bar.n, self.bar.total)

    def close(self) -> None:
        self.bar.close()


def run_units(
    units: list[WorkUnit],
    data: DataConfig,
    tokenizer_dir: Path,
    out_dir: Path,
    num_workers: int,
    max_retries: int,
    queued_per_worker: int = 1,
    progress: _Progress | None = None,
) -> list[dict[str, Any]]:
    """Run `units` as Ray tasks, at most num_workers at a time; their records in unit order.

    The largest units go first, so the last ones to finish are small and the tail where one worker
    runs alone is short; the order does not change the output (records are merged by unit index).
    """
    import ray

    task = ray.remote(num_cpus=1, max_retries=max_retries)(_tokenize_task)
    cluster_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = num_workers or cluster_cpus
    # When the cluster's CPUs are what bounds the tasks (1 CPU each), keep `queued_per_worker` more
    # tasks queued per worker: Ray hands one to a worker the moment its last one ends, instead of after
    # a round trip through this loop (~10 ms per unit). With fewer workers than CPUs, queued tasks
    # would run at once and exceed num_workers, so then exactly num_workers are in flight.
    in_flight = workers * (1 + queued_per_worker) if workers >= cluster_cpus else workers
    pending = sorted(units, key=lambda unit: (unit.bytes, -unit.index))  # pop() takes the largest
    running: dict[Any, int] = {}
    records: dict[int, dict[str, Any]] = {}
    progress = progress or _Progress(len(units), 0)
    try:
        while pending or running:
            while pending and len(running) < in_flight:
                unit = pending.pop()
                # `data` by value: Ray inlines a small argument into the task, where an ObjectRef would
                # cost each task a fetch from the object store (~0.7 ms more idle per unit on 2 cores).
                running[task.remote(unit, data, str(tokenizer_dir), str(out_dir))] = unit.index
            done, _ = ray.wait(list(running), num_returns=1)
            index = running.pop(done[0])
            records[index] = ray.get(done[0])  # re-raises a task's error (BadRecordError names file:line)
            progress.update(records[index])
    finally:
        progress.close()
        for ref in running:
            ray.cancel(ref, force=True)
    return [records[unit.index] for unit in units]


def tokenize_corpus(
    data: DataConfig,
    tokenizer_dir: Path,
    out_dir: Path,
    ray_address: str | None = None,
    num_workers: int = 0,
    max_retries: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Tokenize the corpus into `out_dir` (shards, units/, manifest.json last); resumes; returns out_dir.

    on_progress(units done, units) after each unit, counting those a killed run finished (run status)."""
    out_dir, tokenizer_dir = Path(out_dir).resolve(), Path(tokenizer_dir).resolve()
    units = plan_units(data)  # raises CorpusError naming a missing path before any work
    info = read_info(tokenizer_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {unit.index: record for unit in units if (record := completed_record(unit, out_dir, info))}
    todo = [unit for unit in units if unit.index not in done]
    print(f"tokenize: {len(units)} units, {len(done)} already complete, {len(todo)} to run")
    if todo:
        started_ray = start_ray(ray_address_from(ray_address))
        try:
            progress = _Progress(len(units), len(done), on_progress)
            for record in run_units(todo, data, tokenizer_dir, out_dir, num_workers, max_retries, progress=progress):
                done[record["unit"]["index"]] = record
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    remove_temporaries(out_dir)
    manifest = write_manifest(out_dir, [done[unit.index] for unit in units], data, info)
    if summary := skipped_summary(manifest):  # the readers' warnings scroll away under the bar
        print(summary)
    return out_dir
