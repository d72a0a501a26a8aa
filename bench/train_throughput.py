"""Training throughput of RWKV-4 on one device: tokens/s and MFU, per WKV backend, with and without torch.compile.

    python bench/train_throughput.py                                   # 169M and 430M, bf16, ctx 1024 (GPU)
    python bench/train_throughput.py --models 169m --backends cuda --compile 0 1 --steps 40
    python bench/train_throughput.py --models 169m --backends cuda --zero 0 2 --micro-bsz 16 32 --compile 0
    python bench/train_throughput.py --models 169m --backends cuda --zero 0 --micro-bsz 64 --compile 1 \
        --fused-loss-chunk 0 4096                                      # the fused head loss, side by side
    python bench/train_throughput.py --models 169m --backends cuda --zero 0 --micro-bsz 64 --compile 1 \
        --host-sync old new --profile 3 --out prof/                    # the loop's host syncs; kernel profile
    python bench/train_throughput.py --models tiny --backends torch --precision fp32 --ctx 64 \
        --micro-bsz 4 --steps 6 --warmup 2                             # CPU smoke run

Each configuration runs in its own process through the real training loop (pipeline.train.train:
the DeepSpeed engine at the `--zero` stage, the optimizer groups, L2Wrap, the LR schedule, clipping,
the finite-loss check; bf16 at ZeRO-0 means our optimizer, on bf16 weights with fp32 masters
("master") or on fp32 weights under torch.autocast ("autocast"), and
bf16 at ZeRO >= 1 DeepSpeed's bf16 weights with fp32 master copies: see pipeline/engine.py), on synthetic
shards of random tokens with the RWKV-4 Pile vocabulary (50277; the model pads it to 50304, a multiple
of 128, which keeps the head matmuls on fast kernels). tokens/s is measured over the steps after the
first `--warmup` (compilation, allocator and kernel autotuning happen there). MFU counts the model
FLOPs of reference/rwkv4.md §8.1, 6 (V D + 13 D² L) per token, against `--peak-tflops` (H200 dense
bf16: 989). Prints a markdown table; `--json FILE` also writes the rows.

`--host-sync old` restores the loop's host synchronisations as they were before the deferred
non-finite check (pipeline/train.py: DEFER_FINITE_CHECK, DS_OVERRIDES' throughput timer, PIN_BATCHES);
`new` is the loop as it is. `--profile N` records N more steps after the measured ones under
torch.profiler and prints, per configuration, the top kernels by device time, the device's idle share
and the host's synchronising CUDA calls (`--out DIR` keeps the text and a gzipped trace).
`--inductor profile_bandwidth=1 --out DIR` writes each Triton kernel's time alone, bytes and GB/s
(Inductor's own per-kernel benchmark) to DIR/kernel-bandwidth-*.txt; that run's tokens/s do not count.
"""

from __future__ import annotations

import os
import sys

# bench/ holds a tokenize.py, which would shadow the stdlib module that numpy and torch import.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

SIZES = {"tiny": (2, 64), "169m": (12, 768), "430m": (24, 1024)}  # (n_layer, n_embd)
DATA_VOCAB, MODEL_VOCAB = 50277, 50304


def bench_configs(spec: dict, extra_steps: int = 0) -> tuple[Any, Any]:
    """(ModelConfig, TrainConfig) of one bench row: `warmup` + `steps` (+ extra) steps, logged after the warmup.

    spec keys: model (a SIZES key), backend, ctx, micro_bsz, warmup, steps, precision, zero, compile;
    optional peak_tflops, fused_loss_chunk, chunk_len, grad_checkpointing, fused_ln_mix (default on, as the
    model's).
    bench/train_scaling.py builds its rows with this too.
    """
    from model import ModelConfig
    from pipeline.config import TrainConfig

    n_layer, n_embd = SIZES[spec["model"]]
    model_cfg = ModelConfig(
        n_layer=n_layer,
        n_embd=n_embd,
        vocab_size=MODEL_VOCAB,
        wkv_backend=spec["backend"],
        fused_ln_mix=bool(spec.get("fused_ln_mix", True)),
    )
    cfg = TrainConfig(
        ctx_len=spec["ctx"],
        micro_bsz=spec["micro_bsz"],
        steps=spec["warmup"] + spec["steps"] + extra_steps,
        warmup_steps=0,
        precision=spec["precision"],
        zero_stage=spec["zero"],
        compile=bool(spec["compile"]),
        log_every=spec["warmup"],
        val_every=1 << 30,
        val_batches=1,
        fused_loss_chunk=spec.get("fused_loss_chunk", 0),
        chunk_len=spec.get("chunk_len", 0),
        grad_checkpointing=bool(spec.get("grad_checkpointing", 0)),
        **({"peak_tflops": spec["peak_tflops"]} if "peak_tflops" in spec else {}),
    )
    return model_cfg, cfg


