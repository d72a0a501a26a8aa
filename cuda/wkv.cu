// Fused WKV (RWKV-4) forward and backward with state in/out, parallel over time.
//
// Legend: B batch, T time, C channels; k, v, y, gy, gk, gv are [B, T, C] contiguous (fp32 or bf16);
// time_decay, time_first are (C,) fp32; the state (aa, bb, pp) is three [B, C] fp32 arrays.
// Per lane (b, c), with w = -exp(time_decay) and u = time_first, the true sums a = aa*e^pp and
// b = bb*e^pp follow
//     y_t = (a + e^(u+k_t) v_t) / (b + e^(u+k_t)),   a <- e^w a + e^k_t v_t,   b <- e^w b + e^k_t,
//     pp_t = max(pp_{t-1} + w, k_t)   (the running maximum exponent, as in model/wkv_reference.py).
//
// Parallel scheme (three levels, no compile-time maximum T):
//   * a thread owns one lane and a sub-chunk of SUB consecutive steps, held in registers;
//   * a block owns 32 lanes x SUBS sub-chunks = one segment of SEG = SUB*SUBS steps; sub-chunk
//     summaries are combined in shared memory;
//   * segment summaries are scanned across the sequence by a per-lane kernel (a lane's segments
//     shared by rows of threads when there are many).
// A summary of n steps applied to a state is exact algebra: pp' = max(pp + n w, P),
// aa' = aa e^(pp + n w - pp') + A e^(P - pp'); every exponent is <= 0, so nothing overflows.
//
// Backward works with the adjoint of the true sums scaled by the forward exponent,
// alpha_t = dL/da_t * e^(pp_t), beta_t = dL/db_t * e^(pp_t). Per step (state before: aa, bb, pp;
// output factors e1, e2 and denominator Ds = e1 bb + e2; update factors f1 = e^(pp + w - pp_t),
// f2 = e^(k - pp_t); r = gy / Ds):
//     gv = r e2 + alpha f2,  gk = r e2 (v - y) + f2 (alpha v + beta),  gu += r e2 (v - y),
//     gw += f1 (alpha aa + beta bb),  alpha <- f1 alpha + r e1,  beta <- f1 beta - r e1 y,
// all factors <= 1. The forward saves the state at every sub-chunk start (O(B C T / SUB) floats),
// so backward recomputes each sub-chunk from there instead of keeping per-step arrays. Backward
// mirrors forward: sub-chunk adjoint summaries, a reverse scan over segments, then gradients.
// pp_T itself is a max over paths (pp_0 + T w, or k_i + (T-1-i) w); its gradient goes to the
// arg-max path, found in the forward as the last step whose k won the max.
//
// Kernels per call: forward 3 (summaries, per-lane segment scan, outputs), backward 4 (adjoint
// summaries, per-lane reverse scan, gradients, deterministic reduction of the time_* gradients).
// The second and later kernels of each pass are programmatic dependent launches (Hopper): they
// start while the kernel before finishes and load their k, v, gy before waiting for its results.
// (Measured and not kept, in the history: the per-lane work run by the last block of the kernel
// before, and an in-block lookback over the other segments' summaries; both slower once dependent
// launch hides the launch gaps, docs/benchmarks.md.)
// Where the unpaired kernels run (fp32; bf16 without channel pairs) the backward is one kernel
// plus the reduction instead (WKV_SINGLE_BWD, bwd_single): blocks compose the adjoint across segments
// through published summaries, and each tile is walked forward once instead of twice.
//
// Sequential path: when B*C alone fills the GPU (WKV_SEQ_MIN_LANES_PER_SM lanes per SM or more, as
// in training: 98,304 lanes for 169M at micro-batch 128), parallelism over T only costs bytes. Then
// one thread walks a lane's whole sequence tile by tile (fwd_sequential, bwd_sequential): k, v (gy)
// are read once per pass, no summaries, one kernel per pass plus the time_* reduction; the kept
// workspaces are the same. On an H200 that is 1.5-1.7x faster in bf16 fwd+bwd at 64-128 x 1024 x
// 768-1024 (docs/benchmarks.md, WKV run 8).
//
// Launchers have a C interface (no torch headers); cuda/wkv_binding.cpp binds them for torch.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <initializer_list>

namespace {

// Compile-time tuning knobs (defaults: the best measured on an H200, docs/benchmarks.md;
// bench/wkv_cuda.py --variants builds others side by side):
//   WKV_SUB           steps per thread (held in registers)
//   WKV_SUBS          sub-chunks per block (blockDim.y)
//   WKV_FENCE_ALL     1: every thread fences before the arrival count; 0: a barrier, then one
//                     thread fences and counts (the cooperative-groups grid-sync pattern)
//   WKV_PDL           1: the second and later kernels of a pass are launched as programmatic
//                     dependents (Hopper): they load k, v, gy while the kernel before finishes
//   WKV_ACCURATE_EXP  1: state rescaling factors use the split-argument exp; 0: one ex2.approx
//   WKV_BWD_MIN_BLOCKS, WKV_FWD_MIN_BLOCKS  minimum resident blocks per SM asked of the compiler
//                     for the backward and forward kernels (register budget)
//   WKV_EXACT_DECAY   1: an adjoint summary carries its decay as g - 1, computed once from the
//                     stored exponents (expm1), not as a product of per-step factors; 0: the product
//   WKV_PAIRS         1: bf16 k, v, y, gy, gk, gv move as __nv_bfloat162: a thread owns two adjacent
//                     channels (a block 64), so one warp access covers 128 B instead of 64 B; the
//                     per-channel arithmetic is the unpaired kernels', in the same order. Only for
//                     bf16 with C even and 4-byte aligned k, v (gy); otherwise, and for fp32, the
//                     unpaired kernels run.
//                     (default 1: bf16 fwd+bwd 8-16 % faster at four of the five benchmark shapes,
//                     3 % at the fifth; not bit-identical to WKV_PAIRS=0 in 7 of 24 cases, worst
//                     rel L2 8.2e-6 on bf16 y, error against float64 unchanged; docs/benchmarks.md)
//   WKV_PAIR_FWD_MIN_BLOCKS, WKV_PAIR_BWD_SUMMARIES_MIN_BLOCKS, WKV_PAIR_BWD_MIN_BLOCKS  the same for
//                     the paired kernels: both forward kernels, the backward's summaries, its gradients
//                     (a paired block does two blocks' work and holds two chains per thread). (forward
//                     default 4: 64 registers, 4 blocks per SM instead of 2 (88 registers); on an H200
//                     bf16 forward 2-16 % and fwd+bwd 1-6 % faster than at 2, bit-identical; 3 lies
//                     between. The backward kernels stay at 2: the summaries kernel at 3 or 4 and the
//                     gradients kernel at 3 spill and are slower; docs/benchmarks.md, WKV run 7)
//   WKV_PAIR_GRADIENTS_MIN_GRID  with WKV_PAIRS: the backward's paired gradients kernel runs when
//                     its grid has at least this many blocks per SM; a smaller grid runs the unpaired
//                     gradients kernel on twice the blocks (the paired one walks two channels per thread
//                     and needs 128 registers, so few blocks leave SMs idle). 0: always paired; a huge
//                     value: never. (default 8: on an H200 the paired kernel is 5-8 % faster in fwd+bwd
//                     at 3072-4096 paired blocks, equal at 768, 3-4 % slower at 512; docs/benchmarks.md)
//   WKV_FAST_GM1      1: the exact decay's g - 1 from a degree-8 series for |x| < 1/2 and
//                     e^x - 1 otherwise, instead of expm1f (see decay_m1; default 0: within noise, 0-1 %,
//                     on an H200 in bf16 fwd+bwd; docs/benchmarks.md, WKV "Two bf16 channels per thread")
//   WKV_SEQ_MIN_LANES_PER_SM  calls with at least this many lanes (B*C) per SM run the sequential
//                     kernels (one thread walks a lane's whole sequence, see fwd_sequential); fewer
//                     lanes run the parallel ones. 1: always sequential; a huge value: never.
//   WKV_SEQ_ROWS      blockDim.y of the sequential kernels (blocks of 32 x ROWS threads; small blocks
//                     spread a one-wave grid evenly over the SMs)
//   WKV_SEQ_PAIR_MIN_LANES_PER_SM  from this many lanes per SM the sequential kernels take bf16 channel
//                     pairs (where WKV_PAIRS allows them; fewer lanes: one channel per thread, so more threads)
//   WKV_SEQ_FWD_MIN_BLOCKS, WKV_SEQ_BWD_MIN_BLOCKS, WKV_SEQ_PAIR_FWD_MIN_BLOCKS, WKV_SEQ_PAIR_BWD_MIN_BLOCKS
//                     register budgets of the sequential kernels, in blocks of 32 x WKV_SEQ_ROWS per SM
//   WKV_SINGLE_BWD    the parallel backward as one kernel (bwd_single) plus the time_* reduction:
//                     1 where the unpaired kernels run (fp32; bf16 without pairs), 2 also for bf16 in
//                     place of the paired kernels, 0 never.
//                     (default 1: fp32 fwd+bwd 6-10 % faster at four of the five benchmark shapes; in
//                     bf16 the paired three kernels are 2-6 % faster at three; docs/benchmarks.md, WKV run 10)
//   WKV_SP_GROUP      segments per lookback group of bwd_single (0: ceil(sqrt(nseg)))
//   WKV_SP_BWD_MIN_BLOCKS  bwd_single's register budget, in blocks of 256 threads per SM
//   WKV_SCAN_MAX_ROWS  the segment scan kernels split a lane's segments over up to this many rows of
//                     threads (see fwd_segment_scan; 1: one thread walks them all). (default 16: on an
//                     H200 bf16 fwd+bwd 11 % faster at 2x16384x768, 20 % at 1x65536x768, 1 % at 8x4096x768
//                     than 1; docs/benchmarks.md, WKV run 11)
//   WKV_SCAN_ROWS_MIN_SEG  sequences of fewer segments than this are scanned by one thread per lane
#ifndef WKV_SUB
#define WKV_SUB 16
#endif
#ifndef WKV_SCAN_MAX_ROWS
#define WKV_SCAN_MAX_ROWS 16
#endif
#ifndef WKV_SCAN_ROWS_MIN_SEG
#define WKV_SCAN_ROWS_MIN_SEG 16
#endif
#ifndef WKV_SUBS
#define WKV_SUBS 8
#endif
#ifndef WKV_FENCE_ALL
#define WKV_FENCE_ALL 0
#endif
#ifndef WKV_PDL
#define WKV_PDL 1
#endif
#ifndef WKV_ACCURATE_EXP
#define WKV_ACCURATE_EXP 0
#endif
#ifndef WKV_BWD_MIN_BLOCKS
#define WKV_BWD_MIN_BLOCKS 3
#endif
#ifndef WKV_FWD_MIN_BLOCKS
#define WKV_FWD_MIN_BLOCKS 4
#endif
#ifndef WKV_EXACT_DECAY
#define WKV_EXACT_DECAY 1
#endif
#ifndef WKV_PAIRS
#define WKV_PAIRS 1
#endif
#ifndef WKV_PAIR_FWD_MIN_BLOCKS
#define WKV_PAIR_FWD_MIN_BLOCKS 4
#endif
#ifndef WKV_PAIR_BWD_MIN_BLOCKS
#define WKV_PAIR_BWD_MIN_BLOCKS 2
#endif
#ifndef WKV_PAIR_BWD_SUMMARIES_MIN_BLOCKS
#define WKV_PAIR_BWD_SUMMARIES_MIN_BLOCKS WKV_PAIR_BWD_MIN_BLOCKS
#endif
#ifndef WKV_PAIR_GRADIENTS_MIN_GRID
#define WKV_PAIR_GRADIENTS_MIN_GRID 8
#endif
#ifndef WKV_SEQ_MIN_LANES_PER_SM
#define WKV_SEQ_MIN_LANES_PER_SM 192
#endif
#ifndef WKV_SEQ_PAIR_MIN_LANES_PER_SM
#define WKV_SEQ_PAIR_MIN_LANES_PER_SM 512
#endif
#ifndef WKV_SEQ_ROWS
#define WKV_SEQ_ROWS 4
#endif
#ifndef WKV_SEQ_FWD_MIN_BLOCKS
#define WKV_SEQ_FWD_MIN_BLOCKS 4
#endif
#ifndef WKV_SEQ_BWD_MIN_BLOCKS
#define WKV_SEQ_BWD_MIN_BLOCKS 4
#endif
#ifndef WKV_SEQ_PAIR_FWD_MIN_BLOCKS
#define WKV_SEQ_PAIR_FWD_MIN_BLOCKS 4
#endif
#ifndef WKV_SEQ_PAIR_BWD_MIN_BLOCKS
#define WKV_SEQ_PAIR_BWD_MIN_BLOCKS 3
#endif
#ifndef WKV_FAST_GM1
#define WKV_FAST_GM1 0
#endif
#ifndef WKV_SINGLE_BWD
#define WKV_SINGLE_BWD 1
#endif
#ifndef WKV_SP_GROUP
#define WKV_SP_GROUP 0
#endif
#ifndef WKV_SP_BWD_MIN_BLOCKS
#define WKV_SP_BWD_MIN_BLOCKS 2
#endif

constexpr int SUB = WKV_SUB;
constexpr int SUBS = WKV_SUBS;
constexpr bool SINGLE_BWD = WKV_SINGLE_BWD >= 1;
constexpr bool SINGLE_BWD_PAIRS = SINGLE_BWD && WKV_SINGLE_BWD >= 2;
constexpr bool PDL = WKV_PDL != 0;
constexpr bool EXACT_DECAY = WKV_EXACT_DECAY != 0;
constexpr int LANES = 32;        // channels per block (blockDim.x)
constexpr int SEG = SUB * SUBS;  // steps per block segment
constexpr int SCAN_BATCH = 16;   // segment summaries loaded at once by the per-lane scans
constexpr float EMPTY = -1e38f;  // exponent of the zero state, as in the reference
constexpr float LOG2E = 1.4426950408889634f;

struct St {
    float a, b, p;
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename F>
__device__ __forceinline__ F from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// e^x for x <= 0 in one multiply and one MUFU.EX2: a few ulp, plus |x| 2^-24 relative from
// rounding x log2(e), which is harmless wherever the factor e^x weighs what it multiplies.
__device__ __forceinline__ float fast_exp(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x * LOG2E));
    return r;
}
__device__ __forceinline__ float fast_rcp(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// e^x to about 2 ulp over the whole range (like expf, in 6 instead of ~10 instructions): the
// product x log2(e) is carried to ~48 bits so its rounding does not grow the error with |x|.
__device__ __forceinline__ float accurate_exp(float x) {
    constexpr float LOG2E_LO = 1.925963033500011e-08f;  // log2(e) - LOG2E
    constexpr float LN2 = 0.6931471805599453f;
    float t = x * LOG2E;
    float c = fmaf(x, LOG2E_LO, fmaf(x, LOG2E, -t));  // x log2(e) - t
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
    return fmaf(r, c * LN2, r);  // 2^t * 2^c with 2^c ~ 1 + c ln 2
}

// Rescale from an old exponent (p_plus_x + err exactly) to the max of it and the stored exponent
// q: the new exponent and the factors e^(old - new), e^(q - new). The factors are computed from
// exact differences of stored exponents, because they multiply along the sequence: a rounded
// exponent would drift the state by ~1e-6 per step. The exp itself (WKV_ACCURATE_EXP) may be the
// plain ex2: its argument's rounding error is weighted by the factor (see rescale()), and the
// measured errors were the same to three digits either way (docs/benchmarks.md).
struct Rescale {
    float p, f_old, f_new;
};
__device__ __forceinline__ Rescale rescale(float p_plus_x, float err, float q) {
    bool q_wins = q > p_plus_x;
    float diff = q - p_plus_x;  // exact where it matters (close exponents)
    float x = q_wins ? err - diff : diff;
    // The factor's own error (ex2.approx, ~2 ulp) dominates; the argument's rounding adds at most
    // |x| 2^-24 relative to a factor e^x, i.e. < 2.2e-8 of the state per rescale.
    float e = WKV_ACCURATE_EXP ? accurate_exp(x) : fast_exp(x);
    // When the old exponent wins it is stored rounded: factor e^err ~ 1 + err (|err| <= half an ulp).
    return {q_wins ? q : p_plus_x, q_wins ? e : fmaxf(1.f + err, 0.f), q_wins ? 1.f : e};
}

// The stored exponent after m steps without a k win since an anchor (a stored exponent, or the k
// that last won) is the single rounding of anchor + m w, not m rounded additions, so it stays
// within half an ulp of the reference's float64 pp inside a tile instead of drifting.
struct Anchor {
    float p, m;
    __device__ __forceinline__ explicit Anchor(float p0) : p(p0), m(0.f) {}
};

// One forward update of the state with (k, v): pp' = max(pp + w, k) as the reference defines it;
// returns the update factors f1 = e^(pp + w - pp'), f2 = e^(k - pp') and whether k won.
__device__ __forceinline__ bool update(St& s, Anchor& an, float w, float k, float v, float& f1, float& f2) {
    float pw = fmaf(an.m + 1.f, w, an.p);   // pp + w, rounded once from the anchor
    float err = (s.p - pw) + w;             // pp + w - pw: the difference is exact, w adds one rounding
    Rescale r = rescale(pw, err, k);
    f1 = r.f_old;
    f2 = r.f_new;
    s.a = f1 * s.a + f2 * v;
    s.b = f1 * s.b + f2;
    s.p = r.p;
    bool k_wins = k > pw;
    an.p = k_wins ? k : an.p;
    an.m = k_wins ? 0.f : an.m + 1.f;
    return k_wins;
}

// Output of one step from the state before it: factors e1 = e^(pp - q), e2 = e^(u + k - q) for
// q = max(pp, u + k), the reciprocal of the scaled denominator e1 bb + e2 (>= 1 for states the
// kernel produces), and y.
__device__ __forceinline__ float output(const St& s, float u, float k, float v, float& e1, float& e2, float& inv_ds) {
    float d = (s.p - k) - u;  // pp - (u + k): pp - k is exact where it matters (close values)
    float e = fast_exp(-fabsf(d));
    bool p_wins = d >= 0.f;
    e1 = p_wins ? 1.f : e;
    e2 = p_wins ? e : 1.f;
    inv_ds = fast_rcp(e1 * s.b + e2);
    return (e1 * s.a + e2 * v) * inv_ds;
}

// Apply a summary x of n steps (computed from the zero state) to state s.
__device__ __forceinline__ St apply(const St& s, const St& x, int n, float w) {
    float ps = fmaf(static_cast<float>(n), w, s.p);                // pp + n w, rounded once
    float err = fmaf(static_cast<float>(n), w, s.p - ps);          // its rounding error (s.p - ps exact)
    Rescale r = rescale(ps, err, x.p);
    return {r.f_old * s.a + r.f_new * x.a, r.f_old * s.b + r.f_new * x.b, r.p};
}

// Adjoint summaries (alpha, beta, decay g): applied to an adjoint A at their end they give
// g A + (alpha, beta) at their start. With EXACT_DECAY the decay component holds g - 1 (identity 0):
// over slow decays g is within 1e-2 of 1, where an fp32 g keeps ~6e-8 of absolute resolution and a
// product of per-step factors 1 + err (err the stored exponent's rounding) is biased the same way
// in every tile; both errors compound over thousands of steps and cancel badly in the time_decay
// gradient (1.6e-5 at T 4097 with slow decays, docs/benchmarks.md).
constexpr float G_ONE = EXACT_DECAY ? 0.f : 1.f;  // decay component of the identity summary
__device__ __forceinline__ float adj_apply(float end, float local, float g) {
    if (!EXACT_DECAY) return fmaf(g, end, local);
    // g - 1 near -1 (a k win cut the decay): 1 + (g - 1) is exact there
    return g < -0.5f ? fmaf(1.f + g, end, local) : fmaf(g, end, end + local);
}
// g - 1 = e^x - 1 for a tile's decay exponent x = pp_start + n w - pp_end (<= 0 up to an ulp of the
// exponents; about -1e38 for the empty state). expm1f by default. WKV_FAST_GM1 (both branches are
// computed, then one is selected: no divergence, one MUFU):
//   |x| < 1/2: the series x + x^2/2! + ... + x^8/8! in Horner form (7 FMA, 1 FMUL). Truncation: the
//     first omitted term relative to the result is < |x|^8/9! / (1 - |x|/2) < 1.5e-8 (1/8 ulp).
//     Checked exhaustively on the CPU (the same fp32 FMAs, every float with |x| < 1/2, against
//     float64 expm1): at most 0.90 ulp (relative 7.9e-8); glibc's expm1f reaches 0.81 ulp there.
//   |x| >= 1/2: accurate_exp (about 2 ulp of e^x, see there) minus 1. For x in [-ln 2, -1/2] the
//     subtraction is exact (Sterbenz) and e^x's 2 ulp (<= 1.2e-7) are < 3.1e-7 of |g - 1| >= 0.39;
//     below -ln 2, e^x < 1/2 errs by <= 6e-8 and the subtraction by <= 3e-8, < 1.8e-7 of |g - 1|
//     >= 1/2. x is clamped at -127 first: e^x is then 0 (g - 1 = -1 exactly, as expm1f gives) and an
//     -inf argument cannot turn accurate_exp's correction term into NaN.
// What the adjoint needs holds: where |x| is small (slow decays, long memories) g - 1 keeps its
// relative accuracy, so nothing compounds across tiles; where it is not, the decay is fast and an
// error of a few 1e-7 of the carried adjoint dies out within a few tiles.
__device__ __forceinline__ float decay_m1(float x) {
    if (!WKV_FAST_GM1) return expm1f(x);
    float p = 2.48015873e-05f;      // 1/8!
    p = fmaf(p, x, 1.98412698e-04f);  // 1/7!
    p = fmaf(p, x, 1.38888889e-03f);  // 1/6!
    p = fmaf(p, x, 8.33333333e-03f);  // 1/5!
    p = fmaf(p, x, 4.16666667e-02f);  // 1/4!
    p = fmaf(p, x, 1.66666667e-01f);  // 1/3!
    p = fmaf(p, x, 0.5f);
    float series = fmaf(p * x, x, x);  // x + x (x/2 + x^2/6 + ...)
    float big = accurate_exp(fmaxf(x, -127.f)) - 1.f;
    return fabsf(x) < 0.5f ? series : big;
}
// The summary of x (earlier steps) after y (later steps): A -> x(y(A)).
__device__ __forceinline__ St adj_compose(const St& x, const St& y) {
    float g = EXACT_DECAY ? fmaf(x.p, y.p, x.p + y.p) : x.p * y.p;  // (1 + gx)(1 + gy) - 1
    return {adj_apply(y.a, x.a, x.p), adj_apply(y.b, x.b, x.p), g};
}

// Index of [B][n][ncomp][C] arrays of per-chunk values (coalesced over c).
__device__ __forceinline__ size_t chunk_idx(int b, int i, int n, int comp, int ncomp, int c, int C) {
    return ((static_cast<size_t>(b) * n + i) * ncomp + comp) * C + c;
}

struct Tile {
    int b, c, seg, m, sub, t0, n;  // lane (b, c), segment, sub-chunk in segment and overall, first step, steps
    bool lane_ok;
    size_t base;  // element offset of (b, t0, c) in [B, T, C]
};

// The tile of thread (threadIdx.x, threadIdx.y) in block (segment seg, channel block cb, batch b).
__device__ __forceinline__ Tile tile_at(int T, int C, int seg, int cb, int b) {
    Tile r;
    r.c = cb * LANES + threadIdx.x;
    r.b = b;
    r.seg = seg;
    r.m = threadIdx.y;
    r.sub = r.seg * SUBS + r.m;
    r.t0 = r.sub * SUB;
    r.lane_ok = r.c < C;
    int left = T - r.t0;
    r.n = r.lane_ok ? (left < 0 ? 0 : (left > SUB ? SUB : left)) : 0;
    r.base = (static_cast<size_t>(r.b) * T + r.t0) * C + r.c;
    return r;
}
__device__ __forceinline__ Tile tile(int T, int C) { return tile_at(T, C, blockIdx.x, blockIdx.y, blockIdx.z); }

// Steps j < n of one lane (stride C); FULL = all SUB steps, so no per-step predicate.
template <bool FULL, typename F>
__device__ __forceinline__ void load_steps(const F* __restrict__ x, const Tile& q, int C, float (&out)[SUB]) {
    const F* p = x + q.base;
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
        out[j] = (FULL || j < q.n) ? to_f(*p) : 0.f;
        p += C;
    }
}
template <typename F>
__device__ __forceinline__ void load_steps(const F* __restrict__ x, const Tile& q, int C, float (&out)[SUB]) {
    if (q.n == SUB)
        load_steps<true>(x, q, C, out);
    else
        load_steps<false>(x, q, C, out);
}

