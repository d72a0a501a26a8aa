// The fused head loss's row work (model/fused_loss.py) in one pass over bf16 logits.
//
// For each row x of an (n, V) bf16 block of logits and its target t:
//   max_n[row]    = max_j x_j (bf16) and argmax_n[row] its first index (L2Wrap); a NaN wins, as in
//                   torch.max (the first NaN's index)
//   loss_n[row]   = logsumexp(x) - x_t in fp32 (the row's cross-entropy)
//   grad[row, j]  = bf16((exp(x_j - logsumexp(x)) - [j == t]) * scale)
// which is what model/fused_loss.py's `_chunk_grad_pointwise` computes (plus the max). An out-of-range
// target gives a NaN loss (the training loop's non-finite check reports it) and no one-hot.
//
// One block per row. Pass 1 reads the row once with 16-byte loads and keeps, per thread, the running
// max, its index and the sum of exp(x - max) rescaled whenever the max grows (online softmax); the
// block combines them. Pass 2 reads the row again (from L2 for the most part: a block's row is
// 2V bytes, ~100 KB at V 50304) and writes the gradient. Memory traffic: about one read and one write
// of the logits, where the compiled PyTorch formulation reads each row three times
// (docs/benchmarks.md, "Training throughput").
//
// A lighter pass 1 was measured and removed: per thread only (max, sum) and the group of 8 where the max
// was reached, group maxima on packed bf16 pairs, the arg-max by re-reading that group, ex2.approx.ftz;
// half the SASS instructions per element, yet 0.604 against 0.612 ms per 8192 x 50304 chunk on an H200
// and within noise in training. The kernel waits on memory, not on arithmetic (docs/benchmarks.md).
// A staged variant was measured and removed too: 512-thread blocks that copy the row into shared memory
// in pass 1 and read it there in pass 2 (each row read from memory exactly once). 0.723 against 0.611 ms
// per chunk on an H200 and 0.4-0.9 % slower 169M training: fewer rows in flight (two per SM), and
// pass 2's re-read mostly hits L2 anyway.
//
// Legend: n rows, V vocabulary (row length). C interface, no torch headers: plain `nvcc -arch=sm_90`.
// The per-element and merge arithmetic is __host__ __device__, so tests/unit/test_head_loss_rows_host.py
// runs it on the CPU in the kernel's order of merges.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr float LOG2E = 1.4426950408889634f;

// Running (max, first index of the max, sum of exp(x - max)) of a set of elements.
struct Acc {
    float m;  // -inf for no element yet; NaN once a NaN was seen
    long long i;
    float s;
};

// Is (x at index i) a better max than acc's? NaN beats everything (the first NaN stays), then the
// larger value, then the smaller index.
__host__ __device__ __forceinline__ bool beats(float x, long long i, float m, long long mi) {
    if (isnan(m)) return isnan(x) && i < mi;
    if (isnan(x)) return true;
    return x > m || (x == m && i < mi);
}

__host__ __device__ __forceinline__ float exp_scaled(float x) { return exp2f(x * LOG2E); }

// The union of two accumulators. A max of -inf has summed nothing (exp(-inf - -inf) would be NaN);
// a NaN max keeps the sum NaN.
__host__ __device__ __forceinline__ Acc merge(Acc a, Acc b) {
    bool b_wins = beats(b.m, b.i, a.m, a.i);
    Acc hi = b_wins ? b : a, lo = b_wins ? a : b;
    float scaled = lo.m == -INFINITY ? 0.f : lo.s * exp_scaled(lo.m - hi.m);
    return Acc{hi.m, hi.i, hi.s + scaled};
}

// The accumulator of N consecutive elements starting at index first: their max and its index
// first (compares only), then one exp per element against that max.
template <int N>
__host__ __device__ __forceinline__ Acc local_acc(const float (&e)[N], long long first) {
    float m = e[0];
    int at = 0;
#pragma unroll
    for (int q = 1; q < N; ++q)
        if (beats(e[q], q, m, at)) {
            m = e[q];
            at = q;
        }
    float s = 0.f;
    if (m != -INFINITY) {
#pragma unroll
        for (int q = 0; q < N; ++q) s += exp_scaled(e[q] - m);
    }
    return Acc{m, first + at, s};
}

// lse = max + log(sum); a row of -inf only has sum 0 and lse -inf, as torch.logsumexp.
__host__ __device__ __forceinline__ float row_lse(const Acc& total) { return total.m + logf(total.s); }

// One element's gradient before the bf16 rounding: (softmax - onehot) * scale.
__host__ __device__ __forceinline__ float logit_grad(float x, float lse, bool is_target, float scale) {
    return (exp_scaled(x - lse) - (is_target ? 1.f : 0.f)) * scale;
}

