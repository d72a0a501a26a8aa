"""Parameter groups and the learning-rate schedule of the RWKV-4 recipe (reference/rwkv4.md §4).

Pure functions: no DeepSpeed here, so the formulas are unit-tested on their own.

    groups = param_groups(model, weight_decay=0.0)         # layerwise LR scales, wd on matrices only
    lr = learning_rate(step, cfg)                          # warmup + exponential/cosine decay
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    opt = clipped_adam(groups, max_norm=1.0, betas=(0.9, 0.99), eps=1e-8, adam_w=False)  # one-GPU fast path

Schedule (§4.3), with `step` counted from 0 over the whole run (not since process start: we save
the optimizer state, so the reference's re-warmup after a restart is not needed and would break
exact resume):
    progress = clamp((step - warmup + 1) / (steps - warmup), 0, 1)
    exponential: lr = lr_init * exp(ln(lr_final / lr_init) * progress)   (linear if an end is 0)
    cosine:      lr = lr_init * [(0.5 + f/2) + (0.5 - f/2) * cos(pi * progress)],  f = lr_final / lr_init
    warmup:      lr *= 0.2 + 0.8 * step / warmup   while step < warmup
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim.adam import adam

# Layerwise LR scales of §4.2 (my_pile_stage != 2): matched on the parameter's last name part.
LR_SCALES = {"time_mix": 1.0, "time_decay": 2.0, "time_first": 3.0}


class ScheduleConfig(Protocol):
    """The TrainConfig fields the schedule reads."""

    steps: int
    lr_init: float
    lr_final: float
    lr_schedule: str
    warmup_steps: int


def is_decayed(param: torch.Tensor) -> bool:
    """Weight decay applies to matrices only (§4.1: `len(p.squeeze().shape) >= 2`, emb and head included)."""
    return len(param.squeeze().shape) >= 2


def param_groups(model: nn.Module, weight_decay: float = 0.0, layerwise_lr: bool = True) -> list[dict[str, Any]]:
    """Optimizer groups: one per LR scale (weight decay 0), plus the decayed matrices when weight_decay > 0.

    Each group carries `name` and `lr_scale`; the training loop sets `lr = lr_now * lr_scale` every
    step. Empty groups are dropped (DeepSpeed's ZeRO flattening rejects them).
    """
    buckets: dict[str, list[nn.Parameter]] = {key: [] for key in ("other", *LR_SCALES, "decay")}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        kind = next((prefix for prefix in LR_SCALES if leaf.startswith(prefix)), None) if layerwise_lr else None
        if kind is not None:
            buckets[kind].append(param)
        elif weight_decay > 0 and is_decayed(param):
            buckets["decay"].append(param)
        else:
            buckets["other"].append(param)
    groups = []
    for key, params in buckets.items():
        if not params:
            continue
        scale = LR_SCALES.get(key, 1.0) if layerwise_lr else 1.0
        decay = weight_decay if key == "decay" else 0.0
        groups.append({"params": params, "name": key, "lr_scale": scale, "weight_decay": decay})
    return groups


def decay_progress(step: int, steps: int, warmup_steps: int) -> float:
    """Fraction of the decay done at `step` (0 during warmup, 1 at the last step)."""
    span = steps - warmup_steps
    if span <= 0:
        return 1.0
    return min(max((step - warmup_steps + 1) / span, 0.0), 1.0)


def learning_rate(step: int, cfg: ScheduleConfig) -> float:
    """Learning rate at optimizer step `step` (0-based), before the per-group `lr_scale`."""
    lr_init, lr_final = cfg.lr_init, cfg.lr_final
    progress = decay_progress(step, cfg.steps, cfg.warmup_steps)
    if cfg.lr_schedule == "constant" or lr_final == lr_init:
        lr = lr_init
    elif cfg.lr_schedule == "cosine":
        f = lr_final / lr_init
        lr = lr_init * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * progress))
    elif lr_final == 0 or lr_init == 0:  # the reference falls back to linear when an end is 0
        lr = lr_init + (lr_final - lr_init) * progress
    else:
        lr = lr_init * math.exp(math.log(lr_final / lr_init) * progress)
    if step < cfg.warmup_steps:
        lr *= 0.2 + 0.8 * step / cfg.warmup_steps
    return lr


def set_learning_rate(optimizer: Any, lr: float) -> None:
    """Apply `lr * lr_scale` to every group (works on torch optimizers and DeepSpeed's ZeRO wrappers)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class _ClipMixin:
    """Clip the global gradient norm before the Adam update, and keep the norm for the metrics.

    DeepSpeed reads `_global_grad_norm` after `step()` (engine.get_global_grad_norm). The norm stays
    a device tensor (no host sync); the clip multiplies every gradient by min(1, max_norm / (norm +
    1e-6)), DeepSpeed's own formula, with foreach kernels: a handful of launches instead of two per
    tensor.
    """

    max_norm: float
    _global_grad_norm: torch.Tensor | None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]  # type: ignore[attr-defined]
        if params:
            grads = [p.grad for p in params]
            self._global_grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if self.max_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, self._global_grad_norm, foreach=True)
        return super().step(closure)  # type: ignore[misc]


class ClippedAdam(_ClipMixin, torch.optim.Adam):
    """torch Adam (L2-style weight decay, as DeepSpeed's FusedAdam with adam_w_mode=False) + global-norm clip."""


class ClippedAdamW(_ClipMixin, torch.optim.AdamW):
    """torch AdamW (decoupled weight decay) + global-norm clip."""


