"""Faults a cluster brings (#17): a lock left by a process killed while DeepSpeed built or loaded an op, a rank
that dies or hangs, a disk that fills during a checkpoint, SIGTERM twice, a shard deleted under a running job,
and a resume with another batch size. Each ends in a clear error or a correct run, never a hang or garbage."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smolds.train.config import TrainError
from smolds.train.jit_locks import STALE_AFTER, check_locks

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("kill_loop", ROOT / "bench" / "kill_loop.py")
kill_loop = sys.modules["kill_loop"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kill_loop)

TINY = ["--model.num_hidden_layers", "2", "--train.seq_len", "32", "--train.micro_batch", "4",
        "--train.warmup_steps", "1", "--train.eval_batches", "1", "--train.log_every", "1",
        "--logging.wandb", "disabled", "--eval.sample_tokens", "0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_prep import prepare_default

    d = tmp_path_factory.mktemp("data") / "pydoc"
    prepare_default(d, progress=False)
    return d


def args(data_dir, out, *more) -> list[str]:
    return [*TINY, "--data.dir", str(data_dir), "--train.out_dir", str(out), *more]


def rows(out: Path, kind: str = "train") -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == kind and "loss" in r}


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


# ----------------------------------------------------------------------------- locks of torch's extension builder
def _hold(path: Path) -> subprocess.Popen:
    """A process that creates `path` as torch's FileBaton does (O_CREAT | O_EXCL) and keeps it open."""
    code = f"import os, time; os.open({str(path)!r}, os.O_CREAT | os.O_EXCL); print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_stale_lock_removed_live_lock_waited_for_with_a_bound(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    said = []
    stale = tmp_path / "cpu_adam" / "lock"  # left by a process killed while building: nobody holds it
    stale.parent.mkdir()
    stale.touch()
    os.utime(stale, (time.time() - 5, time.time() - 5))
    check_locks(timeout=5, poll=0.05, say=said.append)
    assert not stale.exists() and said == [f"removed {stale}: a stale lock of torch's extension builder (no process "
                                           "holds it; its owner was killed while building or loading a DeepSpeed op)"]
    live = tmp_path / "fused_adam" / "lock"
    live.parent.mkdir()
    holder = _hold(live)
    try:
        time.sleep(1.1)  # older than a just-created lock
        with pytest.raises(TrainError, match=rf"{live} is still held after 1 s \(held by pid {holder.pid} on this "
                                             r"machine .*\); end that process"):
            check_locks(timeout=1, poll=0.05, say=said.append)
        assert said[-1].startswith(f"waiting for {live}, held by pid {holder.pid} on this machine")
    finally:
        holder.kill()
        holder.wait()
    check_locks(timeout=5, poll=0.05, say=said.append)  # its holder died without removing it: stale now
    assert not live.exists() and said[-1].startswith(f"removed {live}")


def test_unheld_lock_on_a_network_disk_is_stale_only_when_old(tmp_path, monkeypatch):
    """Another node sharing the folder (or another user) may hold it: it is waited for until older than any
    build takes."""
    import smolds.train.jit_locks as jit_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(jit_locks, "_on_network_fs", lambda path: True)
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()
    os.utime(lock, (time.time() - 10, time.time() - 10))
    with pytest.raises(TrainError, match="held by no process on this machine but on a network disk"):
        check_locks(timeout=0.2, poll=0.05, say=lambda line: None)
    os.utime(lock, (time.time() - STALE_AFTER - 1,) * 2)
    check_locks(timeout=0.2, poll=0.05, say=lambda line: None)
    assert not lock.exists()
    if os.getuid() == 0:  # a lock of another user on a local disk: their processes are not visible either
        monkeypatch.setattr(jit_locks, "_on_network_fs", lambda path: False)
        lock.touch()
        os.chown(lock, 4242, 4242)
        os.utime(lock, (time.time() - 10, time.time() - 10))
        with pytest.raises(TrainError, match="created by another user \\(uid 4242\\)"):
            check_locks(timeout=0.2, poll=0.05, say=lambda line: None)


