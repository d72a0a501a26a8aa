"""Triton kernels of model/ln_shift_mix.py (which documents them); imported on first use only.

Kept in a module of their own because Triton decides at definition time whether a kernel is compiled
or interpreted (TRITON_INTERPRET=1, as the CPU tests set it before the first use).
"""

import triton
import triton.language as tl


@triton.jit
def norm_row(x_ptr, row, cols, cmask, w, b, C, eps):
    """LayerNorm of one row in fp32: (ln, xhat, rstd); masked columns 0."""
    x = tl.load(x_ptr + row * C + cols, mask=cmask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / C
    d = tl.where(cmask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 0) / C + eps)
    xhat = d * rstd
    return xhat * w + b, xhat, rstd


@triton.jit
def load_three(p0, p1, p2, offsets, mask, M: tl.constexpr, BLOCK_C: tl.constexpr):
    """p_k + offsets for k < M (M = 2 or 3) as fp32 vectors; without a third, zeros (every term it
    enters then vanishes, and p2 is never read)."""
    r0 = tl.load(p0 + offsets, mask=mask, other=0.0).to(tl.float32)
    r1 = tl.load(p1 + offsets, mask=mask, other=0.0).to(tl.float32)
    r2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    if M > 2:
        r2 = tl.load(p2 + offsets, mask=mask, other=0.0).to(tl.float32)
    return r0, r1, r2


@triton.jit
def forward(x_ptr, w_ptr, b_ptr, prev_ptr, mix_ptr, out0_ptr, out1_ptr, out2_ptr, last_ptr, T, C, eps,
            HAS_PREV: tl.constexpr, M: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)  # row offsets pass 2**31 elements at large B*T*C
    t0 = tl.program_id(1) * ROWS
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    m0, m1, m2 = load_three(mix_ptr, mix_ptr + C, mix_ptr + 2 * C, cols, cmask, M, BLOCK_C)
    # The row before the first: ln of x[t0 - 1], or x_prev (zeros without one) at t0 = 0.
    ln_prev, _, _ = norm_row(x_ptr, seq * T + tl.maximum(t0 - 1, 0), cols, cmask, w, b, C, eps)
    if t0 == 0:
        ln_prev = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_PREV:
            ln_prev = tl.load(prev_ptr + seq * C + cols, mask=cmask, other=0.0).to(tl.float32)
    out_type = out0_ptr.dtype.element_ty
    for i in range(ROWS):
        t = t0 + i
        tb = cols * 0 + t  # t as a block: a mask mixing a block and a scalar fails in Triton 3.9's interpreter
        ok = cmask & (tb < T)
        row = seq * T + tl.minimum(t, T - 1)
        ln, _, _ = norm_row(x_ptr, row, cols, cmask, w, b, C, eps)
        at = row * C + cols
        tl.store(out0_ptr + at, (ln * m0 + ln_prev * (1 - m0)).to(out_type), mask=ok)
        tl.store(out1_ptr + at, (ln * m1 + ln_prev * (1 - m1)).to(out_type), mask=ok)
        if M > 2:
            tl.store(out2_ptr + at, (ln * m2 + ln_prev * (1 - m2)).to(out_type), mask=ok)
        tl.store(last_ptr + seq * C + cols, ln.to(last_ptr.dtype.element_ty), mask=cmask & (tb == T - 1))
        ln_prev = ln


@triton.jit
def backward(x_ptr, w_ptr, b_ptr, prev_ptr, mix_ptr, g0_ptr, g1_ptr, g2_ptr, glast_ptr, gx_ptr, gprev_ptr,
             part_ptr, T, C, eps, HAS_PREV: tl.constexpr, HAS_GLAST: tl.constexpr, M: tl.constexpr,
             ROWS: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)  # row offsets pass 2**31 elements at large B*T*C
    chunk = tl.program_id(1)
    t0 = chunk * ROWS
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    m0, m1, m2 = load_three(mix_ptr, mix_ptr + C, mix_ptr + 2 * C, cols, cmask, M, BLOCK_C)
    # The output gradients of the row after this one: its xx is this row's ln. Start with the row
    # after the chunk (none after the sequence's end).
    t_next = t0 + ROWS
    nxt = cmask & (cols * 0 + t_next < T)
    at = (seq * T + tl.minimum(t_next, T - 1)) * C + cols
    h0, h1, h2 = load_three(g0_ptr, g1_ptr, g2_ptr, at, nxt, M, BLOCK_C)
    acc0 = tl.zeros([BLOCK_C], dtype=tl.float32)  # column sums: the mixes, LayerNorm weight, bias
    acc1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    # Rows in reverse; each row's LayerNorm is computed once, as the row before of the row after it.
    ln, xhat, rstd = norm_row(x_ptr, seq * T + tl.minimum(t_next - 1, T - 1), cols, cmask, w, b, C, eps)
    for j in range(ROWS):
        t = t0 + ROWS - 1 - j
        tb = cols * 0 + t  # as in forward
        ok = cmask & (tb < T)
        row = seq * T + tl.minimum(t, T - 1)
        before = seq * T + tl.minimum(tl.maximum(t - 1, 0), T - 1)
        ln_before, xhat_before, rstd_before = norm_row(x_ptr, before, cols, cmask, w, b, C, eps)
        ln_prev = ln_before
        if t == 0:
            ln_prev = tl.zeros([BLOCK_C], dtype=tl.float32)
            if HAS_PREV:
                ln_prev = tl.load(prev_ptr + seq * C + cols, mask=cmask, other=0.0).to(tl.float32)
        g0, g1, g2 = load_three(g0_ptr, g1_ptr, g2_ptr, row * C + cols, ok, M, BLOCK_C)
        g_ln = g0 * m0 + h0 * (1 - m0) + g1 * m1 + h1 * (1 - m1) + g2 * m2 + h2 * (1 - m2)
        if HAS_GLAST:
            g_ln += tl.load(glast_ptr + seq * C + cols, mask=cmask & (tb == T - 1), other=0.0).to(tl.float32)
        g_ln = tl.where(ok, g_ln, 0.0)
        diff = tl.where(ok, ln - ln_prev, 0.0)
        acc0 += g0 * diff
        acc1 += g1 * diff
        acc2 += g2 * diff
        acc_w += g_ln * xhat
        acc_b += g_ln
        if HAS_PREV:  # x_prev is row 0's xx
            g_prev = g0 * (1 - m0) + g1 * (1 - m1) + g2 * (1 - m2)
            tl.store(gprev_ptr + seq * C + cols, g_prev.to(gprev_ptr.dtype.element_ty), mask=ok & (tb == 0))
        g_xhat = g_ln * w
        c1 = tl.sum(g_xhat * xhat, 0) / C
        c2 = tl.sum(g_xhat, 0) / C
        gx = (g_xhat - xhat * c1 - c2) * rstd
        tl.store(gx_ptr + row * C + cols, gx.to(gx_ptr.dtype.element_ty), mask=ok)
        h0, h1, h2 = g0, g1, g2
        ln, xhat, rstd = ln_before, xhat_before, rstd_before
    part = part_ptr + (seq * tl.num_programs(1) + chunk) * (M + 2) * C + cols
    tl.store(part, acc0, mask=cmask)
    tl.store(part + C, acc1, mask=cmask)
    if M > 2:
        tl.store(part + 2 * C, acc2, mask=cmask)
    tl.store(part + M * C, acc_w, mask=cmask)
    tl.store(part + (M + 1) * C, acc_b, mask=cmask)