def run_one(spec: dict) -> dict:
    """One configuration, in this process: train `steps` steps and report the post-warmup throughput."""

    import pipeline.engine
    import pipeline.train
    from pipeline.train import train

    pipeline.engine.BF16_STAGE0 = spec["bf16_stage0"]  # the training loop builds its engine with the default
    if spec.get("host_sync", "new") == "old":  # the loop's syncs before the deferred check
        pipeline.train.DEFER_FINITE_CHECK, pipeline.train.PIN_BATCHES = False, False
        pipeline.train.DS_OVERRIDES = {}
    if spec.get("compile_mode", "default") != "default":
        pipeline.train.COMPILE_KWARGS = {"mode": spec["compile_mode"]}
    pipeline.train.SKIP_ONE_RANK_ALLREDUCE = bool(spec.get("skip_allreduce", 1))
    apply_inductor_options(spec.get("inductor", ""))
    if spec.get("wkv_defines"):  # a build variant of cuda/wkv.cu's tuning macros for every WKV call
        import model.wkv_cuda

        model.wkv_cuda.OP_DEFINES = tuple(spec["wkv_defines"].split(","))
    from torch._inductor import config as inductor_config

    if inductor_config.profile_bandwidth:  # set by --inductor (or TORCHINDUCTOR_PROFILE)
        keep_kernel_bandwidth(spec.get("out"), spec_label(spec))
    import model.fused_loss

    model.fused_loss.ROW_KERNEL = spec.get("row_kernel", "cuda")
    if spec.get("ln_mix_settings"):  # launch settings of the fused LayerNorm-mix kernels
        import model.ln_shift_mix

        model.ln_shift_mix.set_launch_settings([int(v) for v in spec["ln_mix_settings"].split(",")])

    profiled = spec.get("profile", 0)
    model_cfg, cfg = bench_configs(spec, extra_steps=profiled)
    windows: list[dict] = []
    profiler = step_profiler(spec["warmup"] + spec["steps"], profiled) if profiled else None
    with tempfile.TemporaryDirectory() as out:
        if profiler is not None:
            profiler.start()
        train(
            cfg,
            model_cfg,
            spec["data"],
            out,
            log_metrics=lambda m, step: windows.append({**m, "step": step}),
            checkpoints=False,
            on_step=None if profiler is None else lambda step: profiler.step(),
        )
        if profiler is not None:
            profiler.stop()
    row = {**spec, **measured_figures(windows, spec["warmup"] + spec["steps"])}
    if profiler is not None:
        row["profile"] = summarize_profile(
            profiler, profiled, spec.get("out"), spec_label(spec), trace=spec.get("trace", False)
        )
    return row


def spec_label(spec: dict) -> str:
    """A file-name-safe label of one configuration (profile and kernel-bandwidth files)."""
    keys = ("model", "micro_bsz", "compile", "fused_loss_chunk", "host_sync", "skip_allreduce")
    label = "_".join(str(spec.get(k, "")) for k in keys)
    if spec.get("inductor"):
        label += "_" + file_safe(spec["inductor"])
    if spec.get("row_kernel", "cuda") != "cuda":
        label += f"_{spec['row_kernel']}rows"
    if spec.get("fused_ln_mix"):
        label += "_fusedlnmix" + (f"_{file_safe(spec['ln_mix_settings'])}" if spec.get("ln_mix_settings") else "")
    if spec.get("wkv_defines"):
        label += "_" + file_safe(spec["wkv_defines"])
    return label


def file_safe(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text)


def keep_kernel_bandwidth(out_dir: str | None, label: str) -> None:
    """With `--inductor profile_bandwidth=1` Inductor times every Triton kernel alone on its first call
    and logs ms, GB and GB/s per kernel, then per compiled graph, at INFO: keep those lines in
    OUT/kernel-bandwidth-LABEL.txt. The run's tokens/s are then meaningless (each kernel is benchmarked
    inside the first steps), and a kernel that writes into one of its inputs is timed with a copy of
    that input (Inductor clones mutated arguments inside the timed call), so its GB/s reads low."""
    import logging

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--inductor profile_bandwidth=1 times Triton kernels: it needs a CUDA GPU")
    if out_dir is None:
        raise SystemExit("--inductor profile_bandwidth=1 needs --out DIR for the per-kernel file")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("torch._inductor.runtime.triton_heuristics")
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.FileHandler(Path(out_dir) / f"kernel-bandwidth-{label}.txt"))


