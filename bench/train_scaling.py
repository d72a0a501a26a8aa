"""Data-parallel scaling of RWKV-4 training on the GPUs of one host: tokens/s on 1 and N GPUs side by side.

    python bench/train_scaling.py                                   # 169M and 430M, ZeRO-0/2/3, 1 and 2 GPUs
    python bench/train_scaling.py --models 169m --zero 2 --micro-bsz 169m=64 --compile 1 --gpus 1 2
    python bench/train_scaling.py --models 169m --zero 2 \
        --variant nooverlap='{"zero_optimization": {"overlap_comm": false}}'   # a DeepSpeed setting, side by side
    python bench/train_scaling.py --models tiny --zero 2 --precision fp32 --ctx 64 --micro-bsz tiny=4 \
        --compile 0 --steps 4 --warmup 2 --cpu                      # CPU smoke run (gloo, 2 processes)

Every configuration is one `torchrun --standalone --nproc-per-node W` job of the real training loop
(pipeline.train.train: the DeepSpeed engine at the ZeRO stage, NCCL between the GPUs, L2Wrap, clipping,
the per-micro-step finite-loss all-reduce), with the same per-GPU config at every W (micro-batch,
grad_accum 1, so the global batch grows with W: weak scaling, as data parallelism runs). tokens/s counts
the global tokens over the steps after `--warmup` (compilation, NCCL set-up and autotuning happen there),
timed by rank 0. Scaling efficiency = tokens/s(W) / (W x tokens/s(1)). Synthetic shards of random tokens
of the Pile vocabulary (bench/train_throughput.py); the model pads it to 50304.

Every job runs alone by default. `--pack 1` runs the 1-GPU jobs of two configurations at the same time,
one per GPU (each sees only its own GPU, CUDA_VISIBLE_DEVICES), which saves device time but slows the
baselines through the shared host: 430M's 1-GPU rate fell 7.3 % packed (2 H200s, docs/benchmarks.md),
inflating its efficiency. Every job gets the same OMP_NUM_THREADS. `--variant NAME=JSON` merges
DeepSpeed config keys over pipeline/engine.py's config for the W > 1 jobs (their 1-GPU baseline is
the default config). NVLink multicast stays off in every job (pipeline/distributed_env.py). Prints a
markdown table; `--json FILE` also writes the rows.
"""

from __future__ import annotations

import os
import sys

# bench/ must not shadow stdlib modules for numpy/torch (see bench/train_throughput.py).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


