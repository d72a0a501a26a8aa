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
