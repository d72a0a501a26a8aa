#!/usr/bin/env bash
# One device call (~8 min on one H200): chunked training under torch.compile (RWKV.compile_chunks).
#   1. tests/gpu/test_compiled_training.py, whose chunked case compares every parameter's gradient of
#      a bf16 step compiled per chunk against eager (and the whole-model cases as before);
#   2. only if they pass: 169M, 8 windows of 8192 tokens a step, bf16, fused loss 8192, ZeRO-0 master
#      path, cuda WKV: chunk_len 1024 compiled, then eager, each in its own process; compare with whole
#      windows compiled (537,732 tokens/s, 31.0 GiB in session 15) and chunked eager (82,388, 6.7 GiB).
# Run from the repository root on the GPU machine with DeepSpeed's wheels in .whl/ (device tool: carry
# ".whl"); logs and JSON rows go to $OUT. docs/benchmarks.md, "Training throughput / session 16".
#   bash bench/chunked_compile_device.sh
set -o pipefail
. bench/device_env.sh --deepspeed || exit 1
OUT=${OUT:-/tmp/chunked_compile_out}
mkdir -p "$OUT"
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/env.txt"
gpu_tests "$OUT/tests.log" tests/gpu/test_compiled_training.py || exit 1
for compile in 1 0; do
  python3 bench/train_throughput.py --models 169m --backends cuda --zero 0 --micro-bsz 8 --fused-loss-chunk 8192 \
      --ctx 8192 --chunk-len 1024 --compile "$compile" --steps 6 --warmup 4 --timeout 240 \
      --json "$OUT/chunked_compile$compile.json" 2>&1 | grep -v '^{' | tail -n 3
done
echo "all done: $((SECONDS - start)) s"
