"""launch/launch.py: the command and environment it builds, the rendezvous guard, exit codes, a signal
before the workers start, and (with the trainer) two 'nodes' on loopback matching one process,
SIGTERM -> checkpoint -> resume, and SIGTERM during the trainer's startup -> exit 75 -> resume."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "launch.py"
TINY = ROOT / "configs" / "tiny-cpu.yaml"


def _load_launch():
    spec = importlib.util.spec_from_file_location("smolds_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch = _load_launch()


def dry_run(capsys, *argv: str) -> str:
    assert launch.main(["--dry-run", *argv]) == 0
    return capsys.readouterr().out.strip()


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("OMP_NUM_THREADS", "PYTHONUNBUFFERED", "DS_ACCELERATOR",
                "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
                "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        monkeypatch.delenv(var, raising=False)


# --- command and environment (no processes started) ----------------------------------------------

def test_dry_run_one_node_cpu(capsys, clean_env, monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    out = dry_run(capsys, "--nproc", "2", "--device", "cpu",
                  "--config", "c.yaml", "--train.steps", "3", "--resume")
    env, cmd = out.split(" torchrun ", 1)
    assert env.split() == ["OMP_NUM_THREADS=4", "PYTHONUNBUFFERED=1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300",
                           "DS_ACCELERATOR=cpu", "CUDA_VISIBLE_DEVICES=''"]
    assert cmd == ("--standalone --nnodes 1 --nproc_per_node 2 --max_restarts 0 "
                   "-m smolds train --config c.yaml --train.steps 3 --resume")


def test_dry_run_gpu_node_of_many(capsys, clean_env):
    out = dry_run(capsys, "--nproc", "8", "--device", "gpu", "--nnodes", "4",
                  "--rdzv-endpoint", "10.1.2.3:29400", "--rdzv-id", "77", "--", "--config", "run.yaml")
    assert "DS_ACCELERATOR=cuda NCCL_DEBUG=WARN" in out
    assert "CUDA_VISIBLE_DEVICES" not in out
    assert out.endswith("torchrun --nnodes 4 --rdzv_backend c10d --rdzv_endpoint 10.1.2.3:29400 "
                        "--rdzv_id 77 --nproc_per_node 8 --max_restarts 0 -m smolds train --config run.yaml")


def test_check_runs_the_smoke_test_script(capsys, clean_env):
    out = dry_run(capsys, "--device", "cpu", "--nnodes", "3", "--rdzv-endpoint", "10.1.2.3:1", "--check")
    assert out.endswith("--nproc_per_node 1 --max_restarts 0 " + str(ROOT / "launch" / "check_dist.py"))


def test_caller_environment_wins(capsys, clean_env, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    out = dry_run(capsys, "--device", "cpu", "--config", "c.yaml")
    assert "OMP_NUM_THREADS" not in out and "CUDA_VISIBLE_DEVICES" not in out


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu"], "give the trainer's arguments"),
    (["--device", "cpu", "--check", "--config", "c.yaml"], "--check runs no trainer"),
    (["--device", "cpu", "--nnodes", "2", "--check"], "needs --rdzv-endpoint"),
])
def test_argument_errors(capsys, argv, message):
    with pytest.raises(SystemExit):
        launch.main(["--dry-run", *argv])
    assert message in capsys.readouterr().err


def test_loopback_rendezvous_refused_for_many_nodes(capsys):
    with pytest.raises(SystemExit, match="resolves to loopback .* 2 nodes: each node would form its own world"):
        launch.main(["--dry-run", "--device", "cpu", "--nnodes", "2", "--rdzv-endpoint", "localhost:29400",
                     "--check"])
    # one node, or several simulated on this machine, may use loopback
    dry_run(capsys, "--device", "cpu", "--rdzv-endpoint", "localhost:29400", "--check")
    dry_run(capsys, "--device", "cpu", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29400",
            "--allow-loopback", "--check")


def test_exit_code_of_failed_workers():
    fail = lambda *codes: {rank: SimpleNamespace(exitcode=c) for rank, c in enumerate(codes)}
    assert launch.exit_code(fail(75, 75)) == 75  # all preempted and saved: requeue
    assert launch.exit_code(fail(75, 3)) == 3  # a real failure wins over preemption
    assert launch.exit_code(fail(-9)) == 137  # killed by SIGKILL, as a shell reports it
    assert launch.exit_code(fail(-15, 3)) == 3  # rank 0 SIGTERMed by torchrun after rank 1 failed: rank 1 counts
    assert launch.exit_code(fail(-15, 75)) == 75  # the same when rank 1 was preempted and saved
    assert launch.exit_code(fail(-15, -15)) == 143


# --- real torchrun, no trainer ---------------------------------------------------------------------

@pytest.mark.slow
def test_check_two_processes():
    out = subprocess.run([sys.executable, str(LAUNCH), "--nproc", "2", "--device", "cpu", "--check"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "check_dist: ok world=2 nodes=1 backend=gloo" in out.stdout


STUB_WORKER = """
import os, signal, sys, time
mode, out = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
if mode.startswith("exit"):
    sys.exit(int(mode[4:]) if rank == 1 else 0)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(a[0]))
