// Torch binding of master_adam.cu (C interface, no torch headers there).
//
// step(grads, weights, masters, exp_avgs, exp_avg_sqs, steps, lrs, weight_decays, beta1, beta2, eps, adam_w,
//      clip, skip)
//   per tensor i: grads[i], weights[i] bfloat16 and masters[i], exp_avgs[i], exp_avg_sqs[i] float32 CUDA,
//   contiguous, of one numel; steps[i] a float32 scalar on the device (already advanced); lrs[i] and
//   weight_decays[i] host floats. clip: float32 device scalar (the global-norm factor); skip: bool device
//   scalar or None. Updates masters, moments and weights in place, one launch.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstring>
#include <optional>
#include <vector>

#include "master_adam.h"

namespace {

void check_tensor(const torch::Tensor& t, torch::ScalarType dtype, const torch::Tensor& like, const char* what,
                  size_t i) {
    TORCH_CHECK(t.is_cuda() && t.device() == like.device() && t.scalar_type() == dtype && t.is_contiguous() &&
                    t.numel() == like.numel(),
                "master_adam: ", what, "[", i, "] must be a contiguous ", dtype, " CUDA tensor of ", like.numel(),
                " elements on ", like.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

}  // namespace

void master_adam_step_op(const std::vector<torch::Tensor>& grads, const std::vector<torch::Tensor>& weights,
                         const std::vector<torch::Tensor>& masters, const std::vector<torch::Tensor>& exp_avgs,
                         const std::vector<torch::Tensor>& exp_avg_sqs, const std::vector<torch::Tensor>& steps,
                         const std::vector<double>& lrs, const std::vector<double>& weight_decays, double beta1,
                         double beta2, double eps, bool adam_w, const torch::Tensor& clip,
                         const std::optional<torch::Tensor>& skip) {
    const size_t n = grads.size();
    TORCH_CHECK(weights.size() == n && masters.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                    steps.size() == n && lrs.size() == n && weight_decays.size() == n,
                "master_adam: every per-tensor list must have ", n, " entries");
    if (n == 0) return;
    const auto& device_like = masters[0];
    TORCH_CHECK(clip.is_cuda() && clip.device() == device_like.device() && clip.scalar_type() == torch::kFloat32 &&
                    clip.numel() == 1,
                "master_adam: clip must be a float32 scalar on ", device_like.device());
    if (skip.has_value())
        TORCH_CHECK(skip->is_cuda() && skip->device() == device_like.device() &&
                        skip->scalar_type() == torch::kBool && skip->numel() == 1,
                    "master_adam: skip must be a bool scalar on ", device_like.device());
    std::vector<MasterAdamTensor> table(n);
    long long chunks = 0;
    for (size_t i = 0; i < n; ++i) {
        const auto& master = masters[i];
        check_tensor(master, torch::kFloat32, master, "masters", i);
        TORCH_CHECK(master.device() == device_like.device(), "master_adam: all tensors on one device");
        check_tensor(grads[i], torch::kBFloat16, master, "grads", i);
        check_tensor(weights[i], torch::kBFloat16, master, "weights", i);
        check_tensor(exp_avgs[i], torch::kFloat32, master, "exp_avgs", i);
        check_tensor(exp_avg_sqs[i], torch::kFloat32, master, "exp_avg_sqs", i);
        TORCH_CHECK(steps[i].is_cuda() && steps[i].device() == master.device() &&
                        steps[i].scalar_type() == torch::kFloat32 && steps[i].numel() == 1,
                    "master_adam: steps[", i, "] must be a float32 scalar on ", master.device());
        table[i] = MasterAdamTensor{
            reinterpret_cast<const __nv_bfloat16*>(grads[i].data_ptr()),
            reinterpret_cast<__nv_bfloat16*>(weights[i].data_ptr()),
            master.data_ptr<float>(),
            exp_avgs[i].data_ptr<float>(),
            exp_avg_sqs[i].data_ptr<float>(),
            steps[i].data_ptr<float>(),
            master.numel(),
            chunks,
            static_cast<float>(lrs[i]),
            static_cast<float>(weight_decays[i]),
        };
        chunks += master_adam_chunks(master.numel());
    }
    const c10::cuda::CUDAGuard guard(device_like.device());
    // The table goes to the device through pinned memory: torch's host allocator keeps the block until
    // the asynchronous copy has run, so the host does not wait for the device here.
    const auto bytes = static_cast<int64_t>(n * sizeof(MasterAdamTensor));
    auto host = torch::empty({bytes}, torch::dtype(torch::kUInt8).pinned_memory(true));
    std::memcpy(host.data_ptr(), table.data(), static_cast<size_t>(bytes));
    auto on_device = host.to(device_like.device(), /*non_blocking=*/true);
    const MasterAdamScalars scalars{static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps),
                                    adam_w ? 1 : 0};
    int status = master_adam_step(reinterpret_cast<const MasterAdamTensor*>(on_device.data_ptr()),
                                  static_cast<int>(n), chunks, scalars, clip.data_ptr<float>(),
                                  skip.has_value() ? skip->data_ptr<bool>() : nullptr,
                                  c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == 0, "master_adam failed: ",
                status < 0 ? "bad arguments" : cudaGetErrorString(static_cast<cudaError_t>(status)));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("step", &master_adam_step_op, "Adam/AdamW on bf16 weights with fp32 masters and moments, one pass (CUDA)");
}
