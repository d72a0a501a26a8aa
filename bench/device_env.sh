# Sourced by the one-GPU device scripts (bench/*_device.sh), from the repository root on the GPU machine:
# the environment each of them needs there, and with --deepspeed also DeepSpeed and its missing
# dependencies from the carried .whl/ (../shared/tools/device-wheels.sh; device tool: carry ".whl").
#   . bench/device_env.sh [--deepspeed] || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export TORCH_CUDA_ARCH_LIST=9.0  # the image's 9.0a breaks DeepSpeed's op builder
export PYTHONPATH=$PWD
if [ "${1:-}" = --deepspeed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || return 1
  export PYTHONPATH=/tmp/site:$PWD
fi

# The GPU tests a measurement rests on: `gpu_tests LOG TEST...` runs them into LOG, prints their summary
# and fails when they do (a wrong kernel's throughput is no figure), e.g. `gpu_tests "$OUT/tests.log"
# tests/gpu/test_head_loss_cuda.py || exit 1`.
gpu_tests() {
  local log=$1
  shift
  python3 -m pytest "$@" -q -p no:cacheprovider >"$log" 2>&1
  local status=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$log" | tail -n 12
  [ "$status" = 0 ] || { echo "GPU tests failed: no throughput measured"; return 1; }
}
