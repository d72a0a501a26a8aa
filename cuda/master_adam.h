// C interface of master_adam.cu, shared by the kernel and its torch binding (master_adam_binding.cpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

extern "C" {

// One parameter tensor of the update (filled by the binding, copied to the device per call).
struct MasterAdamTensor {
    const __nv_bfloat16* grad;
    __nv_bfloat16* weight;
    float* master;
    float* exp_avg;
    float* exp_avg_sq;
    const float* step;      // the tensor's step count, already advanced for this step
    long long numel;
    long long first_chunk;  // chunks of the tensors before this one (master_adam_chunks, summed)
    float lr;
    float weight_decay;
};

struct MasterAdamScalars {
    float beta1, beta2, eps;
    int adam_w;  // 1: decoupled weight decay (AdamW); 0: L2 (Adam)
};

// Chunks of `numel` elements, the unit of work of one block.
long long master_adam_chunks(long long numel);

// tensors: a device array of n_tensors entries; clip: device fp32 scalar (the global-norm factor);
// skip: device bool scalar or null. Returns a cudaError_t value (0 = success), or -1 for bad arguments.
int master_adam_step(const MasterAdamTensor* tensors, int n_tensors, long long total_chunks, MasterAdamScalars s,
                     const float* clip, const bool* skip, cudaStream_t stream);

}  // extern "C"
