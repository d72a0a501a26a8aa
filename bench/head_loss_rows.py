"""GPU benchmark of the fused head loss's per-chunk row work under torch.compile, formulation by formulation.

One chunk of the fused head loss (model/fused_loss.py) turns an (n, V) bf16 block of logits into the
row max and arg-max (L2Wrap), the summed cross-entropy and the bf16 gradient (softmax - onehot) / N.
Its minimum traffic is one read of the logits and one write of the gradient; in the compiled 169M
training step Inductor's kernel for it took ~1.3 ms per 8192-row chunk (~0.8 TB/s counted that
way). This times each formulation compiled alone (the CUDA kernel of cuda/head_loss.cu as it is),
side by side in one process, against a copy
of the same bytes, and checks each against `inductor_rows` (loss, gradient, max, arg-max), the
formulation the model compiled before its loss moved out of the graph (model/fused_loss.py
`_apply_eagerly`).

    python bench/head_loss_rows.py                      # n 8192, V 50304, a table
    python bench/head_loss_rows.py --rows 16384 --inductor coordinate_descent_tuning=1
    TORCH_LOGS=output_code python bench/head_loss_rows.py 2> code.txt   # Inductor's kernels

Legend: n rows of a chunk, V vocabulary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _softmax_grad_pointwise(logits_nV, target_n, scale):
    """(summed cross-entropy, (softmax - onehot) * scale in the logits' dtype), with no scatter and no
    (n, V) intermediate: the one-hot is a comparison with an index range, so Inductor makes the gradient
    one pointwise kernel after the row reductions (model/fused_loss.py `_chunk_grad_eager` in eager form)."""
    logits_f = logits_nV.float()
    lse_n = torch.logsumexp(logits_f, dim=-1)
    loss = (lse_n - logits_f.gather(1, target_n[:, None]).squeeze(1)).sum()
    onehot_nV = torch.arange(logits_nV.shape[1], device=logits_nV.device)[None, :] == target_n[:, None]
    grad_nV = (torch.exp(logits_f - lse_n[:, None]) - onehot_nV.float()) * scale
    return loss, grad_nV.to(logits_nV.dtype)


def inductor_rows(logits_nV, target_n, scale):
    """The chunk's row work as plain ops for Inductor: max and arg-max, then `_softmax_grad_pointwise`."""
    max_n, argmax_n = torch.max(logits_nV, dim=-1)
    loss, grad_nV = _softmax_grad_pointwise(logits_nV, target_n, scale)
    return loss, grad_nV, max_n, argmax_n


def max_shift_rows(logits_nV, target_n, scale):
    """The row max (needed for L2Wrap anyway) as the softmax shift: lse = max + log(sum exp(x - max))."""
    max_n, argmax_n = torch.max(logits_nV, dim=-1)
    logits_f = logits_nV.float()
    lse_n = max_n.float() + torch.log(torch.exp(logits_f - max_n.float()[:, None]).sum(-1))
    loss = (lse_n - logits_f.gather(1, target_n[:, None]).squeeze(1)).sum()
    onehot_nV = torch.arange(logits_nV.shape[1], device=logits_nV.device)[None, :] == target_n[:, None]
    grad_nV = (torch.exp(logits_f - lse_n[:, None]) - onehot_nV.float()) * scale
    return loss, grad_nV.to(logits_nV.dtype), max_n, argmax_n


def log_softmax_rows(logits_nV, target_n, scale):
    """log_softmax (Inductor's online-softmax pattern), the loss gathered from it, grad = exp(logp) - onehot."""
    max_n, argmax_n = torch.max(logits_nV, dim=-1)
    logp_nV = torch.log_softmax(logits_nV.float(), dim=-1)
    loss = -logp_nV.gather(1, target_n[:, None]).sum()
    onehot_nV = torch.arange(logits_nV.shape[1], device=logits_nV.device)[None, :] == target_n[:, None]
    grad_nV = (torch.exp(logp_nV) - onehot_nV.float()) * scale
    return loss, grad_nV.to(logits_nV.dtype), max_n, argmax_n


def softmax_rows(logits_nV, target_n, scale):
    """softmax for the gradient, the loss as -log of the target's probability."""
    max_n, argmax_n = torch.max(logits_nV, dim=-1)
    logits_f = logits_nV.float()
    prob_nV = torch.softmax(logits_f, dim=-1)
    loss = -torch.log(prob_nV.gather(1, target_n[:, None]).squeeze(1)).sum()  # underflows for p < 1e-38
    onehot_nV = torch.arange(logits_nV.shape[1], device=logits_nV.device)[None, :] == target_n[:, None]
    grad_nV = (prob_nV - onehot_nV.float()) * scale
    return loss, grad_nV.to(logits_nV.dtype), max_n, argmax_n


def int32_where_rows(logits_nV, target_n, scale):
    """As the model, with the one-hot compared in int32 (not int64) and applied by a select."""
    max_n, argmax_n = torch.max(logits_nV, dim=-1)
    logits_f = logits_nV.float()
    lse_n = torch.logsumexp(logits_f, dim=-1)
    loss = (lse_n - logits_f.gather(1, target_n[:, None]).squeeze(1)).sum()
    columns = torch.arange(logits_nV.shape[1], device=logits_nV.device, dtype=torch.int32)
    prob_nV = torch.exp(logits_f - lse_n[:, None])
    grad_nV = torch.where(columns[None, :] == target_n.to(torch.int32)[:, None], prob_nV - 1.0, prob_nV) * scale
    return loss, grad_nV.to(logits_nV.dtype), max_n, argmax_n


def no_argmax_rows(logits_nV, target_n, scale):
    """Inductor's formulation without the arg-max (what the arg-max costs; L2Wrap would need it elsewhere)."""
    max_n = torch.amax(logits_nV, dim=-1)
    loss, grad_nV = _softmax_grad_pointwise(logits_nV, target_n, scale)
    return loss, grad_nV, max_n, torch.zeros_like(target_n)


def cuda_kernel_rows(logits_nV, target_n, scale):
    """cuda/head_loss.cu (model.fused_loss.ROW_KERNEL = "cuda"): one read of the logits, one write."""
    from model.head_loss_cuda import head_loss_rows_op

    grad_nV, loss_n, max_n, argmax_n = head_loss_rows_op(logits_nV, target_n, scale)
    return loss_n.sum(), grad_nV, max_n, argmax_n


FORMULATIONS = {
    "Inductor (logsumexp)": inductor_rows,
    "max as shift": max_shift_rows,
    "log_softmax": log_softmax_rows,
    "softmax": softmax_rows,
    "int32 one-hot, select": int32_where_rows,
    "no arg-max (not equal)": no_argmax_rows,
    "CUDA kernel (cuda/head_loss.cu)": cuda_kernel_rows,
}


def median_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=100, return_mode="median"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--inductor", default="", help="'key=value,...' set on torch._inductor.config")
    parser.add_argument("--only", default="", help="comma-separated formulation names (default: all)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import apply_inductor_options

    apply_inductor_options(args.inductor)
    torch.manual_seed(0)
    rows, vocab = args.rows, args.vocab
    logits = (torch.randn(rows, vocab, device="cuda") * 3).to(torch.bfloat16)
    target = torch.randint(0, vocab, (rows,), device="cuda")
    scale = 1.0 / (rows * 8)
    src = torch.empty_like(logits)
    copy_ms = median_ms(lambda: src.copy_(logits))
    floor_bytes = 2 * logits.numel() * logits.element_size()  # read the logits, write the gradient
    reference = [t.float() for t in inductor_rows(logits, target, scale)]
    print(
        f"n {rows} V {vocab} bf16, {torch.cuda.get_device_name()}, copy of the logits {copy_ms:.3f} ms "
        f"({floor_bytes / copy_ms / 1e6:.0f} GB/s read + write); inductor options {args.inductor or 'defaults'}"
    )
    print("| formulation | ms | GB/s (1 read + 1 write) | x copy | loss rel | grad max abs diff | max, arg-max equal |")
    print("|---|---|---|---|---|---|---|")
    chosen = [n for n in FORMULATIONS if not args.only or n in args.only.split(",")]
    for name in chosen:
        # The CUDA kernel runs as it is (one launch; compiling around it adds nothing); the PyTorch
        # formulations through Inductor, as in the model.
        fn = FORMULATIONS[name] if name.startswith("CUDA kernel") else torch.compile(FORMULATIONS[name], dynamic=False)
        out = fn(logits, target, scale)
        ms = median_ms(lambda fn=fn: fn(logits, target, scale))
        loss_rel = abs(float(out[0]) - float(reference[0])) / abs(float(reference[0]))
        grad_diff = float((out[1].float() - reference[1]).abs().max())
        same = torch.equal(out[2].float(), reference[2]) and torch.equal(out[3].float(), reference[3])
        print(
            f"| {name} | {ms:.3f} | {floor_bytes / ms / 1e6:.0f} | {ms / copy_ms:.2f} | {loss_rel:.1e} | "
            f"{grad_diff:.1e} | {same} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
