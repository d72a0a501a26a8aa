"""Where a training step's time goes: plain PyTorch vs the DeepSpeed engine, per phase, and a kernel profile.

    python bench/train_step_breakdown.py                       # 169M, bf16, 16 x 1024 tokens, the default runs
    python bench/train_step_breakdown.py --runs master-z0 autocast-z0 bf16-z2 --micro-bsz 16 32 64
    python bench/train_step_breakdown.py --runs master-z0 --profile master-z0 --out prof/
    python bench/train_step_breakdown.py --model tiny --backend torch --ctx 64 --micro-bsz 2 \
        --runs plain plain-master master-z0 autocast-z0 bf16-z2 --repeats 2 --profile master-z0   # CPU smoke

Runs (RUNS below; a `-compile` suffix adds torch.compile of the model):
  plain          the model cast to bf16, fused torch AdamW, no DeepSpeed, no fp32 master weights
  plain-master   the model cast to bf16, pipeline.optim.MasterWeightAdam (fp32 masters), no DeepSpeed
  plain-autocast fp32 weights under torch.autocast(bf16), pipeline.optim.clipped_adam, no DeepSpeed
  master-z0      pipeline.engine.build_engine at ZeRO-0, bf16 "master" path (the training loop's default for
                 bf16 at stage 0: plain-master inside DeepSpeed)
  autocast-z0    the same with the "autocast" path (plain-autocast inside DeepSpeed)
  bf16-z0/z2     DeepSpeed bf16 (bf16 weights, fp32 master copy, FusedAdam) at ZeRO-0 / ZeRO-2, as the
                 loop builds bf16 at stage >= 1 (stage 0 forced to DeepSpeed's bf16 wrapper here)
Phases are timed with a device synchronisation around each (so they add up to more than a pipelined
step): forward+loss, backward, optimizer step; "step" is the three back to back, no syncs between.
`--profile RUN` records 3 steps of that run (first micro-batch size) with torch.profiler and prints the
kernels that take the most device time and the device's busy fraction; `--out DIR` keeps the trace.
Runs on CPU too (tiny model), for checking the script.
"""

from __future__ import annotations

import os
import sys

sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import gzip  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

SIZES = {"tiny": (2, 64), "169m": (12, 768), "430m": (24, 1024)}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# DeepSpeed bf16 at stage 0: the FP16_Optimizer wrapper in bf16 mode, with DeepSpeed's FusedAdam.
DS_BF16 = {"bf16": {"enabled": True, "check_grad_overflow": False}, "torch_autocast": {"enabled": False}}
RUNS = ("plain", "plain-master", "plain-autocast", "master-z0", "autocast-z0", "bf16-z0", "bf16-z2")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _phases(forward_loss: Callable, backward: Callable, step: Callable, repeats: int) -> dict[str, float]:
    """Milliseconds per phase (each synchronised), and of the whole step run back to back."""

    def full() -> None:
        backward(forward_loss())
        step()

    for _ in range(3):  # warm up (compilation, allocator, autotuning)
        full()
    totals = {"fwd_ms": 0.0, "bwd_ms": 0.0, "opt_ms": 0.0}
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        loss = forward_loss()
        _sync()
        t1 = time.perf_counter()
        backward(loss)
        _sync()
        t2 = time.perf_counter()
        step()
        _sync()
        t3 = time.perf_counter()
        for key, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            totals[key] += 1000 * seconds / repeats
    _sync()
    started = time.perf_counter()
    for _ in range(repeats):
        full()
    _sync()
    return {**totals, "step_ms": 1000 * (time.perf_counter() - started) / repeats}


