"""The head loss's CUDA row kernel's arithmetic on the CPU, against float64, edge cases included.

cuda/head_loss.cu keeps its per-element and merge arithmetic (`local_acc`, `merge`, `row_lse`,
`logit_grad`) __host__ __device__. A small host program compiled with nvcc runs them in the kernel's
order (each of 256 threads strides over the row, an xor tree within each warp of 32, then the warps
in order), so the online max / arg-max / logsumexp and the gradient are checked here, with no GPU:
ties, NaN, -inf, +inf, an out-of-range target, rows shorter than the block, and V not a multiple of
8 (the scalar path). tests/gpu/test_head_loss_cuda.py checks the kernel itself on a GPU.

Legend: n rows, V vocabulary.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"

# stdin n V VEC scale, then per row its target and V bf16-exact floats; stdout per row
# max argmax loss, then the V bf16 gradients (as floats).
HARNESS = r"""
#include "HEAD_LOSS_CU"
#include <algorithm>
#include <cstdio>
#include <vector>

int main() {
    long long n; int V, vec; float scale;
    if (scanf("%lld %d %d %f", &n, &V, &vec, &scale) != 4) return 1;
    std::vector<float> x(V);
    for (long long row = 0; row < n; ++row) {
        long long target;
        if (scanf("%lld", &target) != 1) return 1;
        for (int j = 0; j < V; ++j) if (scanf("%f", &x[j]) != 1) return 1;
        std::vector<Acc> acc(THREADS, Acc{-INFINITY, 0x7fffffffffffffffLL, 0.f});
        for (int tid = 0; tid < THREADS; ++tid)
            for (int j = tid * vec; j < V; j += THREADS * vec) {
                if (vec == 8) {
                    float e[8];
                    for (int q = 0; q < 8; ++q) e[q] = x[j + q];
                    acc[tid] = merge(acc[tid], local_acc<8>(e, j));
                } else {
                    float e[1] = {x[j]};
                    acc[tid] = merge(acc[tid], local_acc<1>(e, j));
                }
            }
        for (int offset = 16; offset > 0; offset >>= 1) {  // __shfl_xor_sync: every lane merges its partner
            std::vector<Acc> next(acc);
            for (int lane = 0; lane < THREADS; ++lane) next[lane] = merge(acc[lane], acc[lane ^ offset]);
            acc = next;
        }
        Acc total = acc[0];
        for (int w = 1; w < WARPS; ++w) total = merge(total, acc[32 * w]);
        const float lse = row_lse(total);
        const bool t_ok = target >= 0 && target < V;
        const float loss = t_ok ? lse - x[target] : NAN;
        printf("%.9g %lld %.9g\n", total.m, total.i, loss);
        for (int j = 0; j < V; ++j)
            printf("%.9g ", __bfloat162float(__float2bfloat16_rn(logit_grad(x[j], lse, t_ok && j == target, scale))));
        printf("\n");
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def harness(compile_host_program) -> Path:
    return compile_host_program(HARNESS.replace("HEAD_LOSS_CU", str(CUDA_DIR / "head_loss.cu")))


def run_rows(harness: Path, logits: np.ndarray, targets: list[int], vec: int, scale: float):
    """(max, argmax, loss, grad) per row from the host program; logits are rounded to bf16 first."""
    rows = torch.from_numpy(logits).to(torch.bfloat16).float().numpy()
    lines = [f"{len(rows)} {rows.shape[1]} {vec} {scale!r}"]
    for target, row in zip(targets, rows, strict=True):
        lines.append(f"{target} " + " ".join(repr(float(v)) for v in row))
    out = subprocess.run([str(harness)], input="\n".join(lines), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout.split("\n")
    results = []
    for k in range(len(rows)):
        head, grads = text[2 * k].split(), text[2 * k + 1].split()
        results.append((float(head[0]), int(head[1]), float(head[2]), np.array(grads, dtype=np.float64)))
    return rows, results


def reference(row: np.ndarray, target: int, scale: float):
    x = row.astype(np.float64)
    top = x.max()
    lse = top + math.log(np.exp(x - top).sum())
    grad = np.exp(x - lse) * scale
    grad[target] -= scale
    return int(np.argmax(x)), lse - x[target], grad


@pytest.mark.parametrize(("vocab", "vec"), [(50304, 8), (1000, 8), (1001, 1), (7, 1), (64, 8)])
def test_random_rows_match_float64(harness, vocab, vec):
    rng = np.random.default_rng(vocab)
    logits = rng.normal(0, 4, (3, vocab)).astype(np.float32)
    targets = [int(t) for t in rng.integers(0, vocab, 3)]
    scale = 1.0 / 4096
    rows, results = run_rows(harness, logits, targets, vec, scale)
    for row, target, (top, argmax, loss, grad) in zip(rows, targets, results, strict=True):
        want_argmax, want_loss, want_grad = reference(row, target, scale)
        assert top == row.max() and argmax == want_argmax
        assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-5)
        assert (np.abs(grad - want_grad) <= np.abs(want_grad) * 2**-8 + 1e-30).all()


def test_ties_nan_infinities_and_a_bad_target(harness):
    vocab = 600  # shorter than one pass of the block at 8 per thread: most threads see nothing
    rows = np.zeros((6, vocab), dtype=np.float32)
    rows[0, [5, 300, 599]] = 3.0  # a three-way tie: the first index
    rows[1, [400, 77]] = np.nan  # the first NaN wins over a larger value
    rows[1, 3] = 100.0
    rows[2, :] = -np.inf  # a certain prediction among -inf
    rows[2, 17] = 1.0
    rows[3, :] = -np.inf  # nothing but -inf: NaN loss, as torch
    rows[4, 9] = np.inf  # +inf: a non-finite loss
    targets = [300, 3, 17, 0, 9, vocab]  # row 5: out of range
    _, results = run_rows(harness, rows, targets, 8, 1.0)
    (top0, arg0, loss0, _), (top1, arg1, loss1, _), (top2, arg2, loss2, grad2) = results[:3]
    assert (top0, arg0) == (3.0, 5) and loss0 == pytest.approx(math.log(597 + 3 * math.e**3) - 3, rel=1e-5)
    assert math.isnan(top1) and arg1 == 77 and math.isnan(loss1)
    assert (top2, arg2, loss2) == (1.0, 17, 0.0) and not grad2.any()
    assert math.isnan(results[3][2]) and not math.isfinite(results[4][2])
    loss5, grad5 = results[5][2], results[5][3]  # no one-hot: the gradient is the softmax alone
    assert math.isnan(loss5) and np.allclose(grad5, 1 / vocab, rtol=2**-8, atol=0)


def test_the_first_index_wins_within_one_thread_too(harness):
    """Ties and NaNs in two groups of the same thread (a thread's groups are 2048 elements apart)."""
    vocab = 8192
    rows = np.zeros((3, vocab), dtype=np.float32)
    rows[0, [2048 + 3, 3, 4096 + 3]] = 5.0  # thread 0's groups 0, 1, 2: the earliest, index 3
    rows[1, [2048 + 9, 4096 + 10]] = np.nan  # thread 1: the first NaN, in its first NaN group
    rows[1, 9] = 7.0  # a larger value before them does not win
    rows[2, 2048 + 7] = 4.0  # the max grows in a later group than an equal-so-far value
    rows[2, 6144 + 2] = 4.0
    _, results = run_rows(harness, rows, [0, 0, 0], 8, 1.0)
    assert [(r[0], r[1]) for r in results[::2]] == [(5.0, 3), (4.0, 2048 + 7)]
    assert math.isnan(results[1][0]) and results[1][1] == 2048 + 9
