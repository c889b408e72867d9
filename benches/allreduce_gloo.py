#!/usr/bin/env python3
"""PyTorch gloo all_reduce at the same sizes as ring-bench, for scripts/bench-allreduce.sh.

Spawns --world-size processes on loopback; rank 0 prints one JSON line per size with algbw and
busbw (nccl-tests definitions: busbw = algbw * 2(W-1)/W), from the median of --iterations timed calls.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(args.port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    for megabytes in [float(s) for s in args.sizes_mb.split(",")]:
        count = int(megabytes * 1024 * 1024 / 4)
        data = torch.ones(count, dtype=torch.float32)
        dist.all_reduce(data)
        times = []
        for _ in range(args.iterations):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(data)
            times.append(time.perf_counter() - started)
        median = sorted(times)[len(times) // 2]
        if rank == 0:
            algbw = count * 4 / median / 1e9
            busbw = algbw * 2 * (args.world_size - 1) / args.world_size
            print(json.dumps({"impl": "gloo", "world_size": args.world_size, "bytes": count * 4,
                              "seconds": median, "algbw_gbps": algbw, "busbw_gbps": busbw}), flush=True)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--port", type=int, default=29511)
    parser.add_argument("--sizes-mb", default="1,4,16,64,256")
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args()
    mp.spawn(run, args=(args,), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
