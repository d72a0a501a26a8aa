"""WKV benchmark: forward+backward time per backend, chunk-length sweep, and WKV's share of a training step.

    python bench/wkv.py                        # CPU: op table (torch vs reference), chunk sweep, step share
    python bench/wkv.py --skip-reference       # without the slow float64 loop
    python bench/wkv.py --sections step --threads 1
    python bench/wkv.py --device cuda --backends cuda,torch --sections op,step   # a GPU section, same code
    python bench/wkv.py --json wkv.json        # also write the figures

Legend: B batch, T time, C channels. Each figure is the median (and the minimum) over --repeats
timed calls after one warm-up call; on CUDA the device is synchronised around each call.
"fwd+bwd" is one forward and one backward of sum(y * gy) with gradients for k, v, time_decay and
time_first. The step section times forward, cross-entropy (L2Wrap) loss and backward of an RWKV-4
(6 layers, 256 wide, ctx 256 by default) twice: as built, and with the WKV call replaced by an
identity of the same shapes (y = v, k kept in the graph); the WKV share is the difference over the
full step. It also reports the op alone at the layer's shape times the number of layers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import model.rwkv as rwkv_module
from model import ModelConfig, build_model
from model.loss import language_model_loss
from model.wkv import backend_function
from model.wkv_reference import zero_state


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> dict[str, float]:
    """Wall time (median, min) and process CPU time (median) in ms of fn(), after one warm-up call.

    On a shared machine the CPU time of a 1-thread run is the steadier figure: it leaves out the time
    spent waiting for a core that another process holds.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return {"median_ms": statistics.median(wall), "min_ms": min(wall), "cpu_ms": statistics.median(cpu)}


def op_case(backend: str, shape: tuple[int, int, int], device: torch.device, **kwargs) -> dict[str, Callable]:
    """Closures running the op forward only, and forward+backward, on fixed random inputs."""
    batch, steps, channels = shape
    fn = backend_function(backend, device)
    g = torch.Generator().manual_seed(0)
    time_decay = (torch.rand(channels, generator=g) * 8 - 5).to(device).requires_grad_()  # the init's range
    time_first = torch.randn(channels, generator=g).to(device).requires_grad_()
    k, v, gy = (torch.randn(batch, steps, channels, generator=g).to(device) for _ in range(3))
    k.requires_grad_()
    v.requires_grad_()

    def forward():
        with torch.no_grad():
            return fn(time_decay, time_first, k, v, **kwargs)

    def forward_backward():
        y, _ = fn(time_decay, time_first, k, v, **kwargs)
        torch.autograd.grad((y * gy).sum(), (time_decay, time_first, k, v))

    return {"fwd": forward, "fwd+bwd": forward_backward}


def bench_op(backends: list[str], shape, device, repeats: int, reference_repeats: int) -> list[dict]:
    rows = []
    for backend in backends:
        case = op_case(backend, shape, device)
        n = reference_repeats if backend == "reference" else repeats
        row = {"backend": backend, "shape": shape, "repeats": n}
        for name, fn in case.items():
            row[name] = timed(fn, device, n)
        rows.append(row)
    return rows


def sweep_chunk(lengths: list[int], shapes, device, repeats: int) -> list[dict]:
    rows = []
    for shape in shapes:
        for length in lengths:
            case = op_case("torch", shape, device, chunk_len=length)
            rows.append({"shape": shape, "chunk_len": length, "fwd+bwd": timed(case["fwd+bwd"], device, repeats)})
    return rows


def identity_wkv(time_decay, time_first, k, v, state=None, backend="auto"):
    """Stands in for the WKV op: same shapes, k kept in the graph (its projection still gets a gradient)."""
    batch, _, channels = k.shape
    return torch.add(v, k, alpha=0.0), state if state is not None else zero_state(batch, channels, k.device)


