"""Fused head loss (model/fused_loss.py) vs the unfused head + language_model_loss: time and memory.

    python bench/fused_loss.py                                    # CPU: 169M head (V 50304, C 768), N 1024 rows
    python bench/fused_loss.py --device cuda --dtype bf16 --rows 65536 --chunks 0,4096,8192,16384

The second line is the GPU measurement (micro-batch 64 x ctx 1024 = 65536 rows of the 169M model
in bf16); it has not been run yet. Each row is one forward + backward of the loss alone: hidden
states (N, C), a leaf standing for ln_out's output, through the head (V, C) into cross-entropy with
L2Wrap. chunk 0 is the unfused path (`language_model_loss(hidden @ W.T, targets)`, the (N, V)
logits and log-softmax whole); a chunk > 0 is `fused_head_loss` with that many rows per chunk.

* ms/step: fastest of --repeats forward + backward steps after one warm-up; ms forward: the
  forward alone (the fused forward also computes the gradients, its backward only scales them).
* saved MiB: distinct storages saved for backward (saved_tensors_hooks; the head weight left out).
* live peak MiB: the peak of all storages created during one step (CPU only; a dispatch mode).
* GPU peak GiB: torch.cuda.max_memory_allocated over the timed steps, minus what was allocated
  before them (CUDA only).
* grad rel err: the largest relative L2 difference of grad hidden / grad weight against chunk 0.

Measured: see docs/benchmarks.md "### Fused head loss (CPU)".

Legend: N rows (B*T), C n_embd, V vocab.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from model.fused_loss import fused_head_loss
from model.loss import language_model_loss
from model.memory import PeakLiveBytes, saved_tensor_bytes

MiB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def loss_fn(chunk: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    if chunk == 0:
        return lambda hidden_NC, weight_VC, targets_N: language_model_loss(hidden_NC @ weight_VC.T, targets_N)
    return lambda hidden_NC, weight_VC, targets_N: fused_head_loss(hidden_NC, weight_VC, targets_N, chunk)


def best_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rows", type=int, default=1024, help="N = micro-batch x ctx_len.")
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--chunks", default="0,128,256,1024", help="Comma-separated rows per chunk; 0 = unfused.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    generator = torch.Generator(device=device).manual_seed(0)
    hidden_NC = torch.randn(args.rows, args.width, device=device, generator=generator).to(dtype).requires_grad_()
    weight_VC = (torch.randn(args.vocab, args.width, device=device, generator=generator) * 0.05).to(dtype)
    weight_VC.requires_grad_()
    targets_N = torch.randint(0, args.vocab, (args.rows,), device=device, generator=generator)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    logits_mib = args.rows * args.vocab * hidden_NC.element_size() / MiB
    print(f"N{args.rows} C{args.width} V{args.vocab} {args.dtype} on {device}; logits (N, V) = {logits_mib:.1f} MiB")
    header = ("chunk", "ms/step", "ms forward", "saved MiB", "live peak MiB", "GPU peak GiB", "grad rel err")
    print(f"{header[0]:>6} " + " ".join(f"{h:>13}" for h in header[1:]))

    reference = None
    for chunk in [int(c) for c in args.chunks.split(",")]:
        loss = loss_fn(chunk)

        def step(loss=loss) -> tuple[torch.Tensor, torch.Tensor]:
            hidden_NC.grad = weight_VC.grad = None
            loss(hidden_NC, weight_VC, targets_N).backward()
            return hidden_NC.grad, weight_VC.grad

        grads = step()  # warm-up
        reference = reference or grads
        error = max(float((g - r).float().norm() / r.float().norm()) for g, r in zip(grads, reference, strict=True))
        del grads
        saved = saved_tensor_bytes(lambda loss=loss: loss(hidden_NC, weight_VC, targets_N), [weight_VC]) / MiB
        live = float("nan")
        if device.type == "cpu":
            with PeakLiveBytes() as tracker:
                step()
            live = tracker.peak / MiB
        gpu_peak = float("nan")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        step_ms = best_ms(step, args.repeats, sync)
        forward_ms = best_ms(lambda loss=loss: loss(hidden_NC, weight_VC, targets_N), args.repeats, sync)
        if device.type == "cuda":
            gpu_peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30
        figures = (step_ms, forward_ms, saved, live, gpu_peak)
        print(f"{chunk:>6} " + " ".join(f"{f:>13.2f}" for f in figures) + f" {error:>13.2e}", flush=True)


if __name__ == "__main__":
    main()
