"""Locks of torch's JIT-built C++ extensions: a start never waits on a dead owner's lock, nor silently.

DeepSpeed builds and loads its C++ ops with torch.utils.cpp_extension, which takes the lock file
`TORCH_EXTENSIONS_DIR/<op>/lock` (created with O_EXCL and held open while it builds or loads) and makes every
other process poll until that file is gone, without a word and without a time limit. A process killed while
holding it (kill -9, the OOM killer, a preempted node) leaves the file behind: every later start on the
machine waits forever, and, since `smolds train` catches SIGTERM as a stop flag, a SIGTERM does not end it.

`check_locks` runs before DeepSpeed starts and looks at every lock in the extensions folder:
  held open by a process on this machine -> a live build or load: waited on (the line names the pid) up to
                                            `timeout` seconds, then a one-line TrainError;
  held by no process here, local disk    -> stale (its owner is dead): removed, with a line saying so;
  held by no process here, network disk  -> a process on another node sharing the folder may hold it (or, for
  (or created by another user)              a lock of another user, one of theirs, which we cannot see): waited
                                            on, with a line, until it is STALE_AFTER old (longer than any
                                            DeepSpeed op takes to build), then removed.
The owner is not written in the file, so "held" means an open file descriptor (/proc/PID/fd), which dies
with its process. A lock younger than a second is left alone: its creator may not have its descriptor yet.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from smolds.train.config import TrainError

STALE_AFTER = 900.0  # seconds: a lock on a network disk older than this has no live owner anywhere
FRESH = 1.0  # seconds: the window between a lock's creation and its owner's descriptor
NETWORK_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "fuse", "9p", "afs", "panfs")


def extensions_root() -> Path:
    """The folder torch.utils.cpp_extension builds in: TORCH_EXTENSIONS_DIR, else its per-user default."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def check_locks(timeout: float, poll: float = 0.5, say=None) -> None:
    """Remove stale extension locks; wait (saying so, at most `timeout` s) for live ones. See the module doc."""
    say = say or (lambda line: print(f"smolds train: {line}", file=sys.stderr, flush=True))
    root = extensions_root()
    told: set[Path] = set()
    deadline = time.monotonic() + timeout
    while True:
        waiting = []
        for lock in sorted({*root.glob("*/lock"), *root.glob("*/*/lock")}):
            verdict = _judge(lock)
            if verdict == "stale":
                lock.unlink(missing_ok=True)
                say(f"removed {lock}: a stale lock of torch's extension builder (no process holds it; its owner "
                    "was killed while building or loading a DeepSpeed op)")
            elif verdict:
                waiting.append((lock, verdict))
                if lock not in told:
                    told.add(lock)
                    say(f"waiting for {lock}, {verdict}; at most {timeout:.0f} s (train.wait_timeout)")
        if not waiting:
            return
        if time.monotonic() > deadline:
            lock, verdict = waiting[0]
            raise TrainError(f"{lock} is still held after {timeout:.0f} s ({verdict}); end that process or, if "
                             "no build is running anywhere, delete the file, then start again")
        time.sleep(poll)


def _judge(lock: Path) -> str | None:
    """'stale', None (gone or just created), or why it is live (a sentence fragment naming the holder)."""
    try:
        st = lock.stat()
    except FileNotFoundError:
        return None
    age = time.time() - st.st_mtime
    if age < FRESH:
        return "just created by another process"
    holders = _holders(lock)
    if holders:
        return f"held by pid {', '.join(map(str, holders))} on this machine (building or loading an op)"
    if age < STALE_AFTER and st.st_uid != os.getuid():  # another user's processes' descriptors are not ours to see
        return f"created by another user (uid {st.st_uid}), whose processes cannot be seen; removed once " \
               f"{STALE_AFTER:.0f} s old"
    if age < STALE_AFTER and _on_network_fs(lock):
        return (f"held by no process on this machine but on a network disk (another node may be building); "
                f"removed once {STALE_AFTER:.0f} s old")
    return "stale"


def _holders(path: Path) -> list[int]:
    """Pids on this machine with `path` open (those whose /proc/PID/fd this user may read)."""
    target = os.path.realpath(path)
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:  # gone, or another user's
            continue
    return pids


def _on_network_fs(path: Path) -> bool:
    """Whether `path` lies on a network filesystem (the longest matching mount point in /proc/mounts)."""
    target, best, kind = os.path.realpath(path), "", ""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return True  # cannot tell: assume the careful case
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and (target == fields[1] or target.startswith(fields[1].rstrip("/") + "/")) \
                and len(fields[1]) > len(best):
            best, kind = fields[1], fields[2]
    return kind.split(".")[0] in NETWORK_FS