def apply_inductor_options(options: str) -> None:
    """'key=value,key2=value2' set on torch._inductor.config (dotted keys reach sub-configs, e.g.
    'coordinate_descent_tuning=1,triton.unique_kernel_names=1'); values parse as Python literals."""
    import ast

    from torch._inductor import config

    for item in filter(None, options.split(",")):
        key, _, text = item.partition("=")
        *parents, leaf = key.strip().split(".")
        target = config
        for parent in parents:
            target = getattr(target, parent)
        if not hasattr(target, leaf):
            raise SystemExit(f"--inductor: torch._inductor.config has no option {key!r}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        setattr(target, leaf, value)


def measured_figures(windows: list[dict], last_measured: int) -> dict[str, Any]:
    """tokens/s, MFU, last loss, peak GPU memory and device of a run from its metric windows.

    windows: the loop's logged metrics with their "step"; the first window holds the warm-up, windows
    after step `last_measured` hold profiled steps: neither is measured.
    """
    import torch

    measured = [w for w in windows[1:] if "tokens_per_s" in w and w["step"] <= last_measured]
    figures = {
        "tokens_per_s": sum(w["tokens_per_s"] for w in measured) / len(measured),
        "mfu": sum(w["mfu"] for w in measured) / len(measured),
        "loss_last": measured[-1]["loss"],
    }
    if torch.cuda.is_available():
        figures["gpu_mem_peak_gib"] = max(w.get("gpu_mem_peak_gib", 0.0) for w in windows)
        figures["device"] = torch.cuda.get_device_name()
    return figures


def step_profiler(skip: int, steps: int):
    """torch.profiler over `steps` optimizer steps after the first `skip` (stepped by train's on_step)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=activities, schedule=schedule(wait=skip - 1, warmup=1, active=steps, repeat=1))


WKV_KERNELS = (
    "fwd_summaries",
    "fwd_segment_scan",
    "fwd_outputs",
    "bwd_summaries",
    "bwd_segment_scan",
    "bwd_gradients",
    "bwd_reduce",
)


def kernel_category(name: str) -> str:
    """A device op's kind by its name: where a step's device time goes."""
    lowered = name.lower()
    if any(key in lowered for key in ("nvjet", "gemm", "cutlass", "xmma")):
        return "matmul (cuBLAS)"
    if any(key in name for key in WKV_KERNELS):
        return "WKV kernels"
    if name.startswith("triton_"):
        kind = name.split("_")[1] if name.count("_") >= 2 else ""
        return f"Inductor Triton ({kind})" if kind in ("poi", "red", "per", "tem") else "Inductor Triton"
    if "nccl" in lowered:
        return "NCCL"
    if "memcpy" in lowered or "memset" in lowered:
        return "memcpy / memset"
    if any(key in lowered for key in ("adam", "multi_tensor", "foreach")):
        return "optimizer (foreach / fused Adam)"
    return "other (eager ATen)"


SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def summarize_profile(prof, steps: int, out: str | None, label: str, top: int = 20, trace: bool = False) -> dict:
    """Top kernels by device time, device idle share over the profiled span, host-sync calls; as text + dict.

    Idle = 1 - (union of kernel/memcpy/memset intervals) / (first device start .. last device end).
    Sync calls: the CUDA runtime calls that make the host wait (cudaMemcpy without Async included),
    counted per step, with their host time.
    """
    import gzip
    import shutil

    kernels: dict[str, list[float]] = {}
    intervals, syncs = [], {}
    events = prof.events()
    # The host runs ahead of the device, so the device still works on the step before the first profiled
    # one when profiling starts: only device ops inside the profiled steps' device-side spans (their
    # ProfilerStep annotations mirrored on the device timeline) are counted, or every step's figures would
    # hold ~1.5 steps' kernels (as before 2026-11-30, session 12).
    windows = sorted(
        (event.time_range.start, event.time_range.end)
        for event in events
        if event.device_type.name == "CUDA" and event.name.startswith("ProfilerStep")
    )
    steps = len(windows) or steps

    def in_profiled_step(start: float) -> bool:
        return not windows or any(low <= start <= high for low, high in windows)

    for event in events:
        # user annotations (ProfilerStep#N, Optimizer.step#...) are mirrored on the device timeline: not kernels
        annotation = getattr(event, "is_user_annotation", False) or event.name.startswith("ProfilerStep")
        if event.device_type.name == "CUDA" and not annotation and "#" not in event.name:
            if not in_profiled_step(event.time_range.start):
                continue
            entry = kernels.setdefault(event.name, [0.0, 0.0])
            entry[0] += event.device_time_total / steps
            entry[1] += 1 / steps
            intervals.append((event.time_range.start, event.time_range.end))
        elif event.name.startswith(SYNC_CALLS) and "Async" not in event.name:
            entry = syncs.setdefault(event.name, [0.0, 0.0])
            entry[0] += event.cpu_time_total / steps
            entry[1] += 1 / steps
        elif event.name == "cudaMemcpyAsync":  # D2H/pageable copies can block too: listed with their host time
            entry = syncs.setdefault(event.name, [0.0, 0.0])
            entry[0] += event.cpu_time_total / steps
            entry[1] += 1 / steps
    busy, span, cursor = 0.0, 0.0, None
    if intervals:
        intervals.sort()
        span = intervals[-1][1] - intervals[0][0]
        for start, end in intervals:
            if cursor is None or start > cursor:
                busy += end - start
                cursor = end
            elif end > cursor:
                busy += end - cursor
                cursor = end
    categories: dict[str, list[float]] = {}
    for name, (total, count) in kernels.items():
        entry = categories.setdefault(kernel_category(name), [0.0, 0.0])
        entry[0] += total
        entry[1] += count
    lines = [
        f"profile {label}: {steps} steps, device span {span / 1000 / max(steps, 1):.1f} ms per step, busy "
        f"{busy / 1000 / max(steps, 1):.1f} ms, idle {100 * (1 - busy / span) if span else 0:.1f} %, "
        f"{sum(n for _, n in kernels.values()):.0f} device ops per step",
        "| kernel | ms per step | % of busy | launches per step |",
        "|---|---|---|---|",
    ]
    ranked = sorted(kernels.items(), key=lambda item: -item[1][0])
    for name, (total, count) in ranked[:top]:
        lines.append(
            f"| {name[:100]} | {total / 1000:.2f} | {100 * total * steps / max(busy, 1e-9):.1f} | {count:.0f} |"
        )
    lines += ["| kernel category (all kernels) | ms per step | % of busy | launches per step |", "|---|---|---|---|"]
    for name, (total, count) in sorted(categories.items(), key=lambda item: -item[1][0]):
        lines.append(f"| {name} | {total / 1000:.2f} | {100 * total * steps / max(busy, 1e-9):.1f} | {count:.0f} |")
    lines += ["| host call that can wait for the device | ms per step (host) | calls per step |", "|---|---|---|"]
    for name, (total, count) in sorted(syncs.items(), key=lambda item: -item[1][0]):
        lines.append(f"| {name} | {total / 1000:.2f} | {count:.1f} |")
    text = "\n".join(lines)
    print(text, flush=True)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        every = [f"| {name[:160]} | {total / 1000:.3f} | {count:.0f} |" for name, (total, count) in ranked]
        (Path(out) / f"profile_{label}.md").write_text(
            text
            + "\n\nEvery kernel:\n| kernel | ms per step | launches per step |\n|---|---|---|\n"
            + "\n".join(every)
            + "\n"
        )
    if out and trace:
        path = Path(out) / f"trace_{label}.json"
        prof.export_chrome_trace(str(path))
        with open(path, "rb") as raw, gzip.open(f"{path}.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        path.unlink()
    return {"idle_pct": 100 * (1 - busy / span) if span else 0.0, "busy_ms": busy / 1000 / max(steps, 1), "text": text}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["169m", "430m"], choices=sorted(SIZES))
    parser.add_argument("--backends", nargs="+", default=["torch", "cuda"])
    parser.add_argument("--compile", nargs="+", type=int, default=[0, 1], help="0 eager, 1 torch.compile")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument(
        "--chunk-len", type=int, default=0, help="train.chunk_len: each sample in chunks, state carried (0: whole)"
    )
    parser.add_argument(
        "--grad-checkpointing", type=int, nargs="+", default=[0], help="train.grad_checkpointing: 1 recomputes blocks"
    )
    parser.add_argument("--micro-bsz", type=int, nargs="+", default=[16], help="16 x 1024 = 16,384 tokens per step")
    parser.add_argument("--zero", type=int, nargs="+", default=[0], help="ZeRO stages (0: our bf16 optimizer)")
    parser.add_argument("--bf16-stage0", nargs="+", default=["master"], choices=["master", "autocast"])
    parser.add_argument(
        "--fused-loss-chunk", type=int, nargs="+", default=[0], help="train.fused_loss_chunk values (0: unfused)"
    )
    parser.add_argument(
        "--host-sync", nargs="+", default=["new"], choices=["old", "new"], help="the loop's host syncs (docstring)"
    )
    parser.add_argument(
        "--compile-mode",
        nargs="+",
        default=["default"],
        choices=["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"],
        help="torch.compile mode with --compile 1",
    )
    parser.add_argument(
        "--skip-allreduce", type=int, nargs="+", default=[1], help="0: keep DeepSpeed's one-rank gradient all-reduce"
    )
    parser.add_argument(
        "--row-kernel",
        nargs="+",
        default=["cuda"],
        choices=["torch", "cuda"],
        help="model.fused_loss.ROW_KERNEL with a fused loss chunk",
    )
    parser.add_argument(
        "--inductor",
        nargs="+",
        default=[""],
        help="torch._inductor.config settings, one 'key=value,...' per configuration ('' = defaults)",
    )
    parser.add_argument(
        "--fused-ln-mix",
        type=int,
        nargs="+",
        default=[1],
        help="1: ModelConfig.fused_ln_mix, each block's LayerNorm-mix in one Triton kernel (the default), 0: off",
    )
    parser.add_argument(
        "--ln-mix-settings",
        nargs="+",
        default=[""],
        help="model/ln_shift_mix.py launch settings, one configuration each as bench/ln_shift_mix.py takes them"
        " ('' = the module's)",
    )
    parser.add_argument(
        "--wkv-defines",
        nargs="+",
        default=[""],
        help="cuda/wkv.cu build variants, one 'MACRO=VALUE,...' per configuration ('' = the default build)",
    )
    parser.add_argument("--profile", type=int, default=0, help="profile this many steps after the measured ones")
    parser.add_argument("--out", default=None, help="with --profile: write the profile text here")
    parser.add_argument("--trace", action="store_true", help="with --profile and --out: also a gzipped trace")
    parser.add_argument("--steps", type=int, default=30, help="measured steps")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured steps first")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--data", default=None, help="shard directory (default: synthetic, made once)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all; later configs are skipped")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one spec (JSON)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-shards-") as scratch:
        data = Path(args.data) if args.data else Path(scratch)
        if args.data is None:
            needed = (args.steps + args.warmup + 2) * max(args.micro_bsz) * (args.ctx + 1) * 2
            from tokenization.synthetic import write_synthetic_shards

            write_synthetic_shards(data, tokens=max(needed, 1 << 20), vocab_size=DATA_VOCAB)
        rows = run_all(args, data)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def run_all(args: argparse.Namespace, data: Path) -> list[dict]:
    """Every (model, backend, zero, micro-bsz, compile) configuration in its own process; one JSON row each."""
    rows = []
    deadline = time.monotonic() + (args.budget if args.budget is not None else float("inf"))
    fixed = {
        "precision": args.precision,
        "ctx": args.ctx,
        "chunk_len": args.chunk_len,
        "profile": args.profile,
        "out": args.out,
        "trace": args.trace,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": args.peak_tflops,
        "data": str(data),
    }
    grid = [
        {
            "model": model,
            "backend": backend,
            "zero": zero,
            "bf16_stage0": mode,
            "compile": compiled,
            "micro_bsz": micro_bsz,
            "fused_loss_chunk": fused,
            "host_sync": host_sync,
            "compile_mode": compile_mode,
            "skip_allreduce": skip,
            "inductor": inductor,
            "row_kernel": row_kernel,
            "wkv_defines": wkv_defines,
            "fused_ln_mix": fused_ln_mix,
            "ln_mix_settings": ln_mix_settings,
            "grad_checkpointing": checkpointing,
            **fixed,
        }
        for model in args.models
        for backend in args.backends
        for zero in args.zero
        for mode in (args.bf16_stage0 if zero == 0 else ["master"])
        for micro_bsz in args.micro_bsz
        for compiled in args.compile
        for fused in args.fused_loss_chunk
        for host_sync in args.host_sync
        for compile_mode in (args.compile_mode if compiled else ["default"])
        for skip in args.skip_allreduce
        for inductor in (args.inductor if compiled else [""])
        for row_kernel in (args.row_kernel if fused else ["cuda"])
        for wkv_defines in (args.wkv_defines if backend == "cuda" else [""])
        for fused_ln_mix in args.fused_ln_mix
        for ln_mix_settings in (args.ln_mix_settings if fused_ln_mix else [""])
        for checkpointing in args.grad_checkpointing
    ]
    for spec in grid:
        started = time.perf_counter()
        timeout = min(args.timeout, deadline - time.monotonic())
        if timeout < 20:
            rows.append({**spec, "error": "skipped: out of --budget", "wall_s": 0.0})
            continue
        command = [sys.executable, __file__, "--one", json.dumps(spec)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            # The exception's line is often far above the tail (a compiler's log follows it): kept apart.
            failed = {**spec, "error": failure_line(done.stderr), "stderr_tail": done.stderr[-800:]}
            row = json.loads(lines[-1][7:]) if lines else failed
        except subprocess.TimeoutExpired:
            row = {**spec, "error": f"timed out after {timeout:.0f} s"}
        row["wall_s"] = time.perf_counter() - started
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def failure_line(error: str) -> str:
    """The line of a failed row's stderr that says why: the last one naming an exception (shutdown
    warnings print after it), else the last line."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    named = [line for line in lines if re.search(r"\w+(Error|Exception)\b|^Killed|timed out|skipped", line)]
    return (named or lines or ["?"])[-1]


