#!/usr/bin/env bash
# One device call (~8 min on one H200) for the head loss's staged row kernel (cuda/head_loss.cu,
# model.head_loss_cuda.STAGED_ROWS, off by default: docs/benchmarks.md, "Training throughput"):
#   1. tests/gpu/test_head_loss_cuda.py (both row kernels against float64, staged against two-pass);
#   2. only if they pass: the row kernels alone on an 8192 x 50304 chunk (bench/head_loss_rows.py);
#   3. 169M training at micro-batch 128 (compile, fused loss 8192, ZeRO-0 master path, cuda WKV) with the
#      row kernels as in $ROW_KERNELS (default "cuda cuda-staged cuda cuda-staged"), each row its own
#      process, within the call's limit (CALL_LIMIT, default 570 s).
# Run from the repository root on the GPU machine with DeepSpeed's wheels in .whl/ (device tool: carry
# ".whl"); logs and JSON rows go to $OUT.
#   bash bench/head_loss_device.sh
set -o pipefail
. bench/device_env.sh --deepspeed || exit 1
OUT=${OUT:-/tmp/head_loss_out}
LIMIT=${CALL_LIMIT:-570}
mkdir -p "$OUT"
start=$SECONDS
gpu_tests "$OUT/tests.log" tests/gpu/test_head_loss_cuda.py || exit 1
python3 bench/head_loss_rows.py --only "CUDA kernel (cuda/head_loss.cu),CUDA kernel (staged rows)" \
    >"$OUT/kernels.log" 2>&1
grep -v "^|---" "$OUT/kernels.log" | tail -n 6
echo "kernels done at $((SECONDS - start)) s"
# shellcheck disable=SC2086  # the row kernels are words
python3 bench/train_throughput.py --models 169m --backends cuda --zero 0 --micro-bsz 128 --compile 1 \
    --fused-loss-chunk 8192 --steps 12 --warmup 6 --timeout 200 --budget "$((LIMIT - (SECONDS - start) - 5))" \
    --row-kernel ${ROW_KERNELS:-cuda cuda-staged cuda cuda-staged} --json "$OUT/train169.json" 2>&1 \
    | grep -v '^{' | tail -n 8
echo "all done: $((SECONDS - start)) s"