def bench_step(backend: str, device, n_layer: int, n_embd: int, ctx_len: int, batch: int, vocab: int, repeats: int):
    config = ModelConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab, wkv_backend=backend)
    net = build_model(config).to(device)
    with torch.no_grad():  # off the init (whose zero matrices make k = 0), as after some training
        for p in net.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    idx = torch.randint(0, vocab, (batch, ctx_len + 1), device=device)

    def step():
        logits = net(idx[:, :-1])
        language_model_loss(logits, idx[:, 1:]).backward()
        net.zero_grad(set_to_none=True)

    real_wkv = rwkv_module.wkv
    full, stub = [], []
    for _ in range(repeats):  # interleaved, so a load change on a shared machine hits both alike
        rwkv_module.wkv = real_wkv
        full.append(timed(step, device, 1))
        rwkv_module.wkv = identity_wkv
        stub.append(timed(step, device, 1))
    rwkv_module.wkv = real_wkv
    op = timed(op_case(backend, (batch, ctx_len, n_embd), device)["fwd+bwd"], device, repeats)
    row = {"backend": backend, "model": f"{n_layer} layers x {n_embd}, vocab {vocab}", "B": batch, "ctx": ctx_len}
    for clock in ("median_ms", "cpu_ms"):
        full_ms, stub_ms = (statistics.median(t[clock] for t in runs) for runs in (full, stub))
        row[clock] = {
            "step": full_ms,
            "step_wkv_identity": stub_ms,
            "wkv_share": (full_ms - stub_ms) / full_ms,
            "op_alone_x_layers": op[clock] * n_layer,
            "op_alone_share": op[clock] * n_layer / full_ms,
        }
    return row


def fmt(t: dict) -> str:
    return f"{t['median_ms']:.1f} (min {t['min_ms']:.1f}, CPU {t['cpu_ms']:.1f})"


def print_report(report: dict) -> None:
    print(f"# WKV benchmark  {report['when']}  {report['host']}")
    print(f"device {report['device']}, torch {report['torch']}, threads {report['threads']}, load {report['load']}\n")
    if report.get("op"):
        print("| backend | B, T, C | fwd ms | fwd+bwd ms | repeats |\n|---|---|---|---|---|")
        for r in report["op"]:
            print(f"| {r['backend']} | {r['shape']} | {fmt(r['fwd'])} | {fmt(r['fwd+bwd'])} | {r['repeats']} |")
        print()
    if report.get("sweep"):
        print("| chunk_len | B, T, C | fwd+bwd ms |\n|---|---|---|")
        for r in report["sweep"]:
            print(f"| {r['chunk_len']} | {r['shape']} | {fmt(r['fwd+bwd'])} |")
        print()
    for r in report.get("step", []):
        print(f"Training step ({r['backend']}, {r['model']}, B {r['B']} x ctx {r['ctx']}), medians:\n")
        print(
            "| clock | step ms | step, WKV as identity ms | WKV share | WKV op alone x layers |\n|---|---|---|---|---|"
        )
        for clock, name in (("median_ms", "wall"), ("cpu_ms", "process CPU")):
            c = r[clock]
            print(
                f"| {name} | {c['step']:.0f} | {c['step_wkv_identity']:.0f} | {100 * c['wkv_share']:.1f} % | "
                f"{c['op_alone_x_layers']:.0f} ms ({100 * c['op_alone_share']:.1f} %) |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default="torch,reference", help="for the op table; step uses the first")
    parser.add_argument("--sections", default="op,sweep,step", help="comma list of op, sweep, step")
    parser.add_argument("--shape", default="4,1024,512", help="B,T,C of the op table")
    parser.add_argument("--chunk-lens", default="8,16,32,64,128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-repeats", type=int, default=1, help="the float64 loop is slow")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--step-batch", type=int, default=8)
    parser.add_argument("--step-vocab", type=int, default=4096)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backends = [b for b in args.backends.split(",") if not (args.skip_reference and b == "reference")]
    shape = tuple(int(x) for x in args.shape.split(","))
    sections = args.sections.split(",")
    report: dict = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "command": " ".join(["python", *sys.argv]),
    }
    if "op" in sections:
        report["op"] = bench_op(backends, shape, device, args.repeats, args.reference_repeats)
    if "sweep" in sections and "torch" in backends:
        lengths = [int(x) for x in args.chunk_lens.split(",")]
        shapes = [shape, (args.step_batch, 256, 256)]
        report["sweep"] = sweep_chunk(lengths, shapes, device, args.repeats)
    if "step" in sections:
        report["step"] = [bench_step(backends[0], device, 6, 256, 256, args.step_batch, args.step_vocab, args.repeats)]
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
