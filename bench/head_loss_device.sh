#!/usr/bin/env bash
# One device call (~3-4 min on one H200) for the fused head loss's CUDA row kernel (cuda/head_loss.cu):
# its GPU tests, the row kernel against Inductor's formulation alone, then 169M training with and
# without it. Run from the repository root on the GPU machine with DeepSpeed's wheels in .whl/
# (device tool: carry ".whl"); logs go to $OUT. docs/benchmarks.md, "Training throughput".
#   bash bench/head_loss_device.sh
set -o pipefail
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/head_loss_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
python3 -m pytest tests/gpu/test_head_loss_cuda.py -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.log"
python3 bench/head_loss_rows.py --only "model (logsumexp),CUDA kernel (cuda/head_loss.cu)" 2>&1 | tee "$OUT/rows.log"
python3 bench/train_throughput.py --models 169m --backends cuda --zero 0 --micro-bsz 128 --compile 1 \
    --fused-loss-chunk 8192 --row-kernel compiled cuda --steps 12 --warmup 6 --timeout 200 \
    --json "$OUT/train.json" 2>&1 | grep -v '^{' | tee "$OUT/train.log" | tail -5
