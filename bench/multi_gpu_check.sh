#!/usr/bin/env bash
# One device call on a multi-GPU machine (nvidia-h200-x2): install Ray + DeepSpeed from the carried wheels,
# show the GPUs and their link, build the WKV kernel and FusedAdam once (in parallel), then run what is
# asked, teeing every log into $OUT:
#   bash bench/multi_gpu_check.sh tests                      # tests/gpu/test_multi_gpu.py + all-reduce probe
#   bash bench/multi_gpu_check.sh scaling ARGS...            # bench/train_scaling.py ARGS (its --budget too)
#   bash bench/multi_gpu_check.sh all ARGS...                # both, the scaling bench last
# CALL_LIMIT (seconds, default 540) bounds the whole call: the tests get at most TESTS_LIMIT (300), and the
# scaling bench gets what is left as its --budget (jobs that would not fit are skipped, not started).
# Device tool: carry [".raydev", ".whl"] (.raydev from bench/pack_ray_for_device.sh, .whl from
# ../shared/tools/device-wheels.sh); files come back as $OUT/{env,tests,measured,allreduce,scaling}.*
# The machine is bare unless still warm from the last call: the install is skipped when already there.
set -uo pipefail
mode=${1:-all}
shift || true
OUT=${OUT:-/tmp/multi-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0  # the image's 9.0a breaks DeepSpeed's op builder
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast off
export RAY_AUTH_MODE=disabled MAX_JOBS=16
start=$SECONDS
CALL_LIMIT=${CALL_LIMIT:-540} TESTS_LIMIT=${TESTS_LIMIT:-300}
if ! PYTHONPATH=/tmp/site python3 -c "import ray, deepspeed" 2>/dev/null; then
  mkdir -p /tmp/site
  tar xJf .raydev/ray312.tar.xz -C /tmp/site \
    && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .raydev/*.whl \
    && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/deepspeed* .whl/hjson* || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
# Ray Train V2 (2.60) calls into ray.tune from every worker's ray.train.get_context(): the carried Ray
# must include Tune (bench/pack_ray_for_device.sh packs it; a pack without it failed here on 2026-11-29).
PYTHONPATH=/tmp/site python3 -c "import ray.tune.trainable.trainable_fn_utils" \
  || { echo "the carried Ray lacks ray.tune: rebuild .raydev with bench/pack_ray_for_device.sh"; exit 1; }
{
  echo "install: $((SECONDS - start)) s"; date -u; nvidia-smi -L; nvidia-smi topo -m
  python3 -c "import torch, deepspeed, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpus', torch.cuda.device_count(), 'nccl', torch.cuda.nccl.version(), 'deepspeed', deepspeed.__version__, 'ray', ray.__version__)"
  # Both JIT builds once, side by side; every later process loads them from torch's extension cache.
  python3 -c "from model.wkv_cuda import load_extension; load_extension(); print('wkv built')" &
  python3 -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load(); print('fused adam built')" &
  wait
  echo "ready: $((SECONDS - start)) s"
} 2>&1 | tee -a "$OUT/env.log"

if [ "$mode" = tests ] || [ "$mode" = all ]; then
  if [ "${ALLREDUCE:-1}" = 1 ]; then
    python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/allreduce_bandwidth.py 2>&1 \
      | tee "$OUT/allreduce.log"
  fi
  # The Ray-free test first; -rA and a per-test timeout well inside TESTS_LIMIT, so failures get reported.
  t=tests/gpu/test_multi_gpu.py
  MULTI_GPU_REPORT="$OUT/measured.jsonl" timeout -k 10 "$TESTS_LIMIT" python3 -m pytest -v -rA -p no:cacheprovider \
    --timeout "${TEST_TIMEOUT:-100}" $t::test_fp32_checkpoints_move_one_gpu_to_two_and_back $t::test_ray_train_two_gpus_zero2 \
    $t::test_kill_one_worker_then_loss_curve_continues_exactly $t::test_zero2_two_gpu_checkpoint_exports_to_one_gpu_and_cpu \
    $t::test_ray_train_two_gpus_zero3_and_export 2>&1 | tee "$OUT/tests.log"
  # Ray's own logs (workers, raylet), the tails only, for a failure the test output does not explain.
  for f in /tmp/ray/session_latest/logs/{raylet.out,gcs_server.out,worker-*.err,worker-*.out}; do
    [ -s "$f" ] && { echo "== $f"; tail -n 25 "$f"; }
  done 2>/dev/null | tail -c 2000000 > "$OUT/raylogs.txt"
  echo "tests done: $((SECONDS - start)) s" | tee -a "$OUT/env.log"
fi
if [ "$mode" = scaling ] || [ "$mode" = all ]; then
  budget=$((CALL_LIMIT - (SECONDS - start) - 10))
  python3 bench/train_scaling.py "$@" --budget "$budget" --json "$OUT/scaling.json" 2>&1 | tee "$OUT/scaling.log"
  echo "scaling done: $((SECONDS - start)) s" | tee -a "$OUT/env.log"
fi
