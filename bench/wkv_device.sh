#!/usr/bin/env bash
# One device call (~5 min on one H200) for the WKV kernel's backward choice between its paired and
# unpaired gradients kernels by grid size (cuda/wkv.cu, WKV_PAIR_GRADIENTS_MIN_GRID): the five
# benchmark shapes with the default rule, always paired and never paired side by side (the default
# twice, for the run's noise), with the float64 accuracy table; then the WKV GPU tests and memcheck
# on the default build. Run from the repository root on the GPU machine; logs and JSON go to $OUT.
# docs/benchmarks.md, "WKV CUDA kernel".
#   bash bench/wkv_device.sh
set -o pipefail
. bench/device_env.sh || exit 1
OUT=${OUT:-/tmp/wkv_out}
mkdir -p "$OUT"
start=$SECONDS
python3 bench/wkv_cuda.py --accuracy --json "$OUT/wkv.json" \
    --variants "auto:;always:WKV_PAIR_GRADIENTS_MIN_GRID=0;never:WKV_PAIR_GRADIENTS_MIN_GRID=1000000;auto_again:" \
    >"$OUT/wkv.log" 2>&1
echo "bench done at $((SECONDS - start)) s"
python3 -m pytest tests/gpu/test_wkv_cuda.py tests/gpu/test_wkv_compile.py -q -p no:cacheprovider \
    >"$OUT/wkv_tests.log" 2>&1
PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 bench/wkv_cuda.py --smoke \
    >"$OUT/wkv_memcheck.log" 2>&1
echo "tests done at $((SECONDS - start)) s"
tail -n 30 "$OUT/wkv.log"
tail -n 4 "$OUT/wkv_tests.log" "$OUT/wkv_memcheck.log"
