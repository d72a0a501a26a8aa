#!/usr/bin/env bash
# One device call (~4 min on one H200) for the WKV kernel's sequential path (cuda/wkv.cu,
# WKV_SEQ_MIN_LANES_PER_SM): the parallel kernels only, and the sequential kernels forced on every
# shape at several block sizes and register budgets, side by side on the five benchmark shapes and
# the training shapes (169M at micro-batch 32-128, 430M at 64), with the float64 accuracy table;
# then the WKV GPU tests and memcheck with the sequential kernels forced, and with --default-tests
# the default build's tests too (~2 min more). Run from the repository root on the GPU machine;
# logs and JSON go to $OUT. docs/benchmarks.md, "WKV CUDA kernel", run 8.
#   bash bench/wkv_device.sh [--default-tests]
set -o pipefail
. bench/device_env.sh || exit 1
OUT=${OUT:-/tmp/wkv_out}
mkdir -p "$OUT"
start=$SECONDS
NEVER=WKV_SEQ_MIN_LANES_PER_SM=1000000000
# Sequential kernels on every shape, bf16 with channel pairs (run 8 measured these budgets as seq4,
# the defaults then; the default since is seq4_bwd_wide's, with pairs only from 512 lanes per SM).
SEQ="WKV_SEQ_MIN_LANES_PER_SM=1 WKV_SEQ_PAIR_MIN_LANES_PER_SM=1"
S0=${SEQ// /,}
S=$S0,WKV_SEQ_BWD_MIN_BLOCKS=6,WKV_SEQ_PAIR_BWD_MIN_BLOCKS=4
python3 bench/wkv_cuda.py --accuracy --json "$OUT/wkv.json" \
    --shapes 8x1024x768,8x4096x768,2x16384x768,16x1024x2048,1x1024x4096,32x1024x768,64x1024x768,128x1024x768,64x1024x1024 \
    --variants "parallel:$NEVER;seq4:$S;seq2:$S0,WKV_SEQ_ROWS=2,WKV_SEQ_FWD_MIN_BLOCKS=8,WKV_SEQ_PAIR_FWD_MIN_BLOCKS=8,\
WKV_SEQ_BWD_MIN_BLOCKS=12,WKV_SEQ_PAIR_BWD_MIN_BLOCKS=8;seq8:$S0,WKV_SEQ_ROWS=8,WKV_SEQ_FWD_MIN_BLOCKS=2,\
WKV_SEQ_PAIR_FWD_MIN_BLOCKS=2,WKV_SEQ_BWD_MIN_BLOCKS=3,WKV_SEQ_PAIR_BWD_MIN_BLOCKS=2;\
seq4_unpaired:WKV_SEQ_MIN_LANES_PER_SM=1,WKV_SEQ_PAIR_MIN_LANES_PER_SM=1000000000,WKV_SEQ_BWD_MIN_BLOCKS=6;seq4_bwd_wide:$S0" \
    >"$OUT/wkv.log" 2>&1
echo "bench done at $((SECONDS - start)) s"
RWKV_WKV_TEST_DEFINES="$SEQ" python3 -m pytest tests/gpu/test_wkv_cuda.py -q -p no:cacheprovider \
    >"$OUT/wkv_tests_seq.log" 2>&1
PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 bench/wkv_cuda.py --smoke \
    --defines "$S0" >"$OUT/wkv_memcheck_seq.log" 2>&1
[ "${1:-}" = --default-tests ] && python3 -m pytest tests/gpu/test_wkv_cuda.py tests/gpu/test_wkv_compile.py -q \
    -p no:cacheprovider >"$OUT/wkv_tests.log" 2>&1
echo "tests done at $((SECONDS - start)) s"
tail -n 12 "$OUT/wkv.log"
tail -n 4 "$OUT/wkv_tests_seq.log" "$OUT/wkv_memcheck_seq.log" "$OUT"/wkv_tests.log