__device__ __forceinline__ St load3(const float* __restrict__ s, int i, int n, int b, int c, int C) {
    return {s[chunk_idx(b, i, n, 0, 3, c, C)], s[chunk_idx(b, i, n, 1, 3, c, C)], s[chunk_idx(b, i, n, 2, 3, c, C)]};
}
__device__ __forceinline__ void store3(float* __restrict__ s, int i, int n, int b, int c, int C, const St& x) {
    s[chunk_idx(b, i, n, 0, 3, c, C)] = x.a;
    s[chunk_idx(b, i, n, 1, 3, c, C)] = x.b;
    s[chunk_idx(b, i, n, 2, 3, c, C)] = x.p;
}

// Loads of values other blocks of the same launch wrote (through L2, never a stale L1 line).
__device__ __forceinline__ St load3_cg(const float* s, int i, int n, int b, int c, int C) {
    return {__ldcg(s + chunk_idx(b, i, n, 0, 3, c, C)), __ldcg(s + chunk_idx(b, i, n, 1, 3, c, C)),
            __ldcg(s + chunk_idx(b, i, n, 2, 3, c, C))};
}

// Last-block-done: every block of a group of `total` blocks calls this once after its global
// writes; it returns true (in all threads) in the block that arrives last, which then sees every
// other block's writes. That block resets the counter, so counters stay zero between launches
// (the binding keeps one zeroed buffer per device and stream). Deterministic: what the last block
// computes does not depend on which block it is.
__device__ __forceinline__ bool last_block_arrives(int* counter, int total) {
    __shared__ int is_last;
    if (WKV_FENCE_ALL) __threadfence();  // release this thread's writes before the arrival is counted
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        // After the barrier one thread's fence is cumulative over the block's writes (as in the
        // cooperative-groups grid sync), without every thread waiting for its own stores.
        if (!WKV_FENCE_ALL) __threadfence();
        int before = atomicAdd(counter, 1);
        is_last = before == total - 1;
        if (is_last) {
            atomicExch(counter, 0);
            __threadfence();  // acquire: the other blocks' writes, before this block reads them
        }
    }
    __syncthreads();
    return is_last != 0;
}

// Programmatic dependent launch (sm_90): a kernel lets the next one in the stream start once all
// its blocks have started (trigger), and the next one waits for this one's completion and memory
// (wait) only before it reads what this one wrote. Both are no-ops in a plain launch.
__device__ __forceinline__ void pdl_trigger() {
    if (PDL) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
__device__ __forceinline__ void pdl_wait() {
    if (PDL) asm volatile("griddepcontrol.wait;" ::: "memory");
}

// Per-block shared staging of one St per (sub-chunk, lane).
struct Shared3 {
    float v[3][SUBS][LANES];
    __device__ __forceinline__ void put(int m, const St& x) {
        v[0][m][threadIdx.x] = x.a;
        v[1][m][threadIdx.x] = x.b;
        v[2][m][threadIdx.x] = x.p;
    }
    __device__ __forceinline__ St get(int m) const {
        return {v[0][m][threadIdx.x], v[1][m][threadIdx.x], v[2][m][threadIdx.x]};
    }
};

// ---------------------------------------------------------------------------------------------
// Per-thread walks over a tile (FULL = all SUB steps valid).

template <bool FULL>
__device__ __forceinline__ St summary_walk(int n, float w, const float (&k)[SUB], const float (&v)[SUB]) {
    St s{0.f, 0.f, EMPTY};
    Anchor an(s.p);
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
        float f1, f2;
        if (FULL || j < n) update(s, an, w, k[j], v[j], f1, f2);
    }
    return s;
}

// Forward walk writing y; returns the last step where k won the max (-1 if none). The anchor
// starts at the tile's start state unless the caller carries one across tiles.
template <bool FULL, typename F>
__device__ __forceinline__ int output_walk(const Tile& q, St& s, Anchor& an, float w, float u, const float (&k)[SUB],
                                           const float (&v)[SUB], F* __restrict__ y, int C) {
    int last_win = -1;
    F* p = y + q.base;
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
        if (FULL || j < q.n) {
            float e1, e2, inv, f1, f2;
            *p = from_f<F>(output(s, u, k[j], v[j], e1, e2, inv));
            if (update(s, an, w, k[j], v[j], f1, f2)) last_win = q.t0 + j;
        }
        p += C;
    }
    return last_win;
}
template <bool FULL, typename F>
__device__ __forceinline__ int output_walk(const Tile& q, St& s, float w, float u, const float (&k)[SUB],
                                           const float (&v)[SUB], F* __restrict__ y, int C) {
    Anchor an(s.p);
    return output_walk<FULL>(q, s, an, w, u, k, v, y, C);
}

struct GradAcc {
    float gw, gu, al, be;
};

// Recompute the tile forward (stashing each step's state and factors in shared memory, which keeps
// the registers for k, v, gy and the occupancy up), then walk it in reverse from the end adjoint
// writing gk, gv; `am`/`gpath` add the gradient of pp_T at its arg-max step.
constexpr int STASH_COMPS = 4;  // aa, bb, pp before the step; the step's exp, negated if k won
template <int ROWS>  // blockDim.y
struct StashRows {
    float* base;  // [SUB][STASH_COMPS][threads in block]: consecutive threads, consecutive banks
    __device__ __forceinline__ float& at(int j, int comp) const {
        return base[(j * STASH_COMPS + comp) * (LANES * ROWS) + threadIdx.y * LANES + threadIdx.x];
    }
};
using Stash = StashRows<SUBS>;
constexpr int STASH_BYTES = SUB * STASH_COMPS * LANES * SUBS * sizeof(float);

// gradient_walk's second half (also the single-pass backward's, from the stash its adjoint walk fills):
// the tile in reverse from the stash and the end adjoint (al, be), writing gk, gv; p_end = the
// stored exponent at the tile's end.
template <bool FULL, typename F, typename StashT>
__device__ __forceinline__ GradAcc gradient_reverse(const Tile& q, float p_end, float w, float u,
                                                    const float (&k)[SUB], const float (&v)[SUB],
                                                    const float (&gy)[SUB], float al, float be, int am, float gpath,
                                                    F* __restrict__ gk, F* __restrict__ gv, int C, StashT stash) {
    float p_next = p_end;  // stored exponent after the step being reversed
    GradAcc acc{0.f, 0.f, al, be};
    F* pk = gk + q.base + static_cast<size_t>(SUB - 1) * C;
    F* pv = gv + q.base + static_cast<size_t>(SUB - 1) * C;
#pragma unroll
    for (int j = SUB - 1; j >= 0; --j) {
        if (FULL || j < q.n) {
            St st{stash.at(j, 0), stash.at(j, 1), stash.at(j, 2)};
            float e = stash.at(j, 3);
            bool k_won = signbit(e);
            float f1 = k_won ? -e : fmaxf(1.f + ((st.p - p_next) + w), 0.f);  // as in update()
            float f2 = k_won ? 1.f : e;
            p_next = st.p;
            float e1, e2, inv;
            float y = output(st, u, k[j], v[j], e1, e2, inv);
            float rr = gy[j] * inv;
            float re2 = rr * e2, re1 = rr * e1;
            float dy = re2 * (v[j] - y);
            float gkj = dy + f2 * (acc.al * v[j] + acc.be);
            if (q.t0 + j == am) gkj += gpath;
            *pv = from_f<F>(re2 + acc.al * f2);
            *pk = from_f<F>(gkj);
            acc.gu += dy;
            acc.gw += f1 * (acc.al * st.a + acc.be * st.b);
            acc.al = f1 * acc.al + re1;
            acc.be = f1 * acc.be - re1 * y;
        }
        pk -= C;
        pv -= C;
    }
    return acc;
}

