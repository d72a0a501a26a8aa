"""Test tiers: markers come from the folder, GPU tests are skipped visibly without CUDA."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

# Ray 2.60 turns token authentication on for every later `ray start` once any local `ray.init()` has
# written ~/.ray/auth_token, and then refuses drivers that join by address without the token. Tests
# run their clusters on loopback only, so they keep authentication off, in every process they start.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# Without a GPU, Triton kernels (model/ln_shift_mix.py) run on CPU tensors through Triton's
# interpreter. Triton reads TRITON_INTERPRET when it defines a kernel, its own library's included (at
# import), so the switch is set here, before any test imports triton.
import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture(scope="module")
def compile_host_program(tmp_path_factory) -> Callable[[str], Path]:
    """Compile a host program with nvcc (tests that run a kernel's __host__ __device__ arithmetic on the
    CPU); the test is skipped, visibly, where nvcc is missing. Returns the binary's path."""

    def compile_program(source_text: str) -> Path:
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            pytest.skip("nvcc not found: the kernel's host arithmetic is not compiled")
        folder = tmp_path_factory.mktemp("host_program")
        source, binary = folder / "harness.cu", folder / "harness"
        source.write_text(source_text)
        result = subprocess.run(
            [nvcc, "-arch=sm_90", "-O2", "-std=c++17", str(source), "-o", str(binary)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr
        return binary

    return compile_program
