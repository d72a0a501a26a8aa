"""Tokenize-stage throughput: the Ray stage with 1 and 2 workers against a single-process encode loop.

    python bench/tokenize_throughput.py                       # the Python standard library x 4, vocab 4096
    python bench/tokenize_throughput.py --copies 1 --unit-kb 512   # the corpus and units until 2026-11-30
    python bench/tokenize_throughput.py --workers 1 2 4 8 --unit-kb 512   # on a machine with >= 8 cores
    python bench/tokenize_throughput.py --paired 8    # rounds of (single, Ray stage, plain), back to back

All runs share one corpus and one tokenizer. The corpus is the stdlib's *.py (13 MB) copied --copies
times (default 4: 53 MB) as .txt files, cut into units of --unit-kb (default 2048). A unit costs the
stage a few ms besides its encode (the gap until the next task starts, ~3 ms measured; its shard's
close, fsync and sha256; its record), so units far smaller than the stage's default (16 MB) overstate
that cost, and the stdlib alone is too small for enough units of a realistic size (2-core VM, 53 MB:
512 KB units put the stage at 0.90 of bare processes, 2-4 MB units at 0.93-0.96).
The baseline reads every document and calls sentencepiece `encode` in one process (one thread). The
Ray runs start a local cluster once (as many CPUs as the most workers asked for), warm its workers on
a small run, then time `run_units` over all units into a fresh directory, plus the manifest, for each worker count.
The "plain processes" rows run the baseline's loop in N forked processes (no Ray, no shards): on a
shared machine they show what N cores deliver at that moment, the ceiling for the N-worker Ray row.
Shard writing is the time units spent in the Arrow writer (building batches, writing, fsync, rename,
sha256) over their total time; CPU s is the process CPU time of the baseline or the sum over the Ray
tasks (overhead check that wall time on a busy machine cannot give). Prints a Markdown table.
`--paired N` instead times N rounds of the single loop, the Ray stage and the plain processes (the
most workers) back to back and prints each round's speed-ups and their medians: on a machine whose
speed drifts by +-10 % within a minute, ratios of runs seconds apart resolve what rows 20-30 s apart
cannot. `--verify` then checks that every document in the largest run's shards equals sentencepiece's own
encoding plus the eod id, and (table mode) that every worker count wrote the same bytes.
"""

# ruff: noqa: E402 - the sys.path fix below must run before the other imports
from __future__ import annotations

import sys
from pathlib import Path

# This file shadows the stdlib's `tokenize` module (numpy and inspect import it) when run as a
# script, because Python puts the script's folder first on sys.path: take that folder off.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import os

# Progress bars (the stage's too) would bury the table. tqdm >= 4.66 reads TQDM_* when it is first
# imported, which the imports below do, so this must come before them.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import multiprocessing
import shutil
import statistics
import tempfile
import time
from multiprocessing.pool import ThreadPool

from orchestration.data import run_units
from pipeline.data_stages import train_tokenizer
from tokenization.config import DataConfig, TokenizerConfig
from tokenization.manifest import write_manifest
from tokenization.readers import ReadStats, read_segment
from tokenization.sources import STDLIB, resolve_sources
from tokenization.tokenizer import load_tokenizer
from tokenization.units import plan_units


def single_process(data: DataConfig, tokenizer_dir: Path) -> dict[str, float]:
    processor, _ = load_tokenizer(tokenizer_dir)
    started, cpu_started = time.perf_counter(), time.process_time()
    text_bytes = tokens = 0
    for unit in plan_units(data):
        for segment in unit.segments:
            for doc in read_segment(segment, data, ReadStats()):
                tokens += len(processor.encode(doc.text)) + 1
                text_bytes += len(doc.text.encode("utf-8"))
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    return {"seconds": seconds, "cpu_s": cpu_s, "bytes": text_bytes, "tokens": tokens, "write_share": 0.0}


_pool_processor = None


def _pool_init(tokenizer_dir: Path) -> None:
    global _pool_processor
    _pool_processor, _ = load_tokenizer(tokenizer_dir)


def _encode_unit(job: tuple) -> tuple[int, int, float]:
    unit, data = job
    cpu_started, text_bytes, tokens = time.process_time(), 0, 0
    for segment in unit.segments:
        for doc in read_segment(segment, data, ReadStats()):
            tokens += len(_pool_processor.encode(doc.text)) + 1
            text_bytes += len(doc.text.encode("utf-8"))
    return text_bytes, tokens, time.process_time() - cpu_started


def plain_processes(data: DataConfig, pool, workers: int) -> dict[str, float]:
    """The same encode loop in `workers` forked processes (no Ray, no shards): what the cores give right now."""
    started = time.perf_counter()
    # Largest units first, as the Ray stage submits them, so both rows have the same tail.
    jobs = sorted(((unit, data) for unit in plan_units(data)), key=lambda job: -job[0].bytes)
    with ThreadPool(workers) as feeders:  # at most `workers` units in flight on the shared process pool
        results = feeders.map(lambda job: pool.apply(_encode_unit, (job,)), jobs, chunksize=1)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "cpu_s": sum(r[2] for r in results),
        "bytes": sum(r[0] for r in results),
        "tokens": sum(r[1] for r in results),
        "write_share": 0.0,
    }


