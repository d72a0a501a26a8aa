"""Triton kernels of model/ln_shift_mix.py (which documents them); imported on first use only.

Kept in a module of their own because Triton decides at definition time whether a kernel is compiled
or interpreted (TRITON_INTERPRET=1, as the CPU tests set it before the first use).

Both kernels walk ROWS consecutive rows of one sequence, one row (BLOCK_C columns) at a time, and carry
what the next row needs from the one before in registers, so every row of x and of the output gradients
is loaded once: the forward carries the row's LayerNorm (the next row's xx); the backward, whose row t
gradients reach ln[t] and (through out[t]'s xx) ln[t - 1], finishes row t - 1 in iteration t. Only the
row before a chunk is normalised twice. (The kernels before these normalised tiles of two rows side by
side and loaded x and the gradients a second time, shifted by one row: on an H200 they took 1.05-1.2x as
long at the training shapes, forward and backward; docs/benchmarks.md, session 14.) The
forward saves each row's mean and rstd (8 bytes a row), so the backward normalises with them instead of
taking the row sums again. A row is a (1, BLOCK_C) tile and its index a (1,) vector, so that the
helpers below broadcast as for any tile.
"""

import triton
import triton.language as tl


@triton.jit
def normalise(x, mask, mean, rstd, w, b):
    """(ln, xhat) of the fp32 rows x (R, BLOCK_C) given their mean and rstd (R,), xhat 0 in masked entries:
    the one LayerNorm formula of both kernels, so the backward's xhat is the forward's."""
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    return xhat * w[None, :] + b[None, :], xhat


@triton.jit
def norm_tile(x_ptr, rows, cols, mask, w, b, C, eps):
    """LayerNorm in fp32 of the rows `rows` (R,): (ln, xhat, mean, rstd) with ln, xhat (R, BLOCK_C), xhat 0 in
    masked entries, mean and rstd (R,)."""
    x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / C
    d = tl.where(mask, x - mean[:, None], 0.0)
    # Inductor passes a Python float as fp64, which would make the whole tile fp64: the variance is
    # taken back to fp32 (one scalar per row, so the fp64 add costs nothing).
    rstd = 1.0 / tl.sqrt((tl.sum(d * d, 1) / C + eps).to(tl.float32))
    ln, xhat = normalise(x, mask, mean, rstd, w, b)
    return ln, xhat, mean, rstd


@triton.jit
def saved_norm_tile(x_ptr, stats_ptr, rows, cols, mask, w, b, C):
    """norm_tile with the rows' mean and rstd as the forward saved them (stats_ptr: (rows, 2) fp32): the
    backward then needs no row sums of its own for the LayerNorm (the same values: the forward's)."""
    x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(stats_ptr + rows * 2)
    rstd = tl.load(stats_ptr + rows * 2 + 1)
    ln, xhat = normalise(x, mask, mean, rstd, w, b)
    return ln, xhat, mean, rstd


@triton.jit
def load_three(p0, p1, p2, offsets, mask, M: tl.constexpr):
    """p_k + offsets for k < M (M = 2 or 3) as fp32 tiles; without a third, zeros (every term it
    enters then vanishes, and p2 is never read)."""
    r0 = tl.load(p0 + offsets, mask=mask, other=0.0).to(tl.float32)
    r1 = tl.load(p1 + offsets, mask=mask, other=0.0).to(tl.float32)
    r2 = tl.zeros_like(r0)
    if M > 2:
        r2 = tl.load(p2 + offsets, mask=mask, other=0.0).to(tl.float32)
    return r0, r1, r2


@triton.jit
def per_sequence(seq, C, cols, t):
    """Offsets into a (B, C) tensor (x_prev, ln[:, -1] and their gradients) for the rows t (R,) of sequence
    seq: each row gets its sequence's vector; the store or load masks pick the row."""
    return seq * C + cols[None, :] + t[:, None] * 0


