"""Process groups: where a rank learns who it is, and the expert-parallel groups from DeepSpeed.

Rank and world come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or, when a job was
started by `srun` directly, from Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, first node of the job as
the master). A plain `python -m smolds train` is a world of one on a free local port.

Groups: every rank is a data-parallel rank for the dense parameters (attention, shared experts, router).
With ep_size > 1, consecutive ranks form an expert-parallel group that splits the routed experts, and
ranks holding the same experts form an expert-data-parallel group that averages their gradients
(DeepSpeed's `ep_size_<N>` groups, so its ZeRO optimizer reduces expert gradients over the right ranks).
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_from_launcher() -> tuple[int, int, int]:
    """(rank, world, local_rank), filling torch.distributed's env variables from Slurm or defaults."""
    e = os.environ
    if "RANK" not in e and "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
        e["RANK"], e["WORLD_SIZE"] = e["SLURM_PROCID"], e["SLURM_NTASKS"]
        e["LOCAL_RANK"] = e.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in e:
            nodes = subprocess.run(["scontrol", "show", "hostnames", e.get("SLURM_JOB_NODELIST", "")],
                                   capture_output=True, text=True, check=False).stdout.split()
            e["MASTER_ADDR"] = nodes[0] if nodes else "127.0.0.1"
        e.setdefault("MASTER_PORT", str(29500 + int(e.get("SLURM_JOB_ID", "0")) % 1000))
    if "RANK" not in e:
        e.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        e.setdefault("MASTER_ADDR", "127.0.0.1")
        e.setdefault("MASTER_PORT", str(_free_port()))
    return int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", "0"))


def init(device: str = "auto", timeout: float = 1800) -> Env:
    """Start torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); idempotent.

    `timeout` (train.wait_timeout) bounds every wait on another process: the rendezvous, each collective
    (a peer that died or hangs makes the others fail after it instead of waiting forever) and the locks of
    torch's extension builder (jit_locks.py).
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no GPU is visible; use --train.device cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        _prepare_deepspeed(timeout)
    rank, world, local_rank = env_from_launcher()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        import deepspeed

        if world == 1:  # no peer to meet: an in-process store, no port (a free port picked here could be taken
            # by another process before the bind, failing the start with EADDRINUSE); DeepSpeed adopts the group
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=datetime.timedelta(seconds=timeout))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout), verbose=False)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Env(rank=rank, world=world, local_rank=local_rank, device=dev, backend=backend)


def _prepare_deepspeed(timeout: float) -> None:
    """What must hold before DeepSpeed starts torch.distributed: no stale extension lock to wait on, the run's
    timeout on every process group, and (on CPU) no JIT-built op at all."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.distributed import distributed_c10d

    from smolds.train.jit_locks import check_locks

    check_locks(timeout)
    # Every process group gets the run's timeout: the world's (init_process_group) and those made later,
    # DeepSpeed's data-parallel group (its gradient all-reduce) and the expert groups, which torch would
    # give its module default instead (30 minutes of waiting on a dead peer).
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = datetime.timedelta(seconds=timeout)
    if get_accelerator().device_name() == "cpu":
        # DeepSpeed's CPU backend JIT-builds (or loads) its shared-memory all-reduce op under torch's
        # extension lock at every start; only DeepSpeed's inference path (`inference_all_reduce`) uses
        # it, training reduces through gloo. Marked incompatible, it is never loaded: no build, no lock.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def expert_groups(ep_size: int):
    """Create (once) and return this rank's expert-parallel group and its DeepSpeed group name."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name), name


def all_reduce_(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def any_rank(flag: bool, device) -> bool:
    """True on every rank when `flag` is True on any rank (a collective: every rank must call it)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_(t, op=dist.ReduceOp.MAX).item() > 0)


def all_ranks(flag: bool, device) -> bool:
    """True on every rank when `flag` is True on every rank (a collective: every rank must call it)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_(t, op=dist.ReduceOp.MIN).item() > 0)


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