def ray_stage(
    data: DataConfig, tokenizer_dir: Path, workers: int, scratch: Path, limit: int = 0, queued: int = 1
) -> dict[str, float]:
    out = scratch / f"shards-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    _, info = load_tokenizer(tokenizer_dir)
    started = time.perf_counter()
    units = plan_units(data)[: limit or None]
    records = run_units(units, data, tokenizer_dir, out, workers, max_retries=2, queued_per_worker=queued)
    write_manifest(out, records, data, info)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "cpu_s": sum(r["timing"]["cpu_s"] for r in records),
        "bytes": sum(r["text_bytes"] for r in records),
        "tokens": sum(s["tokens"] for r in records for s in r["shards"]),
        "write_share": sum(r["timing"]["write_s"] for r in records) / sum(r["timing"]["seconds"] for r in records),
        **idle_between_units([r["timing"] for r in records]),
    }


def idle_between_units(timings: list[dict]) -> dict[str, float]:
    """Where workers waited: between one unit's end and their next unit's start ("gap_share"), and after
    their last unit while another worker still ran ("tail_share"), as shares of the workers' time from
    the first start to the last end."""
    by_worker: dict[int, list[tuple[float, float]]] = {}
    for timing in timings:
        by_worker.setdefault(timing["pid"], []).append((timing["started_at"], timing["finished_at"]))
    first, last = min(t["started_at"] for t in timings), max(t["finished_at"] for t in timings)
    span = len(by_worker) * (last - first)
    gaps = tail = 0.0
    for spans in by_worker.values():
        spans.sort()
        gaps += sum(later[0] - earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))
        tail += last - spans[-1][1]
    return {"gap_share": gaps / span, "tail_share": tail / span}


def tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def verify(data: DataConfig, tokenizer_dir: Path, shard_dir: Path) -> int:
    """Documents checked; raises AssertionError on the first document whose tokens differ."""
    import pyarrow as pa

    from tokenization.manifest import read_manifest
    from tokenization.units import split_of

    processor, info = load_tokenizer(tokenizer_dir)
    expected: dict[str, list[str]] = {"train": [], "val": []}
    for unit in plan_units(data):
        for segment in unit.segments:
            for doc in read_segment(segment, data, ReadStats()):
                expected[split_of(doc.id, data.val_fraction)].append(doc.text)
    checked = 0
    for split, texts in expected.items():
        rows = []
        for shard in (s for s in read_manifest(shard_dir)["shards"] if s["split"] == split):
            with pa.memory_map(str(shard_dir / shard["name"])) as source:
                rows += pa.ipc.open_file(source).read_all().column("tokens").to_pylist()
        assert len(rows) == len(texts), f"{split}: {len(rows)} rows for {len(texts)} documents"
        for row, text in zip(rows, texts, strict=True):
            assert row == processor.encode(text) + [info.eod_id], f"{split} document {checked} differs"
            checked += 1
    return checked


def paired_rounds(data: DataConfig, tokenizer_dir: Path, pool, workers: int, scratch: Path, rounds: int) -> None:
    """Each round: the single loop, the Ray stage and the plain processes back to back; per-round speed-ups."""
    ray_x, plain_x, ray_over_plain, gap_share, tail_share = [], [], [], [], []
    print(f"| round | single s | Ray stage, {workers} workers s (speed-up) | {workers} plain processes s (speed-up) |")
    print("|---|---|---|---|")
    for index in range(rounds):
        single = single_process(data, tokenizer_dir)["seconds"]
        stage = ray_stage(data, tokenizer_dir, workers, scratch)
        staged = stage["seconds"]
        gap_share.append(stage["gap_share"])
        tail_share.append(stage["tail_share"])
        plain = plain_processes(data, pool, workers)["seconds"]
        ray_x.append(single / staged)
        plain_x.append(single / plain)
        ray_over_plain.append(plain / staged)
        print(f"| {index} | {single:.2f} | {staged:.2f} ({ray_x[-1]:.2f}x) | {plain:.2f} ({plain_x[-1]:.2f}x) |")
    print(
        f"\nmedian speed-up over {rounds} rounds: Ray stage {statistics.median(ray_x):.2f}x "
        f"({min(ray_x):.2f}-{max(ray_x):.2f}), plain processes {statistics.median(plain_x):.2f}x "
        f"({min(plain_x):.2f}-{max(plain_x):.2f}); Ray stage / plain processes "
        f"{statistics.median(ray_over_plain):.3f} (median of the rounds' rate ratios); "
        f"load avg {os.getloadavg()[0]:.2f}\n"
        f"Ray workers idle between units {statistics.median(gap_share):.1%} and after their last unit "
        f"{statistics.median(tail_share):.1%} of their time (medians)"
    )


