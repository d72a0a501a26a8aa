"""The WKV recurrence of RWKV-4 in vectorised PyTorch, with a hand-written backward: the CPU training path.

    >>> import torch
    >>> from model.wkv_torch import wkv_torch
    >>> k = torch.randn(2, 100, 8); v = torch.randn(2, 100, 8)
    >>> y, (aa, bb, pp) = wkv_torch(torch.zeros(8), torch.zeros(8), k, v)
    >>> y.shape, pp.shape
    (torch.Size([2, 100, 8]), torch.Size([2, 8]))

Legend: B batch, T time, C channels, N chunks, L chunk length (t, i: steps inside a chunk),
R = 2*B*N rows (numerator rows, then denominator rows). Same contract as `model.wkv_reference`:
state (aa, bb, pp) with a = aa*exp(pp), b = bb*exp(pp), pp the running maximum exponent.

Chunked form. The sequence is cut into chunks of L steps. Inside a chunk, the weight of an earlier
step i on step t is exp((t-1-i) w + k_i), and of the step itself exp(u + k_t). That factorises
into a matrix D[c, t, i] (exp((t-1-i) w_c) below the diagonal, exp(u_c) on it) that depends only
on the parameters, times x_i = exp(k_i - M) with M the chunk's max key: one batched matmul with C
as the batch gives every intra-chunk numerator and denominator at once. D's extra row t = L holds
the decays to the chunk's end; a scan over chunks turns those end sums into the state entering each
chunk, exactly as the reference's max-trick would (the exponents pp by one cummax, the sums by two
multiply-adds per chunk on (B, C) tensors). Backward is the same structure transposed: two more
matmuls and a reverse scan. Nothing loops over time steps.

Layout: the work is done in (B, N, C, L) order, so that, viewed as (C, rows, L), the matmul operands
are plain strided BLAS matrices. k, v, y and their gradients stay in (B, T, C) memory: the ops that
read or write them do the per-chunk L x C transposes on the way, with no copy of their own. (A full
(B, T, C) -> (C, B, T) transpose costs several elementwise passes on this CPU.)

Numerics: every factor is <= 1 except exp(u), so nothing overflows; a term underflows only when
keys inside one chunk span more than ~80 nats, far past the |k| <= 20 this op is tested for.
Decay factors below exp(-60) are flushed to exact zeros (see _NEGLIGIBLE_EXPONENT): subnormal
numbers make x86 arithmetic several times slower, and such terms are below float32 resolution.
The maxima M and the per-chunk `top` are stabilisers that y does not depend on, so they carry no
gradient. The backward avoids a cancellation that float32 would amplify (see `backward`).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from model.wkv_reference import State, zero_state

__all__ = ["wkv_torch", "DEFAULT_CHUNK_LEN"]

DEFAULT_CHUNK_LEN = 32
"""Chosen by measurement with bench/wkv.py (see docs/benchmarks.md)."""


def wkv_torch(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k_BTC: torch.Tensor,
    v_BTC: torch.Tensor,
    state: State | None = None,
    chunk_len: int = DEFAULT_CHUNK_LEN,
) -> tuple[torch.Tensor, State]:
    """y (B, T, C) in k's dtype and the state after the last step (float64 for float64 k, else float32)."""
    dtype = torch.float64 if k_BTC.dtype == torch.float64 else torch.float32
    batch, steps, channels = k_BTC.shape
    w_C = -torch.exp(time_decay.to(dtype))
    u_C = time_first.to(dtype)
    k, v = k_BTC.to(dtype), v_BTC.to(dtype)
    if state is None:
        state = zero_state(batch, channels, k.device, dtype)
    carry = [s.to(dtype) for s in state]
    n_full, rest = divmod(steps, chunk_len)
    ys = []
    # Full chunks in one call, then the tail (T % L steps) as one shorter chunk.
    for start, n_chunks, length in ((0, n_full, chunk_len), (n_full * chunk_len, 1 if rest else 0, rest)):
        if n_chunks == 0:
            continue
        k_BNCL, v_BNCL = (_as_chunks(x[:, start : start + n_chunks * length], n_chunks, length) for x in (k, v))
        y_BNCL, *carry = _chunked_wkv_eagerly(w_C, u_C, k_BNCL, v_BNCL, *carry)
        ys.append(y_BNCL.transpose(2, 3).reshape(batch, n_chunks * length, channels))
    y = torch.cat(ys, dim=1) if len(ys) > 1 else ys[0] if ys else k.new_zeros(batch, 0, channels)
    return y.to(k_BTC.dtype), tuple(carry)  # type: ignore[return-value]


