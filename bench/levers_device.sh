#!/usr/bin/env bash
# One device call (~9 min) for the levers still unmeasured after 2026-11-29's sessions, in two lanes
# that run side by side when two GPUs are visible (one after the other on one GPU):
#   kernels (the last GPU):
#     1. WKV at the five shapes with a shorter sub-chunk (WKV_SUB=8: twice the threads, half
#        the serial walk; 1x1024x4096 bf16 is the one shape under 25 % of copy, with the paired kernels
#        filling under one wave there) and with the unpaired gradients kernel everywhere,
#        beside the default build, with the float64 accuracy table;
#     2. the WKV GPU tests and memcheck on the WKV_SUB=8 build (RWKV_WKV_TEST_DEFINES), so it can
#        become the default on this evidence;
#     3. the head loss's GPU tests (both builds: default and HEAD_LOSS_LIGHT_PASS1=1) and its row
#        kernels side by side (bench/head_loss_rows.py);
#   training (GPU 0): 169M (ZeRO-0 master path, compile, fused loss 8192) at micro-batch 128 and 192
#     with the default and the light row kernel, then micro-batch 128 under
#     torch.compile(mode="reduce-overhead") (CUDA graphs; the profile showed ~3 % of the step with the
#     device idle). A row that fails says so in the table.
# Run from the repository root on the GPU machine with DeepSpeed's wheels in .whl/ (device tool:
# carry ".whl"); logs and JSON go to $OUT. docs/benchmarks.md, "WKV CUDA kernel" and "Training
# throughput".
#   CALL_LIMIT=580 bash bench/levers_device.sh
set -o pipefail
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/levers_out}
LIMIT=${CALL_LIMIT:-560}
mkdir -p "$OUT"
start=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
gpus=$(nvidia-smi -L | wc -l)
kernel_gpu=$((gpus - 1))

kernels() {
    export CUDA_VISIBLE_DEVICES=$kernel_gpu
    python3 bench/wkv_cuda.py --variants "pairs:;sub8:WKV_SUB=8;pairs_ng:WKV_PAIR_GRADIENTS_MIN_GRID=1000000" --accuracy \
        --json "$OUT/wkv.json" >"$OUT/wkv.log" 2>&1
    echo "kernels: wkv bench done at $((SECONDS - start)) s"
    RWKV_WKV_TEST_DEFINES="WKV_SUB=8" python3 -m pytest tests/gpu/test_wkv_cuda.py tests/gpu/test_wkv_compile.py \
        -q -p no:cacheprovider >"$OUT/wkv_sub8_tests.log" 2>&1
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 bench/wkv_cuda.py --smoke \
        --defines WKV_SUB=8 >"$OUT/wkv_sub8_memcheck.log" 2>&1
    echo "kernels: wkv sub8 tests done at $((SECONDS - start)) s"
    python3 -m pytest tests/gpu/test_head_loss_cuda.py -q -p no:cacheprovider >"$OUT/head_loss_tests.log" 2>&1
    python3 bench/head_loss_rows.py \
        --only "model (logsumexp),CUDA kernel (cuda/head_loss.cu),CUDA kernel (light pass 1)" >"$OUT/rows.log" 2>&1
    echo "kernels: head loss done at $((SECONDS - start)) s"
}

training() {
    export CUDA_VISIBLE_DEVICES=0
    local budget=$((LIMIT - (SECONDS - start)))
    python3 bench/train_throughput.py --models 169m --backends cuda --zero 0 --micro-bsz 128 192 --compile 1 \
        --fused-loss-chunk 8192 --row-kernel cuda cuda-light --steps 12 --warmup 6 --timeout 200 \
        --budget "$((budget - 120))" --json "$OUT/train_mb.json" 2>&1 | grep -v '^{' >"$OUT/train_mb.log"
    echo "training: micro-batch rows done at $((SECONDS - start)) s"
    budget=$((LIMIT - (SECONDS - start)))
    python3 bench/train_throughput.py --models 169m --backends cuda --zero 0 --micro-bsz 128 --compile 1 \
        --compile-mode reduce-overhead --fused-loss-chunk 8192 --steps 12 --warmup 6 --timeout "$((budget - 10))" \
        --json "$OUT/train_graphs.json" 2>&1 | grep -v '^{' >"$OUT/train_graphs.log"
    echo "training: reduce-overhead done at $((SECONDS - start)) s"
}

if [ "$gpus" -gt 1 ]; then
    kernels &
    training
    wait
else
    kernels
    training
fi
for log in wkv.log wkv_sub8_tests.log wkv_sub8_memcheck.log head_loss_tests.log rows.log train_mb.log train_graphs.log; do
    echo "== $log"
    tail -n 12 "$OUT/$log"
done
echo "all done: $((SECONDS - start)) s"
