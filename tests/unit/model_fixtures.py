"""Shared model helpers for the unit tests (imported as a sibling module, like train_fixtures)."""

from __future__ import annotations

import dataclasses

import torch

from model import RWKV, ModelConfig


def perturbed_rwkv(config: ModelConfig, backend: str = "reference", scale: float = 0.3) -> RWKV:
    """A model away from init: every residual branch is active and time_* are not the init curves."""
    model = RWKV(dataclasses.replace(config, wkv_backend=backend))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model