def print_table(rows: list[dict]) -> None:
    for row in rows:  # the profiles first, so that the table is what a log's tail shows
        if isinstance(row.get("profile"), dict):
            print("\n" + row["profile"]["text"])
    print()
    header = (
        "| model | WKV backend | precision path | micro-bsz | torch.compile | fused loss chunk | host syncs "
        "| tokens/s | MFU | peak GPU mem (GiB) | device idle (profile) |"
    )
    print(header + " wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            cells = f"failed: {failure_line(row['error'])} | | | |"
        else:
            idle = f"{row['profile']['idle_pct']:.1f} %" if isinstance(row.get("profile"), dict) else ""
            memory = row.get("gpu_mem_peak_gib", 0)
            cells = f"{row['tokens_per_s']:,.0f} | {100 * row['mfu']:.1f} % | {memory:.1f} | {idle} |"
        compiled = "yes" if row["compile"] else "no"
        if row.get("compile_mode", "default") != "default":
            compiled += f" ({row['compile_mode']})"
        if row.get("skip_allreduce"):
            compiled += ", no 1-rank all-reduce"
        if row.get("inductor"):
            compiled += f", inductor {row['inductor']}"
        if row.get("fused_ln_mix"):
            compiled += ", fused LN-mix" + (f" {row['ln_mix_settings']}" if row.get("ln_mix_settings") else "")
        backend = row["backend"] + (f" ({row['wkv_defines']})" if row.get("wkv_defines") else "")
        path = precision_path(row["precision"], row["zero"], row.get("bf16_stage0", "master"))
        fused = row.get("fused_loss_chunk", 0) or "off"
        if row.get("row_kernel", "cuda") != "cuda":
            fused = f"{fused}, {row['row_kernel']} row kernel"
        syncs = row.get("host_sync", "new")
        model = row["model"] + (f", ctx {row['ctx']}" if row.get("ctx", 1024) != 1024 else "")
        if row.get("chunk_len"):
            model += f", chunks of {row['chunk_len']}"
        if row.get("grad_checkpointing"):
            model += ", blocks recomputed"
        config = f"| {model} | {backend} | {path} | {row['micro_bsz']} | {compiled} | {fused} | {syncs} |"
        print(f"{config} {cells} {row['wall_s']:.0f} |")


def precision_path(precision: str, zero: int, mode: str) -> str:
    if precision != "bf16":
        return f"{precision}, ZeRO-{zero}"
    if zero == 0:
        return "ZeRO-0, bf16 weights + our fp32 masters" if mode == "master" else "ZeRO-0, fp32 weights + autocast"
    return f"ZeRO-{zero}, DeepSpeed bf16 + fp32 masters"


if __name__ == "__main__":
    sys.exit(main())