open(f"{out}/ready{rank}", "w").close()
deadline = time.time() + 60
while not stop and time.time() < deadline:
    time.sleep(0.05)
time.sleep(1)  # the trainer would finish its step and save here
open(f"{out}/saved{rank}", "w").close()
sys.exit(75 if stop else 1)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode, sig, expected", [
    ("exit3", None, 3), ("exit75", None, 75), ("wait", signal.SIGTERM, 75), ("wait", signal.SIGUSR1, 75),
])
def test_worker_exit_code_reaches_the_caller(tmp_path, mode, sig, expected):
    """Plain torchrun exits 1 for any of these; the launcher keeps the code Slurm must see."""
    worker = tmp_path / "worker.py"
    worker.write_text(STUB_WORKER)
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('l', {str(LAUNCH)!r}); "
            f"m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            f"sys.exit(m.run_torchrun(['--standalone', '--nproc_per_node', '2', {str(worker)!r}, "
            f"{mode!r}, {str(tmp_path)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        if sig is not None:
            wait_for(lambda: all((tmp_path / f"ready{r}").exists() for r in (0, 1)), 60, "workers to start")
            proc.send_signal(sig)
        out, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == expected, out[-3000:]
    if sig is not None:
        assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists()


# --- with the trainer ------------------------------------------------------------------------------

def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def metrics(out_dir: Path) -> list[dict]:
    """Training records of metrics.jsonl (not eval, not skipped steps), skipping a line still being written."""
    path = out_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines if line.endswith("}")]
    return [r for r in records if r["kind"] == "train" and "loss" in r]


def latest_step(out_dir: Path) -> int:
    name = (out_dir / "checkpoints" / "latest").read_text().strip()
    assert (out_dir / "checkpoints" / Path(name).name).is_dir(), f"latest names a missing dir: {name}"
    return int(re.search(r"step_(\d+)", name).group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(*argv: str, out_dir: Path, **kw) -> subprocess.Popen:
    """launch.py on the tiny CPU config, logging every step; its output goes to a .out file beside out_dir."""
    log = open(out_dir.parent / f"{out_dir.name}-{time.monotonic_ns()}.out", "w")
    cmd = [sys.executable, str(LAUNCH), "--device", "cpu", *argv, "--config", str(TINY),
           "--train.out_dir", str(out_dir), "--train.log_every", "1", "--train.eval_batches", "1",
           "--logging.wandb", "disabled"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, **kw)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"launcher still running after {timeout:.0f}s: {proc.args}") from None


def log_tail(tmp_path: Path) -> str:
    return "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.out")))


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process pid has a handler installed for sig (/proc/PID/status SigCgt: a hex mask, bit sig-1)."""
    try:
        mask = re.search(r"^SigCgt:\s*([0-9a-f]+)", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return False
    return bool(mask and int(mask.group(1), 16) >> (sig - 1) & 1)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def listening(port: int) -> bool:
    """Whether a socket on this machine listens on TCP port (read from /proc/net, no connection made)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = [line.split() for line in Path(table).read_text().splitlines()[1:]]
        except OSError:
            continue
        if any(row[3] == "0A" and int(row[1].rsplit(":", 1)[1], 16) == port for row in rows):  # 0A: LISTEN
            return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("when, sig", [
    ("start", signal.SIGTERM), ("rendezvous", signal.SIGTERM), ("rendezvous", signal.SIGUSR1),
], ids=["start-SIGTERM", "rendezvous-SIGTERM", "rendezvous-SIGUSR1"])
def test_signal_before_the_workers_start_exits_75(tmp_path, when, sig):
    """A requeued Slurm job can get its signal again within a second of restarting. Before torchrun has
    started the workers (the launcher importing torch, or waiting in the rendezvous) there is nothing to
    save: exit 75 at once (requeue), not death by the signal (143). Two 'nodes' are announced and one
    comes, so the workers can never start; the signal goes as soon as the launcher catches it, or once
    the rendezvous store listens."""
    port = free_port()
    proc = launcher("--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
                    "--rdzv-id", "half-a-world", "--allow-loopback", out_dir=tmp_path / "run")
    try:
        if when == "start":
            deadline = time.monotonic() + 60
            while not (catches(proc.pid, signal.SIGTERM) or "launch: " in log_tail(tmp_path)):
                assert proc.poll() is None and time.monotonic() < deadline, log_tail(tmp_path)
                time.sleep(0.01)
        else:
            wait_for(lambda: listening(port), 120, f"the rendezvous store on port {port}", proc)
        assert not children(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(sig)
        code = finish(proc, 60)
    finally:
        proc.kill()
    assert code == 75, log_tail(tmp_path)
    assert time.monotonic() - t0 < 10, "exit 75 should be immediate"
    assert f"launch: {sig.name} before the workers started: nothing to save; exit 75 (requeue)" in log_tail(tmp_path)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_nodes_on_loopback_match_one_process(tmp_path):
    """Two torchrun agents (--nnodes 2, one process each) meet at a c10d endpoint on 127.0.0.1 and
    train on the same global batch as one process with gradient accumulation: same losses."""
    run = ["--train.steps", "6", "--train.micro_batch", "2", "--train.checkpoint_every", "1000"]
    one = launcher("--nproc", "1", *run, "--train.grad_accum", "2", out_dir=tmp_path / "one")
    assert finish(one, 600) == 0, log_tail(tmp_path)

    endpoint = f"127.0.0.1:{free_port()}"
    one_core = {**os.environ, "OMP_NUM_THREADS": "1"}  # two "nodes" share this machine's cores
    nodes = [launcher("--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-id", "loopback-test",
                      "--allow-loopback", *run, "--train.grad_accum", "1", out_dir=tmp_path / "two", env=one_core)
             for _ in range(2)]
    assert [finish(p, 600) for p in nodes] == [0, 0], log_tail(tmp_path)

    ref, got = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in got] == [m["step"] for m in ref] and len(ref) == 6
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in ref], rel=1e-5)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    run = launcher("--nproc", "2", "--train.steps", "100000", "--train.micro_batch", "2",
                   "--train.checkpoint_every", "100000", out_dir=out)
    wait_for(lambda: any(m["step"] >= 3 for m in metrics(out)), 600, "step 3 in metrics.jsonl", run)
    run.send_signal(signal.SIGTERM)
    assert finish(run, 300) == 75, log_tail(tmp_path)
    saved = latest_step(out)
    assert saved >= 3 and saved == max(m["step"] for m in metrics(out))

    resumed = launcher("--nproc", "2", "--train.steps", str(saved + 2), "--train.micro_batch", "2", "--resume",
                       out_dir=out)
    assert finish(resumed, 600) == 0, log_tail(tmp_path)
    steps = [m["step"] for m in metrics(out)]
    assert steps[-2:] == [saved + 1, saved + 2], steps  # appended, continuing after the checkpoint
    assert max(steps[:-2]) == saved
    assert latest_step(out) == saved + 2


