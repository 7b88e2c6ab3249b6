"""The trainer's stop signals, SIGTERM and SIGUSR1: "finish the step, checkpoint, exit 75 (requeue me)".

A process-wide flag with no torch import, so that `smolds train` (smolds/cli.py) can install it as the
worker's first act: a signal that Slurm sends, or torchrun forwards, while the worker is still importing
torch, initializing DeepSpeed or loading a checkpoint then sets the flag instead of killing the process
(torchrun would report the death as 143, which nobody requeues). The trainer reads the flag through
`smolds.train.Preemption`, which installs the same handler again when the trainer runs without the CLI.

Importing this module installs nothing.
"""

from __future__ import annotations

import os
import signal
import sys

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[str] = []  # names of the stop signals this process got since install(), oldest first


def _handler(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def install() -> None:
    """From now on SIGTERM/SIGUSR1 only set the flag. Idempotent: a signal already received stays received
    (a process asked to stop stays asked)."""
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def received() -> str | None:
    """The first stop signal this process got (e.g. "SIGTERM"), or None."""
    return _received[0] if _received else None


def die_with_launcher() -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID is set), have the kernel SIGKILL this worker when its launcher dies.

    torchrun starts each worker in a session of its own, so a launcher killed outright (kill -9, the OOM
    killer) left its workers training on as orphans, writing into the out_dir that the requeued job then
    shares. Linux only (prctl PR_SET_PDEATHSIG); elsewhere nothing changes."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # it died before the request was in place
        os._exit(128 + signal.SIGKILL)
