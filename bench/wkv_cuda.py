"""GPU benchmark of the fused CUDA WKV kernel: median times and achieved bandwidth against a copy.

    python bench/wkv_cuda.py                 # the five issue shapes, fp32 and bf16, prints a table
    python bench/wkv_cuda.py --json out.json # also write the figures
    python bench/wkv_cuda.py --graph         # the same, each call captured in a CUDA graph and replayed
                                             # (GPU time without the host's launch and allocation work)
    python bench/wkv_cuda.py --smoke         # one small forward+backward (for compute-sanitizer)
    python bench/wkv_cuda.py --profile 8 4096 768 bfloat16   # three fwd+bwd calls (for ncu)
    python bench/wkv_cuda.py --variants "old:WKV_EXACT_DECAY=0;new:" --accuracy
        # build cuda/wkv.cu with other tuning macros side by side (in parallel), check each against
        # the float64 reference and bit for bit against the first variant, and time each; an empty
        # define list is the default build
    python bench/wkv_cuda.py --smoke --defines WKV_FAST_GM1=1
        # the smoke run through one build variant's extension, outputs poisoned first (for memcheck)
    python bench/wkv_cuda.py --kernel-times 1 1024 4096 bfloat16
        # device time of each kernel of a fwd+bwd call and the call's span (torch.profiler, 50 calls)

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
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.wkv_cuda import load_extension  # noqa: E402
from model.wkv_reference import zero_state  # noqa: E402

SHAPES = [(8, 1024, 768), (8, 4096, 768), (2, 16384, 768), (16, 1024, 2048), (1, 1024, 4096)]
REFERENCE_BF16_FWD_BWD_MS = [0.652, 2.591, 10.030, 0.844, 0.617]  # reference kernel on this H200 (issue 4)
REFERENCE_BY_SHAPE = dict(zip(SHAPES, REFERENCE_BF16_FWD_BWD_MS, strict=True))


def median_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=200, return_mode="median"))


def copy_rate_gbps() -> float:
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def make_case(batch, steps, channels, dtype, ext=None):
    ext = ext or load_extension()
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


def kernel_times(batch: int, steps: int, channels: int, dtype: torch.dtype, calls: int = 50) -> str:
    """Per kernel of one fwd+bwd call: mean device time and launches; the mean span of a call (first
    kernel start to last kernel end) and its device-busy share: the gaps are launch latency."""
    from torch.profiler import ProfilerActivity, profile

    _, forward_backward = make_case(batch, steps, channels, dtype)
    for _ in range(10):
        forward_backward()
    torch.cuda.synchronize()
    spans = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            forward_backward()
            torch.cuda.synchronize()  # one call at a time, so each call's span is its own
    per_name: dict[str, list[float]] = {}
    intervals = []
    for event in prof.events():
        if event.device_type.name != "CUDA":
            continue
        per_name.setdefault(event.name, []).append(event.device_time_total)
        intervals.append((event.time_range.start, event.time_range.end))
    intervals.sort()
    per_call = len(intervals) // calls
    for i in range(calls):
        chunk = intervals[i * per_call : (i + 1) * per_call]
        spans.append((chunk[-1][1] - chunk[0][0], sum(end - start for start, end in chunk)))
    spans.sort()
    span, busy = spans[len(spans) // 2]
    lines = [
        f"{batch}x{steps}x{channels} {str(dtype).removeprefix('torch.')}: median call span {span:.1f} us, "
        f"kernels busy {busy:.1f} us ({100 * busy / span:.0f} %), {per_call} device ops per call",
        "| kernel | mean us | launches per call |",
        "|---|---|---|",
    ]
    for name, times in sorted(per_name.items(), key=lambda item: -sum(item[1])):
        lines.append(f"| {name[:90]} | {sum(times) / len(times):.1f} | {len(times) / calls:.0f} |")
    return "\n".join(lines)


def graphed(fn):
    """fn captured once in a CUDA graph (after warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench(shapes, copy_gbps, ext=None, dtypes=(torch.float32, torch.bfloat16), graph=False):
    rows = []
    for dtype in dtypes:
        for batch, steps, channels in shapes:
            forward, forward_backward = make_case(batch, steps, channels, dtype, ext)
            if graph:
                forward, forward_backward = graphed(forward), graphed(forward_backward)
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
            ref_ms = REFERENCE_BY_SHAPE.get((batch, steps, channels))  # the five shapes only
            if dtype == torch.bfloat16 and ref_ms is not None:
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


def smoke(defines: tuple[str, ...] = ()):
    """Small forwards+backwards through autograd, fp32 and bf16, with tails in T and C; the long
    sequence (66 segments) has its segment scans split over rows of threads.
    With `defines`: the same shapes (and an odd C) straight through that build variant's extension,
    every output and workspace poisoned with NaN first."""
    if defines:
        smoke_variant(defines)
        return
    from model.wkv_cuda import wkv_cuda

    for dtype, steps in ((torch.float32, 301), (torch.bfloat16, 301), (torch.float32, 8321)):
        k = torch.randn(2, steps, 40, device="cuda").to(dtype).requires_grad_(True)
        v = torch.randn(2, steps, 40, device="cuda").to(dtype).requires_grad_(True)
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


def smoke_variant(defines: tuple[str, ...]) -> None:
    ext = load_extension(defines)
    for dtype, steps, channels in (
        (torch.float32, 301, 40),
        (torch.bfloat16, 301, 40),
        (torch.bfloat16, 301, 41),
        (torch.float32, 8321, 40),
        (torch.bfloat16, 8321, 40),
    ):
        td, tf, k, v, state, gy, gstate = identity_inputs(2, steps, channels, dtype)
        got = ext_gradients(ext, td, tf, k, v, state, gy, gstate, poison=True)
        torch.cuda.synchronize()
        bad = [name for name, g in zip(OUTPUT_NAMES, got, strict=True) if not torch.isfinite(g.float()).all()]
        assert not bad, f"{dtype} 2x{steps}x{channels}: non-finite (unwritten?) {bad}"
    print(f"smoke ok ({' '.join(defines)})")


def parse_shapes(spec: str) -> list[tuple[int, int, int]]:
    """'8x1024x768,64x1024x768' -> [(8, 1024, 768), (64, 1024, 768)]."""
    shapes = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        dims = item.lower().split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise argparse.ArgumentTypeError(f"shape {item!r} is not BxTxC with positive integers")
        shapes.append(tuple(int(d) for d in dims))
    return shapes


def parse_variants(spec: str) -> dict[str, tuple[str, ...]]:
    """'name:DEF=1,DEF2=3;name2:' -> {name: (defines...)}."""
    variants = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        name, _, defines = item.partition(":")
        variants[name] = tuple(d for d in defines.split(",") if d)
    return variants


def _build_variant(defines: tuple[str, ...]) -> float:
    start = time.perf_counter()
    load_extension(defines)
    return time.perf_counter() - start


def build_all(variants: dict[str, tuple[str, ...]]) -> None:
    """Compile every variant in its own process at once (nvcc is single-threaded per file)."""
    with ProcessPoolExecutor(len(variants)) as pool:
        futures = {name: pool.submit(_build_variant, defines) for name, defines in variants.items()}
        for name, future in futures.items():
            print(f"built {name} in {future.result():.0f} s", flush=True)


def ext_gradients(ext, td, tf, k, v, state, gy, gstate, poison=False):
    """y, state out and the seven gradients straight from the extension (no autograd); `poison`
    fills outputs and workspaces with NaN before each launch (an unwritten element shows)."""
    y, aa1, bb1, pp1, sub, lastwin = ext.forward(td, tf, k, v, *state, poison)
    grads = ext.backward(td, tf, k, v, gy, state[0], state[1], aa1, bb1, *gstate, sub, lastwin, poison)
    gk, gv, gtd, gtf, gaa0, gbb0, gpp0 = grads
    return [y, aa1, bb1, pp1, gtd, gtf, gk, gv, gaa0, gbb0, gpp0]


def reference_gradients(td, tf, k, v, state, gy, gstate):
    from model.wkv_reference import wkv_reference

    leaves = [x.detach().double().requires_grad_(True) for x in (td, tf, k, v, *state)]
    y, out = wkv_reference(leaves[0], leaves[1], leaves[2], leaves[3], tuple(leaves[4:]))
    loss = (y * gy.double()).sum() + sum((s * g.double()).sum() for s, g in zip(out, gstate, strict=True))
    loss.backward()
    grads = [leaf.grad for leaf in leaves]
    return [y.detach(), *(s.detach() for s in out), grads[0], grads[1], grads[2], grads[3], *grads[4:]]


OUTPUT_NAMES = ("y", "aa", "bb", "pp", "g_time_decay", "g_time_first", "gk", "gv", "gaa0", "gbb0", "gpp0")
ACCURACY_CASES = {  # name: (B, T, C, dtype, |k| bound or None for N(0, 1), time_decay range)
    "fp32 4x500x64 |k|<=60 td[-8,8]": (4, 500, 64, torch.float32, 60.0, (-8.0, 8.0)),
    "fp32 2x4097x32 td[-8,1]": (2, 4097, 32, torch.float32, None, (-8.0, 1.0)),
    "fp32 2x4097x32 |k|<=60 td[-8,8]": (2, 4097, 32, torch.float32, 60.0, (-8.0, 8.0)),
    "fp32 3x1024x96 td[-5,3]": (3, 1024, 96, torch.float32, None, (-5.0, 3.0)),
    "bf16 4x500x64 |k|<=60 td[-8,8]": (4, 500, 64, torch.bfloat16, 60.0, (-8.0, 8.0)),
    "bf16 3x1024x96 td[-5,3]": (3, 1024, 96, torch.bfloat16, None, (-5.0, 3.0)),  # WKV_PAIRS: a half block
    "bf16 2x301x41 td[-8,8]": (2, 301, 41, torch.bfloat16, None, (-8.0, 8.0)),  # odd C: unpaired fallback
}

# Bit-identity sweep (no reference, so cheap): every variant against the first, outputs poisoned.
# Tails in T and C, one to many segments, a 64-channel block half used (96), odd C and k, v, gy at
# an odd element offset (both: WKV_PAIRS falls back to the unpaired kernels).
IDENTITY_SHAPES = [
    (1, 1, 32),
    (2, 31, 48),
    (3, 129, 40),
    (2, 500, 96),
    (2, 301, 41),
    (4, 1024, 64),
    (2, 2049, 64),
    (1, 4097, 32),
    (64, 31, 1024),
    (2048, 1, 32),
    (8, 300, 8192),
]
MISALIGNED_SHAPE = (2, 300, 64)


def accuracy(exts: dict) -> dict[str, dict[str, tuple[float, str]]]:
    """Max relative L2 error over y, the state and all gradients (and which), per case and variant."""
    torch.manual_seed(0)
    table: dict[str, dict[str, tuple[float, str]]] = {}
    for case, (batch, steps, channels, dtype, k_bound, (lo, hi)) in ACCURACY_CASES.items():
        td = torch.rand(channels, device="cuda") * (hi - lo) + lo
        tf = torch.randn(channels, device="cuda")
        raw = torch.randn(batch, steps, channels, device="cuda")
        if k_bound is not None:
            raw = (torch.rand_like(raw) * 2 - 1) * k_bound
        k, v = raw.to(dtype), torch.randn_like(raw).to(dtype)
        bb = torch.rand(batch, channels, device="cuda") + 0.1
        state = (torch.randn_like(bb) * bb, bb, torch.randn_like(bb) * 4)
        gy = torch.randn_like(raw).to(dtype)
        gstate = [torch.randn_like(bb) for _ in range(3)]
        ref = reference_gradients(td, tf, k, v, state, gy, gstate)
        table[case] = {}
        for name, ext in exts.items():
            got = ext_gradients(ext, td, tf, k, v, state, gy, gstate)
            errors = [
                ((g.double() - r).norm() / r.norm().clamp_min(1e-300)).item() for g, r in zip(got, ref, strict=True)
            ]
            finite = all(torch.isfinite(g.float()).all() for g in got)
            worst = max(range(len(errors)), key=errors.__getitem__)
            table[case][name] = (errors[worst], OUTPUT_NAMES[worst]) if finite else (float("nan"), "non-finite")
    return table


def identity_inputs(batch, steps, channels, dtype, misaligned=False, k_bound=None):
    """Random inputs (time_decay in [-8, 8], a random state); `misaligned` puts k, v, gy at an odd
    element offset of their storage (contiguous, but bf16 pairs are not 4-byte aligned)."""
    td = torch.rand(channels, device="cuda") * 16 - 8
    tf = torch.randn(channels, device="cuda")
    numel = batch * steps * channels

    def sequence(scale=None):
        buf = torch.randn(numel + 1, device="cuda")
        if scale is not None:
            buf = (torch.rand_like(buf) * 2 - 1) * scale
        buf = buf.to(dtype)
        return (buf[1:] if misaligned else buf[:numel]).view(batch, steps, channels)

    k, v, gy = sequence(k_bound), sequence(), sequence()
    bb = torch.rand(batch, channels, device="cuda") + 0.1
    state = (torch.randn_like(bb) * bb, bb, torch.randn_like(bb) * 4)
    gstate = [torch.randn_like(bb) for _ in range(3)]
    return td, tf, k, v, state, gy, gstate


def identity(exts: dict) -> dict[str, dict]:
    """Each variant after the first against the first, on IDENTITY_SHAPES (fp32 and bf16, |k| <= 60
    on every other shape) and the misaligned case: how many cases are bit-identical in y, the state
    and all gradients, and the worst relative L2 difference where not."""
    names = list(exts)
    base = names[0]
    torch.manual_seed(1)
    table = {n: {"identical": 0, "cases": 0, "worst": [0.0, "", ""], "non_finite": []} for n in names}
    cases = [(shape, False) for shape in IDENTITY_SHAPES] + [(MISALIGNED_SHAPE, True)]
    for dtype in (torch.float32, torch.bfloat16):
        for i, ((batch, steps, channels), misaligned) in enumerate(cases):
            label = f"{str(dtype).removeprefix('torch.')} {batch}x{steps}x{channels}" + (" misaligned" * misaligned)
            inputs = identity_inputs(batch, steps, channels, dtype, misaligned, 60.0 if i % 2 else None)
            outs = {n: ext_gradients(ext, *inputs, poison=True) for n, ext in exts.items()}
            for n in names:
                row = table[n]
                row["cases"] += 1
                row["non_finite"] += [
                    f"{label} {o}" for o, g in zip(OUTPUT_NAMES, outs[n], strict=True) if not torch.isfinite(g).all()
                ]
                if all(torch.equal(a, b) for a, b in zip(outs[n], outs[base], strict=True)):
                    row["identical"] += 1
                    continue
                for o, a, b in zip(OUTPUT_NAMES, outs[n], outs[base], strict=True):
                    err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()
                    worst = row["worst"][0]
                    if worst == worst and not err <= worst:  # a NaN difference is the worst and stays
                        row["worst"] = [err, o, label]
            del outs
            torch.cuda.empty_cache()
    print(f"\n| variant | bit-identical to {base} (cases) | worst rel L2 vs {base} (output, case) | non-finite |")
    print("|---|---|---|---|")
    for n, row in table.items():
        err, o, label = row["worst"]
        worst = f"{err:.2e} ({o}, {label})" if o else "-"
        bad = row["non_finite"]
        bad_cell = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "") if bad else "none"
        print(f"| {n} | {row['identical']}/{row['cases']} | {worst} | {bad_cell} |")
    return table