def _as_chunks(x_BTC: torch.Tensor, n_chunks: int, length: int) -> torch.Tensor:
    """(B, N*L, C) -> a (B, N, C, L) view (no copy for a contiguous input): the ops that read it do the transpose."""
    return x_BTC.reshape(x_BTC.shape[0], n_chunks, length, x_BTC.shape[2]).transpose(2, 3)


def _empty_in_time_order(like_BNCL: torch.Tensor) -> torch.Tensor:
    """An empty (B, N, C, L) tensor stored as (B, N, L, C): seen as (B, T, C) it is contiguous, so y and the
    gradients of k and v leave without a transpose (writing them strided costs about what a contiguous write does)."""
    batch, n_chunks, channels, length = like_BNCL.shape
    return like_BNCL.new_empty(batch, n_chunks, length, channels).transpose(2, 3)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., C, L) contiguous -> a (C, rows, L) view: one strided matrix per channel, as bmm wants."""
    return x.view(-1, x.shape[-2], x.shape[-1]).transpose(0, 1)


def _unrows(x_CRT: torch.Tensor, batch: int, n_chunks: int) -> torch.Tensor:
    """A channel-major bmm result (C, 2*B*N, T) seen as (2, B, N, C, T). Elementwise ops read this
    strided view at nearly the cost of a contiguous one; bmm writing a (B, N, C, T) layout through
    out= would fall back to one small matmul per channel."""
    return x_CRT.view(x_CRT.shape[0], 2, batch, n_chunks, x_CRT.shape[2]).permute(1, 2, 3, 0, 4)


def _min_exponent(dtype: torch.dtype) -> float:
    """Below this, exp() would return a subnormal number (or zero)."""
    return math.log(torch.finfo(dtype).tiny)


# A factor below exp(-60) = 9e-27 is flushed to an exact zero. Every sum it enters also holds a term
# within ~40 nats of its largest one (the latest key, with |k| <= 20), so what is dropped is below
# float32 resolution; and products of two such factors would be subnormal, which makes mul and the
# matmul several times slower on x86 (measured: 3.3 ms -> 0.8 ms for the forward matmul at C=256).
_NEGLIGIBLE_EXPONENT = {torch.float32: -60.0, torch.float64: -600.0}


def _flushed_exp(exponent: torch.Tensor) -> torch.Tensor:
    """exp() with negligible results as exact zeros (for small tensors only: the mask costs a pass)."""
    return torch.exp(exponent.masked_fill(exponent < _NEGLIGIBLE_EXPONENT[exponent.dtype], float("-inf")))


def _decay_matrix(w_C: torch.Tensor, u_C: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """D^T (C, L, L+1): [c, i, t] = exp((t-1-i) w) for i < t, exp(u) for i = t < L, else 0; and lag t-1-i (L, L+1).

    Built from a table of the L+1 distinct values per channel, so only C*(L+1) exps are taken.
    """
    steps = torch.arange(length, dtype=w_C.dtype, device=w_C.device)
    table_CJ = _flushed_exp(torch.cat((u_C[:, None], steps * w_C[:, None]), dim=1))  # [exp(u), exp(j w)...]
    t = torch.arange(length + 1, device=w_C.device)
    lag_IT = t[None, :] - 1 - t[:length, None]
    dt_CIT = torch.where(lag_IT >= -1, table_CJ[:, (lag_IT + 1).clamp_min(0)], 0.0)
    return dt_CIT, lag_IT.to(w_C.dtype)


class _ChunkedWkv(torch.autograd.Function):
    """WKV over N consecutive chunks of L steps: k, v (B, N, C, L); state in and out each (B, C)."""

    @staticmethod
    def forward(ctx, w_C, u_C, k, v, aa_BC, bb_BC, pp_BC):  # type: ignore[override]
        batch, n_chunks, channels, length = k.shape
        m_BNC1 = k.amax(dim=3, keepdim=True)
        x2 = k.new_empty(2, batch, n_chunks, channels, length)  # [x*v, x], x = exp(k - M)
        x = torch.sub(k, m_BNC1, out=x2[1]).exp_()
        torch.mul(x, v, out=x2[0])
        dt_CIT, lag_IT = _decay_matrix(w_C, u_C, length)
        s_CRT = torch.bmm(_rows(x2), dt_CIT)  # [numerator rows; denominator rows], L intra steps + chunk end
        s = _unrows(s_CRT, batch, n_chunks)

        # End-of-chunk sums, rescaled from M to the exact max exponent P, which becomes pp.
        p_BNC, arg_BNC = (k + lag_IT[:, length] * w_C[:, None]).max(dim=3)
        rescale = torch.exp((m_BNC1[..., 0] - p_BNC).clamp_max(-_min_exponent(k.dtype)))
        end = s[..., length] * rescale
        scan = _scan_forward(length * w_C, p_BNC, end[0], end[1], (aa_BC, bb_BC, pp_BC))
        aa0, bb0, pp0 = scan["aa0"], scan["bb0"], scan["pp0"]  # state entering each chunk (B, N, C)

        # Each step's intra-chunk sums plus the state entering its chunk, decayed t steps.
        top = torch.maximum(m_BNC1[..., 0], pp0)
        e_intra, e_start = _flushed_exp(m_BNC1[..., 0] - top), _flushed_exp(pp0 - top)
        decay_CL = dt_CIT[:, 0, 1:]  # exp(t w), t = 0..L-1
        num = torch.mul(s[0, ..., :length], e_intra[..., None], out=_empty_in_time_order(k))
        num.addcmul_((aa0 * e_start)[..., None], decay_CL)
        den = torch.mul(s[1, ..., :length], e_intra[..., None], out=torch.empty_like(x))
        den.addcmul_((bb0 * e_start)[..., None], decay_CL)
        y = num.div_(den)
        ctx.save_for_backward(v, x2, dt_CIT, lag_IT, s_CRT, end, y, den, e_intra, e_start, arg_BNC, rescale)
        aa1, bb1, pp1 = scan.pop("final")  # not kept on ctx: an output held there would form a reference cycle
        ctx.scan = scan
        return y, aa1, bb1, pp1

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gaa1, gbb1, gpp1):  # type: ignore[override]
        v, x2, dt_CIT, lag_IT, s_CRT, end, y, den, e_intra, e_start, arg_BNC, rescale = ctx.saved_tensors
        batch, n_chunks, channels, length = v.shape
        s, decay_CL = _unrows(s_CRT, batch, n_chunks), dt_CIT[:, 0, 1:]
        aa0, bb0 = ctx.scan["aa0"], ctx.scan["bb0"]
        gy = gy if gy is not None else torch.zeros_like(y)
        q = torch.div(gy, den, out=torch.empty_like(den))  # dL/dnum, in (B, N, C, L) order; dL/dden = -q*y
        qy = torch.mul(q, y, out=torch.empty_like(q))

        def per_chunk(x_BNCL: torch.Tensor, weights_CLJ: torch.Tensor) -> torch.Tensor:
            """sum over t of x[b, n, c, t] * weights[c, t, j] -> (B, N, C, J)."""
            out = torch.bmm(_rows(x_BNCL), weights_CLJ)  # (C, B*N, J)
            return out.view(channels, batch, n_chunks, -1).permute(1, 2, 0, 3)

        # The state entering each chunk, through y: dL/daa0 = sum_t q e_state, dL/dbb0 = -sum_t q y e_state.
        g_aa0 = e_start * per_chunk(q, decay_CL[..., None])[..., 0]
        g_bb0 = -e_start * per_chunk(qy, decay_CL[..., None])[..., 0]
        # dL/dpp0 and the state's share of dL/dw need q e_state (aa0 - y bb0). That difference cancels when
        # the state dominates y, so use the exact identity aa0 - y bb0 = e_intra (aa0 S_den - bb0 S_num) / den.
        z = torch.mul(s[1, ..., :length], aa0[..., None], out=torch.empty_like(q))
        z.addcmul_(s[0, ..., :length], -bb0[..., None]).mul_(q).div_(den)
        ramp = torch.arange(length, dtype=v.dtype, device=v.device)
        sz = per_chunk(z, torch.stack((decay_CL, decay_CL * ramp), dim=2)) * (e_start * e_intra)[..., None]
        g_pp0 = sz[..., 0]
        gw_C = sz[..., 1].sum(dim=(0, 1))

        g_final = [g if g is not None else torch.zeros_like(aa0[:, 0]) for g in (gaa1, gbb1, gpp1)]
        g_end, g_carry, gw_scan = _scan_backward(ctx.scan, length, (g_aa0, g_bb0, g_pp0), g_final)
        g_end_num, g_end_den, g_p = g_end
        g_p = g_p - (g_end_num * end[0] + g_end_den * end[1])  # end = S_end exp(M - P): d end / dP = -end

        # Gradient of the matmul's output, in its channel-major layout; then both matmul gradients.
        g_s_CRT = torch.empty_like(s_CRT)
        g_s = _unrows(g_s_CRT, batch, n_chunks)
        torch.mul(q, e_intra[..., None], out=g_s[0, ..., :length])
        torch.mul(qy, -e_intra[..., None], out=g_s[1, ..., :length])
        g_s[0, ..., length] = g_end_num * rescale
        g_s[1, ..., length] = g_end_den * rescale
        g_x = _unrows(torch.bmm(g_s_CRT, dt_CIT.transpose(1, 2)), batch, n_chunks)
        g_dt = torch.bmm(_rows(x2).transpose(1, 2), g_s_CRT) * dt_CIT  # dL/d(exponent of each D entry)

        x = x2[1]
        gv = torch.mul(g_x[0], x, out=torch.empty_like(x))
        gk = torch.addcmul(g_x[1], g_x[0], v, out=torch.empty_like(x)).mul_(x)
        gk.scatter_add_(3, arg_BNC[..., None], g_p[..., None])  # P = k[arg] + (L-1-arg) w

        gu_C = torch.diagonal(g_dt[:, :, :length], dim1=1, dim2=2).sum(dim=1)
        gw_C = gw_C + (g_dt * lag_IT.clamp_min(0)).sum(dim=(1, 2)) + gw_scan
        gw_C = gw_C + (g_p * (length - 1 - arg_BNC).to(v.dtype)).sum(dim=(0, 1))
        return gw_C, gu_C, gk, gv, *g_carry


# Outside torch.compile's graph (a graph break): torch 2.11 can compile an autograd.Function whose forward
# works in place with a zero incoming gradient (pytorch/pytorch#180642), as it did the fused head loss
# (model/fused_loss.py). This forward works in place throughout; eager, it is tested against float64.
_chunked_wkv_eagerly = torch.compiler.disable(_ChunkedWkv.apply)


def _scan_forward(
    chunk_decay_C: torch.Tensor, p_BNC: torch.Tensor, end_num: torch.Tensor, end_den: torch.Tensor, carry: State
) -> dict:
    """The max-trick recurrence over chunks: states entering each chunk (B, N, C) and after the last.

    Only two multiply-adds per chunk stay in the Python loop. The exponents are solved up front: pp after
    chunk n is max(pp_0 + (n+1) L w, max over m <= n of P_m + (n-m) L w), a cummax once the drift n L w
    is taken out; in float64, because n L w reaches ~1e7 for long sequences. (Each op in the loop, an
    exp above all, may enter a 2-thread parallel region, which stalls on a busy machine.)
    """
    aa_in, bb_in, pp_in = carry
    n_chunks = p_BNC.shape[1]
    decay64_C, p64 = chunk_decay_C.double(), p_BNC.double()
    drift = torch.arange(n_chunks + 1, dtype=torch.float64, device=p_BNC.device)[:, None] * decay64_C
    candidates = torch.cat((pp_in.double()[:, None], p64 - drift[1:]), dim=1)
    pp_all = candidates.cummax(dim=1).values + drift  # (B, N+1, C): entering each chunk, then the final
    decayed = pp_all[:, :-1] + decay64_C
    old_wins = decayed >= p64
    e_old = torch.exp(decayed - pp_all[:, 1:]).to(p_BNC.dtype)
    e_new = torch.exp(p64 - pp_all[:, 1:]).to(p_BNC.dtype)
    add_num, add_den = e_new * end_num, e_new * end_den
    aa, bb = [aa_in], [bb_in]
    for n in range(n_chunks):
        aa.append(torch.addcmul(add_num[:, n], e_old[:, n], aa[-1]))
        bb.append(torch.addcmul(add_den[:, n], e_old[:, n], bb[-1]))
    aa_all, bb_all, pp_all = torch.stack(aa, dim=1), torch.stack(bb, dim=1), pp_all.to(p_BNC.dtype)
    final = (aa_all[:, -1].clone(), bb_all[:, -1].clone(), pp_all[:, -1].clone())
    return {
        **{"aa0": aa_all[:, :-1], "bb0": bb_all[:, :-1], "pp0": pp_all[:, :-1], "final": final},
        **{"e_old": e_old, "e_new": e_new, "old_wins": old_wins, "end_num": end_num, "end_den": end_den},
    }


def _scan_backward(
    scan: dict, length: int, g_starts: tuple[torch.Tensor, ...], g_final: list[torch.Tensor]
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor]:
    """Reverse of `_scan_forward`: grads of the end sums and P per chunk (B, N, C), of the carry in, and of w.

    Chunk n maps (aa, bb, pp) to (e_old aa + e_new num, e_old bb + e_new den, max(pp + L w, P)), with
    e_old = exp(pp + L w - pp'), e_new = exp(P - pp'). Three reverse recurrences (for aa, bb, pp) stay in
    the loop, one multiply-add each; everything else is vectorised over chunks.
    """
    e_old, e_new, old = scan["e_old"], scan["e_new"], scan["old_wins"].to(scan["e_old"].dtype)
    g_aa0, g_bb0, g_pp0 = g_starts
    g_aa, g_bb = [], []  # grads of the state after each chunk
    gaa, gbb = g_final[0], g_final[1]
    for n in range(e_old.shape[1] - 1, -1, -1):
        g_aa.append(gaa)
        g_bb.append(gbb)
        gaa = torch.addcmul(g_aa0[:, n], e_old[:, n], gaa)
        gbb = torch.addcmul(g_bb0[:, n], e_old[:, n], gbb)
    g_aa_all, g_bb_all = torch.stack(g_aa[::-1], dim=1), torch.stack(g_bb[::-1], dim=1)
    via_old = (g_aa_all * scan["aa0"] + g_bb_all * scan["bb0"]) * e_old  # dL/d e_old * e_old
    via_new = (g_aa_all * scan["end_num"] + g_bb_all * scan["end_den"]) * e_new
    # pp' = max(pp + L w, P): its gradient, minus what e_old and e_new already take, goes to the larger one.
    offset = via_old * (1 - old) - via_new * old + g_pp0
    g_pp = []
    gpp = g_final[2]
    for n in range(e_old.shape[1] - 1, -1, -1):
        g_pp.append(gpp)
        gpp = torch.addcmul(offset[:, n], old[:, n], gpp)
    g_new = torch.stack(g_pp[::-1], dim=1) - via_old - via_new
    g_decayed = via_old + old * g_new
    g_p = via_new + (1 - old) * g_new
    g_end = (g_aa_all * e_new, g_bb_all * e_new, g_p)
    return g_end, (gaa, gbb, gpp), g_decayed.sum(dim=(0, 1)) * length  # decayed = pp + L*w
