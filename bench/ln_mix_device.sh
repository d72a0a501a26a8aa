#!/usr/bin/env bash
# One device call (~9 min on one H200) for the fused LayerNorm + token shift + mix kernels
# (model/ln_shift_mix.py, model.rwkv.FUSED_LN_MIX, off by default until this is measured):
#   1. their tests on the GPU: the kernels against float64 (tests/unit/test_ln_shift_mix.py, compiled for
#      CUDA here) and the model with the switch on against the plain blocks, eager and compiled
#      (tests/gpu/test_ln_shift_mix_cuda.py);
#   2. only if they pass: the kernels alone against Inductor at the training shapes, at 32, 64 and 128
#      rows per program (bench/ln_shift_mix.py), then 169M training at micro-batch 128 (compile, fused
#      loss 8192, ZeRO-0 master path, cuda WKV), the switch off and on, alternating, each row its own
#      process.
# Run from the repository root on the GPU machine with DeepSpeed's wheels in .whl/ (device tool: carry
# ".whl"); logs and JSON rows go to $OUT.
#   bash bench/ln_mix_device.sh
set -o pipefail
. bench/device_env.sh --deepspeed || exit 1
OUT=${OUT:-/tmp/ln_mix_out}
mkdir -p "$OUT"
start=$SECONDS
python3 -m pytest tests/unit/test_ln_shift_mix.py tests/gpu/test_ln_shift_mix_cuda.py -q -p no:cacheprovider \
    >"$OUT/tests.log" 2>&1
status=$?
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 12
[ "$status" = 0 ] || { echo "tests failed: no throughput measured"; exit 1; }
echo "tests done at $((SECONDS - start)) s"
python3 bench/ln_shift_mix.py --rows 32 64 128 >"$OUT/kernels.log" 2>&1
tail -n 18 "$OUT/kernels.log"
echo "kernels done at $((SECONDS - start)) s"
python3 bench/train_throughput.py --models 169m --backends cuda --zero 0 --micro-bsz 128 --compile 1 \
    --fused-loss-chunk 8192 --steps 12 --warmup 6 --timeout 200 --fused-ln-mix 0 1 0 1 \
    --json "$OUT/train169.json" 2>&1 | grep -v '^{' | tail -n 6
echo "all done: $((SECONDS - start)) s"