template <bool FULL, typename F, typename StashT = Stash>
__device__ __forceinline__ GradAcc gradient_walk(const Tile& q, St s, float w, float u, const float (&k)[SUB],
                                                 const float (&v)[SUB], const float (&gy)[SUB], float al, float be,
                                                 int am, float gpath, F* __restrict__ gk, F* __restrict__ gv, int C,
                                                 StashT stash) {
    // The stash also keeps the step's exp (negated when k won), so the reverse walk need not redo
    // the update: the other factor is 1, or e^err with err recomputed from the stored exponents.
    Anchor an(s.p);
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
        if (FULL || j < q.n) {
            stash.at(j, 0) = s.a;
            stash.at(j, 1) = s.b;
            stash.at(j, 2) = s.p;
            float f1, f2;
            bool k_wins = update(s, an, w, k[j], v[j], f1, f2);
            stash.at(j, 3) = k_wins ? -f1 : f2;
        }
    }
    return gradient_reverse<FULL>(q, s.p, w, u, k, v, gy, al, be, am, gpath, gk, gv, C, stash);
}

// Local adjoint summary of a tile from its start state s (left at the end state): (alpha, beta) at
// the start for a zero adjoint at its end, and g = e^(pp_start + n w - pp_end) that carries an end
// adjoint to the start (the product of the step factors; see bwd_summaries for EXACT_DECAY).
// STASH: also stash what gradient_walk's forward loop would (the same update from the same state,
// so the same values), for the single-pass backward's gradient_reverse.
template <bool FULL, bool STASH = false>
__device__ __forceinline__ St adjoint_walk(int n, St& s, float w, float u, const float (&k)[SUB],
                                           const float (&v)[SUB], const float (&gy)[SUB], Stash stash = {nullptr}) {
    St r{0.f, 0.f, 1.f};
    Anchor an(s.p);
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
        if (FULL || j < n) {
            if (STASH) {
                stash.at(j, 0) = s.a;
                stash.at(j, 1) = s.b;
                stash.at(j, 2) = s.p;
            }
            float e1, e2, inv, f1, f2;
            float y = output(s, u, k[j], v[j], e1, e2, inv);
            float re1 = r.p * e1 * gy[j] * inv;  // e^(pp_start + j w - q_j) gy / Ds
            r.a += re1;
            r.b -= re1 * y;
            bool k_wins = update(s, an, w, k[j], v[j], f1, f2);
            if (STASH) stash.at(j, 3) = k_wins ? -f1 : f2;
            r.p *= f1;
        }
    }
    return r;
}

// ---------------------------------------------------------------------------------------------
// Forward 1: sub-chunk summaries from the zero state (kept in `sub` for forward 3) and their
// combination into segment summaries (`seg`, read by forward 2).
template <typename F>
__global__ void __launch_bounds__(LANES* SUBS, WKV_FWD_MIN_BLOCKS) fwd_summaries(int T, int C, int nseg, int nsub,
                                                              const float* __restrict__ td, const F* __restrict__ k_,
                                                              const F* __restrict__ v_, float* __restrict__ sub,
                                                              float* __restrict__ seg) {
    pdl_trigger();  // first kernel of the pass: launched plainly, after everything before it
    __shared__ Shared3 sh;
    __shared__ int shn[SUBS][LANES];
    Tile q = tile(T, C);
    float w = q.lane_ok ? -expf(td[q.c]) : 0.f;
    float k[SUB], v[SUB];
    St s;
    if (q.n == SUB) {
        load_steps<true>(k_, q, C, k);
        load_steps<true>(v_, q, C, v);
        s = summary_walk<true>(q.n, w, k, v);
    } else {
        load_steps<false>(k_, q, C, k);
        load_steps<false>(v_, q, C, v);
        s = summary_walk<false>(q.n, w, k, v);
    }
    if (q.n > 0) store3(sub, q.sub, nsub, q.b, q.c, C, s);
    sh.put(q.m, s);
    shn[q.m][threadIdx.x] = q.n;
    __syncthreads();
    if (q.m == 0 && q.lane_ok && q.seg + 1 < nseg) {  // the last segment's summary is never needed
        St acc{0.f, 0.f, EMPTY};
        for (int m = 0; m < SUBS; ++m) acc = apply(acc, sh.get(m), shn[m][threadIdx.x], w);
        store3(seg, q.seg, nseg, q.b, q.c, C, acc);
    }
}

// Forward 2: per lane, the state at each segment's start from the input state and the segment
// summaries, replacing each summary in `seg`. A block is LANES lanes x R rows (R = blockDim.y, see
// scan_rows). With one row a thread walks its lane's segments in order. With R rows, row m first
// composes its own share of the segments (from the zero state), row 0 folds the R shares from the
// input state, then each row walks its share from its start state: about 2 nseg / R + R dependent
// applies instead of nseg, each share's loads issued together. (One thread's walk over 128
// segments, a chain of loads and exps, took 21 us on an H200: docs/benchmarks.md, WKV run 9.)
constexpr int SCAN_MAX_ROWS = WKV_SCAN_MAX_ROWS;
static_assert(SCAN_MAX_ROWS >= 1 && SCAN_MAX_ROWS <= 32, "WKV_SCAN_MAX_ROWS: 1 to 32 rows");

// Segments [lo, hi) of lane (b, c) applied to s in order; with STORE each segment's start state
// replaces its summary. Loads go in batches so their latency overlaps. The last segment's summary
// is never loaded: nothing reads the state after it.
template <bool STORE>
__device__ __forceinline__ St fwd_scan_range(int b, int c, int C, int nseg, int lo, int hi, float w, St s,
                                             float* seg) {
    for (int g0 = lo; g0 < hi; g0 += SCAN_BATCH) {
        St x[SCAN_BATCH];
#pragma unroll
        for (int i = 0; i < SCAN_BATCH; ++i)
            x[i] = g0 + i < hi && g0 + i + 1 < nseg ? load3_cg(seg, g0 + i, nseg, b, c, C) : St{0.f, 0.f, EMPTY};
#pragma unroll
        for (int i = 0; i < SCAN_BATCH; ++i) {
            if (g0 + i < hi) {
                if (STORE) store3(seg, g0 + i, nseg, b, c, C, s);
                s = apply(s, x[i], SEG, w);
            }
        }
    }
    return s;
}

__global__ void __launch_bounds__(LANES* SCAN_MAX_ROWS)
    fwd_segment_scan(int B, int C, int nseg, const float* __restrict__ td, const float* __restrict__ aa0,
                     const float* __restrict__ bb0, const float* __restrict__ pp0, float* __restrict__ seg) {
    __shared__ float share[3][SCAN_MAX_ROWS][LANES];  // row m's composed share, then its start state
    pdl_trigger();
    pdl_wait();
    const int rows = blockDim.y, m = threadIdx.y, x = threadIdx.x;
    const long long lane = static_cast<long long>(blockIdx.x) * LANES + x;
    const bool ok = lane < static_cast<long long>(B) * C;
    const int b = ok ? static_cast<int>(lane / C) : 0, c = ok ? static_cast<int>(lane - static_cast<long long>(b) * C) : 0;
    const float w = ok ? -expf(td[c]) : 0.f;
    const int per = (nseg + rows - 1) / rows, lo = min(m * per, nseg), hi = min(lo + per, nseg);
    St s = ok ? St{aa0[lane], bb0[lane], pp0[lane]} : St{0.f, 0.f, EMPTY};
    if (rows > 1) {
        St part = ok ? fwd_scan_range<false>(b, c, C, nseg, lo, hi, w, St{0.f, 0.f, EMPTY}, seg)
                     : St{0.f, 0.f, EMPTY};
        share[0][m][x] = part.a, share[1][m][x] = part.b, share[2][m][x] = part.p;
        __syncthreads();
        if (m == 0) {
            for (int r = 0; r < rows; ++r) {
                St next = apply(s, St{share[0][r][x], share[1][r][x], share[2][r][x]},
                                (min(r * per + per, nseg) - min(r * per, nseg)) * SEG, w);
                share[0][r][x] = s.a, share[1][r][x] = s.b, share[2][r][x] = s.p;
                s = next;
            }
        }
        __syncthreads();
        s = {share[0][m][x], share[1][m][x], share[2][m][x]};
    }
    if (ok) fwd_scan_range<true>(b, c, C, nseg, lo, hi, w, s, seg);
}