def clipped_adam(
    groups: list[dict[str, Any]],
    *,
    max_norm: float,
    lr: float = 6e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    eps: float = 1e-8,
    adam_w: bool = False,
) -> torch.optim.Optimizer:
    """Adam/AdamW over `groups` that clips the global gradient norm to `max_norm` first (0 = no clip).

    Fused (one multi-tensor CUDA kernel) when the parameters are on CUDA, foreach otherwise. The
    groups keep their `name`/`lr_scale`/`weight_decay` keys, so `set_learning_rate` works unchanged.
    """
    on_cuda = any(p.is_cuda for group in groups for p in group["params"])
    cls = ClippedAdamW if adam_w else ClippedAdam
    optimizer = cls(groups, lr=lr, betas=betas, eps=eps, fused=on_cuda or None, foreach=None if on_cuda else True)
    optimizer.max_norm = max_norm
    optimizer._global_grad_norm = None
    return optimizer


class MasterWeightAdam(torch.optim.Optimizer):
    """Adam/AdamW for low-precision (bf16) weights: fp32 master copies, moments and clip in one foreach pass.

    What DeepSpeed's bf16 optimizers do, without their per-tensor Python loops: each step copies the
    bf16 gradients into fp32 buffers (one foreach copy), clips them at the global norm (DeepSpeed's
    formula, min(1, max_norm / (norm + 1e-6))), runs torch's fused (CUDA) or foreach Adam on the fp32
    masters, and rounds the masters back into the bf16 weights. The masters and moments live in the
    optimizer state, so a checkpoint (state_dict) resumes them exactly; `_global_grad_norm` keeps the
    pre-clip norm for DeepSpeed's `get_global_grad_norm`. The param groups are the model's own (with
    `lr_scale`, `weight_decay`), so `set_learning_rate` works unchanged.
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        max_norm: float,
        adam_w: bool = False,
    ) -> None:
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.max_norm, self.adam_w = max_norm, adam_w
        self._global_grad_norm: torch.Tensor | None = None
        # fp32 gradient buffers, views of one flat buffer (one kernel zeroes a skipped step); not checkpointed
        self._flat32: torch.Tensor | None = None
        self._grad32: dict[torch.Tensor, torch.Tensor] = {}
        self._skip: torch.Tensor | None = None

    def skip_step_if(self, flag: torch.Tensor) -> None:
        """Make the next `step()` a skipped step if the 0-dim bool tensor `flag` is true, decided on the device.

        A skipped step is what the training loop's non-finite-loss skip was when it synchronised (a zero
        surrogate gradient at LR 0): every gradient counts as exactly zero (NaN/inf included) and the LR
        is 0, so the weights and masters do not move, the moments decay by one step and the step count
        advances; the grad norm reads 0. On CUDA no host sync: the gradients are zeroed by a masked fill
        and the LR is a device tensor. On CPU the flag is read on the host.
        """
        self._skip = flag

    def _fp32_grads(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._flat32 is None:  # one flat buffer for every parameter of every group, made on the first step
            every = [p for group in self.param_groups for p in group["params"]]
            self._flat32 = torch.empty(sum(p.numel() for p in every), dtype=torch.float32, device=every[0].device)
            offset = 0
            for p in every:
                self._grad32[p] = self._flat32[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
        return [self._grad32[p] for p in params]

    def _state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[param]
        if "master" not in state:  # masters start from the weights as they are (DeepSpeed does the same)
            master = param.detach().to(torch.float32, copy=True)
            step = torch.zeros((), dtype=torch.float32, device=param.device)
            state.update(
                master=master, exp_avg=torch.zeros_like(master), exp_avg_sq=torch.zeros_like(master), step=step
            )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts loaded state to the parameter's dtype (bf16): put the fp32 masters and moments back."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            param = params[index]
            for key, value in saved.items():
                self.state[param][key] = value.to(device=param.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        skip, self._skip = self._skip, None
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                grads = self._fp32_grads(params)
                torch._foreach_copy_(grads, [p.grad for p in params])
                work.append((group, params, [self._state(p) for p in params], grads))
        all_grads = [g for *_, grads in work for g in grads]
        if not all_grads:
            return
        fused = all_grads[0].is_cuda
        if skip is not None and not fused and not bool(skip):  # CPU: the flag is a host value anyway
            skip = None
        if skip is not None:
            # NaN * 0 is NaN, so the gradients are replaced, not scaled; on CPU only when the step is skipped
            if fused:
                self._flat32.masked_fill_(skip.to(self._flat32.device), 0.0)  # type: ignore[union-attr]
            else:
                self._flat32.zero_()  # type: ignore[union-attr]
        self._global_grad_norm = torch.nn.utils.get_total_norm(all_grads, foreach=True)
        if self.max_norm > 0:
            torch._foreach_mul_(all_grads, torch.clamp(self.max_norm / (self._global_grad_norm + 1e-6), max=1.0))
        for group, params, states, grads in work:
            masters = [s["master"] for s in states]
            decay = group["weight_decay"]
            lr: float | torch.Tensor = group["lr"]
            if skip is not None:  # LR 0: a device tensor for the fused CUDA kernel, a float otherwise
                lr = torch.where(skip.to(masters[0].device), 0.0, float(lr)) if fused else 0.0
            if self.adam_w and decay:  # decoupled: w <- w (1 - lr wd), as torch AdamW, before the Adam update
                torch._foreach_mul_(masters, 1 - lr * decay)
            adam(
                masters,
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                [s["step"] for s in states],
                foreach=None if fused else True,
                fused=fused or None,
                amsgrad=False,
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                lr=lr,
                weight_decay=0.0 if self.adam_w else decay,  # Adam: L2 added to the gradient
                eps=group["eps"],
                maximize=False,
            )
            torch._foreach_copy_(params, masters)  # round to the weights' dtype
