"""Which kernels of a CUDA source compile to different machine code than at another commit.

    python bench/cubin_diff.py --base HEAD~1                 # cuda/wkv.cu, the working tree against HEAD~1
    python bench/cubin_diff.py --base main cuda/head_loss.cu --defines WKV_SINGLE_BWD=2

Both versions are compiled here with the extension's nvcc flags (model/cuda_extension.py) for sm_90,
and each kernel's text section (its SASS) is compared byte for byte: a refactor that leaves every
kernel identical needs no new GPU measurement. CPU machine only needs nvcc and readelf.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.cuda_extension import NVCC_FLAGS  # noqa: E402


def kernel_sections(cubin: Path) -> dict[str, str]:
    """{kernel's mangled name: sha256 of its .text section}, read with readelf (any ELF machine)."""
    listing = subprocess.run(["readelf", "-S", "-W", str(cubin)], capture_output=True, text=True, check=True).stdout
    data = cubin.read_bytes()
    sections = {}
    for line in listing.splitlines():
        match = re.search(r"\]\s+\.text\.(\S+)\s+\S+\s+[0-9a-f]+\s+([0-9a-f]+)\s+([0-9a-f]+)", line)
        if match:
            offset, size = int(match.group(2), 16), int(match.group(3), 16)
            # An anonymous namespace's mangled name carries a hash of the file's path: drop it.
            name = re.sub(r"_GLOBAL__N__[0-9a-f]+_", "_GLOBAL__N__", match.group(1))
            sections[name] = hashlib.sha256(data[offset : offset + size]).hexdigest()
    return sections


def compile_cubin(source: Path, out: Path, defines: list[str]) -> Path:
    command = ["nvcc", "-arch=sm_90", *NVCC_FLAGS, *(f"-D{d}" for d in defines), "-cubin", str(source), "-o", str(out)]
    subprocess.run(command, check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default="cuda/wkv.cu", help="the .cu file, relative to the repository")
    parser.add_argument("--base", required=True, help="the commit to compare the working tree's version with")
    parser.add_argument("--defines", default="", help="'NAME=1,NAME2=2': a build variant, for both versions")
    args = parser.parse_args()
    defines = [d for d in args.defines.split(",") if d]
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        # The base version sits beside its own copy of the source folder, so its includes resolve as in the tree.
        base_dir = tmp / "base"
        base_dir.mkdir()
        folder = Path(args.source).parent
        for name in subprocess.run(
            ["git", "ls-tree", "--name-only", f"{args.base}:{folder}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split():
            blob = subprocess.run(
                ["git", "show", f"{args.base}:{folder / name}"], cwd=ROOT, capture_output=True, check=True
            )
            (base_dir / name).write_bytes(blob.stdout)
        before = kernel_sections(compile_cubin(base_dir / Path(args.source).name, tmp / "base.cubin", defines))
        after = kernel_sections(compile_cubin(ROOT / args.source, tmp / "tree.cubin", defines))
    for name in sorted(set(before) | set(after)):
        if name not in before:
            print(f"new        {name}")
        elif name not in after:
            print(f"removed    {name}")
        elif before[name] != after[name]:
            print(f"different  {name}")
    same = sum(before.get(name) == digest for name, digest in after.items())
    print(f"{same} of {len(after)} kernels identical to {args.base}")


if __name__ == "__main__":
    main()
