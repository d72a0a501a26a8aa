#!/usr/bin/env bash
# One device call for the training-throughput levers (docs/benchmarks.md, "Training throughput"):
# RWKV-4 169M, ctx 1024, bf16, ZeRO-0 master path, micro-batch 64, compiled: the unfused loss vs the fused
# head loss (chunk 8192) x the loop's host syncs before/after (pipeline/train.py), each profiled for 3 steps;
# then 430M at micro-batch 32, eager and compiled. Run from the repository root on the GPU machine with
# DeepSpeed's wheels in .whl/ (device tool: carry ".whl"); logs, rows and profiles go to $OUT.
#   bash bench/train_mfu_device.sh
set -o pipefail
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/mfu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm,temperature.gpu --format=csv,noheader
    python3 -c "import torch, triton, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__)"
    # the deferred skip on CUDA: a device flag, the LR as a device tensor in torch's fused Adam
    python3 - <<'PY'
import torch
from pipeline.optim import MasterWeightAdam
w = torch.nn.Parameter(torch.randn(1000, device="cuda", dtype=torch.bfloat16))
opt = MasterWeightAdam([{"params": [w], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, max_norm=1.0)
before = w.detach().clone()
w.grad = torch.full_like(w, float("nan"))
opt.skip_step_if(torch.tensor(True, device="cuda"))
opt.step()
print("skipped step: weights unchanged", torch.equal(before, w.detach()), "norm", float(opt._global_grad_norm))
w.grad = torch.randn_like(w)
opt.skip_step_if(torch.tensor(False, device="cuda"))
opt.step()
print("normal step: weights moved", not torch.equal(before, w.detach()), "step", opt.state[w]["step"].item())
PY
} 2>&1 | tee "$OUT/env.txt"
python3 bench/train_throughput.py --models 169m --backends cuda --zero 0 --micro-bsz 64 --compile 1 \
    --fused-loss-chunk 0 8192 --host-sync old new --steps 12 --warmup 6 --profile 3 --out /tmp/prof \
    --json "$OUT/rows169.json" --budget "${BUDGET_169:-250}" 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/log169.txt"
python3 bench/train_throughput.py --models 430m --backends cuda --zero 0 --micro-bsz 32 --compile 0 1 \
    --fused-loss-chunk 8192 --steps 12 --warmup 6 --json "$OUT/rows430.json" --budget "${BUDGET_430:-150}" \
    2>&1 | grep -v "Warning\|warn(" | tee "$OUT/log430.txt"
cat /tmp/prof/*.md > "$OUT/profiles.md" 2>/dev/null
grep -h "idle\|^| [a-z]*Synchronize\|^| cudaMemcpy" "$OUT/profiles.md"
grep -h "^| 169m\|^| 430m\|^| model" "$OUT/log169.txt" "$OUT/log430.txt"
