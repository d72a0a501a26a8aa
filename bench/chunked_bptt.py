"""Chunked BPTT (`RWKV.chunk_len`): step time, memory and gradient match against whole windows.

    python bench/chunked_bptt.py                                  # CPU, small model
    python bench/chunked_bptt.py --device cuda --layers 12 --width 768 --vocab 50304 --ctx 4096 --chunks 0,512,1024

Each row is one forward + backward of the training loss (cross-entropy with L2Wrap) on a (B, T)
batch of random tokens, fp32, with `chunk_len` as given (0 = whole window), chunk checkpointing
(`checkpoint_chunks`, the default when chunking) on or off, and block checkpointing off or on.
"ms/step" is the fastest of --repeats steps after one warm-up, "ms forward" the fastest forward
and loss with autograd recording (what backward recomputes with chunk checkpointing, plus the head
and loss). Memory, three ways:

* saved MiB: bytes of the distinct storages saved for backward by the forward and the loss
  (torch.autograd.graph.saved_tensors_hooks; parameters left out): what the step keeps until
  backward. Any device.
* live peak MiB: the peak of all tensor storages created during one step, forward and backward
  (a TorchDispatchMode that tracks each op's outputs until they are freed): CPU only, as it slows
  the step down; it includes what backward recomputes, the gradients and the logits.
* GPU peak GiB: torch.cuda.max_memory_allocated over the timed steps (CUDA only).

"grad rel err" is the largest relative L2 difference of any parameter's gradient against the
whole-window step without checkpointing.

Measured (CPU, one thread of a shared 2-core machine, 2026-11-29, torch WKV, fp32; ms/step,
saved MiB, live peak MiB):

    OMP_NUM_THREADS=1 python bench/chunked_bptt.py --repeats 7              # L4 C128 V1024 B1 T1024
    whole 132 / 72.2 / 84.3; chunk 128: 450 / 8.6 / 20.8 (no chunk checkpointing: 260 / 86.9 / 99.0);
    chunk 256: 284 / 8.5 / 28.8 (175 / 78.5 / 90.6); whole with block checkpointing 164 / 11.5 / 29.7.
    OMP_NUM_THREADS=1 python bench/chunked_bptt.py --repeats 3 --ctx 4096 --chunks 0,256
    whole 599 / 282.7 / 319.8; chunk 256: 1324 / 34.2 / 71.8 (754 / 314.0 / 351.2); whole with
    block checkpointing 698 / 46.1 / 99.6.

What a chunked step still saves is the head's: logits (B, T, V) for L2Wrap, cross-entropy's
log-softmax (B, T, V) and ln_out's output (B, T, C) = 8.5 of the 8.6 MiB at T1024. Chunk
checkpointing adds one forward of the chunks in backward (ms forward above); on CPU, small chunks
also cost more per token than whole windows (many small ops), with or without checkpointing.

Before chunk checkpointing (H200, L12 C768 V50304 B1 T4096, cuda WKV, fp32; ms/step, peak GiB):
whole 90.9 / 8.14; chunk 512: 398.7 / 8.15; with block checkpointing whole 125.4 / 4.58, chunk 512:
671.2 / 4.84. Every chunk's graph was kept until the one backward, so memory did not drop.

Legend: B batch, T ctx_len.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from model import ModelConfig, build_model
from model.loss import language_model_loss
from model.memory import PeakLiveBytes, saved_tensor_bytes

MiB = 2**20


def step(model: torch.nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    language_model_loss(model(x_BT), y_BT).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def best_ms(run: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """The fastest of `repeats` runs, in ms: on a shared machine the minimum is the least disturbed."""
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - started) * 1e3)
    return min(times)


def settings(chunks: list[int]) -> list[tuple[int, bool, bool]]:
    """(chunk_len, checkpoint_chunks, checkpoint_blocks) rows; chunk checkpointing only when chunked."""
    rows = []
    for blocks in (False, True):
        for chunk_len in chunks:
            rows += [(chunk_len, True, blocks)] + ([(chunk_len, False, blocks)] if chunk_len else [])
    return rows


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
    header = ("chunk_len", "ckpt chunks", "ckpt blocks", "ms/step", "ms forward", "saved MiB", "live peak MiB")
    header += ("GPU peak GiB",)
    print(f"{header[0]:>9} {header[1]:>11} {header[2]:>11} " + " ".join(f"{h:>13}" for h in header[3:]), end="")
    print(f" {'grad rel err':>13}")
    for chunk_len, checkpoint_chunks, checkpoint_blocks in settings([int(c) for c in args.chunks.split(",")]):
        model.chunk_len, model.checkpoint_chunks = chunk_len, checkpoint_chunks
        model.checkpoint_blocks = checkpoint_blocks
        grads = step(model, x_BT, y_BT)  # warm-up (and kernel build)
        if reference is None:
            reference = grads
        error = max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in reference.items())
        del grads
        saved = saved_tensor_bytes(lambda: language_model_loss(model(x_BT), y_BT), model.parameters()) / MiB
        live = float("nan")
        if device.type == "cpu":
            with PeakLiveBytes() as tracker:
                step(model, x_BT, y_BT)
            live = tracker.peak / MiB
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_ms = best_ms(lambda: step(model, x_BT, y_BT), args.repeats, sync)
        forward_ms = best_ms(lambda: language_model_loss(model(x_BT), y_BT), args.repeats, sync)
        gpu_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        figures = (step_ms, forward_ms, saved, live, gpu_peak)
        print(f"{chunk_len:>9} {checkpoint_chunks!s:>11} {checkpoint_blocks!s:>11} ", end="")
        print(" ".join(f"{f:>13.2f}" for f in figures) + f" {error:>13.2e}")


if __name__ == "__main__":
    main()
