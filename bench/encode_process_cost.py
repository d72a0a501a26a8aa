"""What one sentencepiece encode loop costs in CPU time, by the kind of process that runs it.

    python bench/encode_process_cost.py                   # main, forked, spawned, Ray task; 12 rounds
    python bench/encode_process_cost.py --rounds 20 --docs 500 --pin 0 1

The tokenize bench (bench/tokenize_throughput.py) found, on a 32-core VM, one forked process or one
Ray worker spending 8-11 % more CPU time than the bench's main process on the same encode work,
which caps 2 workers below 1.8x. This runs the identical loop (the first --docs documents of the
Python standard library, a 4096-token BPE tokenizer) in the main process, a forked child, a spawned
interpreter and a Ray task, round robin, and prints per kind the minimum and median process CPU time
and the minor page faults of a loop. The minimum is the least noisy figure on a shared machine.
The last kind, "2 forked children at once", starts the timed loop in two children at the same
moment (a barrier), one per CPU: its CPU time against one child alone is what running beside a
twin costs (shared caches, memory bandwidth, the host's frequency); 2 / that ratio bounds the
speed-up of 2 workers before any scheduling or imbalance.
--pin: the CPUs each child is bound to (os.sched_setaffinity), to compare, e.g., two logical CPUs of
one physical core against two cores (`lscpu -e` shows the topology; it is printed first).
"""

# ruff: noqa: E402 - the sys.path fix below must run before the project imports
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data_stages import train_tokenizer
from tokenization.config import DataConfig, TokenizerConfig
from tokenization.readers import ReadStats, read_segment
from tokenization.tokenizer import load_tokenizer
from tokenization.units import plan_units

DATA = DataConfig(paths=["stdlib:"], unit_bytes=512 << 10)


def encode_loop(tokenizer_dir: Path, docs: int, cpus: list[int] | None = None, start: Any = None) -> dict[str, float]:
    """Load the tokenizer, read the documents, then time encoding them: CPU seconds, page faults.

    start: a multiprocessing barrier to wait at just before the timed loop (twins start together).
    """
    if cpus:
        os.sched_setaffinity(0, cpus)
    processor, _ = load_tokenizer(tokenizer_dir)
    texts = []
    for unit in plan_units(DATA):
        for segment in unit.segments:
            texts.extend(doc.text for doc in read_segment(segment, DATA, ReadStats()))
    texts = texts[:docs]
    processor.encode(texts[0])
    if start is not None:
        start.wait()
    before, cpu_before = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    tokens = sum(len(processor.encode(text)) for text in texts)
    after, cpu_after = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    return {"cpu_s": cpu_after - cpu_before, "faults": after.ru_minflt - before.ru_minflt, "tokens": tokens}


def _twin(tokenizer_dir: Path, docs: int, cpus: list[int] | None, start: Any, results: Any) -> None:
    results.put(encode_loop(tokenizer_dir, docs, cpus, start))


def twins_at_once(tokenizer_dir: Path, docs: int, pin: list[int] | None) -> dict[str, float]:
    """The loop in two forked children released together, one per CPU of `pin` (or anywhere): the mean."""
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(2), context.Queue()
    cpus = [[pin[i % len(pin)]] if pin else None for i in range(2)]
    children = [context.Process(target=_twin, args=(tokenizer_dir, docs, c, start, results)) for c in cpus]
    for child in children:
        child.start()
    rows = [results.get() for _ in children]
    for child in children:
        child.join()
    return {key: sum(row[key] for row in rows) / 2 for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--pin", type=int, nargs="*", default=None, help="CPUs for the children")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    topology = subprocess.run(["lscpu", "-e"], capture_output=True, text=True).stdout
    print(topology or "(lscpu not available)", f"CPUs usable here: {sorted(os.sched_getaffinity(0))}", sep="\n")

    tokenizer_dir = Path(tempfile.mkdtemp(prefix="encode-cost-")) / "tok"
    train_tokenizer(DATA, TokenizerConfig(vocab_size=4096, sample_bytes=4 << 20), tokenizer_dir)
    job = (tokenizer_dir, args.docs, args.pin)
    forked = multiprocessing.get_context("fork").Pool(1)
    spawned = multiprocessing.get_context("spawn").Pool(1)
    kinds = {
        "main process": lambda: encode_loop(tokenizer_dir, args.docs),
        "forked child": lambda: forked.apply(encode_loop, job),
        "spawned interpreter": lambda: spawned.apply(encode_loop, job),
    }
    kinds["2 forked children at once (each)"] = lambda: twins_at_once(tokenizer_dir, args.docs, args.pin)
    if not args.no_ray:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as orchestration.cluster
        ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
        task = ray.remote(num_cpus=1)(encode_loop)
        kinds["Ray task"] = lambda: ray.get(task.remote(*job))
    for run in kinds.values():  # warm: imports, the first page faults
        run()
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind, run in kinds.items():
            results[kind].append(run())
    base = min(r["cpu_s"] for r in results["main process"])
    print(f"\n{args.docs} documents, {results['main process'][0]['tokens']:,} tokens, {args.rounds} rounds")
    print("| process | min CPU s | median CPU s | min vs main | page faults (median) |")
    print("|---|---|---|---|---|")
    for kind, rows in results.items():
        cpu = [r["cpu_s"] for r in rows]
        faults = statistics.median(r["faults"] for r in rows)
        print(f"| {kind} | {min(cpu):.3f} | {statistics.median(cpu):.3f} | {min(cpu) / base:.3f} | {faults:.0f} |")
    forked.close()
    spawned.close()


if __name__ == "__main__":
    main()
