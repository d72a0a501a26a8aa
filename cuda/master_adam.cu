// One pass of Adam / AdamW over bf16 weights with fp32 master weights and moments: the update of
// pipeline/optim.py MasterWeightAdam (kernel "cuda") for every parameter tensor in one launch.
//
// Per element, with the global-norm clip factor `clip` and the step count of the element's tensor:
//   g = bf16 gradient * clip, or exactly 0 when the step is skipped (a NaN gradient included)
//   Adam:  g += weight_decay * master                     (L2, as torch.optim.Adam)
//   AdamW: master *= 1 - lr * weight_decay                (decoupled, before the update, as torch.optim.AdamW)
//   m = m + (1 - beta1) (g - m)
//   v = beta2 v + (1 - beta2) g^2
//   master -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
//   weight = bf16(master)                                 (round to nearest even)
// A skipped step also runs at lr 0: the masters and weights stay, the moments decay one step (what the
// torch path does with zeroed gradients and a zero LR).
//
// The torch path reads and writes the fp32 state in five passes (gradients to fp32, skip mask, clip,
// fused Adam, masters back to bf16); this reads the bf16 gradient and the state once and writes the
// state and the bf16 weight once: about half the bytes.
//
// Tensors are cut into chunks of CHUNK elements; block b takes chunks b, b + gridDim.x, ... of all
// tensors and finds each chunk's tensor by binary search in the first-chunk table.
// Legend: C interface, no torch headers: plain `nvcc -arch=sm_90`. `adam_element` and `adam_chunk`
// are __host__ __device__, so tests/unit/test_master_adam_host.py runs them on the CPU against float64:
// the arithmetic, and every chunk of a table of tensors through the kernel's lanes.

#include "master_adam.h"

#include <stdint.h>

namespace {

constexpr int THREADS = 256;
constexpr long long CHUNK = 16 * THREADS;

struct Element {
    float master, exp_avg, exp_avg_sq;
};

// The update of one element (see the top of the file); `g` is the clipped gradient or 0, `lr` 0 on a
// skipped step; bc1 = 1 - beta1^step, bc2_sqrt = sqrt(1 - beta2^step).
__host__ __device__ __forceinline__ Element adam_element(Element e, float g, float lr, float weight_decay,
                                                         float bc1, float bc2_sqrt, MasterAdamScalars s) {
    if (s.adam_w)
        e.master *= 1.f - lr * weight_decay;
    else
        g += weight_decay * e.master;
    e.exp_avg += (1.f - s.beta1) * (g - e.exp_avg);
    e.exp_avg_sq = s.beta2 * e.exp_avg_sq + (1.f - s.beta2) * g * g;
    const float denom = sqrtf(e.exp_avg_sq) / bc2_sqrt + s.eps;
    e.master -= (lr / bc1) * e.exp_avg / denom;
    return e;
}

__host__ __device__ __forceinline__ int tensor_of(const MasterAdamTensor* tensors, int n, long long chunk) {
    int lo = 0, hi = n - 1;  // the last tensor whose first_chunk <= chunk
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (tensors[mid].first_chunk <= chunk)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

// Chunk `chunk` of the table, the elements that thread `lane` of a block of THREADS updates.
__host__ __device__ __forceinline__ void adam_chunk(const MasterAdamTensor* tensors, int n_tensors, long long chunk,
                                                    int lane, MasterAdamScalars s, float factor, bool skipped) {
    const MasterAdamTensor t = tensors[tensor_of(tensors, n_tensors, chunk)];
    const float step = *t.step;
    const float bc1 = 1.f - powf(s.beta1, step), bc2_sqrt = sqrtf(1.f - powf(s.beta2, step));
    const float lr = skipped ? 0.f : t.lr;
    const long long start = (chunk - t.first_chunk) * CHUNK;
    const long long end = start + CHUNK < t.numel ? start + CHUNK : t.numel;
    for (long long i = start + lane; i < end; i += THREADS) {
        const float g = skipped ? 0.f : __bfloat162float(t.grad[i]) * factor;
        Element e{t.master[i], t.exp_avg[i], t.exp_avg_sq[i]};
        e = adam_element(e, g, lr, t.weight_decay, bc1, bc2_sqrt, s);
        t.master[i] = e.master;
        t.exp_avg[i] = e.exp_avg;
        t.exp_avg_sq[i] = e.exp_avg_sq;
        t.weight[i] = __float2bfloat16_rn(e.master);
    }
}

__global__ void __launch_bounds__(THREADS)
    master_adam_kernel(const MasterAdamTensor* __restrict__ tensors, int n_tensors, long long total_chunks,
                       MasterAdamScalars s, const float* __restrict__ clip, const bool* __restrict__ skip) {
    const bool skipped = skip != nullptr && *skip;
    const float factor = *clip;
    for (long long chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x)
        adam_chunk(tensors, n_tensors, chunk, threadIdx.x, s, factor, skipped);
}

}  // namespace

extern "C" {

long long master_adam_chunks(long long numel) { return (numel + CHUNK - 1) / CHUNK; }

int master_adam_step(const MasterAdamTensor* tensors, int n_tensors, long long total_chunks, MasterAdamScalars s,
                     const float* clip, const bool* skip, cudaStream_t stream) {
    if (n_tensors < 0 || total_chunks < 0) return -1;
    if (n_tensors == 0 || total_chunks == 0) return 0;
    int device = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return static_cast<int>(err);
    const long long blocks = total_chunks < 8LL * sms ? total_chunks : 8LL * sms;
    master_adam_kernel<<<static_cast<unsigned>(blocks), THREADS, 0, stream>>>(tensors, n_tensors, total_chunks, s,
                                                                               clip, skip);
    return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
