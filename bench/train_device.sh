#!/usr/bin/env bash
# One device call (~9 min on one H200): check what training compiles on the GPU, then measure training.
#   1. tests/gpu/test_compiled_training.py (every parameter's gradient, compiled vs eager, with the fused
#      loss and without) and tests/gpu/test_head_loss_cuda.py (row kernel and fused loss vs float64);
#   2. only if they pass (a wrong backward's throughput is no figure): bench/train_throughput.py for 169M
#      at micro-batch 128, unfused and fused loss 8192, then 430M at micro-batch 64 with the fused loss;
#      all bf16, ZeRO-0 master path, compiled, cuda WKV.
# Run from the repository root on the GPU machine with DeepSpeed's wheels in .whl/ (device tool: carry
# ".whl"); logs and JSON rows go to $OUT. docs/benchmarks.md, "Training throughput".
#   bash bench/train_device.sh
set -o pipefail
. bench/device_env.sh --deepspeed || exit 1
OUT=${OUT:-/tmp/train_device_out}
LIMIT=${CALL_LIMIT:-570}
mkdir -p "$OUT"
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/env.txt"
gpu_tests "$OUT/tests.log" tests/gpu/test_compiled_training.py tests/gpu/test_head_loss_cuda.py || exit 1
python3 bench/train_throughput.py --models 169m --backends cuda --zero 0 --micro-bsz 128 --compile 1 \
    --fused-loss-chunk 0 8192 --steps 12 --warmup 6 --timeout 200 --budget "$((LIMIT - (SECONDS - start) - 150))" \
    --json "$OUT/train169.json" 2>&1 | grep -v '^{' | tail -n 4
python3 bench/train_throughput.py --models 430m --backends cuda --zero 0 --micro-bsz 64 --compile 1 \
    --fused-loss-chunk 8192 --steps 12 --warmup 6 --timeout 200 --budget "$((LIMIT - (SECONDS - start) - 5))" \
    --json "$OUT/train430.json" 2>&1 | grep -v '^{' | tail -n 3
echo "all done: $((SECONDS - start)) s"
