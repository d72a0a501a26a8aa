"""cuda/ holds kernel sources only, and each .cu compiles with plain nvcc (no torch headers).

The compile check runs wherever nvcc is installed (the CPU CI machine has one) and is skipped,
visibly, where it is not. It catches syntax and template errors before any GPU time is spent.
The custom-op plumbing (fake implementations, autograd, no graph break under torch.compile) is
checked on the CPU with a stand-in for the extension computed by the float64 reference; the real
kernel under torch.compile is tests/gpu/test_wkv_compile.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from model.wkv_reference import wkv_reference

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
NVCC = shutil.which("nvcc")


def test_cuda_folder_holds_no_python():
    assert not (CUDA_DIR / "__init__.py").exists(), "cuda/__init__.py would shadow NVIDIA's cuda namespace package"
    assert not list(CUDA_DIR.rglob("*.py")), "cuda/ must hold kernel sources only"
    assert list(CUDA_DIR.glob("*.cu")), "no .cu sources found in cuda/"


def test_an_installed_package_ships_every_kernel_source():
    """A non-editable install builds the kernels from share/rwkv-pipeline/cuda (model/cuda_extension.py
    source_dir): every .cu, .cpp and .h in cuda/ must be among pyproject's data-files there."""
    pyproject = tomllib.loads((CUDA_DIR.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["data-files"]["share/rwkv-pipeline/cuda"]
    shipped = {path.resolve() for pattern in patterns for path in CUDA_DIR.parent.glob(pattern)}
    sources = [path for ext in ("*.cu", "*.cpp", "*.h") for path in CUDA_DIR.glob(ext)]
    missing = sorted(path.name for path in sources if path.resolve() not in shipped)
    assert not missing, f"pyproject.toml data-files do not ship {missing}"


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


# Build variants of cuda/wkv.cu compiled here besides the default (the macro only adds code under
# its own switch). The paired bf16 kernels (WKV_PAIRS, on by default) are also held to almost no
# spills: the forward outputs kernel at its 64-register budget (4 blocks per SM) spills 4 bytes and
# measured faster than at 88 registers; a budget that spills hundreds of bytes (the backward's
# gradients kernel at 80 registers: 368) was 12 % slower (docs/benchmarks.md, WKV run 7). So are the
# sequential kernels (one thread per lane, all their budgets spill-free) and the single-pass backward.
WKV_VARIANT_DEFINES = ("-DWKV_FAST_GM1=1",)
MAX_PAIRED_SPILL_BYTES = 16  # spill stores + spill loads per kernel
# 4 paired parallel kernels; 6 sequential: forward and backward, each fp32, bf16 and bf16 pairs;
# 2 single-pass backward: fp32 and bf16
GUARDED_KERNELS = 12
GUARDED_NAME_PARTS = ("_pair", "sequential", "bwd_single")


def _spills_by_kernel(ptxas_log: str) -> dict[str, str]:
    """{mangled kernel name: its 'N bytes spill stores, M bytes spill loads' line} from -Xptxas -v."""
    spills, name = {}, None
    for line in ptxas_log.splitlines():
        if "Compiling entry function" in line:
            name = line.split("'")[1]
        elif name and "spill stores" in line:
            spills[name] = line.strip()
            name = None
    return spills


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA sources not compiled")
def test_wkv_variants_compile_and_guarded_kernels_barely_spill(tmp_path):
    result = subprocess.run(
        [
            NVCC,
            "-arch=sm_90",
            "-O3",
            "-cubin",
            "-Xptxas",
            "-v",
            *WKV_VARIANT_DEFINES,
            str(CUDA_DIR / "wkv.cu"),
            "-o",
            str(tmp_path / "wkv.cubin"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"nvcc failed on wkv.cu with {WKV_VARIANT_DEFINES}:\n{result.stderr}"
    assert "warning" not in result.stderr.lower(), f"nvcc warnings:\n{result.stderr}"
    guarded = {
        name: line
        for name, line in _spills_by_kernel(result.stderr).items()
        if any(part in name for part in GUARDED_NAME_PARTS)
    }
    assert len(guarded) == GUARDED_KERNELS, f"expected the paired, sequential and single kernels, got {sorted(guarded)}"
    for name, line in guarded.items():
        stores, loads = (int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", line))
        assert stores + loads <= MAX_PAIRED_SPILL_BYTES, f"{name}: {line}"


def test_failed_build_names_the_torch_backend(monkeypatch, tmp_path):
    """A kernel that cannot be built raises CudaBuildError pointing at the pure-PyTorch fallback."""
    import model.wkv_cuda as wkv_cuda_module

    monkeypatch.setattr(wkv_cuda_module.BUILDS, "built", {})
    monkeypatch.setattr(wkv_cuda_module.BUILDS, "directory", tmp_path)  # no sources here
    with pytest.raises(wkv_cuda_module.CudaBuildError, match="wkv_backend=torch"):
        wkv_cuda_module.load_extension()


def test_failed_head_loss_build_names_the_torch_fallback(monkeypatch, tmp_path):
    """The head loss's row kernel failing to build points at model.fused_loss.ROW_KERNEL = 'torch'."""
    import model.cuda_extension
    import model.head_loss_cuda as head_loss_cuda

    monkeypatch.setattr(head_loss_cuda.BUILDS, "built", {})
    monkeypatch.setattr(head_loss_cuda.BUILDS, "directory", tmp_path)  # no sources here
    with pytest.raises(model.cuda_extension.CudaBuildError, match="ROW_KERNEL = 'torch'"):
        head_loss_cuda.load_extension()


def test_a_build_lock_left_by_a_killed_build_is_removed_and_named(tmp_path, capsys):
    """torch's `lock` file outlives a process killed mid-build; the next build removes it instead of
    waiting on it forever, and says so."""
    from model.cuda_extension import exclusive_build

    build_dir = tmp_path / "wkv_0123"
    build_dir.mkdir()
    (build_dir / "lock").touch()
    with exclusive_build(build_dir):
        assert not (build_dir / "lock").exists()
    err = capsys.readouterr().err
    assert str(build_dir / "lock") in err
    assert "building wkv_0123" in err  # no library there yet
    (build_dir / "wkv_0123.so").touch()
    with exclusive_build(build_dir):
        pass
    assert capsys.readouterr().err == ""  # built: loads quietly


def test_a_build_in_progress_holds_its_folder_against_other_processes(tmp_path):
    from model.cuda_extension import exclusive_build

    build_dir = tmp_path / "wkv_0123"
    try_lock = (
        "import fcntl, sys; handle = open(sys.argv[1], 'a')\n"
        "try:\n    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)"
    )
    lock_file = str(tmp_path / "wkv_0123.lock")
    with exclusive_build(build_dir):
        assert subprocess.run([sys.executable, "-c", try_lock, lock_file]).returncode == 3
    assert subprocess.run([sys.executable, "-c", try_lock, lock_file]).returncode == 0


def test_waiting_for_another_processs_build_is_said(tmp_path, capfd):
    from model.cuda_extension import exclusive_build

    build_dir = tmp_path / "wkv_0123"
    build_dir.mkdir()
    (build_dir / "wkv_0123.so").touch()
    released = tmp_path / "released"
    hold = (
        "import fcntl, pathlib, sys, time; handle = open(sys.argv[1], 'a'); fcntl.flock(handle, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(5)\n"
        "pathlib.Path(sys.argv[2]).touch(); fcntl.flock(handle, fcntl.LOCK_UN)"
    )
    lock_file = str(tmp_path / "wkv_0123.lock")
    holder = subprocess.Popen([sys.executable, "-c", hold, lock_file, str(released)], stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    with exclusive_build(build_dir):
        assert released.exists()  # entered only once the other process let go
    holder.wait()
    assert f"waiting for another process's build in {build_dir}" in capfd.readouterr().err


class _ReferenceStandIn:
    """The extension's forward/backward signatures, computed on the CPU by the float64 reference.

    `sub` holds the input state where the kernel keeps sub-chunk 0's start state ([B][nsub][3][C]),
    so backward can recompute; `lastwin` is unused.
    """

    SUB, SEG = 16, 128

    def sub_steps(self) -> int:
        return self.SUB

    def segment_steps(self) -> int:
        return self.SEG

    def _run(self, td, tf, k, v, aa0, bb0, pp0):
        return wkv_reference(
            td.double(), tf.double(), k.double(), v.double(), (aa0.double(), bb0.double(), pp0.double())
        )

    def forward(self, td, tf, k, v, aa0, bb0, pp0, poison):
        batch, steps, channels = k.shape
        y, state = self._run(td, tf, k, v, aa0, bb0, pp0)
        n_sub = (steps + self.SUB - 1) // self.SUB
        sub = torch.zeros(batch, n_sub, 3, channels)
        sub[:, 0] = torch.stack((aa0, bb0, pp0), dim=1)
        lastwin = torch.zeros(batch * ((steps + self.SEG - 1) // self.SEG) * channels, dtype=torch.int32)
        return [y.to(k.dtype), *(s.float() for s in state), sub.flatten(), lastwin]

    def backward(self, td, tf, k, v, gy, aa0, bb0, aa1, bb1, gaa1, gbb1, gpp1, sub, lastwin, poison):
        batch, _steps, channels = k.shape
        pp0 = sub.view(batch, -1, 3, channels)[:, 0, 2]
        leaves = [x.detach().double().requires_grad_(True) for x in (k, v, td, tf, aa0, bb0, pp0)]
        tangents = (gy.double(), gaa1.double(), gbb1.double(), gpp1.double())

        def vjp():  # a custom op's body runs below autograd; a fresh thread has autograd back
            k64, v64, td64, tf64, *state64 = leaves
            y, state = wkv_reference(td64, tf64, k64, v64, tuple(state64))
            return torch.autograd.grad((y, *state), leaves, tangents)

        with ThreadPoolExecutor(1) as pool:
            grads = pool.submit(vjp).result()
        gk, gv, gtd, gtf, gaa0, gbb0, gpp0 = grads
        return [gk.to(k.dtype), gv.to(k.dtype), gtd.float(), gtf.float(), gaa0.float(), gbb0.float(), gpp0.float()]


def test_custom_op_traces_without_graph_break_and_matches_eager(monkeypatch):
    """torch.compile(fullgraph=True) through rwkv::wkv_forward/backward: same outputs and gradients."""
    import model.wkv_cuda as wkv_cuda_module

    monkeypatch.setattr(wkv_cuda_module.BUILDS, "built", {(): _ReferenceStandIn()})
    torch.manual_seed(0)
    batch, steps, channels = 2, 37, 8
    inputs = [
        torch.rand(channels) * 8 - 5,
        torch.randn(channels),
        torch.randn(batch, steps, channels),
        torch.randn(batch, steps, channels),
        torch.randn(batch, channels),
        torch.rand(batch, channels) + 0.1,
        torch.randn(batch, channels),
    ]
    gy = torch.randn(batch, steps, channels)

    def loss_of(td, tf, k, v, aa, bb, pp):
        y, (aa1, bb1, pp1) = wkv_cuda_module._wkv_op(td, tf, k, v, (aa, bb, pp))
        return (y * gy).sum() + aa1.sum() + 2 * bb1.sum() + 3 * pp1.sum()

    def value_and_grads(fn):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        loss = fn(*leaves)
        loss.backward()
        return [loss.detach(), *(leaf.grad for leaf in leaves)]

    torch._dynamo.reset()
    compiled = torch.compile(loss_of, backend="aot_eager", fullgraph=True)  # a graph break raises
    got, expected = value_and_grads(compiled), value_and_grads(loss_of)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0