@pytest.mark.slow
def test_a_start_after_a_kill_during_the_op_load_does_not_hang(data_dir, tmp_path):
    """#17: `kill -9` while DeepSpeed loaded its CPU op left TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/lock, and
    every later start waited on it forever, silently, SIGTERM included. Now the stale lock is removed with a
    line, and the op (used only by DeepSpeed's inference all-reduce) is not built or loaded at all."""
    ext = tmp_path / "ext"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "smolds", "train", *args(data_dir, tmp_path / "run", "--train.steps", "1",
                                                          "--train.device", "cpu")]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("smolds train hung on the stale lock")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"smolds train: removed {ext / 'deepspeed_shm_comm' / 'lock'}: a stale lock" in r.stderr
    assert list((ext / "deepspeed_shm_comm").iterdir()) == []  # nothing built, nothing locked


# --------------------------------------------------------------------------------------- ranks that die or hang
@pytest.fixture(scope="module")
def launcher():
    fork = kill_loop.Fork()
    yield fork
    fork.close()


@pytest.mark.slow
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_stops_the_others_and_a_requeue_resumes(launcher, data_dir, tmp_path, fault):
    """Rank 1 of 2 is killed (its sockets close) or stopped (it holds them open and never answers): rank 0 must
    not wait forever in its next collective. It exits non-zero on its own, after at most train.wait_timeout,
    with one line saying what happened, and the same command again (a requeue) resumes the run."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    argv = ["train", *args(data_dir, out, "--train.steps", "8", "--train.checkpoint_every", "2",
                           "--train.eval_every", "100", "--train.wait_timeout", "20"), "--resume"]
    run = launcher.start(argv, 2, log)
    deadline = time.monotonic() + 600
    while not ((out / "metrics.jsonl").is_file() and rows(out).get(3)):
        assert time.monotonic() < deadline and run.wait(0.5) is None, log.read_text()[-3000:]
    os.kill(run.pids[1], fault)
    assert launcher.reap(run.pids[:1], 300) != [None], "rank 0 still waits on its peer: " + log.read_text()[-3000:]
    code = run.wait(60)
    assert run.codes[0] not in (0, -signal.SIGKILL, None), log.read_text()[-3000:]  # it exited by itself
    assert code != 0
    stopped = [line for line in log.read_text().splitlines() if line.startswith("smolds train: error:")]
    assert stopped and "lost a peer" in stopped[0] and "--resume" in stopped[0], log.read_text()[-3000:]
    done = launcher.start(argv, 2, log)
    assert done.wait(900) == 0, log.read_text()[-3000:]
    assert sorted(rows(out)) == list(range(1, 9)) and "resumed from" in (out / "train.log").read_text()


# ---------------------------------------------------------------------------------------------- the disk fills
@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs: room for one checkpoint of the tiny model (13 MB) but not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_full_during_a_save_is_one_line_and_latest_stays_whole(data_dir, small_disk, capsys):
    from smolds.pretrained import load_pretrained
    from smolds.train.cli import main

    out = small_disk / "run"
    common = args(data_dir, out, "--train.steps", "4", "--train.checkpoint_every", "2", "--train.eval_every", "100",
                  "--train.keep_checkpoints", "1")
    capsys.readouterr()
    assert main(common) == 2
    line = one_error_line(capsys)
    assert line.startswith("smolds train: error: step 4: writing the checkpoint failed (") and "No space left" in line
    assert line.endswith(f"checkpoints/latest still names step_0000002: free space in {out / 'checkpoints'} (or "
                         "lower --train.keep_checkpoints), then --resume"), line
    load_pretrained(out / "checkpoints" / "step_0000002" / "consolidated")
    subprocess.run(["mount", "-o", "remount,size=60m", str(small_disk)], check=True)  # space freed
    assert main([*common, "--resume"]) == 0
    assert (out / "checkpoints" / "latest").read_text() == "step_0000004"


# ------------------------------------------------------------------------------------------- SIGTERM, twice
@pytest.mark.slow
def test_sigterm_again_and_again_still_saves_and_exits_75(data_dir, tmp_path):
    """Slurm (or an impatient user) signals again while the workers save: the launcher must still wait for them
    to finish the checkpoint, exit 75, and --resume continue after it. (torchrun's agent raised out of its
    shutdown at the repeated signal: its third left the workers unwaited for.)"""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "launch.py"), "--nproc", "1", "--device", "cpu",
           *args(data_dir, out, "--train.steps", "1000", "--train.checkpoint_every", "1000",
                 "--train.eval_every", "1000")]
    with open(tmp_path / "launch.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not ((out / "metrics.jsonl").is_file() and rows(out).get(2)):
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "launch.log").read_text()
            time.sleep(0.5)
        for _ in range(3):  # twice in a row, and once more
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        code = proc.wait(timeout=300)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    text = (tmp_path / "launch.log").read_text()
    assert code == 75, text[-3000:]
    saved = int((out / "checkpoints" / "latest").read_text().split("_")[1])
    assert saved == max(rows(out)), text[-3000:]
    assert "launch: SIGTERM again: the workers are already stopping" in text, text[-3000:]
    from smolds.train.cli import main

    assert main(args(data_dir, out, "--train.steps", str(saved + 1), "--train.checkpoint_every", "1000",
                     "--train.eval_every", "1000", "--resume")) == 0
    assert max(rows(out)) == saved + 1


# ------------------------------------------------------------------------------------ a shard deleted mid-run
def test_a_shard_deleted_under_a_running_job_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """Shards already mapped keep their bytes (the inode lives on); the first read of a deleted one stops the run
    with one line, and the last checkpoint is whole."""
    from data_prep import prepare
    from smolds.pretrained import load_pretrained
    from smolds.train import loop
    from smolds.train.cli import main

    data = tmp_path / "data"
    prepare(["pydoc:topics"], data, vocab_size=4096, shard_tokens=2000, progress=False)
    real = loop.train_step

    def delete_after_step_2(run, step):
        if step == 2:
            for shard in data.glob("train_*.bin"):
                shard.unlink()
        return real(run, step)

    monkeypatch.setattr(loop, "train_step", delete_after_step_2)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(args(data, out, "--train.steps", "40", "--train.checkpoint_every", "2",
                     "--train.eval_every", "100")) == 2
    line = one_error_line(capsys)
    assert line.startswith("smolds train: error: shard ") and "is missing or has the wrong size; run `smolds prep " \
        f"--verify {data}`" in line, line
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    load_pretrained(latest / "consolidated")


# ---------------------------------------------------------------------------- a resume with another batch size
def test_resume_with_another_batch_keeps_the_token_count(data_dir, tmp_path):
    """tokens_seen is carried in the checkpoint: after a resume with another micro_batch and grad_accum the
    logged `tokens` go on from the true count (#17 saw step x the new batch), and so does the data position."""
    from smolds.train.cli import main

    out = tmp_path / "run"
    common = ["--train.checkpoint_every", "2", "--train.eval_every", "100"]
    assert main(args(data_dir, out, *common, "--train.steps", "4")) == 0
    assert main(args(data_dir, out, *common, "--train.steps", "6", "--train.micro_batch", "2",
                     "--train.grad_accum", "3", "--resume")) == 0
    tokens = {s: r["tokens"] for s, r in rows(out).items()}
    assert tokens == {1: 128, 2: 256, 3: 384, 4: 512, 5: 704, 6: 896}  # 4 x 32 a step, then 2 x 3 x 32
    state = json.loads((out / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    assert state["tokens_seen"] == 896 and state["data"]["consumed_windows"] == 4 * 4 + 2 * 6


def test_a_resume_of_a_finished_run_says_so(data_dir, tmp_path, capsys):
    """The kill loop found it: a run killed after its last checkpoint, started again with the same command,
    has no step left; it died formatting the loss of no step (a traceback, exit 1)."""
    from smolds.train.cli import main

    out = tmp_path / "run"
    common = args(data_dir, out, "--train.steps", "2", "--train.eval_every", "100")
    assert main(common) == 0
    capsys.readouterr()
    assert main([*common, "--resume"]) == 0
    said = capsys.readouterr().out
    assert "\ndone: the run was already at step 2; nothing to train (raise --train.steps to go on)\n" in said
    assert f"checkpoint: {out / 'checkpoints' / 'step_0000002'}" in said


@pytest.mark.slow
def test_workers_die_with_a_killed_launcher(data_dir, tmp_path):
    """torchrun starts each worker in a session of its own: with the launcher killed (kill -9, the OOM killer)
    they trained on as orphans, writing into the out_dir a requeued job then shares. They die with it now."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "launch.py"), "--nproc", "1", "--device", "cpu",
           *args(data_dir, out, "--train.steps", "1000", "--train.checkpoint_every", "1000", "--train.eval_every", "1000")]
    with open(tmp_path / "launch.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    workers = []
    try:
        deadline = time.monotonic() + 600
        while not ((out / "metrics.jsonl").is_file() and rows(out).get(1)):
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "launch.log").read_text()
            time.sleep(0.5)
        workers = kill_loop._tree(proc.pid)[1:]
        assert workers
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 60
        while any(map(alive, workers)):
            assert time.monotonic() < deadline, f"workers {workers} outlived their launcher"
            time.sleep(0.2)
    finally:
        for w in workers:
            kill_loop._signal(w, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.slow
def test_every_process_group_gives_up_after_wait_timeout(tmp_path):
    """DeepSpeed's own data-parallel group (its gradient all-reduce) and the expert groups got torch's default
    timeout of 30 minutes, not the run's: a rank stopped during a backward left the others waiting that long."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(kill_loop._free_port()), str(ROOT / "tests" / "dist" / "group_timeouts.py"), str(tmp_path / "out.json")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        for pid in kill_loop._tree(proc.pid):  # torchrun's workers live in sessions of their own
            kill_loop._signal(pid, signal.SIGKILL)
        pytest.fail("a process group waited far longer than train.wait_timeout (5 s)")
    assert proc.returncode == 0, output[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert len(result["groups"]) >= 3 and result["failed"] == len(result["groups"]), result


def test_a_second_prep_of_a_directory_says_what_it_waits_for(tmp_path):
    """Two preps of one directory take turns (an flock, which the kernel drops with its holder, so a killed prep
    never leaves it held); the one that waits says on what instead of sitting silent."""
    import fcntl

    out = tmp_path / "data"
    out.mkdir()
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-m", "smolds", "prep", "--out", str(out), "--workers", "1"],
                                stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        assert proc.stderr.readline() == (f"smolds prep: waiting for another prep of {out} to finish (it holds "
                                          f"{out / '.lock'})\n")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    assert (out / "manifest.json").is_file()


@pytest.mark.slow
def test_a_rendezvous_port_in_use_is_one_line(data_dir, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        # rank 0 of two hosts the rendezvous store on MASTER_PORT (a world of one needs no port at all)
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(taken.getsockname()[1]), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
        r = subprocess.run([sys.executable, "-m", "smolds", "train", *args(data_dir, tmp_path / "run")], env=env,
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    errors = [line for line in r.stderr.splitlines() if line.startswith("smolds train:")]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1 and "could not reach the other ranks" in errors[0] and "check MASTER_ADDR and " \
        "MASTER_PORT" in errors[0], r.stderr[-3000:]
