"""NCCL all-reduce and reduce-scatter bandwidth between the GPUs of one host, at gradient-sized messages.

    torchrun --standalone --nproc-per-node 2 bench/allreduce_bandwidth.py          # prints a markdown table

Times `dist.all_reduce` and `dist.reduce_scatter_tensor` of bf16 and fp32 buffers (the gradient bytes of
RWKV-4 169M / 430M and a 200 MB DeepSpeed bucket) with CUDA events, median of `--repeats` after warm-up.
Bus bandwidth as nccl-tests defines it: all-reduce moves 2 (W - 1) / W of the buffer per GPU,
reduce-scatter (W - 1) / W. NVLink multicast stays off (pipeline/distributed_env.py), as in training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pipeline.distributed_env import keep_multicast_off  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mbytes", type=float, nargs="+", default=[25, 200, 338, 860])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    keep_multicast_off()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if rank == 0:
        print("| op | dtype | MB | ms | bus GB/s |\n|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for mbytes in args.mbytes:
            numel = int(mbytes * 1e6) // torch.tensor([], dtype=dtype).element_size() // world * world
            buffer = torch.ones(numel, dtype=dtype, device="cuda")
            out = torch.empty(numel // world, dtype=dtype, device="cuda")
            ops = {
                "all_reduce": (lambda b=buffer: dist.all_reduce(b), 2 * (world - 1) / world),
                "reduce_scatter": (lambda o=out, b=buffer: dist.reduce_scatter_tensor(o, b), (world - 1) / world),
            }
            for name, (op, factor) in ops.items():
                times = []
                for i in range(args.repeats + 3):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    dist.barrier()
                    start.record()
                    op()
                    end.record()
                    torch.cuda.synchronize()
                    if i >= 3:
                        times.append(start.elapsed_time(end))
                ms = statistics.median(times)
                nbytes = numel * buffer.element_size()
                if rank == 0:
                    gbps = nbytes * factor / ms / 1e6
                    print(f"| {name} | {str(dtype)[6:]} | {nbytes / 1e6:.0f} | {ms:.2f} | {gbps:.0f} |")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