def _throughput_bench() -> Any:
    """bench/train_throughput.py as a module (model sizes, vocabularies, configs, figures): one source."""
    spec = importlib.util.spec_from_file_location("train_throughput", os.path.join(_HERE, "train_throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_rank(spec: dict[str, Any]) -> dict[str, Any] | None:
    """One rank of one configuration (under torchrun): train, and on rank 0 return the measured row."""
    import torch.distributed as dist

    import pipeline.engine
    import pipeline.train

    bench = _throughput_bench()
    pipeline.engine.BF16_STAGE0 = "master"  # bf16 at ZeRO-0: bf16 weights + our fp32 masters (the fastest path)
    # The variant's DeepSpeed keys, through the loop's own hook (merged into every engine's config).
    pipeline.train.DS_OVERRIDES = pipeline.engine.merge_config(pipeline.train.DS_OVERRIDES, spec.get("ds") or {})

    model_cfg, cfg = bench.bench_configs(spec)
    windows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as out:
        log = lambda metrics, step: windows.append({**metrics, "step": step})  # noqa: E731 - rank 0 only
        pipeline.train.train(cfg, model_cfg, spec["data"], out, log_metrics=log, checkpoints=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.destroy_process_group()
    if rank != 0:
        return None
    figures = bench.measured_figures(windows, spec["warmup"] + spec["steps"])
    tokens_per_step = spec["micro_bsz"] * spec["ctx"] * world
    return {
        **{k: v for k, v in spec.items() if k != "data"},
        **figures,
        "world": world,
        "tokens_per_s_per_gpu": figures["tokens_per_s"] / world,
        "step_ms": 1000 * tokens_per_step / figures["tokens_per_s"],
    }


def launch(spec: dict[str, Any], devices: list[int] | None, threads: int) -> subprocess.Popen:
    """Start one configuration as a torchrun job on `devices` (None: CPU, gloo)."""
    from pipeline.distributed_env import multicast_off_env

    world = spec["world"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", **multicast_off_env())
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world}",
        os.path.abspath(__file__),
        "--one",
        json.dumps(spec),
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def collect(spec: dict[str, Any], process: subprocess.Popen, started: float, timeout: float) -> dict[str, Any]:
    try:
        output, _ = process.communicate(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        return {**spec, "error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - started}
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    # A failed rank prints "[rankN]: Traceback ...": keep that part (torchrun's own traceback says nothing).
    ranked = [line for line in output.splitlines() if line.startswith("[rank")]
    error = "\n".join(ranked)[-1500:] or output[-1500:] or f"exit {process.returncode}"
    row = json.loads(lines[-1][7:]) if lines else {**spec, "error": error}
    row.pop("data", None)
    row["wall_s"] = time.perf_counter() - started
    return row


def specs_by_group(args: argparse.Namespace, data: Path) -> list[list[dict[str, Any]]]:
    """Groups of specs that share everything but the world size: [the 1-GPU spec, the W-GPU specs...]."""
    micro = {name: int(size) for name, _, size in (item.partition("=") for item in args.micro_bsz)}
    variants = [("default", {})] + [
        (name, json.loads(text)) for name, _, text in (item.partition("=") for item in args.variant)
    ]
    grid = [(model, zero, compiled) for model in args.models for zero in args.zero for compiled in args.compile]
    if args.configs:  # explicit MODEL,ZERO,COMPILE triples instead of the grid, in this order
        grid = [(m, int(z), int(c)) for m, z, c in (item.split(",") for item in args.configs)]
    groups = []
    for model, zero, compiled in grid:
        base = {
            "model": model,
            "zero": zero,
            "compile": compiled,
            "micro_bsz": micro.get(model, 16),
            "precision": args.precision,
            "ctx": args.ctx,
            "backend": args.backend,
            "steps": args.steps,
            "warmup": args.warmup,
            "fused_loss_chunk": args.fused_loss_chunk,
            "data": str(data),
        }
        group = [{**base, "world": 1, "variant": "default", "ds": {}}] if 1 in args.gpus else []
        for world in (w for w in args.gpus if w > 1):
            group += [{**base, "world": world, "variant": name, "ds": ds} for name, ds in variants]
        groups.append(group)
    return groups


def run_all(args: argparse.Namespace, data: Path) -> list[dict[str, Any]]:
    """1-GPU jobs of consecutive groups together (one per GPU), then each group's multi-GPU jobs in turn."""
    import torch

    gpus = 0 if args.cpu else torch.cuda.device_count()
    pack = max(1, gpus) if args.pack and gpus >= 2 else 1
    deadline = time.monotonic() + (args.budget if args.budget is not None else float("inf"))
    groups, rows = specs_by_group(args, data), []
    for first in range(0, len(groups), pack):
        batch = groups[first : first + pack]
        singles = [group[0] for group in batch if group and group[0]["world"] == 1]
        phases = [singles] + [[spec] for group in batch for spec in group if spec["world"] > 1]
        for phase in phases:
            timeout = min(args.timeout, deadline - time.monotonic())
            if timeout < 30:
                rows += [{**s, "error": "skipped: out of --budget", "wall_s": 0.0} for s in phase]
                continue
            started = time.perf_counter()
            running, next_gpu = [], 0
            for spec in phase:
                devices = None if args.cpu else list(range(next_gpu, next_gpu + spec["world"]))
                next_gpu = (next_gpu + spec["world"]) % max(gpus, 1)
                running.append((spec, launch(spec, devices, args.threads)))
            for spec, process in running:
                row = collect(spec, process, started, timeout - (time.perf_counter() - started))
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def efficiency_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each W > 1 row with its 1-GPU baseline's tokens/s and the scaling efficiency."""
    key = ("model", "zero", "compile", "micro_bsz", "precision", "ctx", "backend", "fused_loss_chunk")
    base = {tuple(r[k] for k in key): r for r in rows if r.get("world") == 1 and "error" not in r}
    for row in rows:
        single = base.get(tuple(row.get(k) for k in key))
        if row.get("world", 1) > 1 and single is not None and "error" not in row:
            row["tokens_per_s_1gpu"] = single["tokens_per_s"]
            row["efficiency"] = row["tokens_per_s"] / (row["world"] * single["tokens_per_s"])
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print()
    print(
        "| model | ZeRO | micro-bsz / GPU | compile | GPUs | variant | tokens/s | tokens/s per GPU | step ms | MFU "
        "| scaling efficiency | peak mem GiB | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['model']} | {r['zero']} | {r['micro_bsz']} | {'yes' if r['compile'] else 'no'} | {r['world']} "
        head += f"| {r.get('variant', 'default')} "
        if "error" in r:
            last = r["error"].strip().splitlines()[-1] if r["error"].strip() else "?"
            print(head + f"| failed: {last[:120]} | | | | | | {r['wall_s']:.0f} |")
            continue
        eff = f"{100 * r['efficiency']:.1f} %" if "efficiency" in r else ("(baseline)" if r["world"] == 1 else "")
        print(
            head + f"| {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['step_ms']:.1f} "
            f"| {100 * r['mfu']:.1f} % | {eff} | {r.get('gpu_mem_peak_gib', 0):.1f} | {r['wall_s']:.0f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["169m", "430m"])
    parser.add_argument("--zero", type=int, nargs="+", default=[2, 3, 0], help="ZeRO stages (0: our bf16 optimizer)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="world sizes; 1 is the baseline")
    parser.add_argument("--micro-bsz", nargs="+", default=["169m=64", "430m=32"], help="MODEL=SIZE per GPU (16)")
    parser.add_argument("--compile", type=int, nargs="+", default=[1], help="0 eager, 1 torch.compile")
    parser.add_argument("--configs", nargs="*", default=[], help="MODEL,ZERO,COMPILE triples (replace the grid)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--backend", default=None, help="WKV backend (default: cuda, or torch with --cpu)")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument(
        "--fused-loss-chunk", type=int, default=8192, help="train.fused_loss_chunk (0: unfused; 8192: the 1-GPU best)"
    )
    parser.add_argument("--steps", type=int, default=12, help="measured steps")
    parser.add_argument("--warmup", type=int, default=6, help="unmeasured steps first (compilation)")
    parser.add_argument("--variant", nargs="*", default=[], help="NAME=JSON DeepSpeed overrides for W > 1 jobs")
    parser.add_argument(
        "--pack", type=int, default=0, help="1: 1-GPU jobs of several configs at once, one per GPU (faster, noisier)"
    )
    parser.add_argument("--threads", type=int, default=4, help="OMP_NUM_THREADS of every process")
    parser.add_argument("--cpu", action="store_true", help="no GPUs: gloo processes (smoke test)")
    parser.add_argument("--data", default=None, help="shard directory (default: synthetic, made once)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--timeout", type=float, default=400, help="seconds per job")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all; later jobs are skipped")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one rank of one spec (JSON)
    args = parser.parse_args()
    args.backend = args.backend or ("torch" if args.cpu else "cuda")
    if args.one:
        row = run_rank(json.loads(args.one))
        if row is not None:
            print("RESULT " + json.dumps(row), flush=True)
        return 0

    with tempfile.TemporaryDirectory(prefix="scaling-shards-") as scratch:
        data = Path(args.data) if args.data else Path(scratch)
        if args.data is None:
            micro = max(int(item.partition("=")[2]) for item in args.micro_bsz)
            needed = (args.steps + args.warmup + 2) * micro * (args.ctx + 1) * max(args.gpus) * 2
            from tokenization.synthetic import write_synthetic_shards

            write_synthetic_shards(data, tokens=max(needed, 1 << 20), vocab_size=_throughput_bench().DATA_VOCAB)
        rows = efficiency_rows(run_all(args, data))
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
