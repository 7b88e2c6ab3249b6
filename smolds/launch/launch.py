"""Launch `smolds train` with torchrun: one node, or one node of many (what pretrain.sbatch runs).

    python -m smolds.launch --nproc 2 --device cpu --config configs/tiny-cpu.yaml --train.steps 20
    python -m smolds.launch --dry-run --config configs/tiny-cpu.yaml     # print the command, run nothing
    python -m smolds.launch --check                                      # all-reduce smoke test, no training
    python -m smolds.launch --nnodes 4 --rdzv-endpoint head:29400 --rdzv-id JOB --config run.yaml   # each node

In a checkout, `python launch/launch.py` is the same (launch/launch.py is a link to this file).

Every flag the launcher does not know belongs to the trainer (`smolds train --help`: `--config`,
`--resume`, `--section.field value`) and is passed through verbatim.

Why torchrun runs inside this process (`torch.distributed.run.main`, the function behind the `torchrun`
command, so `--dry-run` prints an exact equivalent) rather than as a child: torchrun reports any worker
failure as exit code 1, and on SIGTERM dies with a traceback. Here the trainer's exit code survives, so 75
("preempted, checkpoint saved, requeue me") reaches Slurm, which requeues the job.

SIGTERM/SIGUSR1 are caught from the first line of main(): one that arrives before torchrun has started the
workers (while torch is imported, during the rendezvous) ends the launcher at once with 75, since there is
nothing new to save; after that torchrun forwards it to the workers, which save and exit 75.

Environment, set only where the caller has not set it already:
  OMP_NUM_THREADS            CPUs of this node (or Slurm task) / processes: torchrun alone would say 1
  PYTHONUNBUFFERED=1         logs of all ranks arrive in order, and before a crash
  DS_ACCELERATOR             cuda or cpu, so DeepSpeed agrees with --device
  CUDA_VISIBLE_DEVICES=""    with --device cpu: no rank picks up a GPU, and the trainer (like check_dist.py)
                             chooses gloo; on GPUs it chooses NCCL
  NCCL_DEBUG=WARN            NCCL's own warnings (e.g. falling back to sockets) reach the log
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT   seconds torchrun waits after forwarding SIGTERM before it kills the
                             workers: the time a preempted trainer has to finish its step and save
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import signal
import socket
import sys
from pathlib import Path

PREEMPTED = 75  # EX_TEMPFAIL: the trainer saved a checkpoint on SIGTERM/SIGUSR1; requeue and --resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
CHECK_SCRIPT = Path(__file__).absolute().with_name("check_dist.py")  # beside this file, or beside its link


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split argv into launcher options and the trainer's arguments (everything else, in order)."""
    p = argparse.ArgumentParser(
        prog="python -m smolds.launch",
        description="Run `smolds train` under torchrun. Unknown flags are the trainer's.",
        allow_abbrev=False,  # `--res` must reach the trainer, not match a launcher flag
    )
    p.add_argument("--nproc", default="auto",
                   help="processes on this node: a number, or auto = GPUs visible on GPU, 1 on CPU")
    p.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto",
                   help="auto = gpu when torch sees CUDA, else cpu")
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the job (each runs this launcher)")
    p.add_argument("--rdzv-endpoint", default=None,
                   help="HOST:PORT of torchrun's c10d rendezvous on the first node; "
                        "default for one node: a free port on this machine")
    p.add_argument("--rdzv-id", default="smolds", help="job id shared by all nodes (Slurm: $SLURM_JOB_ID)")
    p.add_argument("--allow-loopback", action="store_true",
                   help="allow a loopback rendezvous host with --nnodes > 1 (several 'nodes' on one machine)")
    p.add_argument("--shutdown-timeout", type=int, default=300,
                   help="seconds torchrun lets workers save a checkpoint after SIGTERM before killing them")
    p.add_argument("--check", action="store_true",
                   help="run check_dist.py (all-reduce across every rank) instead of the trainer")
    p.add_argument("--dry-run", action="store_true", help="print the environment and command, run nothing")
    args, trainer_args = p.parse_known_args(argv)
    if trainer_args[:1] == ["--"]:
        trainer_args = trainer_args[1:]
    if args.check and trainer_args:
        p.error(f"--check runs no trainer; drop the trainer arguments {trainer_args}")
    if not args.check and not trainer_args:
        p.error("give the trainer's arguments (at least --config RUN.yaml), or --check")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        p.error("--nnodes > 1 needs --rdzv-endpoint HOST:PORT on the first node")
    return args, trainer_args


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def resolve_nproc(nproc: str, device: str) -> int:
    if nproc != "auto":
        if not nproc.isdigit() or int(nproc) < 1:
            raise SystemExit(f"launch: --nproc must be a positive number or auto, not {nproc!r}")
        return int(nproc)
    if device == "cpu":
        return 1
    import torch

    return torch.cuda.device_count()


