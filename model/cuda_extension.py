"""Build the project's CUDA extensions (a kernel in cuda/*.cu plus its torch binding) once, cached on disk.

    >>> from model.cuda_extension import build_extension, source_dir
    >>> ext = build_extension("head_loss", source_dir(), ("head_loss.cu", "head_loss_binding.cpp"),
    ...                       fallback="set model.fused_loss.ROW_KERNEL = 'torch'")

torch.utils.cpp_extension.load compiles into torch's extension cache (~/.cache/torch_extensions, or
TORCH_EXTENSIONS_DIR), under a name keyed by the sources, flags and torch/CUDA versions, so a second
process loads the built library without compiling and an edited kernel gets a fresh build. A failed
build raises CudaBuildError naming the fallback the caller gives. `ExtensionBuilds` keeps one
extension's builds of this process, one per build variant (`defines`). A build folder is held with an
OS file lock for the build or load (`exclusive_build`), so a process killed mid-build blocks nobody.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "CudaBuildError",
    "ExtensionBuilds",
    "NVCC_FLAGS",
    "build_extension",
    "build_root",
    "exclusive_build",
    "source_digest",
    "source_dir",
]

NVCC_FLAGS = ["-O3", "-Xptxas", "-O3", "-std=c++17"]


class CudaBuildError(RuntimeError):
    """A CUDA extension could not be built or loaded."""


def source_dir() -> Path:
    """cuda/ of the checkout (editable installs, tests), else the copy a wheel installs under share/."""
    checkout = Path(__file__).resolve().parent.parent / "cuda"
    installed = Path(sys.prefix) / "share" / "rwkv-pipeline" / "cuda"
    return checkout if (checkout / "wkv.cu").is_file() or not installed.is_dir() else installed


def source_digest(directory: Path, sources: tuple[str, ...], defines: tuple[str, ...] = ()) -> str:
    """Sources, flags and toolchain versions: a change of any of them gets a fresh build folder."""
    h = hashlib.sha256()
    for name in sources:
        h.update((directory / name).read_bytes())
    h.update(" ".join(NVCC_FLAGS + [f"-D{d}" for d in defines]).encode())
    h.update(f"{torch.__version__} {torch.version.cuda}".encode())
    if torch.cuda.is_available():
        h.update(str(torch.cuda.get_device_capability()).encode())
    return h.hexdigest()[:16]


def build_root() -> Path:
    """The folder torch builds extensions under: TORCH_EXTENSIONS_DIR, else its cache per Python and CUDA."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_{accelerator}"


@contextmanager
def exclusive_build(build_dir: Path) -> Iterator[None]:
    """Hold `build_dir` against other processes' builds and loads of it, with an OS lock on a file beside it.

    torch's own lock is a file `lock` in the folder that a build removes when it ends: a process killed
    mid-build (Ctrl-C, a timeout) leaves it, and every later process waits on it forever, silently.
    The OS drops this lock when its process dies, and while it is held no other build of ours runs, so
    a `lock` file found then is such a leftover: it is removed, and named on stderr. Waiting for another
    process's build, and starting a build (no library in the folder yet), are said on stderr too.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f"{build_dir.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process's build in {build_dir}", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            leftover = build_dir / "lock"
            if leftover.exists():
                print(f"removing {leftover}: a build lock left by a build that did not finish", file=sys.stderr)
                leftover.unlink(missing_ok=True)
            if not (build_dir / f"{build_dir.name}.so").exists():  # what torch's load() writes there
                print(f"building {build_dir.name} (first use of these sources: a minute or two, then cached)",
                      file=sys.stderr, flush=True)  # fmt: skip
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_extension(
    prefix: str, directory: Path, sources: tuple[str, ...], *, fallback: str, defines: tuple[str, ...] = ()
) -> ModuleType:
    """Compile (or load from the cache) the extension `prefix_<digest>` from `sources` in `directory`.

    fallback: what the user can do instead, for the error message (compiler missing, compile error,
    ABI mismatch all raise the same CudaBuildError).
    """
    from torch.utils.cpp_extension import load

    try:
        name = f"{prefix}_{source_digest(directory, sources, defines)}"
        build_dir = build_root() / name
        with exclusive_build(build_dir):
            return load(
                name=name,
                sources=[str(directory / source) for source in sources],
                extra_cuda_cflags=NVCC_FLAGS + [f"-D{d}" for d in defines],
                extra_cflags=["-O3"],
                build_directory=str(build_dir),
                verbose=False,
            )
    except Exception as error:
        failure = f"{type(error).__name__}: {error}"
        raise CudaBuildError(
            f"building the CUDA extension {prefix} from {directory} failed ({failure}). {fallback}"
        ) from error


class ExtensionBuilds:
    """One extension's builds in this process, by build variant, each built (or loaded) once.

    `load(defines)` is called before every kernel launch, so a built variant is returned without
    taking the lock; the lock only keeps two threads from building the same variant at once.
    directory: the sources' folder (None: `source_dir()` when a build starts).
    """

    def __init__(self, prefix: str, sources: tuple[str, ...], *, fallback: str, directory: Path | None = None):
        self.prefix, self.sources, self.fallback, self.directory = prefix, sources, fallback, directory
        self.built: dict[tuple[str, ...], ModuleType] = {}
        self._lock = threading.Lock()

    def load(self, defines: tuple[str, ...] = ()) -> ModuleType:
        defines = tuple(defines)
        module = self.built.get(defines)
        if module is not None:
            return module
        with self._lock:
            if defines not in self.built:
                directory = self.directory or source_dir()
                self.built[defines] = build_extension(
                    self.prefix, directory, self.sources, fallback=self.fallback, defines=defines
                )
        return self.built[defines]
