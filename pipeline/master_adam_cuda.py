"""The one-pass master-weight Adam kernel (cuda/master_adam.cu) for pipeline.optim.MasterWeightAdam.

    from pipeline.master_adam_cuda import supports, load_extension
    if supports(params):
        load_extension().step(grads, weights, masters, exp_avgs, exp_avg_sqs, steps, lrs, weight_decays,
                              beta1, beta2, eps, adam_w, clip, skip)

Reads each bf16 gradient and the fp32 master, moments once and writes them and the bf16 weight once,
where the PyTorch path (fp32 gradient copies, skip mask, clip, fused Adam, copy back) makes five passes.
Built on first use like the model's kernels (model/cuda_extension.py).
"""

from __future__ import annotations

from types import ModuleType

import torch

from model.cuda_extension import ExtensionBuilds

__all__ = ["BUILDS", "load_extension", "supports"]

BUILDS = ExtensionBuilds(
    "master_adam",
    ("master_adam.cu", "master_adam_binding.cpp", "master_adam.h"),
    fallback="Use the PyTorch path instead: pipeline.optim.MASTER_ADAM_KERNEL = 'torch'.",
)


def load_extension() -> ModuleType:
    """The compiled extension, building it on first use (once per process, cached across processes)."""
    return BUILDS.load()


def supports(params: list[torch.Tensor]) -> bool:
    """Whether the kernel takes these weights: contiguous bf16 CUDA tensors with contiguous bf16 gradients."""
    return all(
        p.is_cuda
        and p.dtype == torch.bfloat16
        and p.is_contiguous()
        and p.grad is not None
        and p.grad.dtype == torch.bfloat16
        and p.grad.is_contiguous()
        for p in params
    )
