"""kill -9 training and prep at random moments, rerun the same command each time, and check nothing was lost.

    python bench/kill_loop.py --kills 50 --ranks 1             # training, one process, through launch/launch.py
    python bench/kill_loop.py --kills 50 --ranks 2             # training, 2 ranks under torchrun
    python bench/kill_loop.py --kills 50 --what prep           # smolds prep
    python bench/kill_loop.py --kills 5 --launcher fork        # as tests/test_kill_loop.py runs it

A loop, for training: an uninterrupted reference run; then, in a new output dir, the same command (always with
--resume) started again and again, each start killed with SIGKILL, its whole process group (launcher, torchrun,
workers, tokenizer processes: what a preempted node loses), after a random time drawn from [0, 0.9 x the time it
would need to finish): startup, steps, evaluations and checkpoint saves are all hit. Until `--kills` kills have
landed, then one last start runs to the end. Checked:
  - every train and eval loss the killed run ever logged equals the reference's for that step, bit for bit,
    and its final weights equal the reference's;
  - after every kill, every complete checkpoint left behind loads (`smolds.pretrained.load_pretrained` on its
    consolidated/), and the next start resumes from `latest` (a start that cannot fails the loop).
For prep: the shards, document indexes and tokenizer of the killed-and-rerun dataset equal the reference's
byte for byte, and its manifest too but for the creation time.

Launchers: `torchrun` starts each run as a user would (launch/launch.py, which runs torchrun; a fresh Python
each time, so imports are hit too); `fork` forks each run (each rank, with torchrun's environment variables)
from a process that imported torch and DeepSpeed once, which makes a start ~10x cheaper on 2 cores: what the
test suite uses. docs/reliability.md records the last long result.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch" / "launch.py"
TRAIN = ["--model.num_hidden_layers", "2", "--train.seq_len", "32", "--train.micro_batch", "4",
         "--train.warmup_steps", "2", "--train.log_every", "1", "--train.eval_every", "4",
         "--train.eval_batches", "1", "--train.checkpoint_every", "2", "--train.keep_checkpoints", "2",
         "--eval.sample_tokens", "2", "--logging.wandb", "disabled", "--train.device", "cpu"]


# ------------------------------------------------------------------------------------------ launchers
class Fork:
    """Starts runs by forking a helper that imported the whole stack once (`python kill_loop.py --zygote`).

    A run of N ranks is N forks with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
    each in its own session; as torchrun's agent does, once one rank has died the others are killed."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "--zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self._ask({"ping": 1}) == "ready"

    def _ask(self, msg: dict):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv: list[str], ranks: int, log: Path) -> Run:
        return Run(self, self._ask({"argv": argv, "ranks": ranks, "log": str(log)}))

    def reap(self, pids: list[int], timeout: float) -> list[int | None]:
        return self._ask({"reap": pids, "timeout": timeout})

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Torchrun:
    """Starts each run as `python launch/launch.py --nproc N --device cpu smolds-arguments` in a new session."""

    def start(self, argv: list[str], ranks: int, log: Path) -> Run:
        if argv[0] == "prep":
            cmd = [sys.executable, "-m", "smolds", *argv]
        else:
            cmd = [sys.executable, str(LAUNCH), "--nproc", str(ranks), "--device", "cpu", *argv[1:]]
        with open(log, "a") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
        return Run(self, [proc.pid], proc)

    def close(self):
        pass


@dataclass
class Run:
    launcher: object
    pids: list[int]
    proc: subprocess.Popen | None = None  # the launcher process (Torchrun)
    codes: list[int | None] = field(default_factory=list)

    def kill(self) -> None:
        """SIGKILL every process of the run, as a node that dies takes them all: torchrun starts each worker in a
        session of its own, so killing the launcher's process group would leave the workers running. Stopped
        first, the run's processes cannot start new ones while the tree is read."""
        for pid in self.pids:
            _signal(pid, signal.SIGSTOP)
        for pid in [q for p in self.pids for q in _tree(p)]:
            _signal(pid, signal.SIGKILL, group=True)

    def wait(self, timeout: float) -> int | None:
        """The run's exit code (a rank killed by a signal: -signal), None while it still runs after `timeout`."""
        if self.proc is not None:
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        self.codes = self.launcher.reap(self.pids, timeout)
        if None in self.codes:
            return None
        return next((c for c in self.codes if c != 0), 0)