// Forward 3: outputs. The block scans its sub-chunk summaries from the segment start state and
// replaces each summary in `sub` by that sub-chunk's start state (kept for backward); each thread
// walks its steps writing y; the thread with the last step writes the output state; the block
// writes the last step in the segment where k won the running max (-1 if none) to `lastwin`.
template <typename F>
__global__ void __launch_bounds__(LANES* SUBS, WKV_FWD_MIN_BLOCKS)
    fwd_outputs(int T, int C, int nseg, int nsub, const float* __restrict__ td,
                const float* __restrict__ tf, const F* __restrict__ k_, const F* __restrict__ v_, F* __restrict__ y_,
                const float* __restrict__ seg, float* __restrict__ sub, int* __restrict__ lastwin,
                float* __restrict__ aa1, float* __restrict__ bb1, float* __restrict__ pp1) {
    __shared__ Shared3 sh;
    __shared__ int shn[SUBS][LANES];
    Tile q = tile(T, C);
    float w = q.lane_ok ? -expf(td[q.c]) : 0.f;
    float u = q.lane_ok ? tf[q.c] : 0.f;
    float k[SUB], v[SUB];
    pdl_trigger();
    load_steps(k_, q, C, k);  // k, v were complete before the pass's first kernel started
    load_steps(v_, q, C, v);
    pdl_wait();  // the summaries and scan kernels' results, from here on
    St s = q.n > 0 ? load3(sub, q.sub, nsub, q.b, q.c, C) : St{0.f, 0.f, EMPTY};
    sh.put(q.m, s);
    shn[q.m][threadIdx.x] = q.n;
    __syncthreads();
    if (q.m == 0 && q.lane_ok) {
        St acc = load3(seg, q.seg, nseg, q.b, q.c, C);
        for (int m = 0; m < SUBS; ++m) {
            St x = sh.get(m);
            sh.put(m, acc);
            acc = apply(acc, x, shn[m][threadIdx.x], w);
        }
    }
    __syncthreads();
    int last_win = -1;
    if (q.n > 0) {
        s = sh.get(q.m);
        store3(sub, q.sub, nsub, q.b, q.c, C, s);
        last_win = q.n == SUB ? output_walk<true>(q, s, w, u, k, v, y_, C) : output_walk<false>(q, s, w, u, k, v, y_, C);
        if (q.t0 + q.n == T) {
            size_t lane = static_cast<size_t>(q.b) * C + q.c;
            aa1[lane] = s.a;
            bb1[lane] = s.b;
            pp1[lane] = s.p;
        }
    }
    shn[q.m][threadIdx.x] = last_win;  // every thread has passed the second barrier: shn is free
    __syncthreads();
    if (q.m == 0 && q.lane_ok) {
        int best = -1;
        for (int m = 0; m < SUBS; ++m) best = max(best, shn[m][threadIdx.x]);
        lastwin[(static_cast<size_t>(q.b) * nseg + q.seg) * C + q.c] = best;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward 1: per sub-chunk adjoint summaries (kept in `asub` for backward 3), combined per
// segment into `aseg` for backward 2.
template <typename F>
__global__ void __launch_bounds__(LANES* SUBS, WKV_BWD_MIN_BLOCKS)
    bwd_summaries(int T, int C, int nseg, int nsub, const float* __restrict__ td, const float* __restrict__ tf,
                  const F* __restrict__ k_, const F* __restrict__ v_, const F* __restrict__ gy_,
                  const float* __restrict__ sub, float* __restrict__ asub, float* __restrict__ aseg) {
    pdl_trigger();  // first kernel of the pass: launched plainly, after everything before it
    __shared__ Shared3 sh;
    Tile q = tile(T, C);
    float w = q.lane_ok ? -expf(td[q.c]) : 0.f;
    float u = q.lane_ok ? tf[q.c] : 0.f;
    float k[SUB], v[SUB], gy[SUB];
    St r{0.f, 0.f, G_ONE};  // (alpha, beta, g or g - 1)
    St s = q.n > 0 ? load3(sub, q.sub, nsub, q.b, q.c, C) : St{0.f, 0.f, EMPTY};
    float p_start = s.p;
    // EXACT_DECAY: the adjoint at this tile's end is scaled by the next tile's stored start exponent
    // (where the backward's next tile starts), which may differ from the recomputed end exponent by
    // an ulp; take the stored one. The last tile ends at the forward's output exponent, which the
    // walk below recomputes bit for bit.
    bool next_stored = EXACT_DECAY && q.n > 0 && q.sub + 1 < nsub;
    float p_next = next_stored ? sub[chunk_idx(q.b, q.sub + 1, nsub, 2, 3, q.c, C)] : 0.f;
    if (q.n == SUB) {
        load_steps<true>(k_, q, C, k);
        load_steps<true>(v_, q, C, v);
        load_steps<true>(gy_, q, C, gy);
        r = adjoint_walk<true>(q.n, s, w, u, k, v, gy);
    } else if (q.n > 0) {
        load_steps<false>(k_, q, C, k);
        load_steps<false>(v_, q, C, v);
        load_steps<false>(gy_, q, C, gy);
        r = adjoint_walk<false>(q.n, s, w, u, k, v, gy);
    }
    if (EXACT_DECAY && q.n > 0)  // g - 1 from the exponents, in one rounding
        r.p = decay_m1(fmaf(static_cast<float>(q.n), w, p_start - (next_stored ? p_next : s.p)));
    if (q.n > 0) store3(asub, q.sub, nsub, q.b, q.c, C, r);
    sh.put(q.m, r);
    __syncthreads();
    if (q.m == 0 && q.lane_ok && q.seg > 0) {  // segment 0's summary is never needed
        St acc{0.f, 0.f, G_ONE};
        for (int m = SUBS - 1; m >= 0; --m) acc = adj_compose(sh.get(m), acc);
        store3(aseg, q.seg, nseg, q.b, q.c, C, acc);
    }
}

// Backward 2: per lane, the adjoint at each segment's end from the state-out gradient and the
// adjoint summaries, replacing each summary in `aseg` (the reverse of fwd_segment_scan, in rows the
// same way: row m composes its share, row 0 folds the shares from the end, each row walks its
// share); and the arg-max step of pp_T (the last step where k won, -1 for the input pp) from the
// forward's `lastwin`: steps grow with segments, so that is the largest entry.
// Segments [lo, hi) of lane (b, c), latest first: with WALK the adjoint `acc` is carried back over
// them, each segment's end adjoint replacing its summary; without, `acc` is composed with them
// (earlier after later). Segment 0's summary is never loaded: nothing reads the adjoint before it.
template <bool WALK>
__device__ __forceinline__ St bwd_scan_range(int b, int c, int C, int nseg, int lo, int hi, St acc, float* aseg) {
    for (int g0 = hi - 1; g0 >= lo; g0 -= SCAN_BATCH) {
        St x[SCAN_BATCH];
#pragma unroll
        for (int i = 0; i < SCAN_BATCH; ++i) {
            int g = g0 - i;
            x[i] = g >= lo && g > 0 ? load3_cg(aseg, g, nseg, b, c, C) : St{0.f, 0.f, G_ONE};
        }
#pragma unroll
        for (int i = 0; i < SCAN_BATCH; ++i) {
            if (g0 - i >= lo) {
                if (WALK) {
                    store3(aseg, g0 - i, nseg, b, c, C, {acc.a, acc.b, 0.f});
                    acc = {adj_apply(acc.a, x[i].a, x[i].p), adj_apply(acc.b, x[i].b, x[i].p), 0.f};
                } else {
                    acc = adj_compose(x[i], acc);
                }
            }
        }
    }
    return acc;
}

__global__ void __launch_bounds__(LANES* SCAN_MAX_ROWS)
    bwd_segment_scan(int B, int C, int nseg, const float* __restrict__ gaa1, const float* __restrict__ gbb1,
                     const int* __restrict__ lastwin, float* __restrict__ aseg, int* __restrict__ argmax) {
    __shared__ float share[3][SCAN_MAX_ROWS][LANES];  // row m's composed share, then its end adjoint
    __shared__ int share_best[SCAN_MAX_ROWS][LANES];
    pdl_trigger();
    pdl_wait();
    const int rows = blockDim.y, m = threadIdx.y, x = threadIdx.x;
    const long long lane = static_cast<long long>(blockIdx.x) * LANES + x;
    const bool ok = lane < static_cast<long long>(B) * C;
    const int b = ok ? static_cast<int>(lane / C) : 0, c = ok ? static_cast<int>(lane - static_cast<long long>(b) * C) : 0;
    const int per = (nseg + rows - 1) / rows, lo = min(m * per, nseg), hi = min(lo + per, nseg);
    St end = ok ? St{gaa1[lane], gbb1[lane], 0.f} : St{0.f, 0.f, 0.f};  // alpha_T = dL/daa_T: a_T = aa_T e^(pp_T)
    int best = -1;  // the largest lastwin entry of the row's share (row 0: at last, of all)
    if (ok) {
        const int* win = lastwin + static_cast<size_t>(b) * nseg * C + c;
#pragma unroll 4
        for (int g = lo; g < hi; ++g) best = max(best, win[static_cast<size_t>(g) * C]);
    }
    if (rows > 1) {
        St part = ok ? bwd_scan_range<false>(b, c, C, nseg, lo, hi, St{0.f, 0.f, G_ONE}, aseg) : St{0.f, 0.f, G_ONE};
        share[0][m][x] = part.a, share[1][m][x] = part.b, share[2][m][x] = part.p;
        share_best[m][x] = best;
        __syncthreads();
        if (m == 0) {
            for (int r = rows - 1; r >= 0; --r) {
                St sum{share[0][r][x], share[1][r][x], share[2][r][x]};
                share[0][r][x] = end.a, share[1][r][x] = end.b;
                end = {adj_apply(end.a, sum.a, sum.p), adj_apply(end.b, sum.b, sum.p), 0.f};
                best = max(best, share_best[r][x]);
            }
        }
        __syncthreads();
        end = {share[0][m][x], share[1][m][x], 0.f};
    }
    if (ok) bwd_scan_range<true>(b, c, C, nseg, lo, hi, end, aseg);
    if (ok && m == 0) argmax[lane] = best;
}

// Backward 3: gradients. The block scans the adjoint back over its sub-chunks from the segment
// end; each thread walks its tile (gradient_walk); the block writes per-segment partials of gw,
// gu, and the thread owning step 0 writes the input-state gradient.
template <typename F>
__global__ void __launch_bounds__(LANES* SUBS, WKV_BWD_MIN_BLOCKS)
    bwd_gradients(int T, int C, int nseg, int nsub, const float* __restrict__ td,
                  const float* __restrict__ tf,
                  const F* __restrict__ k_, const F* __restrict__ v_, const F* __restrict__ gy_,
                  const float* __restrict__ sub, const float* __restrict__ asub, const float* __restrict__ aseg,
                  const int* __restrict__ argmax, const float* __restrict__ aa0, const float* __restrict__ bb0,
                  const float* __restrict__ aa1, const float* __restrict__ bb1, const float* __restrict__ gaa1,
                  const float* __restrict__ gbb1, const float* __restrict__ gpp1, F* __restrict__ gk_,
                  F* __restrict__ gv_, float* __restrict__ part, float* __restrict__ gaa0, float* __restrict__ gbb0,
                  float* __restrict__ gpp0) {
    __shared__ Shared3 sh;
    extern __shared__ float stash_mem[];
    Tile q = tile(T, C);
    float w = q.lane_ok ? -expf(td[q.c]) : 0.f;
    float u = q.lane_ok ? tf[q.c] : 0.f;
    float k[SUB], v[SUB], gy[SUB];
    pdl_trigger();
    load_steps(k_, q, C, k);  // k, v, gy were complete before the pass's first kernel started
    load_steps(v_, q, C, v);
    load_steps(gy_, q, C, gy);
    pdl_wait();  // the adjoint summaries and scan kernels' results, from here on
    sh.put(q.m, q.n > 0 ? load3(asub, q.sub, nsub, q.b, q.c, C) : St{0.f, 0.f, G_ONE});
    __syncthreads();
    if (q.m == 0 && q.lane_ok) {
        St acc = load3(aseg, q.seg, nseg, q.b, q.c, C);
        for (int m = SUBS - 1; m >= 0; --m) {
            St x = sh.get(m);
            sh.put(m, acc);
            acc = {adj_apply(acc.a, x.a, x.p), adj_apply(acc.b, x.b, x.p), 0.f};
        }
    }
    __syncthreads();
    GradAcc acc{0.f, 0.f, 0.f, 0.f};
    if (q.n > 0) {
        St s = load3(sub, q.sub, nsub, q.b, q.c, C);
        St adj = sh.get(q.m);
        // The gradient of pp_T goes to its arg-max path: step `am`, or the input pp when am = -1.
        size_t lane = static_cast<size_t>(q.b) * C + q.c;
        int am = argmax[lane];
        bool path_here = (am >= q.t0 && am < q.t0 + q.n) || (am < 0 && q.t0 == 0);
        float gpath = 0.f;
        if (path_here) gpath = gpp1[lane] - gaa1[lane] * aa1[lane] - gbb1[lane] * bb1[lane];
        acc = q.n == SUB ? gradient_walk<true>(q, s, w, u, k, v, gy, adj.a, adj.b, am, gpath, gk_, gv_, C, {stash_mem})
                         : gradient_walk<false>(q, s, w, u, k, v, gy, adj.a, adj.b, am, gpath, gk_, gv_, C, {stash_mem});
        if (path_here) acc.gw += (am < 0 ? static_cast<float>(T) : static_cast<float>(T - 1 - am)) * gpath;
        if (q.t0 == 0) {
            gaa0[lane] = acc.al;
            gbb0[lane] = acc.be;
            gpp0[lane] = acc.al * aa0[lane] + acc.be * bb0[lane] + (am < 0 ? gpath : 0.f);
        }
    }
    __syncthreads();  // the scan results in sh are consumed; reuse it for the partial sums
    sh.put(q.m, {acc.gw, acc.gu, 0.f});
    __syncthreads();
    if (q.m == 0 && q.lane_ok) {
        float sw = 0.f, su = 0.f;
        for (int m = 0; m < SUBS; ++m) {
            St x = sh.get(m);
            sw += x.a;
            su += x.b;
        }
        part[chunk_idx(q.b, q.seg, nseg, 0, 2, q.c, C)] = sw;
        part[chunk_idx(q.b, q.seg, nseg, 1, 2, q.c, C)] = su;
    }
}

// Backward 4: reduce the partials over (batch, segment) items in a fixed order (deterministic,
// in double): ROWS x 32 threads, row r sums items r, r + ROWS, ...; then the rows in order.
// `sh` holds 2 * ROWS * LANES doubles.
template <int ROWS>
__device__ void reduce_channels(int B, int C, int nseg, int c0, int row, const float* __restrict__ td,
                                                const float* part, float* __restrict__ gtd, float* __restrict__ gtf,
                                                double* sh) {
    int c = c0 + threadIdx.x;
    double sw = 0.0, su = 0.0;
    if (c < C) {
        long long items = static_cast<long long>(B) * nseg;
#pragma unroll 4
        for (long long i = row; i < items; i += ROWS) {
            sw += __ldcg(part + (i * 2 + 0) * C + c);
            su += __ldcg(part + (i * 2 + 1) * C + c);
        }
    }
    sh[row * LANES + threadIdx.x] = sw;
    sh[(ROWS + row) * LANES + threadIdx.x] = su;
    __syncthreads();
    if (row == 0 && c < C) {
        for (int r = 1; r < ROWS; ++r) {
            sw += sh[r * LANES + threadIdx.x];
            su += sh[(ROWS + r) * LANES + threadIdx.x];
        }
        gtd[c] = static_cast<float>(sw * -exp(static_cast<double>(td[c])));
        gtf[c] = static_cast<float>(su);
    }
}

__global__ void __launch_bounds__(LANES* 8) bwd_reduce(int B, int C, int nseg, const float* __restrict__ td,
                                                       const float* __restrict__ part, float* __restrict__ gtd,
                                                       float* __restrict__ gtf) {
    __shared__ double sh[2 * 8 * LANES];
    pdl_wait();
    reduce_channels<8>(B, C, nseg, blockIdx.x * LANES, threadIdx.y, td, part, gtd, gtf, sh);
}

// ---------------------------------------------------------------------------------------------
// WKV_PAIRS: the bf16 kernels with two adjacent channels per thread. Same blocks of 32 x SUBS
// threads, same sub-chunks and segments (so the same scan kernels, workspaces and partials), but
// a block covers 64 channels: thread x owns channels c = 2 (32 blockIdx.y + x) and c + 1, and moves
// their k, v, y, gy, gk, gv as one __nv_bfloat162 per step (a warp access covers 128 B). Every
// channel goes through the unpaired kernels' device functions (update, output, apply, the walks), in
// their order; the interleaving of the two channels' independent instructions differs, and which
// thread runs the per-block serial parts (row h of the block does channel c + h there, where the
// unpaired kernels have row 0). Results are nevertheless not always bit-identical to the unpaired
// kernels' (bf16 y differs in 7 of 24 bench cases, worst rel L2 8.2e-6; the cause, presumably the
// compiler contracting multiply-adds differently in the interleaved code, was not established).
#if WKV_PAIRS
static_assert(SUBS >= 2, "WKV_PAIRS: rows 0 and 1 of a block do the two channels' serial parts");
using bf2 = __nv_bfloat162;

__device__ __forceinline__ Tile tile_pair(int T, int C) {
    Tile r = tile(T, C);
    r.c = 2 * (blockIdx.y * LANES + threadIdx.x);  // C is even: c < C implies c + 1 < C
    r.lane_ok = r.c < C;
    int left = T - r.t0;
    r.n = r.lane_ok ? (left < 0 ? 0 : (left > SUB ? SUB : left)) : 0;
    r.base = (static_cast<size_t>(r.b) * T + r.t0) * C + r.c;  // even: 4-byte aligned pairs
    return r;
}

// Steps j < n of a lane pair (stride C / 2 pairs).
template <bool FULL>
__device__ __forceinline__ void load_pairs(const __nv_bfloat16* __restrict__ x, const Tile& q, int C,
                                           bf2 (&out)[SUB]) {
    const bf2* p = reinterpret_cast<const bf2*>(x + q.base);
    const int stride = C / 2;
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
        out[j] = (FULL || j < q.n) ? *p : __float2bfloat162_rn(0.f);
        p += stride;
    }
}
__device__ __forceinline__ void load_pairs(const __nv_bfloat16* __restrict__ x, const Tile& q, int C,
                                           bf2 (&out)[SUB]) {
    if (q.n == SUB)
        load_pairs<true>(x, q, C, out);
    else
        load_pairs<false>(x, q, C, out);
}

// Channel H (0: c, 1: c + 1) of a pair, exactly as to_f converts a lone bf16.
template <int H>
__device__ __forceinline__ float half_f(bf2 x) {
    return H ? __high2float(x) : __low2float(x);
}
template <int H>
__device__ __forceinline__ void unpack(const bf2 (&x)[SUB], float (&out)[SUB]) {
#pragma unroll
    for (int j = 0; j < SUB; ++j) out[j] = half_f<H>(x[j]);
}
__device__ __forceinline__ bf2 pack(float lo, float hi) {  // each rounded as from_f rounds one value
    return __halves2bfloat162(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
}

template <bool FULL, int H>
__device__ __forceinline__ St summary_half(int n, float w, const bf2 (&k2)[SUB], const bf2 (&v2)[SUB]) {
    float k[SUB], v[SUB];
    unpack<H>(k2, k);
    unpack<H>(v2, v);
    return summary_walk<FULL>(n, w, k, v);
}

template <bool FULL, int H>
__device__ __forceinline__ St adjoint_half(int n, St& s, float w, float u, const bf2 (&k2)[SUB],
                                           const bf2 (&v2)[SUB], const bf2 (&gy2)[SUB]) {
    float k[SUB], v[SUB], gy[SUB];
    unpack<H>(k2, k);
    unpack<H>(v2, v);
    unpack<H>(gy2, gy);
    return adjoint_walk<FULL>(n, s, w, u, k, v, gy);
}

// output_walk for both channels, step by step (each channel: output, then update, as there).
template <bool FULL>
__device__ __forceinline__ void output_walk_pair(const Tile& q, St (&s)[2], Anchor& an0, Anchor& an1,
                                                 const float (&w)[2], const float (&u)[2], const bf2 (&k2)[SUB],
                                                 const bf2 (&v2)[SUB], __nv_bfloat16* __restrict__ y, int C,
                                                 int (&last_win)[2]) {
    bf2* p = reinterpret_cast<bf2*>(y + q.base);
    const int stride = C / 2;
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
        if (FULL || j < q.n) {
            float k0 = half_f<0>(k2[j]), v0 = half_f<0>(v2[j]);
            float k1 = half_f<1>(k2[j]), v1 = half_f<1>(v2[j]);
            float e1, e2, inv, f1, f2;
            float y0 = output(s[0], u[0], k0, v0, e1, e2, inv);
            float y1 = output(s[1], u[1], k1, v1, e1, e2, inv);
            *p = pack(y0, y1);
            if (update(s[0], an0, w[0], k0, v0, f1, f2)) last_win[0] = q.t0 + j;
            if (update(s[1], an1, w[1], k1, v1, f1, f2)) last_win[1] = q.t0 + j;
        }
        p += stride;
    }
}
template <bool FULL>
__device__ __forceinline__ void output_walk_pair(const Tile& q, St (&s)[2], const float (&w)[2], const float (&u)[2],
                                                 const bf2 (&k2)[SUB], const bf2 (&v2)[SUB],
                                                 __nv_bfloat16* __restrict__ y, int C, int (&last_win)[2]) {
    Anchor an0(s[0].p), an1(s[1].p);
    output_walk_pair<FULL>(q, s, an0, an1, w, u, k2, v2, y, C, last_win);
}

// gradient_walk for channel H of the pair, the arithmetic copied line for line. Channel 0 runs
// first and leaves its (gk, gv) per step, rounded to bf16, in `held`; channel 1 then stores both
// channels' gk and gv as pairs. The stash is per thread, so channel 1 may overwrite it without a
// barrier. (One template for both walks, with the loads and stores as a policy, was tried four ways:
// each changed the unpaired bwd_gradients kernels' SASS, more spills in fp32 and another FMA
// contraction in a bf16 variant, so the copy stays until a GPU session can measure such a change.)
template <bool FULL, int H, typename StashT = Stash>
__device__ __forceinline__ GradAcc gradient_half(const Tile& q, St s, float w, float u, const bf2 (&k2)[SUB],
                                                 const bf2 (&v2)[SUB], const bf2 (&gy2)[SUB], float al, float be,
                                                 int am, float gpath, __nv_bfloat16* __restrict__ gk,
                                                 __nv_bfloat16* __restrict__ gv, int C, StashT stash,
                                                 bf2 (&held)[SUB]) {
    Anchor an(s.p);
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
        if (FULL || j < q.n) {
            stash.at(j, 0) = s.a;
            stash.at(j, 1) = s.b;
            stash.at(j, 2) = s.p;
            float f1, f2;
            bool k_wins = update(s, an, w, half_f<H>(k2[j]), half_f<H>(v2[j]), f1, f2);
            stash.at(j, 3) = k_wins ? -f1 : f2;
        }
    }
    float p_next = s.p;
    GradAcc acc{0.f, 0.f, al, be};
    const int stride = C / 2;
    bf2* pk = reinterpret_cast<bf2*>(gk + q.base) + static_cast<size_t>(SUB - 1) * stride;
    bf2* pv = reinterpret_cast<bf2*>(gv + q.base) + static_cast<size_t>(SUB - 1) * stride;
#pragma unroll
    for (int j = SUB - 1; j >= 0; --j) {
        if (FULL || j < q.n) {
            float kj = half_f<H>(k2[j]), vj = half_f<H>(v2[j]), gyj = half_f<H>(gy2[j]);
            St st{stash.at(j, 0), stash.at(j, 1), stash.at(j, 2)};
            float e = stash.at(j, 3);
            bool k_won = signbit(e);
            float f1 = k_won ? -e : fmaxf(1.f + ((st.p - p_next) + w), 0.f);  // as in update()
            float f2 = k_won ? 1.f : e;
            p_next = st.p;
            float e1, e2, inv;
            float y = output(st, u, kj, vj, e1, e2, inv);
            float rr = gyj * inv;
            float re2 = rr * e2, re1 = rr * e1;
            float dy = re2 * (vj - y);
            float gkj = dy + f2 * (acc.al * vj + acc.be);
            if (q.t0 + j == am) gkj += gpath;
            if (H == 0) {
                held[j] = pack(gkj, re2 + acc.al * f2);  // (gk, gv) of channel 0
            } else {
                *pv = __halves2bfloat162(__high2bfloat16(held[j]), __float2bfloat16_rn(re2 + acc.al * f2));
                *pk = __halves2bfloat162(__low2bfloat16(held[j]), __float2bfloat16_rn(gkj));
            }
            acc.gu += dy;
            acc.gw += f1 * (acc.al * st.a + acc.be * st.b);
            acc.al = f1 * acc.al + re1;
            acc.be = f1 * acc.be - re1 * y;
        }
        pk -= stride;
        pv -= stride;
    }
    return acc;
}

