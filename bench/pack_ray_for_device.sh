#!/usr/bin/env bash
# Pack Ray for the GPU machines, which have no Ray and cannot fetch one: writes .raydev/ (git-ignored),
# a stripped Ray for CPython 3.12 plus the wheels it needs there, small enough to carry (< 64 MiB).
#
#   bash bench/pack_ray_for_device.sh            # Ray 2.60.0 (the version of this project's venv)
#   RAY_VERSION=2.60.0 bash bench/pack_ray_for_device.sh
#
# On the device (carry [".raydev"]), before anything imports Ray:
#   mkdir -p /tmp/site && tar xJf .raydev/ray312.tar.xz -C /tmp/site \
#     && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .raydev/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD
#
# Why stripped: the cp312 wheel is ~79 MB, over the carry limit. Symbols are stripped from the binaries; dropped: the Java jars, RLlib, Serve, LLM,
# the dashboard's web client, and every tests/ folder. Kept: core, Data, Train AND Tune (Ray Train V2 calls
# ray.tune's `_in_tune_session` in every worker's ray.train.get_context(); a build without Tune fails
# there with "No module named 'ray.tune'", as seen on the x2 machine on 2026-11-29).
set -euo pipefail
RAY_VERSION=${RAY_VERSION:-2.60.0}
root=$(git rev-parse --show-toplevel)
out="$root/.raydev"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
grep -qx '/.raydev/' "$root/.git/info/exclude" 2>/dev/null || echo '/.raydev/' >>"$root/.git/info/exclude"

platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
fetch() {  # fetch NAME==VERSION... as cp312 binary wheels, without their dependencies
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$1" "${@:2}"
}
fetch "$work" "ray==$RAY_VERSION"
python3 - "$work" <<'EOF'
import sys, zipfile
from pathlib import Path

work = Path(sys.argv[1])
wheel = next(work.glob("ray-*.whl"))
drop = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/")
with zipfile.ZipFile(wheel) as archive:
    names = [n for n in archive.namelist()
             if n.startswith("ray/") and not n.startswith(drop) and "/tests/" not in n]
    for name in names:  # extractall drops the mode bits, and raylet / gcs_server must stay executable
        path = Path(archive.extract(name, work / "pkg"))
        mode = archive.getinfo(name).external_attr >> 16
        if mode:
            path.chmod(mode & 0o777)
print(f"{len(names)} files kept from {wheel.name}")
EOF
# Symbols are a third of the binaries' size and nothing here needs them.
find "$work/pkg" -type f \( -name '*.so*' -o -perm -u+x \) -exec sh -c 'head -c4 "$1" | grep -q ELF' _ {} \; \
  -exec strip --strip-unneeded {} \;
mkdir -p "$out"
rm -f "$out"/ray312.tar.xz "$out"/*.whl
tar -C "$work/pkg" -cf - ray | xz -T0 -9 >"$out/ray312.tar.xz"
# What Ray needs that the device image lacks (its image has numpy, pyarrow, pandas, fsspec, requests,
# msgpack, protobuf, grpcio, aiohttp, pyyaml, click, filelock, packaging).
fetch "$out" pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 \
  jsonschema==4.26.0 jsonschema_specifications==2025.9.1 referencing==0.37.0 rpds_py==2026.9.1 zstandard==0.25.0
du -sh "$out"
