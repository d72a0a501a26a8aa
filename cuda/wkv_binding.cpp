// Torch binding of the WKV kernels in wkv.cu (which has a C interface and no torch headers).
//
// forward(time_decay, time_first, k, v, aa0, bb0, pp0, poison) -> [y, aa1, bb1, pp1, sub, lastwin]
// backward(time_decay, time_first, k, v, gy, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1, sub, lastwin, poison)
//     -> [gk, gv, g_time_decay, g_time_first, gaa0, gbb0, gpp0]
// poison = true fills every output and workspace with NaN before the launch (a test hook).
// sub_steps(), segment_steps(): the build's step counts, from which the workspace sizes follow
// (model/wkv_cuda.py's fake implementations use them to give workspace shapes without a launch).
// Shapes: k, v, y, gy [B, T, C] (float32 or bfloat16, contiguous); time_* (C,) float32; state
// tensors (B, C) float32. sub and lastwin are the forward's workspaces kept for backward.

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <limits>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

extern "C" {
long long wkv_sub_floats(int B, int T, int C);
long long wkv_segment_elems(int B, int T, int C, int ncomp);
int wkv_forward(int dtype, int B, int T, int C, const float* time_decay, const float* time_first, const void* k,
                const void* v, const float* aa0, const float* bb0, const float* pp0, void* y, float* aa1, float* bb1,
                float* pp1, float* sub, int* lastwin, float* seg, cudaStream_t stream);
int wkv_backward(int dtype, int B, int T, int C, const float* time_decay, const float* time_first, const void* k,
                 const void* v, const void* gy, const float* aa0, const float* bb0, const float* aa1, const float* bb1,
                 const float* gaa1, const float* gbb1, const float* gpp1, const float* sub, const int* lastwin,
                 float* asub, float* aseg, float* part, int* argmax, void* gk, void* gv, float* g_time_decay,
                 float* g_time_first, float* gaa0, float* gbb0, float* gpp0, int* counters, cudaStream_t stream);
long long wkv_counter_ints(int B, int T, int C);
int wkv_sub_steps();
int wkv_segment_steps();
}

namespace {

int dtype_code(const torch::Tensor& x) {
    if (x.scalar_type() == torch::kFloat32) return 0;
    if (x.scalar_type() == torch::kBFloat16) return 1;
    TORCH_CHECK(false, "wkv_cuda: k and v must be float32 or bfloat16, got ", x.scalar_type());
    return -1;
}

void check_f32(const torch::Tensor& x, const char* name, at::IntArrayRef shape, const torch::Tensor& like) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "wkv_cuda: ", name, " must be float32");
    TORCH_CHECK(x.is_contiguous() && x.device() == like.device(), "wkv_cuda: ", name,
                " must be contiguous and on k's device");
    TORCH_CHECK(x.sizes() == shape, "wkv_cuda: ", name, " has shape ", x.sizes(), ", expected ", shape);
}

void check_seq(const torch::Tensor& x, const char* name, const torch::Tensor& k) {
    TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "wkv_cuda: ", name, " must be a contiguous CUDA tensor");
    TORCH_CHECK(x.scalar_type() == k.scalar_type() && x.sizes() == k.sizes(), "wkv_cuda: ", name,
                " must match k in dtype and shape");
}

void check_status(int status, const char* what) {
    TORCH_CHECK(status == 0, "wkv_cuda: ", what, " failed: ",
                status < 0 ? "unsupported shape or dtype" : cudaGetErrorString(static_cast<cudaError_t>(status)));
}

torch::TensorOptions f32(const torch::Tensor& like) { return like.options().dtype(torch::kFloat32); }

// Test hook: fill outputs and workspaces with NaN first, so an element the kernels fail to write
// (or a workspace entry read before it is written) shows up as NaN.
void poison(std::initializer_list<torch::Tensor*> tensors) {
    for (auto* t : tensors) t->fill_(std::numeric_limits<float>::quiet_NaN());
}

// The backward's arrival counters: one zeroed int buffer per (device, stream), grown on demand.
// Each launch leaves its counters zero again, so calls in stream order share one buffer; calls on
// different streams get different buffers, so they may run at the same time.
int* counters_for(const torch::Tensor& like, long long needed) {
    if (needed == 0) return nullptr;  // this build has no single-pass backward
    static std::mutex mutex;
    static std::map<std::pair<int, cudaStream_t>, torch::Tensor> buffers;
    auto stream = c10::cuda::getCurrentCUDAStream(like.device().index());
    std::lock_guard<std::mutex> lock(mutex);
    auto& buffer = buffers[{like.device().index(), stream.stream()}];
    if (!buffer.defined() || buffer.numel() < needed)
        buffer = torch::zeros({std::max<long long>(needed, 4096)}, like.options().dtype(torch::kInt32));
    return buffer.data_ptr<int>();
}

}  // namespace

