"""GPU benchmark of the fused CUDA WKV kernel: median times and achieved bandwidth against a copy.

    python bench/wkv_cuda.py                 # the five issue shapes, fp32 and bf16, prints a table
    python bench/wkv_cuda.py --json out.json # also write the figures
    python bench/wkv_cuda.py --smoke         # one small forward+backward (for compute-sanitizer)
    python bench/wkv_cuda.py --profile 8 4096 768 bfloat16   # three fwd+bwd calls (for ncu)

Legend: B batch, T time, C channels. Times are medians of triton.testing.do_bench (CUDA events,
L2 flushed before each call) of the extension's forward, and of forward followed by backward,
output allocation included. Minimum bytes: forward reads k, v and writes y (3 B*T*C elements);
backward reads k, v, y, gy and writes gk, gv (6 more). The copy rate is a device-to-device copy of
1 GiB measured in the same run, counting bytes read plus written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.wkv_cuda import load_extension  # noqa: E402
from model.wkv_reference import zero_state  # noqa: E402

SHAPES = [(8, 1024, 768), (8, 4096, 768), (2, 16384, 768), (16, 1024, 2048), (1, 1024, 4096)]
REFERENCE_BF16_FWD_BWD_MS = [0.652, 2.591, 10.030, 0.844, 0.617]  # reference kernel on this H200 (issue 4)


def median_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=200, return_mode="median"))


def copy_rate_gbps() -> float:
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def make_case(batch, steps, channels, dtype):
    ext = load_extension()
    td = torch.rand(channels, device="cuda") * 8 - 5
    tf = torch.randn(channels, device="cuda")
    k = torch.randn(batch, steps, channels, device="cuda").to(dtype)
    v = torch.randn(batch, steps, channels, device="cuda").to(dtype)
    gy = torch.randn(batch, steps, channels, device="cuda").to(dtype)
    aa0, bb0, pp0 = zero_state(batch, channels, "cuda")
    gstate = [torch.randn(batch, channels, device="cuda") for _ in range(3)]

    def forward():
        return ext.forward(td, tf, k, v, aa0, bb0, pp0, False)

    def forward_backward():
        y, aa1, bb1, pp1, sub, lastwin = forward()
        return ext.backward(td, tf, k, v, gy, aa0, bb0, aa1, bb1, *gstate, sub, lastwin, False)

    return forward, forward_backward


def bench(shapes, copy_gbps):
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for (batch, steps, channels), ref_ms in zip(shapes, REFERENCE_BF16_FWD_BWD_MS, strict=True):
            forward, forward_backward = make_case(batch, steps, channels, dtype)
            elements = batch * steps * channels * torch.tensor([], dtype=dtype).element_size()
            row = {"B": batch, "T": steps, "C": channels, "dtype": str(dtype).removeprefix("torch.")}
            for name, fn, units in (("fwd", forward, 3), ("fwd+bwd", forward_backward, 9)):
                ms = median_ms(fn)
                gbps = units * elements / ms / 1e6
                row[name] = {
                    "ms": ms,
                    "GB/s": gbps,
                    "copy%": 100 * gbps / copy_gbps,
                    "floor_ms": units * elements / copy_gbps / 1e6,
                }
            if dtype == torch.bfloat16:
                row["reference_fwd+bwd_ms"] = ref_ms
            rows.append(row)
            torch.cuda.empty_cache()
    return rows


def print_table(rows, copy_gbps):
    print(f"device: {torch.cuda.get_device_name()}, copy rate {copy_gbps:.0f} GB/s (read + write)")
    print(
        "| B x T x C | dtype | fwd ms | fwd GB/s | fwd % copy | fwd+bwd ms | fwd+bwd GB/s | fwd+bwd % copy "
        "| fwd+bwd floor ms | reference kernel fwd+bwd ms |"
    )
    print("|---" * 10 + "|")
    for r in rows:
        f, fb = r["fwd"], r["fwd+bwd"]
        print(
            f"| {r['B']}x{r['T']}x{r['C']} | {r['dtype']} | {f['ms']:.3f} | {f['GB/s']:.0f} | {f['copy%']:.0f} % | "
            f"{fb['ms']:.3f} | {fb['GB/s']:.0f} | {fb['copy%']:.0f} % | {fb['floor_ms']:.3f} | "
            f"{r.get('reference_fwd+bwd_ms', '')} |"
        )


def smoke():
    """A small forward+backward through autograd, fp32 and bf16, with tails in T and C."""
    from model.wkv_cuda import wkv_cuda

    for dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(2, 301, 40, device="cuda").to(dtype).requires_grad_(True)
        v = torch.randn(2, 301, 40, device="cuda").to(dtype).requires_grad_(True)
        td = torch.randn(40, device="cuda", requires_grad=True)
        tf = torch.randn(40, device="cuda", requires_grad=True)
        state = tuple(
            s.requires_grad_(True)
            for s in (
                torch.randn(2, 40, device="cuda"),
                torch.rand(2, 40, device="cuda") + 0.1,
                torch.randn(2, 40, device="cuda"),
            )
        )
        y, (aa, bb, pp) = wkv_cuda(td, tf, k, v, state)
        (y.float().sum() + aa.sum() + bb.sum() + pp.sum()).backward()
        torch.cuda.synchronize()
        grads = [k.grad, v.grad, td.grad, tf.grad, *(s.grad for s in state)]
        assert all(torch.isfinite(g.float()).all() for g in grads)
    print("smoke ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--smoke", action="store_true", help="one small forward+backward, no timing")
    parser.add_argument("--profile", nargs=4, metavar=("B", "T", "C", "DTYPE"), help="3 fwd+bwd calls, for ncu")
    args = parser.parse_args()
    if args.smoke:
        smoke()
        return
    if args.profile:
        batch, steps, channels = (int(x) for x in args.profile[:3])
        _, forward_backward = make_case(batch, steps, channels, getattr(torch, args.profile[3]))
        for _ in range(3):
            forward_backward()
        torch.cuda.synchronize()
        return
    load_extension()
    copy_gbps = copy_rate_gbps()
    rows = bench(SHAPES, copy_gbps)
    print_table(rows, copy_gbps)
    if args.json:
        args.json.write_text(
            json.dumps({"copy_GBps": copy_gbps, "device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