def round_robin_table(args, data: DataConfig, tokenizer_dir: Path, pool, fresh, most: int, scratch: Path) -> None:
    """Every row `args.repeats` times, round robin, then the table of their medians."""
    rows = {}
    runs = {
        "single process, sentencepiece encode loop": lambda: single_process(data, tokenizer_dir),
        "single process, same loop in a fresh interpreter": lambda: fresh.apply(single_process, (data, tokenizer_dir)),
    }
    workers_of = {}  # row name -> worker count, for the parallel efficiency column
    for n in sorted(args.workers):
        name = f"{n} plain process{'es' if n > 1 else ''}, encode only (no Ray, no shards)"
        runs[name], workers_of[name] = (lambda n=n: plain_processes(data, pool, n)), n
        name = f"Ray stage, {n} worker{'s' if n > 1 else ''}"
        runs[name], workers_of[name] = (lambda n=n: ray_stage(data, tokenizer_dir, n, scratch)), n
        if n == most and args.compare_queue:
            name += ", no task queued ahead"
            runs[name], workers_of[name] = (lambda n=n: ray_stage(data, tokenizer_dir, n, scratch, queued=0)), n
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # round robin, so a change in the neighbours' load hits every row alike
        for name, run in runs.items():
            results[name].append(run())
    for name, runs_of_row in results.items():
        rows[name] = {key: statistics.median(r[key] for r in runs_of_row) for key in runs_of_row[0]}
    base = rows["single process, sentencepiece encode loop"]
    base_rate = base["bytes"] / base["seconds"]
    corpus = f"corpus {args.paths} x {args.copies}: {base['bytes'] / 1e6:.1f} MB"
    print(f"\n{corpus}, {base['tokens'] / 1e6:.2f} M tokens, ", end="")
    print(
        f"{len(plan_units(data))} units of {args.unit_kb} KB, vocab {args.vocab}, load avg {os.getloadavg()[0]:.2f}\n"
    )
    print("| run | seconds | MB/s | M tokens/s | speed-up vs single | parallel efficiency | shard writing | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        rate = row["bytes"] / row["seconds"]
        workers = workers_of.get(name, 1)
        print(
            f"| {name} | {row['seconds']:.2f} | {rate / 1e6:.2f} | {row['tokens'] / row['seconds'] / 1e6:.2f} "
            f"| {rate / base_rate:.2f}x | {rate / base_rate / workers:.0%} | {row['write_share']:.1%} "
            f"| {row['cpu_s']:.2f} |"
        )


def copied_corpus(paths: list[str], copies: int, out: Path) -> Path:
    """`copies` copies of the corpus files under out/copy-K/ (stdlib files as .txt, which is how the stage
    reads them); each document keeps a distinct id."""
    for source in resolve_sources(paths):
        name = source.rel.removeprefix(STDLIB) + (".txt" if source.rel.startswith(STDLIB) else "")
        for copy in range(copies):
            target = out / f"copy-{copy}" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.path, target)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="+", default=["stdlib:"])
    parser.add_argument("--copies", type=int, default=4, help="the corpus this many times over (see above)")
    parser.add_argument("--unit-kb", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row; the median is shown")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts to time")
    parser.add_argument(
        "--compare-queue", action="store_true", help="also time the most workers without a task queued ahead"
    )
    parser.add_argument("--verify", action="store_true", help="check every document against sentencepiece")
    parser.add_argument("--paired", type=int, default=0, help="N rounds of single, Ray, plain back to back")
    args = parser.parse_args()

    import ray

    scratch = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    paths = [str(copied_corpus(args.paths, args.copies, scratch / "corpus"))] if args.copies > 1 else args.paths
    data = DataConfig(paths=paths, unit_bytes=args.unit_kb << 10)
    tokenizer_dir = train_tokenizer(data, TokenizerConfig(vocab_size=args.vocab, sample_bytes=4 << 20), scratch / "tok")
    most = max(args.workers)
    pool = multiprocessing.get_context("fork").Pool(most, initializer=_pool_init, initargs=(tokenizer_dir,))
    pool.map(time.sleep, [0.1] * most)  # forked before Ray starts threads; warm
    # The baseline again in a spawned interpreter that has done nothing else: this process trained the
    # tokenizer first, and on some machines (a sandboxed kernel) that alone changes its encode speed.
    fresh = multiprocessing.get_context("spawn").Pool(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # see orchestration.cluster._start_local_cluster
    ray.init(address="local", num_cpus=most, include_dashboard=False, logging_level="WARNING")
    ray_stage(data, tokenizer_dir, most, scratch, limit=2 * most)  # start and warm the workers

    try:
        if args.paired:
            paired_rounds(data, tokenizer_dir, pool, most, scratch, args.paired)
        else:
            round_robin_table(args, data, tokenizer_dir, pool, fresh, most, scratch)
    finally:
        ray.shutdown()
        pool.close()
        fresh.close()
    if args.verify:
        print(f"\nverified: {verify(data, tokenizer_dir, scratch / f'shards-{most}')} documents equal encode + [eod]")
    if args.verify and not args.paired:  # the paired rounds run one worker count
        files = {workers: tree(scratch / f"shards-{workers}") for workers in args.workers}
        same = all(files[workers] == files[most] for workers in args.workers)
        print(f"{' vs '.join(map(str, args.workers))} workers: {len(files[most])} files, byte-identical: {same}")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
