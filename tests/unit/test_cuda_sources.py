"""cuda/ holds kernel sources only, and each .cu compiles with plain nvcc (no torch headers).

The compile check runs wherever nvcc is installed (the CPU CI machine has one) and is skipped,
visibly, where it is not. It catches syntax and template errors before any GPU time is spent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
NVCC = shutil.which("nvcc")


def test_cuda_folder_holds_no_python():
    assert not (CUDA_DIR / "__init__.py").exists(), "cuda/__init__.py would shadow NVIDIA's cuda namespace package"
    assert not list(CUDA_DIR.rglob("*.py")), "cuda/ must hold kernel sources only"
    assert list(CUDA_DIR.glob("*.cu")), "no .cu sources found in cuda/"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA sources not compiled")
@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_DIR.glob("*.cu")))
def test_cu_source_compiles_with_plain_nvcc(source, tmp_path):
    result = subprocess.run(
        [NVCC, "-arch=sm_90", "-O3", "-c", str(CUDA_DIR / source), "-o", str(tmp_path / "out.o")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"nvcc failed on {source}:\n{result.stderr}"
    assert "warning" not in result.stderr.lower(), f"nvcc warnings on {source}:\n{result.stderr}"


def test_failed_build_names_the_torch_backend(monkeypatch, tmp_path):
    """A kernel that cannot be built raises CudaBuildError pointing at the pure-PyTorch fallback."""
    import model.wkv_cuda as wkv_cuda_module

    monkeypatch.setattr(wkv_cuda_module, "_extension", None)
    monkeypatch.setattr(wkv_cuda_module, "SOURCE_DIR", tmp_path)  # no sources here
    with pytest.raises(wkv_cuda_module.CudaBuildError, match="wkv_backend=torch"):
        wkv_cuda_module.load_extension()