// Forward 1, paired (see fwd_summaries).
__global__ void __launch_bounds__(LANES* SUBS, WKV_PAIR_FWD_MIN_BLOCKS)
    fwd_summaries_pair(int T, int C, int nseg, int nsub, const float* __restrict__ td,
                       const __nv_bfloat16* __restrict__ k_, const __nv_bfloat16* __restrict__ v_,
                       float* __restrict__ sub, float* __restrict__ seg) {
    pdl_trigger();  // first kernel of the pass: launched plainly, after everything before it
    __shared__ Shared3 sh[2];
    __shared__ int shn[SUBS][LANES];
    Tile q = tile_pair(T, C);
    float w[2] = {q.lane_ok ? -expf(td[q.c]) : 0.f, q.lane_ok ? -expf(td[q.c + 1]) : 0.f};
    bf2 k[SUB], v[SUB];
    St s[2];
    if (q.n == SUB) {
        load_pairs<true>(k_, q, C, k);
        load_pairs<true>(v_, q, C, v);
        s[0] = summary_half<true, 0>(q.n, w[0], k, v);
        s[1] = summary_half<true, 1>(q.n, w[1], k, v);
    } else {
        load_pairs<false>(k_, q, C, k);
        load_pairs<false>(v_, q, C, v);
        s[0] = summary_half<false, 0>(q.n, w[0], k, v);
        s[1] = summary_half<false, 1>(q.n, w[1], k, v);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (q.n > 0) store3(sub, q.sub, nsub, q.b, q.c + h, C, s[h]);
        sh[h].put(q.m, s[h]);
    }
    shn[q.m][threadIdx.x] = q.n;
    __syncthreads();
    if (q.m < 2 && q.lane_ok && q.seg + 1 < nseg) {  // the last segment's summary is never needed
        const int h = q.m;  // row h combines channel c + h
        const float wh = h ? w[1] : w[0];
        St acc{0.f, 0.f, EMPTY};
        for (int m = 0; m < SUBS; ++m) acc = apply(acc, sh[h].get(m), shn[m][threadIdx.x], wh);
        store3(seg, q.seg, nseg, q.b, q.c + h, C, acc);
    }
}

// Forward 3, paired (see fwd_outputs).
__global__ void __launch_bounds__(LANES* SUBS, WKV_PAIR_FWD_MIN_BLOCKS)
    fwd_outputs_pair(int T, int C, int nseg, int nsub, const float* __restrict__ td, const float* __restrict__ tf,
                     const __nv_bfloat16* __restrict__ k_, const __nv_bfloat16* __restrict__ v_,
                     __nv_bfloat16* __restrict__ y_, const float* __restrict__ seg, float* __restrict__ sub,
                     int* __restrict__ lastwin, float* __restrict__ aa1, float* __restrict__ bb1,
                     float* __restrict__ pp1) {
    __shared__ Shared3 sh[2];
    __shared__ int shn[2][SUBS][LANES];
    Tile q = tile_pair(T, C);
    float w[2] = {q.lane_ok ? -expf(td[q.c]) : 0.f, q.lane_ok ? -expf(td[q.c + 1]) : 0.f};
    float u[2] = {q.lane_ok ? tf[q.c] : 0.f, q.lane_ok ? tf[q.c + 1] : 0.f};
    bf2 k[SUB], v[SUB];
    pdl_trigger();
    load_pairs(k_, q, C, k);
    load_pairs(v_, q, C, v);
    pdl_wait();  // the summaries and scan kernels' results, from here on
    St s[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        s[h] = q.n > 0 ? load3(sub, q.sub, nsub, q.b, q.c + h, C) : St{0.f, 0.f, EMPTY};
        sh[h].put(q.m, s[h]);
    }
    shn[0][q.m][threadIdx.x] = q.n;
    __syncthreads();
    if (q.m < 2 && q.lane_ok) {
        const int h = q.m;  // row h scans channel c + h
        const float wh = h ? w[1] : w[0];
        St acc = load3(seg, q.seg, nseg, q.b, q.c + h, C);
        for (int m = 0; m < SUBS; ++m) {
            St x = sh[h].get(m);
            sh[h].put(m, acc);
            acc = apply(acc, x, shn[0][m][threadIdx.x], wh);
        }
    }
    __syncthreads();
    int last_win[2] = {-1, -1};
    if (q.n > 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            s[h] = sh[h].get(q.m);
            store3(sub, q.sub, nsub, q.b, q.c + h, C, s[h]);
        }
        if (q.n == SUB)
            output_walk_pair<true>(q, s, w, u, k, v, y_, C, last_win);
        else
            output_walk_pair<false>(q, s, w, u, k, v, y_, C, last_win);
        if (q.t0 + q.n == T) {
            size_t lane = static_cast<size_t>(q.b) * C + q.c;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                aa1[lane + h] = s[h].a;
                bb1[lane + h] = s[h].b;
                pp1[lane + h] = s[h].p;
            }
        }
    }
    shn[0][q.m][threadIdx.x] = last_win[0];  // every thread has passed the second barrier
    shn[1][q.m][threadIdx.x] = last_win[1];
    __syncthreads();
    if (q.m < 2 && q.lane_ok) {
        const int h = q.m;
        int best = -1;
        for (int m = 0; m < SUBS; ++m) best = max(best, shn[h][m][threadIdx.x]);
        lastwin[(static_cast<size_t>(q.b) * nseg + q.seg) * C + q.c + h] = best;
    }
}

// Backward 1, paired (see bwd_summaries).
__global__ void __launch_bounds__(LANES* SUBS, WKV_PAIR_BWD_SUMMARIES_MIN_BLOCKS)
    bwd_summaries_pair(int T, int C, int nseg, int nsub, const float* __restrict__ td, const float* __restrict__ tf,
                       const __nv_bfloat16* __restrict__ k_, const __nv_bfloat16* __restrict__ v_,
                       const __nv_bfloat16* __restrict__ gy_, const float* __restrict__ sub,
                       float* __restrict__ asub, float* __restrict__ aseg) {
    pdl_trigger();  // first kernel of the pass: launched plainly, after everything before it
    __shared__ Shared3 sh[2];
    Tile q = tile_pair(T, C);
    float w[2] = {q.lane_ok ? -expf(td[q.c]) : 0.f, q.lane_ok ? -expf(td[q.c + 1]) : 0.f};
    float u[2] = {q.lane_ok ? tf[q.c] : 0.f, q.lane_ok ? tf[q.c + 1] : 0.f};
    bf2 k[SUB], v[SUB], gy[SUB];
    St r[2] = {{0.f, 0.f, G_ONE}, {0.f, 0.f, G_ONE}};
    St s[2];
    float p_start[2], p_next[2];
    bool next_stored = EXACT_DECAY && q.n > 0 && q.sub + 1 < nsub;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        s[h] = q.n > 0 ? load3(sub, q.sub, nsub, q.b, q.c + h, C) : St{0.f, 0.f, EMPTY};
        p_start[h] = s[h].p;
        p_next[h] = next_stored ? sub[chunk_idx(q.b, q.sub + 1, nsub, 2, 3, q.c + h, C)] : 0.f;
    }
    if (q.n == SUB) {
        load_pairs<true>(k_, q, C, k);
        load_pairs<true>(v_, q, C, v);
        load_pairs<true>(gy_, q, C, gy);
        r[0] = adjoint_half<true, 0>(q.n, s[0], w[0], u[0], k, v, gy);
        r[1] = adjoint_half<true, 1>(q.n, s[1], w[1], u[1], k, v, gy);
    } else if (q.n > 0) {
        load_pairs<false>(k_, q, C, k);
        load_pairs<false>(v_, q, C, v);
        load_pairs<false>(gy_, q, C, gy);
        r[0] = adjoint_half<false, 0>(q.n, s[0], w[0], u[0], k, v, gy);
        r[1] = adjoint_half<false, 1>(q.n, s[1], w[1], u[1], k, v, gy);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (EXACT_DECAY && q.n > 0)  // g - 1 from the exponents, in one rounding
            r[h].p = decay_m1(fmaf(static_cast<float>(q.n), w[h], p_start[h] - (next_stored ? p_next[h] : s[h].p)));
        if (q.n > 0) store3(asub, q.sub, nsub, q.b, q.c + h, C, r[h]);
        sh[h].put(q.m, r[h]);
    }
    __syncthreads();
    if (q.m < 2 && q.lane_ok && q.seg > 0) {  // segment 0's summary is never needed
        const int h = q.m;  // row h combines channel c + h
        St acc{0.f, 0.f, G_ONE};
        for (int m = SUBS - 1; m >= 0; --m) acc = adj_compose(sh[h].get(m), acc);
        store3(aseg, q.seg, nseg, q.b, q.c + h, C, acc);
    }
}

// Backward 3, paired (see bwd_gradients). The two channels walk one after the other
// (the stash holds one channel's steps), channel 0 keeping its bf16 results for the paired stores.
__global__ void __launch_bounds__(LANES* SUBS, WKV_PAIR_BWD_MIN_BLOCKS)
    bwd_gradients_pair(int T, int C, int nseg, int nsub, const float* __restrict__ td, const float* __restrict__ tf,
                       const __nv_bfloat16* __restrict__ k_, const __nv_bfloat16* __restrict__ v_,
                       const __nv_bfloat16* __restrict__ gy_, const float* __restrict__ sub,
                       const float* __restrict__ asub, const float* __restrict__ aseg, const int* __restrict__ argmax,
                       const float* __restrict__ aa0, const float* __restrict__ bb0, const float* __restrict__ aa1,
                       const float* __restrict__ bb1, const float* __restrict__ gaa1, const float* __restrict__ gbb1,
                       const float* __restrict__ gpp1, __nv_bfloat16* __restrict__ gk_,
                       __nv_bfloat16* __restrict__ gv_, float* __restrict__ part, float* __restrict__ gaa0,
                       float* __restrict__ gbb0, float* __restrict__ gpp0) {
    __shared__ Shared3 sh[2];
    extern __shared__ float stash_mem[];
    Tile q = tile_pair(T, C);
    float w[2] = {q.lane_ok ? -expf(td[q.c]) : 0.f, q.lane_ok ? -expf(td[q.c + 1]) : 0.f};
    float u[2] = {q.lane_ok ? tf[q.c] : 0.f, q.lane_ok ? tf[q.c + 1] : 0.f};
    bf2 k[SUB], v[SUB], gy[SUB];
    pdl_trigger();
    load_pairs(k_, q, C, k);
    load_pairs(v_, q, C, v);
    load_pairs(gy_, q, C, gy);
    pdl_wait();  // the adjoint summaries and scan kernels' results, from here on
#pragma unroll
    for (int h = 0; h < 2; ++h)
        sh[h].put(q.m, q.n > 0 ? load3(asub, q.sub, nsub, q.b, q.c + h, C) : St{0.f, 0.f, G_ONE});
    __syncthreads();
    if (q.m < 2 && q.lane_ok) {
        const int h = q.m;  // row h scans channel c + h
        St acc = load3(aseg, q.seg, nseg, q.b, q.c + h, C);
        for (int m = SUBS - 1; m >= 0; --m) {
            St x = sh[h].get(m);
            sh[h].put(m, acc);
            acc = {adj_apply(acc.a, x.a, x.p), adj_apply(acc.b, x.b, x.p), 0.f};
        }
    }
    __syncthreads();
    GradAcc acc[2] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    if (q.n > 0) {
        bf2 held[SUB];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            St s = load3(sub, q.sub, nsub, q.b, q.c + h, C);
            St adj = sh[h].get(q.m);
            size_t lane = static_cast<size_t>(q.b) * C + q.c + h;
            int am = argmax[lane];
            bool path_here = (am >= q.t0 && am < q.t0 + q.n) || (am < 0 && q.t0 == 0);
            float gpath = 0.f;
            if (path_here) gpath = gpp1[lane] - gaa1[lane] * aa1[lane] - gbb1[lane] * bb1[lane];
            Stash stash{stash_mem};
            if (h == 0)
                acc[h] = q.n == SUB ? gradient_half<true, 0>(q, s, w[h], u[h], k, v, gy, adj.a, adj.b, am, gpath, gk_,
                                                             gv_, C, stash, held)
                                    : gradient_half<false, 0>(q, s, w[h], u[h], k, v, gy, adj.a, adj.b, am, gpath,
                                                              gk_, gv_, C, stash, held);
            else
                acc[h] = q.n == SUB ? gradient_half<true, 1>(q, s, w[h], u[h], k, v, gy, adj.a, adj.b, am, gpath, gk_,
                                                             gv_, C, stash, held)
                                    : gradient_half<false, 1>(q, s, w[h], u[h], k, v, gy, adj.a, adj.b, am, gpath,
                                                              gk_, gv_, C, stash, held);
            if (path_here) acc[h].gw += (am < 0 ? static_cast<float>(T) : static_cast<float>(T - 1 - am)) * gpath;
            if (q.t0 == 0) {
                gaa0[lane] = acc[h].al;
                gbb0[lane] = acc[h].be;
                gpp0[lane] = acc[h].al * aa0[lane] + acc[h].be * bb0[lane] + (am < 0 ? gpath : 0.f);
            }
        }
    }
    __syncthreads();  // the scan results in sh are consumed; reuse it for the partial sums
#pragma unroll
    for (int h = 0; h < 2; ++h) sh[h].put(q.m, {acc[h].gw, acc[h].gu, 0.f});
    __syncthreads();
    if (q.m < 2 && q.lane_ok) {
        const int h = q.m;  // row h sums channel c + h, in the default's order
        float sw = 0.f, su = 0.f;
        for (int m = 0; m < SUBS; ++m) {
            St x = sh[h].get(m);
            sw += x.a;
            su += x.b;
        }
        part[chunk_idx(q.b, q.seg, nseg, 0, 2, q.c + h, C)] = sw;
        part[chunk_idx(q.b, q.seg, nseg, 1, 2, q.c + h, C)] = su;
    }
}
#endif  // WKV_PAIRS

// ---------------------------------------------------------------------------------------------
// Sequential path (WKV_SEQ_MIN_LANES_PER_SM): when the B*C lanes alone fill the GPU, one thread walks
// its lane's whole sequence tile by tile, carrying the state (forward) or the adjoint (backward) in
// registers. k, v (gy) are then read once per pass instead of twice, no summary is computed or
// scanned, and a pass is one kernel (the backward plus its time_* reduction). The tiles, the walks
// and the kept workspaces are the parallel kernels': `sub` holds the state at every tile start and
// `lastwin` the last k win per segment, so either backward can follow either forward. Threads of a
// block own consecutive lanes of the flattened [B, C] (pairs: consecutive channel pairs), so a warp's
// access to one step is contiguous over c.

constexpr int SEQ_ROWS = WKV_SEQ_ROWS;  // blockDim.y of the sequential kernels (blockDim.x = LANES)
using SeqStash = StashRows<SEQ_ROWS>;
constexpr int SEQ_STASH_BYTES = SUB * STASH_COMPS * LANES * SEQ_ROWS * sizeof(float);

// Tile i (SUB steps from i * SUB) of lane (b, c).
__device__ __forceinline__ Tile seq_tile(int b, int c, int T, int C, int i) {
    Tile r;
    r.b = b;
    r.c = c;
    r.sub = i;
    r.seg = i / SUBS;
    r.m = i - r.seg * SUBS;
    r.t0 = i * SUB;
    r.lane_ok = true;
    r.n = min(SUB, T - r.t0);
    r.base = (static_cast<size_t>(b) * T + r.t0) * C + c;
    return r;
}

// The thread's first channel as a flat [B, C] index, or -1 past the end; `per` channels per thread.
__device__ __forceinline__ long long seq_lane(int B, int C, int per) {
    long long t = static_cast<long long>(blockIdx.x) * (LANES * SEQ_ROWS) + threadIdx.y * LANES + threadIdx.x;
    return t < static_cast<long long>(B) * (C / per) ? t * per : -1;
}

