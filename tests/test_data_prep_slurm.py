"""`smolds prep --executor slurm` on a real one-node Slurm cluster on this host (.ci/slurm_up.sh brings it up).

A 4-task job array prep of ../shared/corpora equals a one-process prep byte for byte; a task killed mid-way
reruns alone; options Slurm refuses are one-line errors. Each prep is the CLI as a user runs it, which
submits the jobs and returns; the tests then follow the jobs with `scontrol show job` (no accounting
database here, finished jobs stay visible for MinJobAge).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_data_prep_tasks import CORPORA, dataset_files, manifest_of, small_bpe

from data_prep import prepare, verify
from data_prep.distributed import unfinished_tasks

ROOT = Path(__file__).resolve().parents[1]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}
NOT_INSTALLABLE = 3  # .ci/slurm_up.sh: no root or no apt-get here

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def slurm():
    """A running one-node cluster: `.ci/slurm_up.sh` (idempotent). Skips only where Slurm cannot be
    installed, and never under CI, which must install it (as in test_slurm.py)."""
    try:
        up = subprocess.run(["bash", str(ROOT / ".ci" / "slurm_up.sh")], capture_output=True, text=True,
                            timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail(".ci/slurm_up.sh took more than 15 minutes")
    if up.returncode == NOT_INSTALLABLE and not os.environ.get("CI"):
        pytest.skip(f"Slurm cannot be installed here: {up.stderr.strip()}")
    if up.returncode != 0:
        pytest.fail(f".ci/slurm_up.sh failed (exit {up.returncode}):\n{up.stdout}\n{up.stderr}")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    return small_bpe(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_file) -> Path:
    out = tmp_path_factory.mktemp("ref")
    prepare([str(CORPORA)], out, tokenizer=tokenizer_file, shard_tokens=20_000, workers=1, progress=False)
    return out


def prep(out: Path, tokenizer_file: str, *more: str) -> subprocess.CompletedProcess:
    """`smolds prep ../shared/corpora --executor slurm --tasks 4` as a user runs it: submits, then returns."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "data_prep.cli", str(CORPORA), "--out", str(out), "--tokenizer",
                           tokenizer_file, "--shard-tokens", "20000", "--executor", "slurm", "--tasks", "4",
                           "--time", "10", *more], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def records(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job`: one record per array task (or one for a plain job)."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", str(job_id)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.stdout.splitlines() if line.strip()]


def wait_ended(job_id: str, timeout: float = 300) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        recs = records(job_id)
        if all(r["JobState"] in DONE for r in recs):
            return recs
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job_id)], timeout=30)
            pytest.fail(f"job {job_id} not done after {timeout:.0f} s: {[r['JobState'] for r in recs]}")
        time.sleep(0.5)


def submitted(out: Path, r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "tasks" / "jobs.json").read_text())


def test_array_prep_equals_one_process(slurm, tokenizer_file, reference, tmp_path):
    out = tmp_path / "data"
    jobs = submitted(out, prep(out, tokenizer_file))
    assert jobs["tasks"] == [0, 1, 2, 3]
    array = wait_ended(jobs["tokenize_job"])
    assert sorted(int(r["ArrayTaskId"]) for r in array) == [0, 1, 2, 3]
    assert all(r["JobState"] == "COMPLETED" for r in array), array
    merge = wait_ended(jobs["merge_job"])[0]
    assert merge["JobState"] == "COMPLETED" and merge["ExitCode"] == "0:0", merge
    assert dataset_files(out) == dataset_files(reference) and manifest_of(out) == manifest_of(reference)
    assert verify(out) == []


def test_killed_task_reruns_alone(slurm, tokenizer_file, reference, tmp_path):
    out = tmp_path / "data"
    jobs = submitted(out, prep(out, tokenizer_file))
    half_written = out / "tasks" / "parts" / "00003.bin.tmp"
    deadline = time.monotonic() + 300
    while not half_written.exists():  # task 3 has started writing its part: kill it there
        assert time.monotonic() < deadline and not (out / "tasks" / "parts" / "00003.bin").exists()
        time.sleep(0.01)
    subprocess.run(["scancel", f"{jobs['tokenize_job']}_3"], check=True, timeout=30)
    states = {int(r["ArrayTaskId"]): r["JobState"] for r in wait_ended(jobs["tokenize_job"])}
    assert states == {0: "COMPLETED", 1: "COMPLETED", 2: "COMPLETED", 3: "CANCELLED"}, states
    merge = wait_ended(jobs["merge_job"])[0]  # runs after the array however it ended, and says what is missing
    assert merge["JobState"] == "FAILED", merge
    log = (out / "tasks" / "merge" / "slurm_logs" / f"{jobs['merge_job']}_0.out").read_text()
    assert "tasks 3 of 4 have not completed" in log and "rerun the same `smolds prep` command" in log
    assert unfinished_tasks(out, 4) == [3] and "tasks 3 of 4 have not completed" in verify(out)[0]

    logs = out / "tasks" / "tokenize" / "logs"
    before = {p.name: p.stat().st_mtime_ns for p in logs.iterdir()}
    again = submitted(out, prep(out, tokenizer_file))  # the same command
    assert again["tasks"] == [3] and json.loads((out / "tasks" / "tokenize" / "ranks_to_run.json").read_text()) == [3]
    array = wait_ended(again["tokenize_job"])
    assert len(array) == 1 and array[0]["JobState"] == "COMPLETED", array
    merge = wait_ended(again["merge_job"])[0]
    assert merge["JobState"] == "COMPLETED", merge
    after = {p.name: p.stat().st_mtime_ns for p in logs.iterdir()}
    assert [name for name in sorted(after) if after[name] != before.get(name)] == ["task_00003.log"]
    assert dataset_files(out) == dataset_files(reference) and manifest_of(out) == manifest_of(reference)
    assert verify(out) == []


@pytest.mark.parametrize("option, reason", [
    (["--slurm-partition", "nope"], "invalid partition specified: nope"),
    (["--time", "soon"], "Invalid --time specification"),
    (["--merge-time", "soon"], "Invalid --time specification"),  # checked before the array is submitted
])
def test_options_slurm_refuses_are_one_line_errors(slurm, tokenizer_file, tmp_path, option, reason):
    r = prep(tmp_path / "data", tokenizer_file, *option)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"smolds prep: error: Slurm refuses the job ({reason}); check --slurm-partition, --time, --merge-time, "
        "--workers and --sbatch-arg"), r.stderr
    assert not (tmp_path / "data" / "tasks" / "jobs.json").exists()  # nothing submitted


def test_rerun_while_jobs_are_queued_is_refused(slurm, tokenizer_file, tmp_path):
    """Submitting the same prep again before its jobs end would run the same tasks twice."""
    out = tmp_path / "data"
    jobs = submitted(out, prep(out, tokenizer_file, "--sbatch-arg", "hold"))  # held: queued until released
    try:
        r = prep(out, tokenizer_file)
        ids = f"{jobs['tokenize_job']}, {jobs['merge_job']}"
        assert r.returncode == 2 and r.stderr.strip() == (
            f"smolds prep: error: jobs {ids} of this prep are still queued or running (squeue -j "
            f"{ids.replace(', ', ',')}); wait for them to end, or scancel them, then rerun"), r.stderr
    finally:
        subprocess.run(["scancel", jobs["tokenize_job"], jobs["merge_job"]], timeout=30)
