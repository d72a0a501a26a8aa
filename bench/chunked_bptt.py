"""Chunked BPTT (`RWKV.chunk_len`): step time, peak memory and gradient match against whole windows.

    python bench/chunked_bptt.py                                  # CPU, small model
    python bench/chunked_bptt.py --device cuda --layers 12 --width 768 --vocab 50304 --ctx 4096 --chunks 0,512,1024

Each row is one forward + backward of the training loss (cross-entropy with L2Wrap) on a (B, T)
batch of random tokens, fp32, with `chunk_len` as given (0 = whole window) and block checkpointing
off or on. Time is the median of --repeats steps after one warm-up; peak memory is
torch.cuda.max_memory_allocated over one step (CUDA only). "grad rel err" is the largest relative
L2 difference of any parameter's gradient against the whole-window step without checkpointing.

Measured (H200, 2026-11-29, L12 C768 V50304 B1 T4096, cuda WKV, fp32; ms/step, peak GiB, grad rel err):
whole 90.9 / 8.14; chunk 512: 398.7 / 8.15 / 1.6e-6; with block checkpointing whole 125.4 / 4.58,
chunk 512: 671.2 / 4.84 / 1.6e-6. One backward keeps every chunk's graph, so memory does not drop;
at B=1 the 8x12 small calls cost about 4x in time.

Legend: B batch, T ctx_len.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model import ModelConfig, build_model
from model.loss import language_model_loss


def step(model: torch.nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    language_model_loss(model(x_BT), y_BT).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--chunks", default="0,128,256", help="Comma-separated chunk_len values; 0 = whole window.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=args.layers, n_embd=args.width, vocab_size=args.vocab)).to(device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.ctx + 1), device=device)
    x_BT, y_BT = tokens[:, :-1], tokens[:, 1:]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    reference = None
    print(f"L{args.layers} C{args.width} V{args.vocab} B{args.batch} T{args.ctx} on {device}")
    print(f"{'chunk_len':>9} {'ckpt':>5} {'ms/step':>9} {'peak GiB':>9} {'grad rel err':>13}")
    for checkpointing in (False, True):
        for chunk_len in (int(c) for c in args.chunks.split(",")):
            model.chunk_len, model.checkpoint_blocks = chunk_len, checkpointing
            grads = step(model, x_BT, y_BT)  # warm-up (and kernel build)
            if reference is None:
                reference = grads
            error = max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in reference.items())
            del grads
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(args.repeats):
                sync()
                started = time.perf_counter()
                step(model, x_BT, y_BT)
                sync()
                times.append((time.perf_counter() - started) * 1e3)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            print(f"{chunk_len:>9} {checkpointing!s:>5} {statistics.median(times):>9.1f} {peak:>9.2f} {error:>13.2e}")


if __name__ == "__main__":
    main()
