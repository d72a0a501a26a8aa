#!/usr/bin/env bash
# One device call (~9 min on one H200) for the levers still unmeasured after 2026-11-29's sessions:
#   1. WKV at the five shapes with a shorter sub-chunk (WKV_SUB=8: twice the threads, half the
#      serial walk; 1x1024x4096 bf16 is the one shape under 25 % of copy, with the paired kernels
#      filling under one wave there) and with the unpaired gradients kernel, beside the default build;
#   2. 169M training (ZeRO-0 master path, compile, fused loss 8192, CUDA row kernel) at micro-batch
#      128 and 192: fewer optimizer steps and host gaps per token;
#   3. the same at micro-batch 128 under torch.compile(mode="reduce-overhead") (CUDA graphs; the
#      profile showed ~3 % of the step with the device idle). It may fail; the table says so;
#   and between 1 and 2 the head loss's row kernel built with HEAD_LOSS_LIGHT_PASS1=1 beside the default
#   (bench/head_loss_rows.py: time, and loss / gradient / max / arg-max against the model's formulation).
# Run from the repository root on the GPU machine with DeepSpeed's wheels in .whl/ (device tool:
# carry ".whl"); logs and JSON go to $OUT. docs/benchmarks.md, "WKV CUDA kernel" and "Training
# throughput".
#   bash bench/levers_device.sh
set -o pipefail
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/levers_out}
mkdir -p "$OUT"
start=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
python3 bench/wkv_cuda.py --variants "pairs:;sub8:WKV_SUB=8;pairs_ng:WKV_PAIR_GRADIENTS=0" --accuracy \
    --json "$OUT/wkv.json" 2>&1 | tee "$OUT/wkv.log" | tail -30
echo "wkv done: $((SECONDS - start)) s"
python3 bench/head_loss_rows.py --only "model (logsumexp),CUDA kernel (cuda/head_loss.cu),CUDA kernel (light pass 1)" \
    2>&1 | tee "$OUT/rows.log" | tail -5
budget=$((${CALL_LIMIT:-560} - (SECONDS - start)))
python3 bench/train_throughput.py --models 169m --backends cuda --zero 0 --micro-bsz 128 192 --compile 1 \
    --fused-loss-chunk 8192 --steps 12 --warmup 6 --timeout 200 --budget "$((budget - 180))" \
    --json "$OUT/train_mb.json" 2>&1 | grep -v '^{' | tee "$OUT/train_mb.log" | tail -5
budget=$((${CALL_LIMIT:-560} - (SECONDS - start)))
python3 bench/train_throughput.py --models 169m --backends cuda --zero 0 --micro-bsz 128 --compile 1 \
    --compile-mode reduce-overhead --fused-loss-chunk 8192 --steps 12 --warmup 6 --timeout "$((budget - 10))" \
    --json "$OUT/train_graphs.json" 2>&1 | grep -v '^{' | tee "$OUT/train_graphs.log" | tail -5
echo "all done: $((SECONDS - start)) s"
