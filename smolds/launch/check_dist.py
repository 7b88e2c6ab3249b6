"""Smoke test of a launch: every rank joins one world and an all-reduce adds up (`launch.py --check`).

Run it on a fresh allocation before a long job: a split world (a rendezvous host that resolves to
loopback), a blocked port or a broken NCCL/gloo setup shows up here in seconds, not after data loading.
Prints one line per node from its first rank and `check_dist: ok ...` from rank 0; exits 1 on a wrong sum.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def main() -> int:
    backend = "nccl" if torch.cuda.is_available() else "gloo"  # as the trainer decides (smolds/train/parallel.py)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    dist.init_process_group(backend, timeout=timedelta(minutes=5))  # RANK, WORLD_SIZE, MASTER_* from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    if local_rank == 0:
        print(f"check_dist: node {socket.gethostname()} rank {rank}/{world} backend {backend}", flush=True)

    x = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(x)
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    expected = world * (world + 1) / 2
    ok = bool(torch.all(x == expected))
    if rank == 0:
        status = "ok" if ok else f"FAILED: all-reduce gave {x[0].item()}, expected {expected}"
        print(f"check_dist: {status} world={world} nodes={len(set(hosts))} backend={backend} "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
