"""`smolds prep --tasks N`: one corpus prepared by N tasks, on this machine or over Slurm, with the bytes of one process.

    smolds prep SOURCES --out DIR --tasks N [--executor local|slurm] [--workers W]
                [--slurm-partition P] [--time T] [--merge-time T] [--sbatch-arg NAME[=VALUE] ...]

The tasks run on datatrove's executors (HF's engine behind FineWeb): a local process pool, or a Slurm
job array plus a merge job that waits for it, submitted with sbatch. An executor writes a completion marker
per task and, when the same command runs again, runs only the tasks without one. Three stages:

    launch    this process: the checks, the tokenizer and progress.json of `prepare` (pack.py), and the
              cut of the input into N slices (slices.py), recorded in progress.json; then it runs the
              executors (local) or submits them (Slurm) and returns.
    tokenize  task k tokenizes slice k with W tokenizer processes (workers.py) into part k: the
              slice's documents in order, each followed by EOS. No task knows a document's split.
    merge     one task, once every tokenize task has ended: reads the parts in slice order, numbers
              their documents (part k's first is the count of the parts before it), routes each to
              train or val by pack.is_val, and hands them to pack.py's packer, shards and manifest.

Why these are the shards of one process whatever N, and whichever node ran which task: the parts in
slice order hold the one-process document stream (slices.py), tokenized document by document as one
process does; routing and packing then run the code `prepare` runs, on the same stream. The merge
resumes like `prepare` (progress.json's cursors) and takes the directory's lock.

Why a merge that reads and writes every token once more: the shard cut depends on the whole stream and
the train/val split on global document indices, neither of which a task knows while it tokenizes. Per
token it costs about 1% of tokenizing (bench/prep.py), but it is one process, bound by one node's disk:
at corpus scale its hours can exceed those of the tokenize stage (docs/data.md's 1T-token plan).

On disk, beside what pack.py writes (tasks/ stays for its logs; the parts go once manifest.json is written):
    tasks/tokenize/        datatrove's folder for the stage: completions/00003 (task 3's marker),
                           logs/task_00003.log, stats/00003.json (documents, tokens, CPU seconds),
                           local_executor.pik (local) or executor.pik, launch_script.slurm,
                           ranks_to_run.json and slurm_logs/ (Slurm)
    tasks/merge/           the same for the merge (Slurm)
    tasks/jobs.json        the Slurm job ids of the last submission: a rerun waits until they have ended
    tasks/parts/00003.bin           part 3: its tokens, in the dataset's dtype
    tasks/parts/00003.lengths.npy   uint32: the tokens of each of its documents, EOS included
A part is written to .tmp files, fsynced and renamed before its task's marker is written, so a task
killed at any point leaves no marker, and the next run of the same command runs it again, alone.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import dill
import numpy as np
from datatrove.executor.local import LocalPipelineExecutor
from datatrove.executor.slurm import SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import logger
from tokenizers import Tokenizer

from data_prep.errors import DataError
from data_prep.pack import (
    CHUNK_CHARS,
    DEFAULT_VOCAB_SIZE,
    SHARD_TOKENS,
    SPLITS,
    TASKS_DIR,
    VAL_FRACTION,
    Plan,
    as_command,
    begin,
    claim,
    cursors,
    finish,
    is_val,
    locked,
    pack,
    plan,
    read_json,
    save_progress,
    use_tokenizer,
    write_atomic,
)
from data_prep.slices import cut
from data_prep.sources import iter_documents
from data_prep.tokenizer import eos_id
from data_prep.workers import tokenize_in_order

EXECUTORS = ("local", "slurm")
MERGE_TOKENS = 1 << 24  # tokens the merge routes at a time: 32 MiB of uint16 per read


@dataclass(frozen=True)
class SlurmOptions:
    """What sbatch gets beyond datatrove's defaults (1 node, 2 GB per CPU, --requeue, one array task per slice)."""

    partition: str | None = None  # None: the cluster's default partition
    time: str | None = None  # of each tokenize task; None: the partition's default time limit
    merge_time: str | None = None  # of the merge job; None: `time`
    sbatch_args: dict[str, str] = field(default_factory=dict)  # more #SBATCH options: {"account": "proj"}