// The arg-max step of the lane's pp_T from the forward's per-segment last wins: the latest win, -1
// for the input pp. Loads go in batches, so a lane without wins does not wait nseg round trips.
__device__ __forceinline__ int seq_argmax(const int* __restrict__ lastwin, int b, int c, int C, int nseg) {
    const int* win = lastwin + static_cast<size_t>(b) * nseg * C + c;
    int am = -1;
    for (int g1 = nseg; g1 > 0 && am < 0; g1 -= SCAN_BATCH) {
        int x[SCAN_BATCH];
#pragma unroll
        for (int i = 0; i < SCAN_BATCH; ++i) x[i] = g1 - 1 - i >= 0 ? win[static_cast<size_t>(g1 - 1 - i) * C] : -1;
#pragma unroll
        for (int i = 0; i < SCAN_BATCH; ++i)
            if (am < 0) am = x[i];
    }
    return am;
}

// Per-lane backward bookkeeping across tiles: the carried adjoint, the pp_T path, the time_* sums
// (in double across tiles: thousands of tile sums per lane).
struct SeqAdjoint {
    float al, be, gpath;
    int am;
    double gw, gu;
};

__device__ __forceinline__ SeqAdjoint seq_adjoint_start(size_t lane, int b, int c, int C, int T, int nseg,
                                                        const int* __restrict__ lastwin,
                                                        const float* __restrict__ aa1, const float* __restrict__ bb1,
                                                        const float* __restrict__ gaa1, const float* __restrict__ gbb1,
                                                        const float* __restrict__ gpp1) {
    SeqAdjoint r;
    r.am = seq_argmax(lastwin, b, c, C, nseg);  // the gradient of pp_T goes to step am (-1: the input pp)
    r.gpath = gpp1[lane] - gaa1[lane] * aa1[lane] - gbb1[lane] * bb1[lane];
    r.al = gaa1[lane];  // alpha_T = dL/daa_T since a_T = aa_T e^(pp_T)
    r.be = gbb1[lane];
    r.gw = (r.am < 0 ? static_cast<double>(T) : static_cast<double>(T - 1 - r.am)) * r.gpath;
    r.gu = 0.0;
    return r;
}

__device__ __forceinline__ void seq_adjoint_add(SeqAdjoint& r, const GradAcc& acc) {
    r.al = acc.al;
    r.be = acc.be;
    r.gw += acc.gw;
    r.gu += acc.gu;
}

// The input-state gradient and the lane's time_* partials, [B][1][2][C] (bwd_reduce with nseg 1).
__device__ __forceinline__ void seq_adjoint_finish(const SeqAdjoint& r, size_t lane, int b, int c, int C,
                                                   const float* __restrict__ aa0, const float* __restrict__ bb0,
                                                   float* __restrict__ gaa0, float* __restrict__ gbb0,
                                                   float* __restrict__ gpp0, float* __restrict__ part) {
    gaa0[lane] = r.al;
    gbb0[lane] = r.be;
    gpp0[lane] = r.al * aa0[lane] + r.be * bb0[lane] + (r.am < 0 ? r.gpath : 0.f);
    part[(static_cast<size_t>(b) * 2 + 0) * C + c] = static_cast<float>(r.gw);
    part[(static_cast<size_t>(b) * 2 + 1) * C + c] = static_cast<float>(r.gu);
}

template <bool FULL, typename F>
__device__ __forceinline__ int seq_forward_tile(const Tile& q, St& s, Anchor& an, float w, float u,
                                                const F* __restrict__ k_, const F* __restrict__ v_,
                                                F* __restrict__ y_, int C) {
    float k[SUB], v[SUB];
    load_steps<FULL>(k_, q, C, k);
    load_steps<FULL>(v_, q, C, v);
    return output_walk<FULL>(q, s, an, w, u, k, v, y_, C);
}

template <typename F>
__global__ void __launch_bounds__(LANES* SEQ_ROWS, WKV_SEQ_FWD_MIN_BLOCKS)
    fwd_sequential(int B, int T, int C, int nseg, int nsub, const float* __restrict__ td,
                   const float* __restrict__ tf, const F* __restrict__ k_, const F* __restrict__ v_,
                   F* __restrict__ y_, float* __restrict__ sub, int* __restrict__ lastwin, float* __restrict__ aa1,
                   float* __restrict__ bb1, float* __restrict__ pp1, const float* __restrict__ aa0,
                   const float* __restrict__ bb0, const float* __restrict__ pp0) {
    long long lane = seq_lane(B, C, 1);
    if (lane < 0) return;  // no barriers below
    int b = static_cast<int>(lane / C), c = static_cast<int>(lane - static_cast<long long>(b) * C);
    float w = -expf(td[c]), u = tf[c];
    St s{aa0[lane], bb0[lane], pp0[lane]};
    Anchor an(s.p);  // carried across tiles: pp stays one rounding from the last k win
    int best = -1;
    for (int i = 0; i < nsub; ++i) {
        Tile q = seq_tile(b, c, T, C, i);
        store3(sub, i, nsub, b, c, C, s);
        int win = q.n == SUB ? seq_forward_tile<true>(q, s, an, w, u, k_, v_, y_, C)
                             : seq_forward_tile<false>(q, s, an, w, u, k_, v_, y_, C);
        best = max(best, win);
        if (q.m == SUBS - 1 || i == nsub - 1) {
            lastwin[(static_cast<size_t>(b) * nseg + q.seg) * C + c] = best;
            best = -1;
        }
    }
    aa1[lane] = s.a;
    bb1[lane] = s.b;
    pp1[lane] = s.p;
}

template <bool FULL, typename F>
__device__ __forceinline__ GradAcc seq_backward_tile(const Tile& q, St s, float w, float u, const SeqAdjoint& r,
                                                     const F* __restrict__ k_, const F* __restrict__ v_,
                                                     const F* __restrict__ gy_, F* __restrict__ gk_,
                                                     F* __restrict__ gv_, int C) {
    extern __shared__ float stash_mem[];
    float k[SUB], v[SUB], gy[SUB];
    load_steps<FULL>(k_, q, C, k);
    load_steps<FULL>(v_, q, C, v);
    load_steps<FULL>(gy_, q, C, gy);
    return gradient_walk<FULL>(q, s, w, u, k, v, gy, r.al, r.be, r.am, r.gpath, gk_, gv_, C, SeqStash{stash_mem});
}

template <typename F>
__global__ void __launch_bounds__(LANES* SEQ_ROWS, WKV_SEQ_BWD_MIN_BLOCKS)
    bwd_sequential(int B, int T, int C, int nseg, int nsub, const float* __restrict__ td,
                   const float* __restrict__ tf, const F* __restrict__ k_, const F* __restrict__ v_,
                   const F* __restrict__ gy_, const float* __restrict__ sub, const int* __restrict__ lastwin,
                   const float* __restrict__ aa0, const float* __restrict__ bb0, const float* __restrict__ aa1,
                   const float* __restrict__ bb1, const float* __restrict__ gaa1, const float* __restrict__ gbb1,
                   const float* __restrict__ gpp1, F* __restrict__ gk_, F* __restrict__ gv_, float* __restrict__ part,
                   float* __restrict__ gaa0, float* __restrict__ gbb0, float* __restrict__ gpp0) {
    pdl_trigger();  // the reduction may launch; it waits for this kernel before reading `part`
    long long lane = seq_lane(B, C, 1);
    if (lane < 0) return;  // no barriers below (the stash is per thread)
    int b = static_cast<int>(lane / C), c = static_cast<int>(lane - static_cast<long long>(b) * C);
    float w = -expf(td[c]), u = tf[c];
    SeqAdjoint r = seq_adjoint_start(lane, b, c, C, T, nseg, lastwin, aa1, bb1, gaa1, gbb1, gpp1);
    for (int i = nsub - 1; i >= 0; --i) {
        Tile q = seq_tile(b, c, T, C, i);
        St s = load3(sub, i, nsub, b, c, C);
        seq_adjoint_add(r, q.n == SUB ? seq_backward_tile<true>(q, s, w, u, r, k_, v_, gy_, gk_, gv_, C)
                                      : seq_backward_tile<false>(q, s, w, u, r, k_, v_, gy_, gk_, gv_, C));
    }
    seq_adjoint_finish(r, lane, b, c, C, aa0, bb0, gaa0, gbb0, gpp0, part);
}

#if WKV_PAIRS
// The same for bf16 channel pairs (the paired kernels' walks).
template <bool FULL>
__device__ __forceinline__ void seq_forward_tile_pair(const Tile& q, St (&s)[2], Anchor (&an)[2], const float (&w)[2],
                                                      const float (&u)[2], const __nv_bfloat16* __restrict__ k_,
                                                      const __nv_bfloat16* __restrict__ v_,
                                                      __nv_bfloat16* __restrict__ y_, int C, int (&best)[2]) {
    bf2 k[SUB], v[SUB];
    load_pairs<FULL>(k_, q, C, k);
    load_pairs<FULL>(v_, q, C, v);
    output_walk_pair<FULL>(q, s, an[0], an[1], w, u, k, v, y_, C, best);  // sets best[h] to each later win
}

__global__ void __launch_bounds__(LANES* SEQ_ROWS, WKV_SEQ_PAIR_FWD_MIN_BLOCKS)
    fwd_sequential_pair(int B, int T, int C, int nseg, int nsub, const float* __restrict__ td,
                        const float* __restrict__ tf, const __nv_bfloat16* __restrict__ k_,
                        const __nv_bfloat16* __restrict__ v_, __nv_bfloat16* __restrict__ y_,
                        float* __restrict__ sub, int* __restrict__ lastwin, float* __restrict__ aa1,
                        float* __restrict__ bb1, float* __restrict__ pp1, const float* __restrict__ aa0,
                        const float* __restrict__ bb0, const float* __restrict__ pp0) {
    long long lane = seq_lane(B, C, 2);
    if (lane < 0) return;  // no barriers below
    int b = static_cast<int>(lane / C), c = static_cast<int>(lane - static_cast<long long>(b) * C);
    float w[2] = {-expf(td[c]), -expf(td[c + 1])}, u[2] = {tf[c], tf[c + 1]};
    St s[2] = {{aa0[lane], bb0[lane], pp0[lane]}, {aa0[lane + 1], bb0[lane + 1], pp0[lane + 1]}};
    Anchor an[2] = {Anchor(s[0].p), Anchor(s[1].p)};
    int best[2] = {-1, -1};
    for (int i = 0; i < nsub; ++i) {
        Tile q = seq_tile(b, c, T, C, i);
        store3(sub, i, nsub, b, c, C, s[0]);
        store3(sub, i, nsub, b, c + 1, C, s[1]);
        if (q.n == SUB)
            seq_forward_tile_pair<true>(q, s, an, w, u, k_, v_, y_, C, best);
        else
            seq_forward_tile_pair<false>(q, s, an, w, u, k_, v_, y_, C, best);
        if (q.m == SUBS - 1 || i == nsub - 1) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                lastwin[(static_cast<size_t>(b) * nseg + q.seg) * C + c + h] = best[h];
                best[h] = -1;
            }
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        aa1[lane + h] = s[h].a;
        bb1[lane + h] = s[h].b;
        pp1[lane + h] = s[h].p;
    }
}

// Channel 0 walks first and holds its bf16 (gk, gv) per step; channel 1 then stores both as pairs.
template <bool FULL>
__device__ __forceinline__ void seq_backward_tile_pair(const Tile& q, const St (&s)[2], const float (&w)[2],
                                                       const float (&u)[2], SeqAdjoint (&r)[2],
                                                       const __nv_bfloat16* __restrict__ k_,
                                                       const __nv_bfloat16* __restrict__ v_,
                                                       const __nv_bfloat16* __restrict__ gy_,
                                                       __nv_bfloat16* __restrict__ gk_,
                                                       __nv_bfloat16* __restrict__ gv_, int C) {
    extern __shared__ float stash_mem[];
    bf2 k[SUB], v[SUB], gy[SUB], held[SUB];
    load_pairs<FULL>(k_, q, C, k);
    load_pairs<FULL>(v_, q, C, v);
    load_pairs<FULL>(gy_, q, C, gy);
    seq_adjoint_add(r[0], gradient_half<FULL, 0>(q, s[0], w[0], u[0], k, v, gy, r[0].al, r[0].be, r[0].am,
                                                 r[0].gpath, gk_, gv_, C, SeqStash{stash_mem}, held));
    seq_adjoint_add(r[1], gradient_half<FULL, 1>(q, s[1], w[1], u[1], k, v, gy, r[1].al, r[1].be, r[1].am,
                                                 r[1].gpath, gk_, gv_, C, SeqStash{stash_mem}, held));
}

__global__ void __launch_bounds__(LANES* SEQ_ROWS, WKV_SEQ_PAIR_BWD_MIN_BLOCKS)
    bwd_sequential_pair(int B, int T, int C, int nseg, int nsub, const float* __restrict__ td,
                        const float* __restrict__ tf, const __nv_bfloat16* __restrict__ k_,
                        const __nv_bfloat16* __restrict__ v_, const __nv_bfloat16* __restrict__ gy_,
                        const float* __restrict__ sub, const int* __restrict__ lastwin, const float* __restrict__ aa0,
                        const float* __restrict__ bb0, const float* __restrict__ aa1, const float* __restrict__ bb1,
                        const float* __restrict__ gaa1, const float* __restrict__ gbb1,
                        const float* __restrict__ gpp1, __nv_bfloat16* __restrict__ gk_,
                        __nv_bfloat16* __restrict__ gv_, float* __restrict__ part, float* __restrict__ gaa0,
                        float* __restrict__ gbb0, float* __restrict__ gpp0) {
    pdl_trigger();  // the reduction may launch; it waits for this kernel before reading `part`
    long long lane = seq_lane(B, C, 2);
    if (lane < 0) return;  // no barriers below (the stash is per thread)
    int b = static_cast<int>(lane / C), c = static_cast<int>(lane - static_cast<long long>(b) * C);
    float w[2] = {-expf(td[c]), -expf(td[c + 1])}, u[2] = {tf[c], tf[c + 1]};
    SeqAdjoint r[2] = {seq_adjoint_start(lane, b, c, C, T, nseg, lastwin, aa1, bb1, gaa1, gbb1, gpp1),
                       seq_adjoint_start(lane + 1, b, c + 1, C, T, nseg, lastwin, aa1, bb1, gaa1, gbb1, gpp1)};
    for (int i = nsub - 1; i >= 0; --i) {
        Tile q = seq_tile(b, c, T, C, i);
        St s[2] = {load3(sub, i, nsub, b, c, C), load3(sub, i, nsub, b, c + 1, C)};
        if (q.n == SUB)
            seq_backward_tile_pair<true>(q, s, w, u, r, k_, v_, gy_, gk_, gv_, C);
        else
            seq_backward_tile_pair<false>(q, s, w, u, r, k_, v_, gy_, gk_, gv_, C);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) seq_adjoint_finish(r[h], lane + h, b, c + h, C, aa0, bb0, gaa0, gbb0, gpp0, part);
}
#endif  // WKV_PAIRS

// ---------------------------------------------------------------------------------------------
// Single-pass backward (WKV_SINGLE_BWD): bwd_summaries, the reverse segment scan and bwd_gradients
// as one kernel. A block computes its segment's adjoint summary from the k, v, gy it holds in
// registers, publishes it, composes the adjoint at its segment's end from what the blocks of later
// segments published, and goes on to the gradients without reading k, v, gy again; the forward
// recompute of its adjoint walk stays in the stash for the gradient walk, so each tile is walked
// forward once instead of twice (the saving that counts: at small shapes arithmetic, not bytes,
// limits these kernels; docs/benchmarks.md, WKV run 10).
//
// Blocks take tickets in launch order (an atomic counter), and ticket order is reverse segment
// order: a block waits only on blocks with earlier tickets, which are resident or done, so the waits
// cannot deadlock whatever order the hardware starts blocks in. Deterministic: segments form groups
// of `group` consecutive segments counted from the end; a block folds, from the adjoint published by
// the group after its own (the adjoint at that group's start) or from the output-state gradient, the
// summaries of its group's later segments, latest first. That is bwd_segment_scan's fold with one row, in
// the same order, whatever the timing. The chain between groups has nseg / group links; a block's waits for
// the records it folds overlap (one thread polls each).
//
// counters (the binding's zeroed per-stream buffer): [0] ticket, [1] arrival, [2...] one ready flag
// per (batch, segment, channel block). The last block to finish zeroes them for the next launch.
constexpr int SP_HEADER = 2;
__device__ __forceinline__ int ceil_div_dev(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ int load_acquire(const int* p) {
    int x;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(x) : "l"(p) : "memory");
    return x;
}
__device__ __forceinline__ void store_release(int* p, int x) {
    asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(x) : "memory");
}
// Every thread calls this (barrier): returns once the records [lo, hi) are published, polled by one
// thread each (hi - lo <= threads in the block), so the waits overlap instead of a round trip each.
// The barrier orders every thread's later loads (through L2: load3_cg) after the acquiring loads.
__device__ __forceinline__ void wait_published(const int* flags, int stride, int lo, int hi) {
    int i = lo + threadIdx.y * blockDim.x + threadIdx.x;
    if (i < hi)
        while (load_acquire(flags + static_cast<size_t>(i) * stride) == 0) {
        }
    __syncthreads();
}

