#!/usr/bin/env bash
# One device call (~7 min on one H200) for the fused LayerNorm + token shift + mix kernels
# (model/ln_shift_mix.py, ModelConfig.fused_ln_mix, on by default: docs/benchmarks.md):
#   1. their tests on the GPU: the kernels against float64 (tests/unit/test_ln_shift_mix.py, compiled for
#      CUDA here) and the model with the switch on against the plain blocks, eager and compiled
#      (tests/gpu/test_ln_shift_mix_cuda.py); TESTS=0 skips them (~3 min);
#   2. only if they pass: the kernels alone against Inductor at the training shapes, at each launch
#      configuration given (bench/ln_shift_mix.py --configs; none: the module's), with $BENCH_FLAGS
#      (e.g. "--compiled --wide"); SWEEP=0 skips it;
#   3. 169M training at micro-batch 128 (compile, fused loss 8192, ZeRO-0 master path, cuda WKV), the
#      switch as in $TRAIN_SWITCH (default "0 1 0 1": off and on, alternating), each row its own process;
#      with PROFILE=N each row also profiles N steps (top kernels in the log, files in $OUT); with
#      SWITCH_430M="0 1" also 430M at micro-batch 64, the switch as given.
# Run from the repository root on the GPU machine with DeepSpeed's wheels in .whl/ (device tool: carry
# ".whl"); logs and JSON rows go to $OUT.
#   bash bench/ln_mix_device.sh [CONFIG ...]
set -o pipefail
. bench/device_env.sh --deepspeed || exit 1
OUT=${OUT:-/tmp/ln_mix_out}
mkdir -p "$OUT"
start=$SECONDS
if [ "${TESTS:-1}" != 0 ]; then
  gpu_tests "$OUT/tests.log" tests/unit/test_ln_shift_mix.py tests/gpu/test_ln_shift_mix_cuda.py || exit 1
  echo "tests done at $((SECONDS - start)) s"
fi
if [ "${SWEEP:-1}" != 0 ]; then
  # shellcheck disable=SC2086  # the flags are words
  python3 bench/ln_shift_mix.py ${1:+--configs "$@"} ${BENCH_FLAGS:-} >"$OUT/kernels.log" 2>&1
  grep -v "^|---" "$OUT/kernels.log" | tail -n 40
  echo "kernels done at $((SECONDS - start)) s"
fi
# shellcheck disable=SC2086  # the switch values are words
python3 bench/train_throughput.py --models 169m --backends cuda --zero 0 --micro-bsz 128 --compile 1 \
    --fused-loss-chunk 8192 --steps 12 --warmup 6 --timeout 200 --fused-ln-mix ${TRAIN_SWITCH:-0 1 0 1} \
    ${PROFILE:+--profile "$PROFILE" --out "$OUT"} --json "$OUT/train169.json" 2>&1 | grep -v '^{' | tail -n 80
if [ -n "${SWITCH_430M:-}" ]; then
  # shellcheck disable=SC2086  # the switch values are words
  python3 bench/train_throughput.py --models 430m --backends cuda --zero 0 --micro-bsz 64 --compile 1 \
      --fused-loss-chunk 8192 --steps 12 --warmup 6 --timeout 280 --fused-ln-mix $SWITCH_430M \
      --json "$OUT/train430.json" 2>&1 | grep -v '^{' | tail -n 20
fi
echo "all done: $((SECONDS - start)) s"