@triton.jit
def shift_in(ln_before, prev_ptr, seq, t, cols, cmask, C, HAS_PREV: tl.constexpr):
    """xx of the rows t (R,) from ln_before, the LayerNorm of rows t - 1 (the callers normalise rows
    max(t - 1, 0)): at t = 0 x_prev instead (zeros without one)."""
    start = tl.zeros_like(ln_before)
    if HAS_PREV:
        prev = tl.load(prev_ptr + seq * C + cols, mask=cmask, other=0.0).to(tl.float32)
        start += prev[None, :]
    return tl.where((t == 0)[:, None], start, ln_before)


@triton.jit
def forward(x_ptr, w_ptr, b_ptr, prev_ptr, mix_ptr, out0_ptr, out1_ptr, out2_ptr, last_ptr, stats_ptr, T, C,
            eps, HAS_PREV: tl.constexpr, M: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
            STAGES: tl.constexpr):  # fmt: skip
    """Program (sequence, chunk): the outputs of ROWS rows, and their LayerNorm mean and rstd for the backward
    (stats_ptr). Each row's LayerNorm is carried to the next row as its xx. STAGES: the row loop's
    software pipelining (loads for the next rows issued while one is computed; None: Triton's default)."""
    seq = tl.program_id(0).to(tl.int64)  # row offsets pass 2**31 elements at large B*T*C
    start = tl.program_id(1) * ROWS
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    m0, m1, m2 = load_three(mix_ptr, mix_ptr + C, mix_ptr + 2 * C, cols[None, :], cmask[None, :], M)
    # xx of the chunk's first row: the LayerNorm of the row before it, or x_prev (zeros) at t = 0.
    t = start + tl.arange(0, 1)
    ln_before = norm_tile(x_ptr, seq * T + tl.maximum(t - 1, 0), cols, (t > 0)[:, None] & cmask[None, :], w, b, C,
                          eps)[0]  # fmt: skip
    ln_before = shift_in(ln_before, prev_ptr, seq, t, cols, cmask, C, HAS_PREV)
    out_type = out0_ptr.dtype.element_ty
    for i in tl.range(ROWS, num_stages=STAGES):
        t = start + i + tl.arange(0, 1)
        ok = (t < T)[:, None] & cmask[None, :]
        rows = seq * T + tl.minimum(t, T - 1)
        ln, _, mean, rstd = norm_tile(x_ptr, rows, cols, ok, w, b, C, eps)
        tl.store(stats_ptr + rows * 2, mean, mask=t < T)
        tl.store(stats_ptr + rows * 2 + 1, rstd, mask=t < T)
        at = rows[:, None] * C + cols[None, :]
        tl.store(out0_ptr + at, (ln * m0 + ln_before * (1 - m0)).to(out_type), mask=ok)
        tl.store(out1_ptr + at, (ln * m1 + ln_before * (1 - m1)).to(out_type), mask=ok)
        if M > 2:
            tl.store(out2_ptr + at, (ln * m2 + ln_before * (1 - m2)).to(out_type), mask=ok)
        tl.store(last_ptr + per_sequence(seq, C, cols, t), ln.to(last_ptr.dtype.element_ty),
                 mask=ok & (t == T - 1)[:, None])  # fmt: skip
        ln_before = ln