// This block's (segment, channel block, batch): ticket order walks segments slowest, from the last,
// so every block a block waits on took its ticket earlier.
struct Ticket {
    int seg, cb, b;
};
__device__ __forceinline__ Ticket take_ticket(int* counter, int nseg, int cblocks, int B) {
    __shared__ int ticket;
    if (threadIdx.x == 0 && threadIdx.y == 0) ticket = atomicAdd(counter, 1);
    __syncthreads();
    int per_seg = cblocks * B;
    int s = ticket / per_seg, r = ticket - s * per_seg;
    return {nseg - 1 - s, r % cblocks, r / cblocks};
}

// Barrier, then one thread releases the block's published values (the grid-sync pattern).
__device__ __forceinline__ void publish(int* flag) {
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        __threadfence();
        store_release(flag, 1);
    }
}

// After the block's last global access to `counters`: the last block to get here zeroes the flags
// and the ticket (last_block_arrives zeroes the arrival count).
__device__ __forceinline__ void sp_finish(int* counters, int nflags) {
    int total = gridDim.x;
    if (last_block_arrives(counters + 1, total)) {
        for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < nflags; i += blockDim.x * blockDim.y)
            counters[SP_HEADER + i] = 0;
        if (threadIdx.x == 0 && threadIdx.y == 0) counters[0] = 0;
    }
}

// The single-pass backward (the time_* reduction stays its own kernel). `aseg` slot j holds segment
// j's adjoint summary, or, for the last segment of a group (the earliest in time: groups count from
// the end), the adjoint at its start.
template <typename F>
__global__ void __launch_bounds__(LANES* SUBS, WKV_SP_BWD_MIN_BLOCKS)
    bwd_single(int B, int T, int C, int nseg, int nsub, int group, const float* __restrict__ td,
               const float* __restrict__ tf, const F* __restrict__ k_, const F* __restrict__ v_,
               const F* __restrict__ gy_, const float* __restrict__ sub, const int* __restrict__ lastwin,
               float* aseg, const float* __restrict__ aa0, const float* __restrict__ bb0,
               const float* __restrict__ aa1, const float* __restrict__ bb1, const float* __restrict__ gaa1,
               const float* __restrict__ gbb1, const float* __restrict__ gpp1, F* __restrict__ gk_,
               F* __restrict__ gv_, float* __restrict__ part, float* __restrict__ gaa0, float* __restrict__ gbb0,
               float* __restrict__ gpp0, int* counters) {
    __shared__ Shared3 sh;
    __shared__ int arg_max[LANES];
    extern __shared__ float stash_mem[];
    const int cblocks = ceil_div_dev(C, LANES);
    Ticket tk = take_ticket(counters, nseg, cblocks, B);
    pdl_trigger();  // the reduction may launch; it waits for this kernel before reading `part`
    Tile q = tile_at(T, C, tk.seg, tk.cb, tk.b);
    int* flags = counters + SP_HEADER + static_cast<size_t>(q.b) * nseg * cblocks + tk.cb;
    const size_t lane = static_cast<size_t>(q.b) * C + q.c;
    float w = q.lane_ok ? -expf(td[q.c]) : 0.f;
    float u = q.lane_ok ? tf[q.c] : 0.f;
    if (q.m == 0) arg_max[threadIdx.x] = q.lane_ok ? seq_argmax(lastwin, q.b, q.c, C, nseg) : -1;
    float k[SUB], v[SUB], gy[SUB];
    St r{0.f, 0.f, G_ONE};  // as in bwd_summaries
    St s = q.n > 0 ? load3(sub, q.sub, nsub, q.b, q.c, C) : St{0.f, 0.f, EMPTY};
    float p_start = s.p;
    bool next_stored = EXACT_DECAY && q.n > 0 && q.sub + 1 < nsub;
    float p_next = next_stored ? sub[chunk_idx(q.b, q.sub + 1, nsub, 2, 3, q.c, C)] : 0.f;
    if (q.n == SUB) {
        load_steps<true>(k_, q, C, k);
        load_steps<true>(v_, q, C, v);
        load_steps<true>(gy_, q, C, gy);
        r = adjoint_walk<true, true>(q.n, s, w, u, k, v, gy, {stash_mem});
    } else if (q.n > 0) {
        load_steps<false>(k_, q, C, k);
        load_steps<false>(v_, q, C, v);
        load_steps<false>(gy_, q, C, gy);
        r = adjoint_walk<false, true>(q.n, s, w, u, k, v, gy, {stash_mem});
    }
    const float p_end = s.p;
    if (EXACT_DECAY && q.n > 0) r.p = decay_m1(fmaf(static_cast<float>(q.n), w, p_start - (next_stored ? p_next : s.p)));
    sh.put(q.m, r);
    __syncthreads();
    const int rank = nseg - 1 - q.seg;            // position from the end
    const int first = nseg - 1 - (rank - rank % group);  // this group's first segment (the latest in time)
    const bool closes_group = rank % group == group - 1;
    const bool needed = q.seg > 0;  // segment 0's summary is never needed
    St own{0.f, 0.f, G_ONE};
    if (q.m == 0 && q.lane_ok) {
        for (int m = SUBS - 1; m >= 0; --m) own = adj_compose(sh.get(m), own);
        if (needed && !closes_group) store3(aseg, q.seg, nseg, q.b, q.c, C, own);
    }
    if (needed && !closes_group) publish(flags + static_cast<size_t>(q.seg) * cblocks);
    wait_published(flags, cblocks, q.seg + 1, first + 1 < nseg ? first + 2 : nseg);
    float al = 0.f, be = 0.f;  // row 0: the adjoint at this segment's end
    if (q.m == 0 && q.lane_ok) {
        if (first == nseg - 1) {
            al = gaa1[lane];
            be = gbb1[lane];
        } else {
            St x = load3_cg(aseg, first + 1, nseg, q.b, q.c, C);
            al = x.a;
            be = x.b;
        }
        for (int j = first; j > q.seg; --j) {  // one load at a time: batches of 4 spilled, and were no faster
            St x = load3_cg(aseg, j, nseg, q.b, q.c, C);
            al = adj_apply(al, x.a, x.p);
            be = adj_apply(be, x.b, x.p);
        }
        if (needed && closes_group)
            store3(aseg, q.seg, nseg, q.b, q.c, C, {adj_apply(al, own.a, own.p), adj_apply(be, own.b, own.p), 0.f});
    }
    if (needed && closes_group) publish(flags + static_cast<size_t>(q.seg) * cblocks);
    if (q.m == 0 && q.lane_ok) {  // the sub-chunks' end adjoints, as bwd_gradients scans them
        St acc{al, be, 0.f};
        for (int m = SUBS - 1; m >= 0; --m) {
            St x = sh.get(m);
            sh.put(m, acc);
            acc = {adj_apply(acc.a, x.a, x.p), adj_apply(acc.b, x.b, x.p), 0.f};
        }
    }
    __syncthreads();
    GradAcc acc{0.f, 0.f, 0.f, 0.f};
    if (q.n > 0) {
        St adj = sh.get(q.m);
        int am = arg_max[threadIdx.x];
        bool path_here = (am >= q.t0 && am < q.t0 + q.n) || (am < 0 && q.t0 == 0);
        float gpath = 0.f;
        if (path_here) gpath = gpp1[lane] - gaa1[lane] * aa1[lane] - gbb1[lane] * bb1[lane];
        acc = q.n == SUB ? gradient_reverse<true, F, Stash>(q, p_end, w, u, k, v, gy, adj.a, adj.b, am, gpath, gk_,
                                                            gv_, C, {stash_mem})
                         : gradient_reverse<false, F, Stash>(q, p_end, w, u, k, v, gy, adj.a, adj.b, am, gpath, gk_,
                                                             gv_, C, {stash_mem});
        if (path_here) acc.gw += (am < 0 ? static_cast<float>(T) : static_cast<float>(T - 1 - am)) * gpath;
        if (q.t0 == 0) {
            gaa0[lane] = acc.al;
            gbb0[lane] = acc.be;
            gpp0[lane] = acc.al * aa0[lane] + acc.be * bb0[lane] + (am < 0 ? gpath : 0.f);
        }
    }
    // From here as bwd_gradients ends, copied: the same lines as a shared helper changed the address
    // arithmetic of bwd_gradients' default instances (their SASS, compared by cubin section here).
    __syncthreads();  // the scan results in sh are consumed; reuse it for the partial sums
    sh.put(q.m, {acc.gw, acc.gu, 0.f});
    __syncthreads();
    if (q.m == 0 && q.lane_ok) {
        float sw = 0.f, su = 0.f;
        for (int m = 0; m < SUBS; ++m) {
            St x = sh.get(m);
            sw += x.a;
            su += x.b;
        }
        part[chunk_idx(q.b, q.seg, nseg, 0, 2, q.c, C)] = sw;
        part[chunk_idx(q.b, q.seg, nseg, 1, 2, q.c, C)] = su;
    }
    sp_finish(counters, B * nseg * cblocks);
}

int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

// SMs of the current device (0 if it cannot be asked); cached per device, a benign race writes the
// same value.
// Rows of the segment scan kernels for nseg segments: a lane's chain is about 2 nseg / R + R applies,
// least at R = sqrt(2 nseg).
int scan_rows(int nseg) {
    if (nseg < WKV_SCAN_ROWS_MIN_SEG) return 1;
    int rows = static_cast<int>(sqrt(2.0 * nseg));
    return rows < 1 ? 1 : (rows > SCAN_MAX_ROWS ? SCAN_MAX_ROWS : rows);
}
dim3 scan_grid(int B, int C) { return dim3(static_cast<unsigned>(ceil_div(static_cast<long long>(B) * C, LANES))); }

int sm_count() {
    static int counts[64] = {};
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return 0;
    int& sms = counts[device & 63];
    if (sms == 0 && cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) sms = 0;
    return sms;
}

// Whether a call takes the sequential kernels (WKV_SEQ_MIN_LANES_PER_SM), and their bf16 pairs
// (WKV_SEQ_PAIR_MIN_LANES_PER_SM); forward and backward of one shape decide alike.
bool lanes_per_sm_at_least(int B, int C, long long per_sm) {
    return static_cast<long long>(B) * C >= per_sm * sm_count();
}
bool sequential(int B, int C) { return lanes_per_sm_at_least(B, C, WKV_SEQ_MIN_LANES_PER_SM); }
#if WKV_PAIRS
bool sequential_pairs(int B, int C) { return lanes_per_sm_at_least(B, C, WKV_SEQ_PAIR_MIN_LANES_PER_SM); }
#endif

// Launch `kernel`; `dependent` = a later kernel of a pass, launched as a programmatic dependent
// of the kernel before it when PDL is on (it calls pdl_wait() before reading that kernel's output).
template <typename... Params, typename... Args>
cudaError_t launch(bool dependent, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args... args) {
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = PDL && dependent ? 1 : 0;
    return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

template <typename F>
int forward_impl(int B, int T, int C, const float* td, const float* tf, const void* k, const void* v, const float* aa0,
                 const float* bb0, const float* pp0, void* y, float* aa1, float* bb1, float* pp1, float* sub,
                 int* lastwin, float* seg, cudaStream_t stream) {
    int nseg = ceil_div(T, SEG), nsub = ceil_div(T, SUB);
    dim3 grid(nseg, ceil_div(C, LANES), B), block(LANES, SUBS);
    const F* kk = static_cast<const F*>(k);
    const F* vv = static_cast<const F*>(v);
    cudaError_t err = launch(false, fwd_summaries<F>, grid, block, 0, stream, T, C, nseg, nsub, td, kk, vv, sub, seg);
    if (err == cudaSuccess)
        err = launch(true, fwd_segment_scan, scan_grid(B, C), dim3(LANES, scan_rows(nseg)), 0, stream,
                     B, C, nseg, td, aa0, bb0, pp0, seg);
    if (err == cudaSuccess)
        err = launch(true, fwd_outputs<F>, grid, block, 0, stream, T, C, nseg, nsub, td, tf, kk, vv,
                     static_cast<F*>(y), seg, sub, lastwin, aa1, bb1, pp1);
    return static_cast<int>(err != cudaSuccess ? err : cudaGetLastError());
}

// The stash plus the static shared memory pass the default 48 KiB per block: opt in, once per
// device and kernel (the attribute is per function and device; setting it on every call costs
// host time).
template <auto Kernel>
cudaError_t allow_stash(int bytes = STASH_BYTES) {
    static unsigned long long done_mask = 0;  // one bit per device; a race only repeats the call
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    unsigned long long bit = 1ull << (device & 63);
    if (__atomic_load_n(&done_mask, __ATOMIC_ACQUIRE) & bit) return cudaSuccess;
    err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err == cudaSuccess && device < 64) __atomic_fetch_or(&done_mask, bit, __ATOMIC_RELEASE);
    return err;
}

// Lookback group of the single-pass kernels (WKV_SP_GROUP): at most the block's threads, which poll
// one record each.
int sp_group(int nseg) {
    int g = WKV_SP_GROUP > 0 ? WKV_SP_GROUP : static_cast<int>(ceil(sqrt(static_cast<double>(nseg))));
    return g < 1 ? 1 : (g > LANES * SUBS ? LANES * SUBS : g);
}

template <typename F>
int backward_single_pass(int B, int T, int C, const float* td, const float* tf, const void* k, const void* v,
                         const void* gy, const float* aa0, const float* bb0, const float* aa1, const float* bb1,
                         const float* gaa1, const float* gbb1, const float* gpp1, const float* sub,
                         const int* lastwin, float* aseg, float* part, void* gk, void* gv, float* gtd, float* gtf,
                         float* gaa0, float* gbb0, float* gpp0, int* counters, cudaStream_t stream) {
    int nseg = ceil_div(T, SEG), nsub = ceil_div(T, SUB);
    dim3 grid(nseg * ceil_div(C, LANES) * B), block(LANES, SUBS);
    cudaError_t err = allow_stash<bwd_single<F>>();
    if (err == cudaSuccess)
        err = launch(false, bwd_single<F>, grid, block, static_cast<size_t>(STASH_BYTES), stream, B, T, C, nseg, nsub,
                     sp_group(nseg), td, tf, static_cast<const F*>(k), static_cast<const F*>(v),
                     static_cast<const F*>(gy), sub, lastwin, aseg, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1,
                     static_cast<F*>(gk), static_cast<F*>(gv), part, gaa0, gbb0, gpp0, counters);
    if (err == cudaSuccess)
        err = launch(true, bwd_reduce, dim3(ceil_div(C, LANES)), dim3(LANES, 8), 0, stream, B, C, nseg, td, part, gtd,
                     gtf);
    return static_cast<int>(err != cudaSuccess ? err : cudaGetLastError());
}