def build_run(name: str, model_cfg, micro_bsz: int, ctx: int, n_layer: int):
    """(forward_loss(x, y), backward(loss), step()) of one run, on DEVICE."""
    from model import build_model
    from model.loss import language_model_loss
    from pipeline.config import TrainConfig
    from pipeline.engine import build_engine, merge_config, optimizer_config
    from pipeline.optim import MasterWeightAdam, clipped_adam, param_groups, set_learning_rate
    from pipeline.train import DS_OVERRIDES

    kind, compiled = name.removesuffix("-compile"), name.endswith("-compile")
    if compiled:  # older engines compiled one frame per block; harmless now
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * n_layer)
    if kind.startswith("plain"):
        model = build_model(model_cfg).to(DEVICE)
        if kind == "plain":
            model = model.to(torch.bfloat16)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), fused=DEVICE.type == "cuda")
        elif kind == "plain-master":
            model = model.to(torch.bfloat16)
            optimizer = MasterWeightAdam(param_groups(model), max_norm=1.0, lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
        else:
            optimizer = clipped_adam(param_groups(model), max_norm=1.0, lr=1e-4)
        set_learning_rate(optimizer, 1e-4)
        forward = torch.compile(model) if compiled else model

        def forward_loss(x_BT, y_BT):
            with torch.autocast(DEVICE.type, torch.bfloat16, enabled=kind == "plain-autocast"):
                logits = forward(x_BT)
            return language_model_loss(logits, y_BT)

        def step():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return forward_loss, lambda loss: loss.backward(), step
    stage = {"master-z0": 0, "autocast-z0": 0, "bf16-z0": 0, "bf16-z2": 2}[kind]
    cfg = TrainConfig(ctx_len=ctx, micro_bsz=micro_bsz, precision="bf16", zero_stage=stage, compile=compiled)
    overrides = {}
    if kind == "bf16-z0":  # DeepSpeed's own bf16 path at stage 0, with its optimizer and clipping
        overrides = {**DS_BF16, "optimizer": optimizer_config(cfg, DEVICE.type), "gradient_clipping": cfg.grad_clip}
    mode = kind.removesuffix("-z0") if kind in ("master-z0", "autocast-z0") else None
    model = build_model(model_cfg)
    overrides = merge_config(DS_OVERRIDES, overrides)  # as the loop: DeepSpeed's synchronising timer off
    engine = build_engine(model, cfg, world_size=1, device_type=DEVICE.type, ds_overrides=overrides, bf16_stage0=mode)
    set_learning_rate(engine.optimizer, 1e-4)
    if compiled:
        engine.compile()
    return (lambda x_BT, y_BT: language_model_loss(engine(x_BT), y_BT)), engine.backward, engine.step


def profile(forward_loss: Callable, backward: Callable, step: Callable, out: Path | None, label: str) -> None:
    """Three steps under torch.profiler: the top kernels by device time, and the busy fraction."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    for _ in range(2):
        backward(forward_loss())
        step()
    _sync()
    started = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            backward(forward_loss())
            step()
        _sync()
    wall_us = 1e6 * (time.perf_counter() - started) / 3
    device = torch.autograd.DeviceType.CUDA if DEVICE.type == "cuda" else torch.autograd.DeviceType.CPU
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == device and DEVICE.type == "cuda":
            entry = kernels.setdefault(event.name, [0.0, 0])
            entry[0] += event.device_time_total / 3
            entry[1] += 1 / 3
    busy = sum(t for t, _ in kernels.values())
    print(
        f"\nprofile {label}: {wall_us / 1000:.1f} ms per step (under the profiler), device busy {busy / 1000:.1f} ms "
        f"({100 * busy / wall_us:.0f} %), {sum(n for _, n in kernels.values()):.0f} kernels per step"
    )
    print("| kernel | ms per step | % of busy | launches per step |")
    print("|---|---|---|---|")
    for name, (total, count) in sorted(kernels.items(), key=lambda item: -item[1][0])[:25]:
        print(f"| {name[:90]} | {total / 1000:.2f} | {100 * total / max(busy, 1e-9):.1f} | {count:.0f} |")
    if DEVICE.type != "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        trace = out / f"trace_{label}.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        trace.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="169m", choices=sorted(SIZES))
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--micro-bsz", type=int, nargs="+", default=[16])
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    valid = [*RUNS, *(f"{r}-compile" for r in RUNS)]
    parser.add_argument("--runs", nargs="+", default=["plain", "master-z0", "bf16-z2"], choices=valid)
    parser.add_argument("--profile", default=None, choices=valid, help="also profile this run")
    parser.add_argument("--out", type=Path, default=None, help="write the profiler trace here")
    args = parser.parse_args()

    from model import ModelConfig
    from pipeline.engine import init_process_group
    from pipeline.metrics import train_flops_per_token

    init_process_group(DEVICE.type)
    n_layer, n_embd = SIZES[args.model]
    vocab = 50304 if args.model != "tiny" else 256
    model_cfg = ModelConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab, wkv_backend=args.backend)
    flops_per_token = train_flops_per_token(model_cfg.vocab_size, n_embd, n_layer)
    runs = list(dict.fromkeys(args.runs + ([args.profile] if args.profile else [])))
    rows = []
    for micro_bsz in args.micro_bsz:
        tokens = torch.randint(0, vocab - 27, (micro_bsz, args.ctx + 1), device=DEVICE)
        x_BT, y_BT = tokens[:, :-1], tokens[:, 1:]
        for name in runs:
            try:
                forward_loss, backward, step = build_run(name, model_cfg, micro_bsz, args.ctx, n_layer)
                fl = lambda fl=forward_loss, x_BT=x_BT, y_BT=y_BT: fl(x_BT, y_BT)  # noqa: E731
                if name in args.runs:
                    rows.append((name, micro_bsz, _phases(fl, backward, step, args.repeats)))
                    print(f"{name} bsz {micro_bsz}: {rows[-1][2]}", flush=True)
                if name == args.profile and micro_bsz == args.micro_bsz[0]:
                    profile(fl, backward, step, args.out, name)
            except Exception as error:  # one failing run must not lose the others' figures
                print(f"{name} bsz {micro_bsz} FAILED: {type(error).__name__}: {str(error)[:400]}", flush=True)
            forward_loss = backward = step = fl = None
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()

    print(
        f"\n| {args.model} {args.backend} ctx {args.ctx} | micro-bsz | fwd+loss ms | bwd ms | optimizer ms | "
        "step ms | tokens/s | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, micro_bsz, times in rows:
        tokens_per_s = micro_bsz * args.ctx / (times["step_ms"] / 1000)
        model_mfu = tokens_per_s * flops_per_token / 989e12
        print(
            f"| {name} | {micro_bsz} | {times['fwd_ms']:.1f} | {times['bwd_ms']:.1f} | {times['opt_ms']:.1f} | "
            f"{times['step_ms']:.1f} | {tokens_per_s:,.0f} | {100 * model_mfu:.1f} % |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
