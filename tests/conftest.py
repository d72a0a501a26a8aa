"""Test tiers: markers come from the folder, GPU tests are skipped visibly without CUDA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

# Ray 2.60 turns token authentication on for every later `ray start` once any local `ray.init()` has
# written ~/.ray/auth_token, and then refuses drivers that join by address without the token. Tests
# run their clusters on loopback only, so they keep authentication off, in every process they start.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    has_cuda = torch.cuda.is_available()
    for item in items:
        tier = Path(str(item.fspath)).relative_to(TESTS).parts[0]
        if tier == "integration":
            item.add_marker(pytest.mark.integration)
        elif tier == "gpu":
            item.add_marker(pytest.mark.gpu)
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default_dtype)
