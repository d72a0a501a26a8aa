"""Where a training step's time goes: plain PyTorch (eager, compiled) vs the DeepSpeed engine, per phase.

    python bench/train_step_breakdown.py                 # RWKV-4 169M, bf16, 16 x 1024 tokens, one GPU
    python bench/train_step_breakdown.py --model 430m --backend torch
    python bench/train_step_breakdown.py --no-plain --compile 0 --ds-config old new   # DeepSpeed settings

Phases are timed with a device synchronisation around each (so they add up to more than a
pipelined step): forward+loss, backward, optimizer step; "step" is the three back to back.
"plain" is the model cast to bf16 with fused torch AdamW (no fp32 master weights); "deepspeed" is
pipeline.engine.build_engine (ZeRO-2, bf16 with fp32 master weights, FusedAdam), as the training
loop runs it. `--ds-config` names DeepSpeed settings to compare (DS_CONFIGS: overrides merged over
pipeline.engine.deepspeed_config; "new" is the config as the training loop builds it now, "old" the
one before check_grad_overflow and single-rank overlap_comm were turned off).
"""

from __future__ import annotations

import os
import sys

sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

SIZES = {"tiny": (2, 64), "169m": (12, 768), "430m": (24, 1024)}
DS_CONFIGS = {
    "new": {},
    "old": {"bf16": {"check_grad_overflow": True}, "zero_optimization": {"overlap_comm": True}},
    "overflow-check": {"bf16": {"check_grad_overflow": True}},  # new, but with the per-tensor check
    "overlap": {"zero_optimization": {"overlap_comm": True}},  # new, but overlapping on one rank
}


def _timed(fn, repeats: int) -> float:
    """Mean milliseconds of fn() over `repeats` calls, synchronised."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started) / repeats


def _phases(forward_loss, backward, step, repeats: int) -> dict[str, float]:
    """Milliseconds per phase (each synchronised), and of the whole step run back to back."""

    def full() -> None:
        backward(forward_loss())
        step()

    for _ in range(3):  # warm up (compilation, allocator, autotuning)
        full()
    totals = {"fwd_ms": 0.0, "bwd_ms": 0.0, "opt_ms": 0.0}
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = forward_loss()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        backward(loss)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        for key, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            totals[key] += 1000 * seconds / repeats
    return {**totals, "step_ms": _timed(full, repeats)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="169m", choices=sorted(SIZES))
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--micro-bsz", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--zero", type=int, nargs="+", default=[2], help="ZeRO stages of the DeepSpeed rows")
    parser.add_argument("--compile", type=int, nargs="+", default=[0, 1], help="0 eager, 1 compiled")
    parser.add_argument("--no-plain", action="store_true", help="only the DeepSpeed rows")
    parser.add_argument("--ds-config", nargs="+", default=["new"], choices=sorted(DS_CONFIGS))
    args = parser.parse_args()

    from model import ModelConfig, build_model
    from model.loss import language_model_loss
    from pipeline.config import TrainConfig
    from pipeline.engine import build_engine, init_process_group
    from pipeline.metrics import train_flops_per_token

    n_layer, n_embd = SIZES[args.model]
    model_cfg = ModelConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=50304, wkv_backend=args.backend)
    tokens = torch.randint(0, 50277, (args.micro_bsz, args.ctx + 1), device="cuda")
    x_BT, y_BT = tokens[:, :-1], tokens[:, 1:]
    flops = train_flops_per_token(model_cfg.vocab_size, n_embd, n_layer) * x_BT.numel()
    rows = []

    for compiled in [bool(c) for c in args.compile if not args.no_plain]:
        model = build_model(model_cfg).cuda().to(torch.bfloat16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8, fused=True)
        forward = torch.compile(model) if compiled else model
        rows.append(
            (
                f"plain {'compiled' if compiled else 'eager'}",
                _phases(
                    lambda forward=forward: language_model_loss(forward(x_BT), y_BT),
                    lambda loss: loss.backward(),
                    lambda optimizer=optimizer: (optimizer.step(), optimizer.zero_grad(set_to_none=True)),
                    args.repeats,
                ),
            )
        )
        del model, optimizer, forward
        torch.cuda.empty_cache()

    init_process_group("cuda")
    runs = [(name, stage, bool(c)) for name in args.ds_config for stage in args.zero for c in args.compile]
    for name, stage, compiled in runs:
        cfg = TrainConfig(
            ctx_len=args.ctx, micro_bsz=args.micro_bsz, precision="bf16", zero_stage=stage, compile=compiled
        )
        overrides = DS_CONFIGS[name]
        if stage == 0:  # no zero_optimization keys below stage 1
            overrides = {key: value for key, value in overrides.items() if key != "zero_optimization"}
        engine = build_engine(build_model(model_cfg), cfg, world_size=1, device_type="cuda", ds_overrides=overrides)
        if compiled:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * n_layer)
            engine.compile()
        rows.append(
            (
                f"deepspeed {name} ZeRO-{stage} {'compiled' if compiled else 'eager'}",
                _phases(
                    lambda engine=engine: language_model_loss(engine(x_BT), y_BT),
                    lambda loss, engine=engine: engine.backward(loss),
                    lambda engine=engine: engine.step(),
                    args.repeats,
                ),
            )
        )
        del engine
        torch.cuda.empty_cache()

    print(f"| {args.model} {args.backend} | fwd+loss ms | bwd ms | optimizer ms | step ms | tokens/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for name, times in rows:
        tokens_per_s = x_BT.numel() / (times["step_ms"] / 1000)
        model_flops = flops / (times["step_ms"] / 1000) / 989e12
        print(
            f"| {name} | {times['fwd_ms']:.1f} | {times['bwd_ms']:.1f} | {times['opt_ms']:.1f} | "
            f"{times['step_ms']:.1f} | {tokens_per_s:,.0f} | {100 * model_flops:.1f} % |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
