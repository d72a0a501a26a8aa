#!/usr/bin/env bash
# One device call (~8 min on one H200) for two prepared levers of 169M training: the one-pass
# master-weight Adam kernel (cuda/master_adam.cu, pipeline.optim.MASTER_ADAM_KERNEL) and the fused
# loss's grad_weight accumulated inside the matmul (model.fused_loss.GRAD_WEIGHT_IN_GEMM). First their
# GPU tests (the kernel against MasterWeightAdam's PyTorch path; the fused loss against float64, eager
# and compiled), then training (ZeRO-0 master path, compile, fused loss 8192, micro-batch 128) with the
# four combinations side by side; ROUNDS=2 repeats them (two calls' worth of time), so a difference
# can be told from the 1-2 % that separate calls of one configuration.
# Run from the repository root on the GPU machine with DeepSpeed's wheels in .whl/ (device tool: carry
# ".whl"); logs and JSON go to $OUT. docs/benchmarks.md, "Training throughput".
#   bash bench/train_levers_device.sh
set -o pipefail
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/master_adam_out}
LIMIT=${CALL_LIMIT:-560}
mkdir -p "$OUT"
start=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
python3 -m pytest tests/gpu/test_master_adam_cuda.py tests/gpu/test_head_loss_cuda.py -q -p no:cacheprovider \
    >"$OUT/tests.log" 2>&1
tail -n 3 "$OUT/tests.log"
for round in $(seq "${ROUNDS:-1}"); do
    budget=$((LIMIT - (SECONDS - start)))
    python3 bench/train_throughput.py --models 169m --backends cuda --zero 0 --micro-bsz 128 --compile 1 \
        --fused-loss-chunk 8192 --master-adam torch cuda --grad-weight apart gemm --steps 12 --warmup 6 --timeout 170 \
        --budget "$((budget - 10))" --json "$OUT/train_$round.json" 2>&1 | grep -v '^{' | tail -n 6
done
echo "all done: $((SECONDS - start)) s"