__device__ __forceinline__ Acc warp_merge(Acc acc) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        Acc other{__shfl_xor_sync(0xffffffffu, acc.m, offset), __shfl_xor_sync(0xffffffffu, acc.i, offset),
                  __shfl_xor_sync(0xffffffffu, acc.s, offset)};
        acc = merge(acc, other);
    }
    return acc;
}

// Every thread gets the block's accumulator.
__device__ __forceinline__ Acc block_merge(Acc acc) {
    __shared__ float sm[WARPS], ss[WARPS];
    __shared__ long long si[WARPS];
    acc = warp_merge(acc);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        sm[warp] = acc.m;
        si[warp] = acc.i;
        ss[warp] = acc.s;
    }
    __syncthreads();
    Acc total{sm[0], si[0], ss[0]};
#pragma unroll
    for (int w = 1; w < WARPS; ++w) total = merge(total, Acc{sm[w], si[w], ss[w]});
    return total;
}

__host__ __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// Pass 2 for the VEC elements at j of a row: g = bf16(grad(x, is the target)), one 16-byte load and
// store when VEC is 8.
template <int VEC, typename Grad>
__device__ __forceinline__ void write_grads(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ g, int j,
                                            int t, Grad grad) {
    if constexpr (VEC == 8) {
        uint4 raw = *reinterpret_cast<const uint4*>(x + j);
        const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&raw);
        uint4 out;
        __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&out);
#pragma unroll
        for (int q = 0; q < 8; ++q) o[q] = __float2bfloat16_rn(grad(to_f(e[q]), j + q == t));
        *reinterpret_cast<uint4*>(g + j) = out;
    } else {
        g[j] = __float2bfloat16_rn(grad(to_f(x[j]), j == t));
    }
}

// VEC: 8 bf16 per 16-byte load (V % 8 == 0 and 16-byte aligned rows); else 1.
template <int VEC>
__global__ void __launch_bounds__(THREADS) head_loss_rows_kernel(int V, const __nv_bfloat16* __restrict__ logits,
                                                                  const long long* __restrict__ target, float scale,
                                                                  __nv_bfloat16* __restrict__ grad,
                                                                  float* __restrict__ loss,
                                                                  __nv_bfloat16* __restrict__ max_out,
                                                                  long long* __restrict__ argmax_out) {
    const long long row = blockIdx.x;
    const __nv_bfloat16* x = logits + row * V;
    __nv_bfloat16* g = grad + row * V;
    const long long target_row = target[row];
    const bool t_ok = target_row >= 0 && target_row < V;
    const int t = t_ok ? static_cast<int>(target_row) : -1;  // -1: no one-hot

    Acc acc{-INFINITY, 0x7fffffffffffffffLL, 0.f};
    for (int j = threadIdx.x * VEC; j < V; j += THREADS * VEC) {
        float e[VEC];
        if constexpr (VEC == 8) {
            uint4 raw = *reinterpret_cast<const uint4*>(x + j);
            const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
            for (int q = 0; q < 8; ++q) e[q] = to_f(h[q]);
        } else {
            e[0] = to_f(x[j]);
        }
        acc = merge(acc, local_acc<VEC>(e, j));
    }
    const Acc total = block_merge(acc);
    const float lse = row_lse(total);
    if (threadIdx.x == 0) {
        loss[row] = t_ok ? lse - to_f(x[t]) : __int_as_float(0x7fc00000);  // NaN for a bad target
        max_out[row] = __float2bfloat16_rn(total.m);
        argmax_out[row] = total.i;
    }

    for (int j = threadIdx.x * VEC; j < V; j += THREADS * VEC)
        write_grads<VEC>(x, g, j, t, [=](float v, bool is_target) { return logit_grad(v, lse, is_target, scale); });
}

}  // namespace

extern "C" {

// logits, grad: [n, V] bf16, contiguous; target [n] int64; loss [n] fp32; max_out [n] bf16;
// argmax_out [n] int64. Returns a cudaError_t value (0 = success), or -1 for a bad shape.
int head_loss_rows(long long n, int V, const void* logits, const long long* target, float scale, void* grad,
                   float* loss, void* max_out, long long* argmax_out, cudaStream_t stream) {
    if (n < 0 || n > 0x7fffffffLL || V <= 0) return -1;
    if (n == 0) return 0;
    const auto* x = static_cast<const __nv_bfloat16*>(logits);
    auto* g = static_cast<__nv_bfloat16*>(grad);
    auto* m = static_cast<__nv_bfloat16*>(max_out);
    bool vectorized = V % 8 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(grad) % 16 == 0;
    dim3 grid(static_cast<unsigned>(n)), block(THREADS);
    if (vectorized)
        head_loss_rows_kernel<8><<<grid, block, 0, stream>>>(V, x, target, scale, g, loss, m, argmax_out);
    else
        head_loss_rows_kernel<1><<<grid, block, 0, stream>>>(V, x, target, scale, g, loss, m, argmax_out);
    return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