template <typename F>
int backward_impl(int B, int T, int C, const float* td, const float* tf, const void* k, const void* v, const void* gy,
                  const float* aa0, const float* bb0, const float* aa1, const float* bb1, const float* gaa1,
                  const float* gbb1, const float* gpp1, const float* sub, const int* lastwin, float* asub,
                  float* aseg, float* part, int* argmax, void* gk, void* gv, float* gtd, float* gtf, float* gaa0,
                  float* gbb0, float* gpp0, int* counters, cudaStream_t stream) {
    if (SINGLE_BWD)
        return backward_single_pass<F>(B, T, C, td, tf, k, v, gy, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1, sub, lastwin,
                                       aseg, part, gk, gv, gtd, gtf, gaa0, gbb0, gpp0, counters, stream);
    int nseg = ceil_div(T, SEG), nsub = ceil_div(T, SUB);
    dim3 grid(nseg, ceil_div(C, LANES), B), block(LANES, SUBS);
    const F* kk = static_cast<const F*>(k);
    const F* vv = static_cast<const F*>(v);
    const F* gg = static_cast<const F*>(gy);
    cudaError_t err = launch(false, bwd_summaries<F>, grid, block, 0, stream, T, C, nseg, nsub, td, tf, kk, vv, gg,
                             sub, asub, aseg);
    if (err == cudaSuccess)
        err = launch(true, bwd_segment_scan, scan_grid(B, C), dim3(LANES, scan_rows(nseg)), 0, stream,
                     B, C, nseg, gaa1, gbb1, lastwin, aseg, argmax);
    if (err == cudaSuccess) err = allow_stash<bwd_gradients<F>>();
    if (err == cudaSuccess)
        err = launch(true, bwd_gradients<F>, grid, block, static_cast<size_t>(STASH_BYTES), stream, T, C, nseg, nsub,
                     td, tf, kk, vv, gg, sub, asub, aseg, argmax, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1,
                     static_cast<F*>(gk), static_cast<F*>(gv), part, gaa0, gbb0, gpp0);
    if (err == cudaSuccess)
        err = launch(true, bwd_reduce, dim3(ceil_div(C, LANES)), dim3(LANES, 8), 0, stream, B, C, nseg, td, part, gtd,
                     gtf);
    return static_cast<int>(err != cudaSuccess ? err : cudaGetLastError());
}

#if WKV_PAIRS
// The paired kernels need C even and every bf16 [B, T, C] pointer 4-byte aligned (a contiguous
// view may start at an odd element); otherwise the launchers below fall back to the unpaired ones.
bool pairs_ok(int C, std::initializer_list<const void*> ptrs) {
    if (C % 2 != 0) return false;
    for (const void* p : ptrs)
        if (reinterpret_cast<uintptr_t>(p) % 4 != 0) return false;
    return true;
}

int forward_pairs(int B, int T, int C, const float* td, const float* tf, const void* k, const void* v,
                  const float* aa0, const float* bb0, const float* pp0, void* y, float* aa1, float* bb1, float* pp1,
                  float* sub, int* lastwin, float* seg, cudaStream_t stream) {
    int nseg = ceil_div(T, SEG), nsub = ceil_div(T, SUB);
    dim3 grid(nseg, ceil_div(C, 2 * LANES), B), block(LANES, SUBS);
    const __nv_bfloat16* kk = static_cast<const __nv_bfloat16*>(k);
    const __nv_bfloat16* vv = static_cast<const __nv_bfloat16*>(v);
    cudaError_t err = launch(false, fwd_summaries_pair, grid, block, 0, stream, T, C, nseg, nsub, td, kk, vv, sub, seg);
    if (err == cudaSuccess)
        err = launch(true, fwd_segment_scan, scan_grid(B, C), dim3(LANES, scan_rows(nseg)), 0, stream,
                     B, C, nseg, td, aa0, bb0, pp0, seg);
    if (err == cudaSuccess)
        err = launch(true, fwd_outputs_pair, grid, block, 0, stream, T, C, nseg, nsub, td, tf, kk, vv,
                     static_cast<__nv_bfloat16*>(y), seg, sub, lastwin, aa1, bb1, pp1);
    return static_cast<int>(err != cudaSuccess ? err : cudaGetLastError());
}

// Whether the backward's paired gradients kernel runs on this paired grid (WKV_PAIR_GRADIENTS_MIN_GRID).
bool paired_gradients(dim3 grid) {
    long long blocks = static_cast<long long>(grid.x) * grid.y * grid.z;
    return blocks >= static_cast<long long>(WKV_PAIR_GRADIENTS_MIN_GRID) * sm_count();
}

int backward_pairs(int B, int T, int C, const float* td, const float* tf, const void* k, const void* v,
                   const void* gy, const float* aa0, const float* bb0, const float* aa1, const float* bb1,
                   const float* gaa1, const float* gbb1, const float* gpp1, const float* sub, const int* lastwin,
                   float* asub, float* aseg, float* part, int* argmax, void* gk, void* gv, float* gtd, float* gtf,
                   float* gaa0, float* gbb0, float* gpp0, int* counters, cudaStream_t stream) {
    if (SINGLE_BWD_PAIRS)
        return backward_single_pass<__nv_bfloat16>(B, T, C, td, tf, k, v, gy, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1,
                                                   sub, lastwin, aseg, part, gk, gv, gtd, gtf, gaa0, gbb0, gpp0,
                                                   counters, stream);
    int nseg = ceil_div(T, SEG), nsub = ceil_div(T, SUB);
    dim3 grid(nseg, ceil_div(C, 2 * LANES), B), block(LANES, SUBS);
    const __nv_bfloat16* kk = static_cast<const __nv_bfloat16*>(k);
    const __nv_bfloat16* vv = static_cast<const __nv_bfloat16*>(v);
    const __nv_bfloat16* gg = static_cast<const __nv_bfloat16*>(gy);
    cudaError_t err = launch(false, bwd_summaries_pair, grid, block, 0, stream, T, C, nseg, nsub, td, tf, kk, vv, gg,
                             sub, asub, aseg);
    if (err == cudaSuccess)
        err = launch(true, bwd_segment_scan, scan_grid(B, C), dim3(LANES, scan_rows(nseg)), 0, stream,
                     B, C, nseg, gaa1, gbb1, lastwin, aseg, argmax);
    if (paired_gradients(grid)) {
        if (err == cudaSuccess) err = allow_stash<bwd_gradients_pair>();
        if (err == cudaSuccess)
            err = launch(true, bwd_gradients_pair, grid, block, static_cast<size_t>(STASH_BYTES), stream, T, C, nseg,
                         nsub, td, tf, kk, vv, gg, sub, asub, aseg, argmax, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1,
                         static_cast<__nv_bfloat16*>(gk), static_cast<__nv_bfloat16*>(gv), part, gaa0, gbb0, gpp0);
    } else {  // the unpaired kernel on its own grid (the workspaces are the same)
        if (err == cudaSuccess) err = allow_stash<bwd_gradients<__nv_bfloat16>>();
        if (err == cudaSuccess)
            err = launch(true, bwd_gradients<__nv_bfloat16>, dim3(nseg, ceil_div(C, LANES), B), block,
                         static_cast<size_t>(STASH_BYTES), stream, T, C, nseg, nsub, td, tf, kk, vv, gg, sub, asub,
                         aseg, argmax, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1, static_cast<__nv_bfloat16*>(gk),
                         static_cast<__nv_bfloat16*>(gv), part, gaa0, gbb0, gpp0);
    }
    if (err == cudaSuccess)
        err = launch(true, bwd_reduce, dim3(ceil_div(C, LANES)), dim3(LANES, 8), 0, stream, B, C, nseg, td, part, gtd,
                     gtf);
    return static_cast<int>(err != cudaSuccess ? err : cudaGetLastError());
}
#endif  // WKV_PAIRS

// The sequential kernels: one thread per lane, or per channel pair where the paired kernels may run
// (bf16, C even, aligned). dtype as wkv_forward's.
dim3 sequential_grid(int B, int C, int channels_per_thread) {
    return dim3(ceil_div(static_cast<long long>(B) * (C / channels_per_thread), LANES * SEQ_ROWS));
}

int forward_sequential(int dtype, int B, int T, int C, const float* td, const float* tf, const void* k,
                       const void* v, const float* aa0, const float* bb0, const float* pp0, void* y, float* aa1,
                       float* bb1, float* pp1, float* sub, int* lastwin, cudaStream_t stream) {
    int nseg = ceil_div(T, SEG), nsub = ceil_div(T, SUB);
    dim3 lanes = sequential_grid(B, C, 1), block(LANES, SEQ_ROWS);
    cudaError_t err;
    if (dtype == 0)
        err = launch(false, fwd_sequential<float>, lanes, block, 0, stream, B, T, C, nseg, nsub, td, tf, k, v, y, sub,
                     lastwin, aa1, bb1, pp1, aa0, bb0, pp0);
#if WKV_PAIRS
    else if (sequential_pairs(B, C) && pairs_ok(C, {k, v, y}))
        err = launch(false, fwd_sequential_pair, sequential_grid(B, C, 2), block, 0, stream, B, T, C, nseg, nsub, td,
                     tf, k, v, y, sub, lastwin, aa1, bb1, pp1, aa0, bb0, pp0);
#endif
    else
        err = launch(false, fwd_sequential<__nv_bfloat16>, lanes, block, 0, stream, B, T, C, nseg, nsub, td, tf, k, v,
                     y, sub, lastwin, aa1, bb1, pp1, aa0, bb0, pp0);
    return static_cast<int>(err != cudaSuccess ? err : cudaGetLastError());
}

// A sequential backward kernel, with the dynamic shared memory of its per-thread stash.
template <auto Kernel, typename... Args>
cudaError_t launch_sequential_backward(dim3 grid, cudaStream_t stream, Args... args) {
    cudaError_t err = allow_stash<Kernel>(SEQ_STASH_BYTES);
    if (err != cudaSuccess) return err;
    return launch(false, Kernel, grid, dim3(LANES, SEQ_ROWS), static_cast<size_t>(SEQ_STASH_BYTES), stream, args...);
}

int backward_sequential(int dtype, int B, int T, int C, const float* td, const float* tf, const void* k,
                        const void* v, const void* gy, const float* aa0, const float* bb0, const float* aa1,
                        const float* bb1, const float* gaa1, const float* gbb1, const float* gpp1, const float* sub,
                        const int* lastwin, float* part, void* gk, void* gv, float* gtd, float* gtf, float* gaa0,
                        float* gbb0, float* gpp0, cudaStream_t stream) {
    int nseg = ceil_div(T, SEG), nsub = ceil_div(T, SUB);
    dim3 lanes = sequential_grid(B, C, 1);
    cudaError_t err;
    if (dtype == 0)
        err = launch_sequential_backward<bwd_sequential<float>>(lanes, stream, B, T, C, nseg, nsub, td, tf, k, v, gy,
                                                                sub, lastwin, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1,
                                                                gk, gv, part, gaa0, gbb0, gpp0);
#if WKV_PAIRS
    else if (sequential_pairs(B, C) && pairs_ok(C, {k, v, gy, gk, gv}))
        err = launch_sequential_backward<bwd_sequential_pair>(sequential_grid(B, C, 2), stream, B, T, C, nseg, nsub,
                                                              td, tf, k, v, gy, sub, lastwin, aa0, bb0, aa1, bb1,
                                                              gaa1, gbb1, gpp1, gk, gv, part, gaa0, gbb0, gpp0);
#endif
    else
        err = launch_sequential_backward<bwd_sequential<__nv_bfloat16>>(lanes, stream, B, T, C, nseg, nsub, td, tf, k,
                                                                        v, gy, sub, lastwin, aa0, bb0, aa1, bb1, gaa1,
                                                                        gbb1, gpp1, gk, gv, part, gaa0, gbb0, gpp0);
    // One partial per lane: the reduction's "segments" are 1.
    if (err == cudaSuccess)
        err = launch(true, bwd_reduce, dim3(ceil_div(C, LANES)), dim3(LANES, 8), 0, stream, B, C, 1, td, part, gtd,
                     gtf);
    return static_cast<int>(err != cudaSuccess ? err : cudaGetLastError());
}

bool shape_ok(int B, int T, int C) {
    return B > 0 && T > 0 && C > 0 && B <= 65535 && ceil_div(C, LANES) <= 65535 &&
           static_cast<long long>(B) * C <= 0x7fffffffLL;
}

}  // namespace

extern "C" {

// Workspace sizes in elements. Per sub-chunk of SUB steps: [B][ceil(T/SUB)][3][C] floats; per
// segment of SEG steps: [B][ceil(T/SEG)][ncomp][C] (floats, or ints for ncomp = 1 lastwin).
long long wkv_sub_floats(int B, int T, int C) { return static_cast<long long>(B) * ceil_div(T, SUB) * 3 * C; }
long long wkv_segment_elems(int B, int T, int C, int ncomp) {
    return static_cast<long long>(B) * ceil_div(T, SEG) * ncomp * C;
}
// Counters (ints) the backward needs (the single-pass kernel's tickets and flags): zero before the
// first call; every launch leaves them zero again. Calls that may run at the same time need separate
// counters. 0 when this build has no single-pass backward (the pointer may be null).
long long wkv_counter_ints(int B, int T, int C) {
    return SINGLE_BWD ? SP_HEADER + static_cast<long long>(B) * ceil_div(T, SEG) * ceil_div(C, LANES) : 0;
}
// Steps per sub-chunk and per segment of this build (the workspace sizes above follow from them).
int wkv_sub_steps() { return SUB; }
int wkv_segment_steps() { return SEG; }

// dtype: 0 = float32, 1 = bfloat16 (k, v, y). Returns a cudaError_t value (0 = success), or -1
// for a bad shape or dtype. Workspaces: sub (sub floats) and lastwin (segment elems, ncomp 1,
// int) are kept for the backward; seg (segment elems, ncomp 3) is scratch.
int wkv_forward(int dtype, int B, int T, int C, const float* time_decay, const float* time_first, const void* k,
                const void* v, const float* aa0, const float* bb0, const float* pp0, void* y, float* aa1, float* bb1,
                float* pp1, float* sub, int* lastwin, float* seg, cudaStream_t stream) {
    if (!shape_ok(B, T, C) || (dtype != 0 && dtype != 1)) return -1;
    if (sequential(B, C))
        return forward_sequential(dtype, B, T, C, time_decay, time_first, k, v, aa0, bb0, pp0, y, aa1, bb1, pp1, sub,
                                  lastwin, stream);
    if (dtype == 0)
        return forward_impl<float>(B, T, C, time_decay, time_first, k, v, aa0, bb0, pp0, y, aa1, bb1, pp1, sub,
                                   lastwin, seg, stream);
#if WKV_PAIRS
    if (dtype == 1 && pairs_ok(C, {k, v, y}))
        return forward_pairs(B, T, C, time_decay, time_first, k, v, aa0, bb0, pp0, y, aa1, bb1, pp1, sub, lastwin, seg,
                             stream);
#endif
    if (dtype == 1)
        return forward_impl<__nv_bfloat16>(B, T, C, time_decay, time_first, k, v, aa0, bb0, pp0, y, aa1, bb1, pp1,
                                           sub, lastwin, seg, stream);
    return -1;
}

// Gradients for all inputs given gy and the gradient of the output state (gaa1, gbb1, gpp1).
// aa1, bb1 are the forward's output state; sub and lastwin the forward's kept workspaces.
// Scratch: asub (sub floats), aseg (segment elems, ncomp 3), part (ncomp 2), argmax (B*C ints).
int wkv_backward(int dtype, int B, int T, int C, const float* time_decay, const float* time_first, const void* k,
                 const void* v, const void* gy, const float* aa0, const float* bb0, const float* aa1, const float* bb1,
                 const float* gaa1, const float* gbb1, const float* gpp1, const float* sub, const int* lastwin,
                 float* asub, float* aseg, float* part, int* argmax, void* gk, void* gv, float* g_time_decay,
                 float* g_time_first, float* gaa0, float* gbb0, float* gpp0, int* counters, cudaStream_t stream) {
    if (!shape_ok(B, T, C) || (dtype != 0 && dtype != 1)) return -1;
    if (sequential(B, C))
        return backward_sequential(dtype, B, T, C, time_decay, time_first, k, v, gy, aa0, bb0, aa1, bb1, gaa1, gbb1,
                                   gpp1, sub, lastwin, part, gk, gv, g_time_decay, g_time_first, gaa0, gbb0, gpp0,
                                   stream);
    if (dtype == 0)
        return backward_impl<float>(B, T, C, time_decay, time_first, k, v, gy, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1,
                                    sub, lastwin, asub, aseg, part, argmax, gk, gv, g_time_decay, g_time_first, gaa0,
                                    gbb0, gpp0, counters, stream);
#if WKV_PAIRS
    if (dtype == 1 && pairs_ok(C, {k, v, gy, gk, gv}))
        return backward_pairs(B, T, C, time_decay, time_first, k, v, gy, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1, sub,
                              lastwin, asub, aseg, part, argmax, gk, gv, g_time_decay, g_time_first, gaa0, gbb0, gpp0,
                              counters, stream);
#endif
    if (dtype == 1)
        return backward_impl<__nv_bfloat16>(B, T, C, time_decay, time_first, k, v, gy, aa0, bb0, aa1, bb1, gaa1,
                                            gbb1, gpp1, sub, lastwin, asub, aseg, part, argmax, gk, gv, g_time_decay,
                                            g_time_first, gaa0, gbb0, gpp0, counters, stream);
    return -1;
}

}  // extern "C"