@triton.jit
def backward(x_ptr, w_ptr, b_ptr, prev_ptr, mix_ptr, stats_ptr, g0_ptr, g1_ptr, g2_ptr, glast_ptr, gx_ptr,
             gprev_ptr, part_ptr, T, C, HAS_PREV: tl.constexpr, HAS_GLAST: tl.constexpr, M: tl.constexpr,
             ROWS: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """Program (sequence, chunk): x's gradient of ROWS rows and the chunk's column sums (mixes, LayerNorm
    weight and bias) as one partial, written to part_ptr. Row t's gradients enter ln[t] (through out[t])
    and ln[t - 1] (through out[t]'s xx), so iteration t finishes row t - 1: it carries row t - 1's
    LayerNorm, xhat, rstd and the part of its ln gradient that came through its own outputs. ROWS + 1
    iterations: the last reads only the next chunk's first row's gradients. STAGES: as the forward's."""
    seq = tl.program_id(0).to(tl.int64)  # row offsets pass 2**31 elements at large B*T*C
    chunk = tl.program_id(1)
    start = chunk * ROWS
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    m0, m1, m2 = load_three(mix_ptr, mix_ptr + C, mix_ptr + 2 * C, cols[None, :], cmask[None, :], M)
    t = start + tl.arange(0, 1)
    ln_before, xhat_before, _, rstd_before = saved_norm_tile(
        x_ptr, stats_ptr, seq * T + tl.maximum(t - 1, 0), cols, (t > 0)[:, None] & cmask[None, :], w, b, C
    )
    ln_before = shift_in(ln_before, prev_ptr, seq, t, cols, cmask, C, HAS_PREV)
    g_ln_own = tl.zeros_like(ln_before)  # row t - 1's ln gradient through its own outputs
    acc0 = tl.zeros_like(ln_before)  # column sums: the mixes, LayerNorm weight, bias
    acc1 = tl.zeros_like(ln_before)
    acc2 = tl.zeros_like(ln_before)
    acc_w = tl.zeros_like(ln_before)
    acc_b = tl.zeros_like(ln_before)
    for i in tl.range(ROWS + 1, num_stages=STAGES):
        t = start + i + tl.arange(0, 1)
        own = i < ROWS  # row t is this chunk's (else only its gradients are read, for row t - 1)
        ok = (t < T)[:, None] & cmask[None, :]
        rows = seq * T + tl.minimum(t, T - 1)
        at = rows[:, None] * C + cols[None, :]
        ln, xhat, _, rstd = saved_norm_tile(x_ptr, stats_ptr, rows, cols, ok & own, w, b, C)
        g0, g1, g2 = load_three(g0_ptr + at, g1_ptr + at, g2_ptr + at, 0, ok, M)  # 0 past T
        diff = ln - ln_before
        keep = own.to(tl.float32)
        acc0 += keep * g0 * diff
        acc1 += keep * g1 * diff
        if M > 2:
            acc2 += keep * g2 * diff
        into_before = g0 * (1 - m0) + g1 * (1 - m1)
        if M > 2:
            into_before += g2 * (1 - m2)
        if HAS_PREV:  # x_prev is row 0's xx
            tl.store(gprev_ptr + per_sequence(seq, C, cols, t), into_before.to(gprev_ptr.dtype.element_ty),
                     mask=cmask[None, :] & (t == 0)[:, None])  # fmt: skip
        # Row t - 1 is complete: its LayerNorm backward.
        done = ((i > 0) & (t - 1 < T))[:, None]
        g_ln = tl.where(done, g_ln_own + into_before, 0.0)
        acc_w += g_ln * xhat_before
        acc_b += g_ln
        g_xhat = g_ln * w[None, :]
        c1 = tl.sum(g_xhat * xhat_before, 1) / C
        c2 = tl.sum(g_xhat, 1) / C
        gx = (g_xhat - xhat_before * c1[:, None] - c2[:, None]) * rstd_before[:, None]
        before = (seq * T + tl.minimum(tl.maximum(t - 1, 0), T - 1))[:, None] * C + cols[None, :]  # row t - 1
        tl.store(gx_ptr + before, gx.to(gx_ptr.dtype.element_ty), mask=cmask[None, :] & done)
        g_ln_own = g0 * m0 + g1 * m1
        if M > 2:
            g_ln_own += g2 * m2
        if HAS_GLAST:  # ln[:, -1]'s gradient
            g_ln_own += tl.load(glast_ptr + per_sequence(seq, C, cols, t), mask=ok & (t == T - 1)[:, None],
                                other=0.0).to(tl.float32)  # fmt: skip
        ln_before, xhat_before, rstd_before = ln, xhat, rstd
    part = part_ptr + (seq * tl.num_programs(1) + chunk) * (M + 2) * C + cols
    tl.store(part, tl.sum(acc0, 0), mask=cmask)
    tl.store(part + C, tl.sum(acc1, 0), mask=cmask)
    if M > 2:
        tl.store(part + 2 * C, tl.sum(acc2, 0), mask=cmask)
    tl.store(part + M * C, tl.sum(acc_w, 0), mask=cmask)
    tl.store(part + (M + 1) * C, tl.sum(acc_b, 0), mask=cmask)