def prepare_distributed(
    sources: list[str],
    out_dir: str | os.PathLike,
    tasks: int,
    executor: str = "local",
    workers: int = 1,
    slurm: SlurmOptions | None = None,
    tokenizer: str = "bpe",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    shard_tokens: int = SHARD_TOKENS,
    val_fraction: float = VAL_FRACTION,
    text_field: str = "text",
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Prepare `sources` into `out_dir` on `tasks` tasks; the result is byte for byte that of `prepare`.

    Args:
        tasks: slices of the input, one task each (see slices.py).
        executor: "local" runs the tasks here, cpu_count // workers at a time, then the merge, and
            returns the manifest; "slurm" submits a job array and a merge job after it, and returns
            {"tokenize_job": id or None (every task already done), "merge_job": id, "tasks": [unfinished]}.
        workers: tokenizer processes per task (and CPUs per Slurm task).
        slurm: partition, time limit and other sbatch options for executor="slurm".
        The rest as for `prepare`. A rerun of the same call finds the dataset complete, or runs what is
        left: the tasks without a completion marker, then the merge.
    """
    if executor not in EXECUTORS:
        raise DataError(f"--executor {executor}: choose local or slurm")
    if slurm is not None and executor != "slurm":
        raise DataError("--slurm-partition, --time, --merge-time and --sbatch-arg are for --executor slurm; "
                        "add it or drop them")
    if executor == "slurm" and shutil.which("sbatch") is None:
        raise DataError("--executor slurm needs Slurm's sbatch on PATH; run on a Slurm login node, "
                        "or use --executor local")
    command = command or (as_command(sources, out_dir, tokenizer, vocab_size, workers, shard_tokens, val_fraction,
                                     text_field, dtype) + f" --tasks {tasks} --executor {executor}")
    t0 = time.perf_counter()
    p, tok = plan(sources, out_dir, tokenizer, vocab_size, workers, shard_tokens, val_fraction, text_field, dtype,
                  command)
    _refuse_if_running(p.out)  # before the lock, which a running merge job holds
    with locked(p.out):
        state = claim(p, overwrite, tasks)
        if state is not None and state.get("complete"):
            if progress:
                print(f"smolds prep: {p.out} already holds this dataset ({state['tokens']:,} tokens); nothing to do",
                      file=sys.stderr)
            return state
        state = begin(p, state)
        slices = (state.get("tasks") or {}).get("slices") or [list(map(list, s)) for s in cut(p.srcs, tasks)]
        tok, tok_json = use_tokenizer(p, state, tok)
        state["tasks"] = {"count": tasks, "slices": slices}
        save_progress(p.out, state)
    step = _Tokenize(p, slices, tok_json, workers)
    if executor == "local":
        _run_local(p, step, parallel=max(1, min(tasks, (os.cpu_count() or 1) // workers)))
        manifest = merge(p, tasks, progress)
        if progress:
            print(f"smolds prep: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens on {tasks} tasks "
                  f"in {time.perf_counter() - t0:.1f} s -> {p.out}", file=sys.stderr)
        return manifest
    return _submit(p, step, slurm or SlurmOptions(), progress)


def merge(p: Plan, tasks: int, progress: bool = False) -> dict:
    """Pack the parts of every tokenize task into the dataset's shards and manifest; return the manifest."""
    with locked(p.out):
        state = read_json(p.out / "progress.json")
        if not (p.out / "manifest.json").is_file() and not (state and state.get("tasks")):
            raise DataError(f"{p.out} holds no task-parallel prep to merge (no progress.json with tasks); "
                            "rerun the `smolds prep ... --tasks N` command")
        state = claim(p, overwrite=False, tasks=tasks)
        if state.get("complete"):
            return state
        missing = unfinished_tasks(p.out, tasks)
        if missing:
            raise DataError(f"tasks {_ranges(missing)} of {tasks} have not completed (see {p.out / TASKS_DIR}/tokenize/"
                            "logs); rerun the same `smolds prep` command: it runs them, then the merge")
        tok_json = (p.out / "tokenizer.json").read_text()
        tok = Tokenizer.from_str(tok_json)
        np_dtype = p.np_dtype(tok)
        with closing(_read_parts(p.out, tasks, np_dtype, p.frac, cursors(state))) as results:
            pack(p.out, state, results, np_dtype, p.shard_tokens, progress, desc="merging")
        manifest = finish(p, state, tok, tok_json)
        shutil.rmtree(p.out / TASKS_DIR / "parts")
    return manifest


def unfinished_tasks(out: Path, tasks: int) -> list[int]:
    """The tokenize tasks without a completion marker (datatrove writes it once the task's part is whole)."""
    done = out / TASKS_DIR / "tokenize" / "completions"
    return [k for k in range(tasks) if not (done / f"{k:05d}").is_file()]


# --- the tokenize stage -------------------------------------------------------------------------------


class _Tokenize(PipelineStep):
    """Task k: the documents of slice k, tokenized, into part k (tokens + lengths), written whole or not at all."""

    name = "tokenize a slice into a part"
    type = "smolds prep"

    def __init__(self, p: Plan, slices: list, tok_json: str, workers: int):
        super().__init__()
        self.p, self.slices, self.tok_json, self.workers = p, slices, tok_json, workers

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        with self.track_time(unit="task"):
            self._tokenize(rank)

    def _tokenize(self, rank: int) -> None:
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        start, end = (tuple(pos) for pos in self.slices[rank])
        tok = Tokenizer.from_str(self.tok_json)
        np_dtype = self.p.np_dtype(tok)
        parts = self.p.out / TASKS_DIR / "parts"
        parts.mkdir(parents=True, exist_ok=True)
        bin_path, len_path = parts / f"{rank:05d}.bin", parts / f"{rank:05d}.lengths.npy"
        chunks = _chunks(iter_documents(self.p.srcs, self.p.text_field, start, end))
        lengths = []
        with (closing(tokenize_in_order(chunks, self.tok_json, eos_id(tok), self.workers)) as results,
              open(f"{bin_path}.tmp", "wb") as f):
            for _, tokens, doc_lengths in results:
                f.write(tokens.astype(np_dtype).data)
                lengths.append(doc_lengths)
            f.flush()
            os.fsync(f.fileno())
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        with open(f"{len_path}.tmp", "wb") as f:
            np.save(f, lengths.astype(np.uint32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(f"{len_path}.tmp", len_path)
        os.replace(f"{bin_path}.tmp", bin_path)
        tokens, seconds, cpu = int(lengths.sum()), time.perf_counter() - t0, _cpu_seconds() - cpu0
        self.stat_update("documents", value=len(lengths))
        self.stat_update("tokens", value=tokens)
        self.stat_update("cpu_seconds", value=round(cpu, 3))  # this process and its tokenizer workers
        logger.info(f"part {rank}: slice {start}..{end}, {len(lengths):,} documents, {tokens:,} tokens in "
                    f"{seconds:.1f} s ({tokens / seconds / 1e6:.2f}M tok/s, {tokens / max(cpu, 1e-9) / 1e6:.2f}M per "
                    "CPU-second)")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have ended."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _run_local(p: Plan, step: _Tokenize, parallel: int) -> None:
    """Run the tokenize tasks here, `parallel` at a time, on datatrove's LocalPipelineExecutor.

    The executor runs in a fresh `python -c` process, as datatrove's own launcher runs a pickled one
    under Slurm: its forkserver pool re-imports the caller's main module in every worker, which would
    restart a script without a main guard and fail in a loop for one piped to stdin; a `-c` process has
    no main module to re-import. A task's DataError comes back as the child's one line on stdout.
    """
    folder = p.out / TASKS_DIR / "tokenize"
    folder.mkdir(parents=True, exist_ok=True)
    executor = LocalPipelineExecutor([step], tasks=len(step.slices), workers=parallel, logging_dir=str(folder),
                                     start_method="forkserver")
    with open(folder / "local_executor.pik", "wb") as f:
        dill.dump(executor, f)
    r = subprocess.run([sys.executable, "-c", _LOCAL_MAIN, str(folder / "local_executor.pik")], stdout=subprocess.PIPE,
                       text=True, env=_env())
    if r.returncode == 2 and r.stdout.strip():
        raise DataError(r.stdout.strip().splitlines()[-1])
    if r.returncode != 0:
        raise DataError(f"the local tasks failed (exit {r.returncode}): the error is above, each task's log in "
                        f"{folder}/logs; fix it and rerun the same command (finished tasks are kept)")


_LOCAL_MAIN = """
import sys, dill
from data_prep.errors import DataError
try:
    with open(sys.argv[1], "rb") as f:
        dill.load(f).run()
except DataError as e:
    print(e)
    sys.exit(2)
"""


def _env() -> dict[str, str]:
    """This environment, with this data_prep first on PYTHONPATH: a child process imports the same code."""
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def _chunks(docs: Iterable[str]) -> Iterator[tuple[None, list[str]]]:
    """Documents in lists of ~CHUNK_CHARS characters, one worker task each (as pack.py cuts them)."""
    texts, chars = [], 0
    for text in docs:
        texts.append(text)
        chars += len(text)
        if chars >= CHUNK_CHARS:
            yield None, texts
            texts, chars = [], 0
    if texts:
        yield None, texts


# --- the merge stage ----------------------------------------------------------------------------------


def _read_parts(out: Path, tasks: int, np_dtype: np.dtype, frac: Fraction,
                cursor: dict) -> Iterator[tuple[tuple[str, np.ndarray], np.ndarray, np.ndarray]]:
    """The parts as pack() takes tokenizer results: ((split, document indices), tokens, lengths), in document
    order per split, documents before a split's cursor left out."""
    parts, first = out / TASKS_DIR / "parts", 0  # first: global index of the part's first document
    for k in range(tasks):
        lengths = np.load(parts / f"{k:05d}.lengths.npy").astype(np.int64)
        size = (parts / f"{k:05d}.bin").stat().st_size
        if size != lengths.sum() * np_dtype.itemsize:
            raise DataError(f"{parts / f'{k:05d}.bin'} holds {size} bytes, its lengths say "
                            f"{lengths.sum() * np_dtype.itemsize}; delete {out / TASKS_DIR}/tokenize/completions/"
                            f"{k:05d} and rerun the command to tokenize it again")
        # a plain view of the mapped file: slicing a np.memmap costs more than copying a short document
        tokens = np.asarray(np.memmap(parts / f"{k:05d}.bin", dtype=np_dtype, mode="r")) if size else np.zeros(0, np_dtype)
        ids = first + np.arange(len(lengths), dtype=np.int64)
        val = is_val(ids, frac)
        ends = np.cumsum(lengths)  # document j is tokens [ends[j] - lengths[j], ends[j]) of the part
        a = 0
        while a < len(lengths):  # documents [a, b): about MERGE_TOKENS tokens at a time
            b = max(a + 1, int(np.searchsorted(ends, ends[a] - lengths[a] + MERGE_TOKENS, side="right")))
            for split, mine in zip(SPLITS, (~val[a:b], val[a:b])):
                keep = np.flatnonzero(mine & (ids[a:b] >= cursor[split][0])) + a
                if len(keep):
                    yield (split, ids[keep]), _gather(tokens, keep, ends, lengths), lengths[keep]
            a = b
        first += len(lengths)


def _gather(tokens: np.ndarray, docs: np.ndarray, ends: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The tokens of documents `docs` (ascending) concatenated: one copy per run of consecutive documents
    (train runs between val documents), not a per-token mask."""
    breaks = np.flatnonzero(np.diff(docs) != 1) + 1
    first, last = docs[np.concatenate([[0], breaks])], docs[np.concatenate([breaks - 1, [len(docs) - 1]])]
    return np.concatenate([tokens[int(ends[f] - lengths[f]):int(ends[g])] for f, g in zip(first, last)])


# --- Slurm ------------------------------------------------------------------------------------------


class _Slurm(SlurmPipelineExecutor):
    """datatrove's Slurm executor, leaving to Slurm what the user did not set, without its stats job."""

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        return {k: v for k, v in super().get_sbatch_args(max_array).items() if v is not None}

    def launch_merge_stats(self):
        """Not launched: a third job that would wait forever (afterok) on a failed task; the merge counts."""


def _submit(p: Plan, step: _Tokenize, slurm: SlurmOptions, progress: bool) -> dict:
    """Submit the tokenize array (unfinished tasks only) and the merge after it; record the job ids."""
    tasks = len(step.slices)
    root = Path(__file__).resolve().parent.parent  # so the jobs import this data_prep
    common = dict(partition=slurm.partition, qos=None, sbatch_args=dict(slurm.sbatch_args),
                  env_command=f"export PYTHONPATH={shlex.quote(str(root))}${{PYTHONPATH:+:$PYTHONPATH}}")
    tokenize = _Slurm([step], tasks=tasks, cpus_per_task=step.workers, job_name="smolds-prep-tokenize",
                      time=slurm.time, logging_dir=str(p.out / TASKS_DIR / "tokenize"), **common)
    merger = _Slurm([_Merge(p, tasks)], tasks=1, job_name="smolds-prep-merge", depends=tokenize,
                    time=slurm.merge_time or slurm.time,
                    run_on_dependency_fail=True, skip_completed=False, logging_dir=str(p.out / TASKS_DIR / "merge"),
                    **common)
    left = tokenize.get_incomplete_ranks()
    if left:
        _check_options(tokenize.get_sbatch_args(len(left)))
    _check_options(merger.get_sbatch_args())
    merger.run()  # submits the array first (its dependency), then the merge with --dependency=afterany:<array>
    jobs = {"tokenize_job": tokenize.job_id if left else None, "merge_job": merger.job_id, "tasks": left}
    write_atomic(p.out / TASKS_DIR / "jobs.json", json.dumps(jobs).encode())
    if progress:
        array = f"array job {jobs['tokenize_job']} ({len(left)} of {tasks} tasks: {_ranges(left)}), then " if left else ""
        print(f"smolds prep: submitted {array}merge job {jobs['merge_job']}; the dataset is complete when the "
              f"merge ends (`smolds prep --verify {p.out}`); if a task fails, rerun this command: it resubmits "
              "only the unfinished tasks", file=sys.stderr)
    return jobs


class _Merge(PipelineStep):
    """The merge as a one-task datatrove pipeline, run by Slurm after the tokenize array."""

    name = "merge the parts into shards"
    type = "smolds prep"

    def __init__(self, p: Plan, tasks: int):
        super().__init__()
        self.p, self.tasks = p, tasks

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        manifest = merge(self.p, self.tasks)
        logger.info(f"merged {self.tasks} parts: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens")


def _check_options(sbatch_args: dict) -> None:
    """Ask Slurm (sbatch --test-only, nothing submitted) whether it takes these options; one line if not."""
    args = [f"--{k}={v}" if v != "" else f"--{k}" for k, v in sbatch_args.items()]
    r = subprocess.run(["sbatch", "--test-only", *args, "--wrap=true"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        reason = next((line for line in r.stderr.splitlines() if line.strip()), f"exit {r.returncode}")
        raise DataError(f"Slurm refuses the job ({reason.removeprefix('sbatch: error: ').strip()}); check "
                        "--slurm-partition, --time, --merge-time, --workers and --sbatch-arg")


def _refuse_if_running(out: Path) -> None:
    """A rerun while the last Slurm submission's jobs are queued or running would run the same tasks twice."""
    last = read_json(out / TASKS_DIR / "jobs.json") or {}
    jobs = [j for j in (last.get("tokenize_job"), last.get("merge_job")) if j]
    if not jobs or shutil.which("squeue") is None:
        return
    r = subprocess.run(["squeue", "--noheader", "--format=%F"], capture_output=True, text=True, timeout=60)
    alive = sorted(set(jobs) & set(r.stdout.split()), key=int)
    if alive:
        raise DataError(f"jobs {', '.join(alive)} of this prep are still queued or running (squeue -j "
                        f"{','.join(alive)}); wait for them to end, or scancel them, then rerun")


def _ranges(ks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (Slurm's array notation)."""
    out, i = [], 0
    while i < len(ks):
        j = i
        while j + 1 < len(ks) and ks[j + 1] == ks[j] + 1:
            j += 1
        out.append(str(ks[i]) if i == j else f"{ks[i]}-{ks[j]}")
        i = j + 1
    return ",".join(out)


def unfinished_message(out: Path, state: dict) -> str:
    """verify's line for a task-parallel prep that has not finished: which tasks are left."""
    n = state["tasks"]["count"]
    missing = unfinished_tasks(out, n)
    left = f"tasks {_ranges(missing)} of {n} have not completed" if missing else f"all {n} tasks completed"
    return (f"{out}: the {n}-task prep did not finish ({left}; no manifest.json yet); rerun the same "
            "`smolds prep` command to finish it")