def _signal(pid: int, sig: int, group: bool = False) -> None:
    for send in (os.killpg, os.kill) if group else (os.kill,):  # its group: what it started in its session
        try:
            send(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from the parent pid in /proc/PID/stat."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, parent in parents.items() if parent == p]
    return out


def zygote() -> None:
    """The fork server behind `Fork`: imports once, then forks a rank per request (one JSON line each)."""
    answers = os.fdopen(os.dup(1), "w")  # the replies' own channel: whatever the imports print goes to stderr
    os.dup2(2, 1)
    import deepspeed  # noqa: F401  (imported once, for every fork)
    import torch  # noqa: F401

    import smolds.cli  # noqa: F401
    import smolds.train.loop  # noqa: F401
    from data_prep import cli as _  # noqa: F401

    def reply(obj) -> None:
        answers.write(json.dumps(obj) + "\n")
        answers.flush()

    exited: dict[int, int] = {}
    for line in sys.stdin:
        msg = json.loads(line)
        if "ping" in msg:
            reply("ready")
        elif "argv" in msg:
            port = _free_port()
            pids = []
            for rank in range(msg["ranks"]):
                pid = os.fork()
                if pid == 0:
                    _child(msg["argv"], rank, msg["ranks"], port, msg["log"])
                pids.append(pid)
            reply(pids)
        elif "reap" in msg:
            deadline = time.monotonic() + msg["timeout"]
            pending = [p for p in msg["reap"] if p not in exited]
            while pending and time.monotonic() < deadline:
                for p in list(pending):
                    done, status = os.waitpid(p, os.WNOHANG)
                    if done:
                        exited[p] = os.waitstatus_to_exitcode(status)
                        pending.remove(p)
                if any(exited.get(p, 0) != 0 for p in msg["reap"]):  # torchrun's agent: one died, stop all
                    for p in pending:
                        try:
                            os.killpg(p, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                time.sleep(0.05)
            reply([exited.get(p) for p in msg["reap"]])


def _child(argv: list[str], rank: int, world: int, port: int, log: str) -> None:
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    if argv[0] == "train":
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    code = 1
    try:
        from smolds.cli import main

        code = main(argv)
    except BaseException:  # as the interpreter would report it, then the exit code of an uncaught exception
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ the loops
@dataclass
class Result:
    what: str
    kills: int = 0
    starts: int = 0
    resumes: int = 0  # starts that found a checkpoint to resume from
    checkpoints_loaded: int = 0
    rows_compared: int = 0
    max_loss_diff: float = 0.0
    files_compared: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        what = (f"{self.rows_compared} logged losses, max |diff| {self.max_loss_diff}, "
                f"{self.checkpoints_loaded} checkpoint loads" if self.rows_compared else
                f"{self.files_compared} files byte-identical")
        return (f"{self.what}: {self.kills} kills, {self.starts} starts ({self.resumes} resumed), {what}, "
                f"{self.seconds:.0f} s")


def run_to_end(launcher, argv: list[str], ranks: int, log: Path, timeout: float) -> float:
    t0 = time.monotonic()
    run = launcher.start(argv, ranks, log)
    code = run.wait(timeout)
    if code is None:
        run.kill()
        raise AssertionError(f"{' '.join(argv[:2])} did not finish in {timeout:.0f} s; see {log}")
    if code != 0:
        raise AssertionError(f"{' '.join(argv[:2])} exited {code}; see {log}:\n{log.read_text()[-3000:]}")
    return time.monotonic() - t0


def kill_loop(launcher, argv_for, kills: int, ranks: int, root: Path, rng: random.Random, res: Result,
              progress, first_work, after_kill, check, timeout: float = 900) -> Result:
    """The shared loop: a reference run, then starts of the same command each killed at a random moment until
    `kills` have landed, then a last start to the end. A kill comes at a time drawn from [0, 0.9 x (startup +
    the share of the work left x the reference's working time)]: `first_work(dir)` is the wall time the
    reference's work began (its startup is paid by every start), `progress(dir)` the fraction of the work done.
    `after_kill(dir)` checks what a kill left behind; `check(dir)` compares a finished run with the reference. A start that finishes before its kill is checked too, and the loop goes on in a
    fresh directory, so that kills keep landing on unfinished work."""
    t0 = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    ref, dut, log = root / "reference", root / "killed", root / "killed.log"
    started = time.time()
    duration = run_to_end(launcher, argv_for(ref), ranks, root / "reference.log", timeout)
    startup = min(max(first_work(ref) - started, 0.0), duration)  # what every start pays before any work
    while res.kills < kills:
        left = max(1.0 - progress(dut), 0.1)
        delay = rng.uniform(0, 0.9 * (startup + left * (duration - startup)))
        res.starts += 1
        run = launcher.start(argv_for(dut), ranks, log)
        code = run.wait(delay)
        if code is None:
            run.kill()
            if run.wait(120) is None:
                raise AssertionError(f"a killed run did not exit; see {log}")
            res.kills += 1
            after_kill(dut)
        elif code != 0:
            raise AssertionError(f"a start after a kill exited {code}; see {log}:\n{log.read_text()[-3000:]}")
        else:
            check(dut)
            shutil.rmtree(dut)
    res.starts += 1
    run_to_end(launcher, argv_for(dut), ranks, log, timeout)
    check(dut)
    text = log.read_text()  # the trainer's startup line (rank 0), prep's resume line
    res.resumes = text.count(" resumed from ") + text.count("smolds prep: resuming ")
    res.seconds = time.monotonic() - t0
    return res


def train_loop(launcher, kills: int, ranks: int, root: Path, seed: int, steps: int, data: Path) -> Result:
    from smolds.pretrained import load_pretrained

    res = Result(f"train, {ranks} rank(s)")

    def argv_for(out: Path) -> list[str]:
        return ["train", *TRAIN, "--train.steps", str(steps), "--data.dir", str(data), "--train.out_dir", str(out),
                "--resume"]

    def progress(out: Path) -> float:
        latest = out / "checkpoints" / "latest"
        return int(latest.read_text().strip().split("_")[-1]) / steps if latest.is_file() else 0.0

    def after_kill(out: Path) -> None:
        for ck in sorted((out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []:
            if ck.is_dir() and not ck.name.endswith(".tmp"):
                load_pretrained(ck / "consolidated")
                res.checkpoints_loaded += 1

    def check(out: Path) -> None:
        ref_rows, got_rows = _rows(root / "reference"), _rows(out)
        for kind_step, values in got_rows.items():
            assert kind_step in ref_rows, f"{kind_step} was logged by the killed run only"
            for v in values:
                res.max_loss_diff = max(res.max_loss_diff, abs(v - ref_rows[kind_step][0]))
                res.rows_compared += 1
        assert set(ref_rows) <= set(got_rows), f"steps missing after kills: {sorted(set(ref_rows) - set(got_rows))}"
        final = [load_pretrained(r / "checkpoints" / f"step_{steps:07d}" / "consolidated")[0].state_dict()
                 for r in (root / "reference", out)]
        assert final[0].keys() == final[1].keys() and all((final[0][k] == final[1][k]).all() for k in final[0]), \
            "the final weights differ from the uninterrupted run's"

    def first_work(out: Path) -> float:  # the first step's row
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["time"]

    return kill_loop(launcher, argv_for, kills, ranks, root, random.Random(seed), res, progress, first_work,
                     after_kill, check)


def _rows(out: Path) -> dict[tuple[str, int], list[float]]:
    """Every loss logged, by (kind, step): a resumed run logs again the steps after its checkpoint."""
    rows: dict[tuple[str, int], list[float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)  # a row torn by a kill is dropped when the next run opens the file
        if r["kind"] in ("train", "eval") and isinstance(r.get("loss"), float):
            rows.setdefault((r["kind"], r["step"]), []).append(r["loss"])
    return rows


def prep_loop(launcher, kills: int, root: Path, seed: int, sources: list[str], shard_tokens: int = 20000) -> Result:
    res = Result("prep")

    def argv_for(out: Path) -> list[str]:
        return ["prep", *sources, "--out", str(out), "--vocab-size", "512", "--shard-tokens", str(shard_tokens),
                "--workers", "1"]

    def progress(out: Path) -> float:
        state, ref = _json(out / "progress.json"), _json(root / "reference" / "manifest.json")
        done = sum(len(s["shards"]) for s in state["splits"].values()) if state else 0
        return done / sum(len(s["shards"]) for s in ref["splits"].values())

    def check(out: Path) -> None:
        ref = root / "reference"
        names = sorted(p.name for p in ref.iterdir() if p.name != ".lock")
        assert names == sorted(p.name for p in out.iterdir() if p.name != ".lock"), "other files after the kills"
        for name in names:
            a, b = (ref / name).read_bytes(), (out / name).read_bytes()
            if name == "manifest.json":
                a, b = (json.dumps({k: v for k, v in json.loads(x).items() if k not in ("created", "command")})
                        for x in (a, b))
            assert a == b, f"{name} differs from the uninterrupted prep's"
            res.files_compared += 1

    def first_work(out: Path) -> float:  # tokenizing begins once the tokenizer is written
        return (out / "tokenizer.json").stat().st_mtime

    return kill_loop(launcher, argv_for, kills, 1, root, random.Random(seed), res, progress, first_work,
                     lambda out: None, check)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--what", choices=["train", "prep", "all"], default="train")
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launcher", choices=["torchrun", "fork"], default="torchrun")
    p.add_argument("--keep", help="work in this directory (kept) instead of a temporary one")
    args = p.parse_args()
    if args.zygote:
        zygote()
        return 0
    sys.path.insert(0, str(REPO))
    root = Path(args.keep or tempfile.mkdtemp(prefix="kill_loop-"))
    launcher = Fork() if args.launcher == "fork" else Torchrun()
    try:
        if args.what in ("train", "all"):
            from data_prep import prepare_default

            prepare_default(root / "data", progress=False)
            r = train_loop(launcher, args.kills, args.ranks, root / "train", args.seed, args.steps, root / "data")
            print(r.line(), flush=True)
        if args.what in ("prep", "all"):
            corpus = sorted(str(f) for f in (REPO.parent / "shared" / "corpora").glob("*.txt"))
            r = prep_loop(launcher, args.kills, root / "prep", args.seed, [f"lines:{c}" for c in corpus])
            print(r.line(), flush=True)
    finally:
        launcher.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