def node_cpus() -> int:
    """CPUs this launcher may use: the Slurm task's allocation when there is one, else the affinity mask."""
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return len(os.sched_getaffinity(0))


def launch_env(device: str, nproc: int, shutdown_timeout: int, environ: dict[str, str]) -> dict[str, str]:
    """The variables to add to `environ` (never overriding what the caller set)."""
    wanted = {
        "OMP_NUM_THREADS": str(max(1, node_cpus() // nproc)),
        "PYTHONUNBUFFERED": "1",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(shutdown_timeout),
    }
    if device == "gpu":
        wanted |= {"DS_ACCELERATOR": "cuda", "NCCL_DEBUG": "WARN"}
    else:
        wanted |= {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    return {k: v for k, v in wanted.items() if k not in environ}


def check_rendezvous_host(endpoint: str, nnodes: int, allow_loopback: bool) -> None:
    """Refuse a multi-node rendezvous whose host is loopback here: every node would host its own
    rendezvous, form its own world and wait for the others forever (PEERS.md's most common failure)."""
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise SystemExit(f"launch: rendezvous host {host!r} does not resolve on {socket.gethostname()}: {e}") from None
    loopback = sorted(a for a in addrs if ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if nnodes > 1 and loopback and not allow_loopback:
        raise SystemExit(
            f"launch: rendezvous host {host!r} resolves to loopback {loopback} on {socket.gethostname()}, "
            f"but the job has {nnodes} nodes: each node would form its own world and hang. Fix the host's "
            "entry in /etc/hosts or DNS, or pass the first node's routable address "
            "(pretrain.sbatch: export SMOLDS_RDZV_HOST=<ip>)."
        )


def torchrun_args(args: argparse.Namespace, nproc: int, trainer_args: list[str]) -> list[str]:
    """torchrun's argv: c10d rendezvous at --rdzv-endpoint, or --standalone (a free local port) on one node.
    No --node_rank: c10d numbers the nodes as they join (torchrun ignores node_rank for it)."""
    if args.rdzv_endpoint:
        cmd = ["--nnodes", str(args.nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", args.rdzv_endpoint,
               "--rdzv_id", str(args.rdzv_id)]
    else:
        cmd = ["--standalone", "--nnodes", "1"]
    cmd += ["--nproc_per_node", str(nproc), "--max_restarts", "0"]
    if args.check:
        return cmd + [str(CHECK_SCRIPT)]
    return cmd + ["-m", "smolds", "train", *trainer_args]


def exit_code(failures: dict) -> int:
    """One exit code for the failed workers: 75 when every failure is 'preempted, saved', else the first
    other failure (a signal death -N as 128+N, as a shell reports it). Deaths by SIGTERM count only when
    nothing else failed: once one worker ends torchrun SIGTERMs the others, and a survivor slow to exit (a
    loaded machine) would otherwise hide the code of the worker that ended (143 instead of its 3 or 75)."""
    codes = [f.exitcode for _, f in sorted(failures.items())]
    codes = [c for c in codes if c != -signal.SIGTERM] or codes
    others = [c for c in codes if c != PREEMPTED]
    if not others:
        return PREEMPTED
    code = others[0]
    return 128 - code if code < 0 else (code if 0 < code < 256 else 1)


def _stop_signal(signum: int, frame) -> None:
    """SIGTERM/SIGUSR1 handler, installed first thing in main().

    Until torchrun starts the workers, nothing exists that a checkpoint could save: exit 75 at once (requeue;
    --resume continues from the last checkpoint), whatever the launcher is doing (importing torch,
    rendezvous). torchrun's process context takes SIGTERM over just before it starts the workers (its
    handler forwards SIGTERM to them and raises SignalException, see run_torchrun); from then on SIGUSR1,
    which torchrun does not handle, is turned into SIGTERM for it. So every moment has a handler that ends
    in 75: this one, or torchrun's."""
    if signal.getsignal(signal.SIGTERM) is not _stop_signal:  # torchrun has taken over: workers exist
        os.kill(os.getpid(), signal.SIGTERM)
        return
    # os.write, not print: the signal may have interrupted a print to stderr (a reentrant call fails)
    os.write(2, f"launch: {signal.Signals(signum).name} before the workers started: nothing to save; "
                f"exit {PREEMPTED} (requeue)\n".encode())
    os._exit(PREEMPTED)  # not SystemExit: torch code could catch it, or wait on its threads at exit


def _first_sigterm_only(handler):
    """torchrun's SIGTERM handler raises SignalException, and its agent then forwards the signal and waits
    (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) for the workers to save and exit. A SIGTERM during that wait raised again
    out of it, and a third ended the launcher with the workers unwaited for and no checkpoint: Slurm, a user,
    a script often signal more than once. Only the first SIGTERM is torchrun's; later ones are acknowledged."""
    fired = []

    def handle(signum, frame):
        if signum == signal.SIGTERM and fired:
            os.write(2, b"launch: SIGTERM again: the workers are already stopping (they save, then exit 75)\n")
            return
        fired.append(signum)
        handler(signum, frame)

    return handle


def run_torchrun(argv: list[str]) -> int:
    """Run torchrun in this process and return the trainer's exit code (see the module docstring)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import api
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for sig in STOP_SIGNALS:  # main() has done this already; this is for run_torchrun called on its own
        signal.signal(sig, _stop_signal)
    # the handler torchrun installs when it starts the workers (looked up then, so replaced here)
    api._terminate_process_handler = _first_sigterm_only(api._terminate_process_handler)
    try:
        torchrun.main(argv)
    except ChildFailedError as e:
        return exit_code(e.failures)
    except SignalException as e:
        # torchrun forwarded the signal and waited for the workers (TORCH_ELASTIC_SHUTDOWN_TIMEOUT).
        # On SIGTERM the trainer saves and exits; --resume continues from checkpoints/latest either way.
        if e.sigval == signal.SIGTERM:
            print("launch: SIGTERM: workers told to checkpoint and stop; exit 75 (requeue)", file=sys.stderr)
            return PREEMPTED
        return 128 + int(e.sigval)
    return 0


def main(argv: list[str] | None = None) -> int:
    previous = {sig: signal.signal(sig, _stop_signal) for sig in STOP_SIGNALS}  # first: see _stop_signal
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    finally:
        if signal.getsignal(signal.SIGTERM) is _stop_signal:  # torchrun never started (--dry-run, errors)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _main(argv: list[str]) -> int:
    args, trainer_args = parse_args(argv)
    device = resolve_device(args.device)
    nproc = resolve_nproc(args.nproc, device)
    if nproc < 1:
        raise SystemExit("launch: --device gpu but torch sees no GPU; use --device cpu --nproc N")
    if args.rdzv_endpoint:
        check_rendezvous_host(args.rdzv_endpoint, args.nnodes, args.allow_loopback)
    env = launch_env(device, nproc, args.shutdown_timeout, os.environ)
    argv_torchrun = torchrun_args(args, nproc, trainer_args)
    command = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(["torchrun", *argv_torchrun])])
    if args.dry_run:
        print(command)
        return 0
    print(f"launch: {command}", file=sys.stderr, flush=True)
    os.environ.update(env)
    return run_torchrun(argv_torchrun)


if __name__ == "__main__":
    sys.exit(main())