std::vector<torch::Tensor> wkv_forward_op(torch::Tensor time_decay, torch::Tensor time_first, torch::Tensor k,
                                          torch::Tensor v, torch::Tensor aa0, torch::Tensor bb0, torch::Tensor pp0,
                                          bool poison_outputs) {
    TORCH_CHECK(k.dim() == 3 && k.is_cuda() && k.is_contiguous(), "wkv_cuda: k must be a contiguous CUDA [B, T, C]");
    check_seq(v, "v", k);
    const int B = k.size(0), T = k.size(1), C = k.size(2);
    check_f32(time_decay, "time_decay", {C}, k);
    check_f32(time_first, "time_first", {C}, k);
    for (auto* s : {&aa0, &bb0, &pp0}) check_f32(*s, "state", {B, C}, k);
    const c10::cuda::CUDAGuard guard(k.device());
    auto y = torch::empty_like(k);
    auto aa1 = torch::empty({B, C}, f32(k)), bb1 = torch::empty({B, C}, f32(k)), pp1 = torch::empty({B, C}, f32(k));
    auto sub = torch::empty({wkv_sub_floats(B, T, C)}, f32(k));
    auto lastwin = torch::empty({wkv_segment_elems(B, T, C, 1)}, k.options().dtype(torch::kInt32));
    auto seg = torch::empty({wkv_segment_elems(B, T, C, 3)}, f32(k));
    if (poison_outputs) {
        poison({&y, &aa1, &bb1, &pp1, &sub, &seg});
        lastwin.fill_(0x7fffffff);
    }
    int status = wkv_forward(dtype_code(k), B, T, C, time_decay.data_ptr<float>(), time_first.data_ptr<float>(),
                             k.data_ptr(), v.data_ptr(), aa0.data_ptr<float>(), bb0.data_ptr<float>(),
                             pp0.data_ptr<float>(), y.data_ptr(), aa1.data_ptr<float>(), bb1.data_ptr<float>(),
                             pp1.data_ptr<float>(), sub.data_ptr<float>(), lastwin.data_ptr<int>(),
                             seg.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
    check_status(status, "forward");
    return {y, aa1, bb1, pp1, sub, lastwin};
}

std::vector<torch::Tensor> wkv_backward_op(torch::Tensor time_decay, torch::Tensor time_first, torch::Tensor k,
                                           torch::Tensor v, torch::Tensor gy, torch::Tensor aa0, torch::Tensor bb0,
                                           torch::Tensor aa1, torch::Tensor bb1, torch::Tensor gaa1,
                                           torch::Tensor gbb1, torch::Tensor gpp1, torch::Tensor sub,
                                           torch::Tensor lastwin, bool poison_outputs) {
    TORCH_CHECK(k.dim() == 3 && k.is_cuda() && k.is_contiguous(), "wkv_cuda: k must be a contiguous CUDA [B, T, C]");
    check_seq(v, "v", k);
    check_seq(gy, "gy", k);
    const int B = k.size(0), T = k.size(1), C = k.size(2);
    check_f32(time_decay, "time_decay", {C}, k);
    check_f32(time_first, "time_first", {C}, k);
    for (auto* s : {&aa0, &bb0, &aa1, &bb1, &gaa1, &gbb1, &gpp1}) check_f32(*s, "state", {B, C}, k);
    TORCH_CHECK(sub.numel() == wkv_sub_floats(B, T, C) && lastwin.numel() == wkv_segment_elems(B, T, C, 1),
                "wkv_cuda: forward workspaces do not match the shape");
    const c10::cuda::CUDAGuard guard(k.device());
    auto gk = torch::empty_like(k), gv = torch::empty_like(k);
    auto asub = torch::empty({wkv_sub_floats(B, T, C)}, f32(k));
    auto aseg = torch::empty({wkv_segment_elems(B, T, C, 3)}, f32(k));
    auto part = torch::empty({wkv_segment_elems(B, T, C, 2)}, f32(k));
    auto argmax = torch::empty({B, C}, k.options().dtype(torch::kInt32));
    auto gtd = torch::empty({C}, f32(k)), gtf = torch::empty({C}, f32(k));
    auto gaa0 = torch::empty({B, C}, f32(k)), gbb0 = torch::empty({B, C}, f32(k)), gpp0 = torch::empty({B, C}, f32(k));
    if (poison_outputs) {
        poison({&gk, &gv, &asub, &aseg, &part, &gtd, &gtf, &gaa0, &gbb0, &gpp0});
        argmax.fill_(0x7fffffff);
    }
    int status = wkv_backward(
        dtype_code(k), B, T, C, time_decay.data_ptr<float>(), time_first.data_ptr<float>(), k.data_ptr(),
        v.data_ptr(), gy.data_ptr(), aa0.data_ptr<float>(), bb0.data_ptr<float>(), aa1.data_ptr<float>(),
        bb1.data_ptr<float>(), gaa1.data_ptr<float>(), gbb1.data_ptr<float>(), gpp1.data_ptr<float>(),
        sub.data_ptr<float>(), lastwin.data_ptr<int>(), asub.data_ptr<float>(), aseg.data_ptr<float>(),
        part.data_ptr<float>(), argmax.data_ptr<int>(), gk.data_ptr(), gv.data_ptr(), gtd.data_ptr<float>(),
        gtf.data_ptr<float>(), gaa0.data_ptr<float>(), gbb0.data_ptr<float>(), gpp0.data_ptr<float>(),
        counters_for(k, wkv_counter_ints(B, T, C)), c10::cuda::getCurrentCUDAStream().stream());
    check_status(status, "backward");
    return {gk, gv, gtd, gtf, gaa0, gbb0, gpp0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &wkv_forward_op, "WKV forward with state (CUDA)");
    m.def("backward", &wkv_backward_op, "WKV backward with state (CUDA)");
    m.def("sub_steps", &wkv_sub_steps, "steps per sub-chunk of this build (workspace `sub` sizes)");
    m.def("segment_steps", &wkv_segment_steps, "steps per segment of this build (workspace `lastwin` sizes)");
}
