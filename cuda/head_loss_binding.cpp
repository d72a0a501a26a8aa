// Torch binding of the fused head loss's row kernel in head_loss.cu (C interface, no torch headers).
//
// rows(logits, target, scale) -> [grad, loss, max, argmax]
//   logits [n, V] bfloat16 CUDA, contiguous; target [n] int64; scale: the gradient's factor (1 / N)
//   grad [n, V] bfloat16 = (softmax(logits) - onehot(target)) * scale; loss [n] float32 =
//   logsumexp - the target's logit; max [n] bfloat16 and argmax [n] int64 of each row.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <vector>

extern "C" {
int head_loss_rows(long long n, int V, const void* logits, const long long* target, float scale, void* grad,
                   float* loss, void* max_out, long long* argmax_out, cudaStream_t stream);
}

std::vector<torch::Tensor> head_loss_rows_op(torch::Tensor logits, torch::Tensor target, double scale) {
    TORCH_CHECK(logits.dim() == 2 && logits.is_cuda() && logits.is_contiguous() &&
                    logits.scalar_type() == torch::kBFloat16,
                "head_loss_rows: logits must be a contiguous bfloat16 CUDA [n, V], got ", logits.scalar_type(), " ",
                logits.sizes());
    TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.scalar_type() == torch::kInt64 &&
                    target.is_contiguous() && target.device() == logits.device(),
                "head_loss_rows: target must be a contiguous int64 [n] on the logits' device");
    TORCH_CHECK(logits.size(1) > 0 && logits.size(1) <= 0x7fffffffLL, "head_loss_rows: V out of range");
    const c10::cuda::CUDAGuard guard(logits.device());
    const long long n = logits.size(0);
    auto grad = torch::empty_like(logits);
    auto loss = torch::empty({n}, logits.options().dtype(torch::kFloat32));
    auto max_out = torch::empty({n}, logits.options());
    auto argmax_out = torch::empty({n}, logits.options().dtype(torch::kInt64));
    // int64_t is long on Linux; the C interface says long long (the same 64 bits)
    const auto* target_ptr = reinterpret_cast<const long long*>(target.data_ptr<int64_t>());
    auto* argmax_ptr = reinterpret_cast<long long*>(argmax_out.data_ptr<int64_t>());
    int status = head_loss_rows(n, static_cast<int>(logits.size(1)), logits.data_ptr(), target_ptr,
                                static_cast<float>(scale), grad.data_ptr(), loss.data_ptr<float>(), max_out.data_ptr(),
                                argmax_ptr, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == 0, "head_loss_rows failed: ",
                status < 0 ? "unsupported shape" : cudaGetErrorString(static_cast<cudaError_t>(status)));
    return {grad, loss, max_out, argmax_out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("rows", &head_loss_rows_op, "fused head loss rows: gradient, loss, max, arg-max (CUDA)");
}
