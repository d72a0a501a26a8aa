#!/usr/bin/env bash
# Where the WKV kernel's time goes at the issue's shapes, by the hardware counters (one device call on one
# H200, ~4 min; ncu reads the counters on the Firecracker machines: ../.library/device/KINDS.md).
# For each shape: 10 fwd+bwd calls of the default build (bf16) to warm up, then 2 more with the profiler
# on; ncu profiles each of their kernels in isolation (serialised, caches flushed, clocks as found).
# The raw CSVs go to $OUT; `python bench/wkv_ncu_table.py $OUT/ncu_*.csv` makes the per-kernel table.
#   bash bench/wkv_ncu.sh ["B T C" ...]        # default: the issue's five shapes
set -uo pipefail
OUT=${OUT:-/tmp/wkv-ncu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
python3 -c "from model.wkv_cuda import load_extension; load_extension(); print('built')" || exit 1
[ $# -gt 0 ] || set -- "8 1024 768" "8 4096 768" "2 16384 768" "16 1024 2048" "1 1024 4096"
case_py='
import sys, torch
sys.path.insert(0, "bench")
from wkv_cuda import make_case
b, t, c = map(int, sys.argv[1:4])
_, forward_backward = make_case(b, t, c, torch.bfloat16)
for _ in range(10):
    forward_backward()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
for _ in range(2):
    forward_backward()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
'
for shape in "$@"; do
  name=${shape// /x}
  ncu --clock-control none --profile-from-start off -k 'regex:^(fwd|bwd)_' \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --csv --page details python3 -c "$case_py" $shape \
      >"$OUT/ncu_$name.csv" 2>"$OUT/ncu_$name.err" \
    && echo "$shape: $(grep -c '"Duration"' "$OUT/ncu_$name.csv") kernels profiled" \
    || { echo "ncu failed at $shape:"; tail -n 5 "$OUT/ncu_$name.err"; }
done