def run_variants(spec: str, check: bool, json_path: Path | None, shapes=SHAPES) -> None:
    variants = parse_variants(spec)
    build_all(variants)
    exts = {name: load_extension(defines) for name, defines in variants.items()}
    copy_gbps = copy_rate_gbps()
    results: dict = {"copy_GBps": copy_gbps, "device": torch.cuda.get_device_name(), "variants": {}}
    errors = accuracy(exts) if check else {}
    same = identity(exts) if check else {}
    for name, ext in exts.items():
        rows = bench(shapes, copy_gbps, ext)
        results["variants"][name] = {"defines": variants[name], "rows": rows}
        print(f"\n## variant {name}: {' '.join(variants[name]) or '(defaults)'}")
        print_table(rows, copy_gbps)
    if same:
        results["identity"] = same
    if errors:
        results["accuracy"] = errors
        names = list(exts)
        print("\n| max rel L2 (y, state, all grads) | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for case, per in errors.items():
            print(f"| {case} | " + " | ".join(f"{per[n][0]:.2e} {per[n][1]}" for n in names) + " |")
    print("\n| variant | " + " | ".join(f"{r['B']}x{r['T']}x{r['C']} {r['dtype'][:4]}" for r in rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for name, result in results["variants"].items():
        cells = [f"{r['fwd+bwd']['ms']:.3f} ({r['fwd+bwd']['copy%']:.0f}%)" for r in result["rows"]]
        print(f"| {name} fwd+bwd ms | " + " | ".join(cells) + " |")
    if json_path:
        json_path.write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--smoke", action="store_true", help="one small forward+backward, no timing")
    parser.add_argument("--profile", nargs=4, metavar=("B", "T", "C", "DTYPE"), help="3 fwd+bwd calls, for ncu")
    parser.add_argument("--graph", action="store_true", help="time CUDA graph replays of each call")
    parser.add_argument(
        "--kernel-times", nargs=4, metavar=("B", "T", "C", "DTYPE"), help="per-kernel device times of fwd+bwd"
    )
    parser.add_argument("--variants", help="'name:DEF=1,DEF2=2;name2:' builds to compare (see module doc)")
    parser.add_argument(
        "--accuracy", action="store_true", help="with --variants: errors against float64, bit-identity to the first"
    )
    parser.add_argument("--defines", default="", help="with --smoke: 'DEF=1,DEF2=2', a build variant's extension")
    parser.add_argument(
        "--shapes", type=parse_shapes, default=SHAPES, help="'BxTxC,BxTxC' to time instead of the issue's five"
    )
    args = parser.parse_args()
    if args.variants:
        run_variants(args.variants, args.accuracy, args.json, args.shapes)
        return
    if args.smoke:
        smoke(tuple(d for d in args.defines.split(",") if d))
        return
    if args.kernel_times:
        batch, steps, channels = (int(x) for x in args.kernel_times[:3])
        print(kernel_times(batch, steps, channels, getattr(torch, args.kernel_times[3])))
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
    rows = bench(args.shapes, copy_gbps, graph=args.graph)
    print_table(rows, copy_gbps)
    if args.json:
        args.json.write_text(
            json.dumps({"copy_GBps": copy_gbps, "device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
