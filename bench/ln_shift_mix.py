"""GPU benchmark of the fused LayerNorm + token shift + mix kernels (model/ln_shift_mix.py) against the same
computation as PyTorch ops compiled by Inductor, side by side in one run.

    python bench/ln_shift_mix.py                            # the training shapes, bf16, the kernels as set
    python bench/ln_shift_mix.py --configs 4,4,64,4 8,4,128,3     # several launch configurations
    python bench/ln_shift_mix.py --wide                     # also rows of 2048 columns (warps widened)

A configuration is FORWARD_WARPS,BACKWARD_WARPS,ROWS,STAGES (model/ln_shift_mix.py; a warp count 0 takes
the module's default for the row; stages 0: Triton's default pipelining of the row loops).

Legend: B batch, T time, C channels, M mixes (3: TimeMix, 2: ChannelMix). Median times (triton's do_bench,
L2 flushed) of forward, and of forward + backward with random output gradients (ln[:, -1]'s gradient
left out, as in training without state). Minimum bytes, in (B, T, C) tensors: forward reads x and writes
the M mixes (1 + M); backward reads x and the M gradients and writes x's gradient (2 + M). The copy rate
is a device-to-device copy of 1 GiB in the same run, read plus written. "bwd alone": the backward op
launched directly (kernel and partials' sum), no autograd or host work around it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model.ln_shift_mix as lsm  # noqa: E402

SHAPES = [(128, 1024, 768, 3), (128, 1024, 768, 2), (64, 1024, 1024, 3), (64, 1024, 1024, 2)]
WIDE_SHAPES = [(16, 1024, 2048, 3), (16, 1024, 2048, 2)]  # 1.5B; wider rows take the PyTorch ops
DEVICE = "cuda"


def median_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_rate_gbps() -> float:
    src = torch.randn(2**28, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_ms(lambda: dst.copy_(src)) / 1e6


def make_case(batch, steps, channels, n_mix, dtype):
    x = torch.randn(batch, steps, channels, device=DEVICE, dtype=dtype, requires_grad=True)
    params = [
        torch.randn(channels, device=DEVICE, dtype=dtype).requires_grad_(True),  # LayerNorm weight
        torch.randn(channels, device=DEVICE, dtype=dtype).requires_grad_(True),  # bias
        torch.rand(n_mix, channels, device=DEVICE, dtype=dtype).requires_grad_(True),
    ]
    grads = [torch.randn(batch, steps, channels, device=DEVICE, dtype=dtype) for _ in range(n_mix)]
    return x, params, grads


def timed(fn, x, params, grads) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of fn(x, weight, bias, mixes) -> (outs, last)."""
    weight, bias, mixes = params

    def forward():
        return fn(x, weight, bias, mixes)

    def forward_backward():
        outs, _ = forward()
        torch.autograd.backward(outs, grads)

    for _ in range(3):  # compile and warm up outside the timing
        forward_backward()
    with torch.no_grad():
        fwd = median_ms(forward)
    return fwd, median_ms(forward_backward)


def backward_alone_ms(x, params, grads) -> float:
    """The backward op launched directly (its kernel and the partials' sum), without autograd: the
    kernel's own time, which the fwd+bwd column can blur with the host's work on a busy machine."""
    weight, bias, mixes = (p.detach() for p in params)
    x = x.detach()
    _, _, stats = lsm.forward_kernel_launch(x, weight, bias, None, mixes, 1e-5)
    return median_ms(lambda: lsm.backward_kernel_launch(grads, None, x, weight, bias, None, mixes, stats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = ",".join(str(value) for value in lsm.launch_settings())
    parser.add_argument("--configs", nargs="+", default=[here], help="launch configurations (see above)")
    parser.add_argument("--compiled", action="store_true", help="also time each configuration under torch.compile")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--wide", action="store_true", help="also rows of 2048 columns (1.5B)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    copy_gbps = copy_rate_gbps()
    print(f"device: {torch.cuda.get_device_name()}, copy rate {copy_gbps:.0f} GB/s (read + write), {args.dtype}")
    print(
        "| B x T x C, M | path | fwd ms | fwd % copy | fwd+bwd ms | fwd+bwd % copy | fwd+bwd vs Inductor "
        "| bwd alone ms | bwd % copy |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, steps, channels, n_mix in SHAPES + (WIDE_SHAPES if args.wide else []):
        x, params, grads = make_case(batch, steps, channels, n_mix, dtype)
        unit = x.numel() * x.element_size()
        fwd_bytes, bwd_bytes = (1 + n_mix) * unit, (2 + n_mix) * unit
        # A fresh compile per shape: after a shape change Dynamo recompiles with dynamic shapes, whose
        # generic kernels ran 4x slower at C = 1024 (docs/benchmarks.md, session 11).
        torch._dynamo.reset()
        inductor = torch.compile(lambda x, w, b, m: lsm.ln_shift_mix_reference(x, w, b, None, m, 1e-5))
        rows = {"Inductor (PyTorch ops)": (*timed(inductor, x, params, grads), None)}
        for config in args.configs:
            lsm.set_launch_settings([int(v) for v in config.split(",")])
            fused = lambda x, w, b, m: lsm.ln_shift_mix(x, w, b, None, m)  # noqa: E731
            backward = backward_alone_ms(x, params, grads)
            rows[f"fused {config}"] = (*timed(fused, x, params, grads), backward)
            if args.compiled:  # as training runs them: launched from Inductor's graph
                torch._dynamo.reset()  # as above
                rows[f"fused {config}, compiled"] = (*timed(torch.compile(fused), x, params, grads), backward)
        base = rows["Inductor (PyTorch ops)"][1]

        def share(nbytes: int, ms: float) -> str:
            return f"{100 * nbytes / ms / 1e6 / copy_gbps:.0f} %"

        for name, (fwd, total, bwd) in rows.items():
            alone = f"{bwd:.3f} | {share(bwd_bytes, bwd)}" if bwd is not None else "- | -"
            print(
                f"| {batch}x{steps}x{channels}, {n_mix} | {name} | {fwd:.3f} | {share(fwd_bytes, fwd)} | "
                f"{total:.3f} | {share(fwd_bytes + bwd_bytes, total)} | {base / total:.2f}x | {alone} |"
            )
        del x, params, grads
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