@pytest.mark.slow
def test_signal_while_the_trainer_starts_up_exits_75_and_resume_works(tmp_path):
    """A requeued job restarts with --resume and gets SIGTERM again while the worker is still starting up
    (importing torch, DeepSpeed init, loading the checkpoint); Slurm signals the launcher and the worker.
    The worker catches it from its first moments and stops before its first step without saving (the run
    is still at its checkpoint), the launcher exits 75, and the next --resume continues from there."""
    out = tmp_path / "run"
    run = ["--nproc", "1", "--train.micro_batch", "2", "--train.eval_every", "1000"]
    assert finish(launcher(*run, "--train.steps", "2", out_dir=out), 600) == 0, log_tail(tmp_path)
    assert latest_step(out) == 2

    proc = launcher(*run, "--train.steps", "4", "--resume", out_dir=out)
    worker = []

    def worker_catches_sigterm() -> bool:
        worker[:] = [pid for pid in children(proc.pid) if catches(pid, signal.SIGTERM)]
        return bool(worker)

    try:
        wait_for(worker_catches_sigterm, 120, "the worker to catch SIGTERM", proc)
        assert [m["step"] for m in metrics(out)] == [1, 2]  # still starting up
        proc.send_signal(signal.SIGTERM)
        os.kill(worker[0], signal.SIGTERM)
        assert finish(proc, 300) == 75, log_tail(tmp_path)
    finally:
        proc.kill()
    log = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert ("smolds train: stop signal (SIGTERM/SIGUSR1) during startup, before step 3: nothing to save, "
            f"--resume continues from checkpoint {out / 'checkpoints' / 'step_0000002'}") in log, log
    assert [m["step"] for m in metrics(out)] == [1, 2] and latest_step(out) == 2

    assert finish(launcher(*run, "--train.steps", "4", "--resume", out_dir=out), 600) == 0, log_tail(tmp_path)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert latest_step(out) == 4
