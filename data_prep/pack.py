"""Tokenize a corpus on many processes and pack it into fixed-size token shards, resumably.

On disk (docs/data.md has every field):
    manifest.json          written last, so its presence means the dataset is complete
    tokenizer.json         the tokenizer used; the trainer loads it and copies it into checkpoints
    train_00000.bin ...    raw tokens (uint16, or uint32 for vocabularies over 65,535), `shard_tokens`
                           per shard (the last one shorter): the split's documents, each followed by EOS
    train_00000.docs.npy   uint32 offsets, inside that shard, of each document that starts there
    val_00000.bin ...      the same for the validation split
    progress.json          only while a run is unfinished: the settings hash, finished shards, cursors

Pipeline: this process reads documents in order, routes each to train or val, and sends chunks of
~256k characters to `workers` processes that tokenize with one core each (workers.py); results come
back in chunk order and are appended to the split's open shard. A document's tokens depend only on its
text, chunks are cut by text length alone and results are written in submission order, so the shards
are byte-identical whatever the number of workers.

Resume (after datatrove's per-task completion markers, one shard fine): a shard is written to a temp
file and renamed once full; then progress.json records it together with the split's cursor, the
(document index, token offset) of the first token not yet in a shard. Rerunning the same command reads
the documents again, skips those before the cursor without tokenizing them, drops the first `offset`
tokens of the cursor's document and carries on, which gives the bytes of an uninterrupted run.
Megatron's and GPT-NeoX's preprocessing cannot resume: their index is written at the very end.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from data_prep.errors import DataError
from data_prep.sources import DEFAULT_SOURCE, Source, iter_documents, resolve_sources
from data_prep.tokenizer import SPECIAL_TOKENS, eos_id, load_tokenizer, train_bpe, vocab_size_of
from data_prep.workers import tokenize_in_order

FORMAT = "smolds-shards/1"
SPLITS = ("train", "val")
SHARD_TOKENS = 1 << 27  # 134M tokens, 256 MiB of uint16: few files, and a crash loses at most seconds of work
VAL_FRACTION = 0.05
DEFAULT_VOCAB_SIZE = 4096  # the `tiny` model preset's vocab_size
LONE_DOC_CHARS = 1 << 16  # a source this large that is mostly one document has lost its document separators
CHUNK_CHARS = 1 << 18  # text per worker task: big enough to amortize IPC, small enough to balance 2+ workers
SPLIT_RULE = "document i >= 1 goes to val when ceil(i*f) > ceil((i-1)*f), f = val_fraction; document 0 to train"
TASKS_DIR = "tasks"  # a task-parallel prep's parts, markers and logs (distributed.py)
_KINDS = {int: "an integer >= 0", str: "a string", dict: "an object", list: "a list"}
_OURS = re.compile(r"^(manifest\.json|progress\.json|tokenizer\.json|\.lock|tasks|(train|val)_\d{5,}\.(bin|docs\.npy))(\.tmp)?$")


def prepare(
    sources: list[str],
    out_dir: str | os.PathLike,
    tokenizer: str = "bpe",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    workers: int = 1,
    shard_tokens: int = SHARD_TOKENS,
    val_fraction: float = VAL_FRACTION,
    text_field: str = "text",
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Tokenize `sources` into shards under `out_dir` and return the manifest.

    Args:
        sources: file, folder, glob, hf:NAME[:CONFIG][:SPLIT] or pydoc:topics specs (see sources.py).
        tokenizer: "bpe" trains a byte-level BPE of `vocab_size` on the corpus; anything else goes to
            `load_tokenizer` (tokenizer.json, HF folder, hub id, gguf, gguf:PATH).
        workers: tokenizer processes (one core each); this process reads and writes.
        shard_tokens: tokens per shard file.
        val_fraction: share of documents for the validation split (rule in SPLIT_RULE).
        dtype: "auto" (uint16 when the vocabulary fits, else uint32), "uint16" or "uint32".
        overwrite: replace a different dataset already in out_dir.
        command: recorded in the manifest; defaults to the equivalent `smolds prep` command.

    Runs again with the same settings return the manifest at once (complete) or resume (interrupted).
    """
    t0 = time.perf_counter()
    p, tok = plan(sources, out_dir, tokenizer, vocab_size, workers, shard_tokens, val_fraction, text_field, dtype,
                  command)
    with locked(p.out):
        state = claim(p, overwrite)
        if state is not None and state.get("complete"):
            if progress:
                print(f"smolds prep: {p.out} already holds this dataset ({state['tokens']:,} tokens); nothing to do",
                      file=sys.stderr)
            return state
        state = begin(p, state)
        resumed = sum(len(state["splits"][s]["shards"]) for s in SPLITS)
        tok, tok_json = use_tokenizer(p, state, tok)
        eos, np_dtype = eos_id(tok), p.np_dtype(tok)
        if progress and resumed:
            print(f"smolds prep: resuming {p.out} after {resumed} finished shards", file=sys.stderr)
        stats: list[dict] = []
        chunks = _chunks(_counted(p.srcs, p.text_field, p.frac, stats), p.frac, cursors(state))
        with closing(tokenize_in_order(chunks, tok_json, eos, workers)) as results:
            docs, tokens = pack(p.out, state, results, np_dtype, p.shard_tokens, progress)
        manifest = finish(p, state, tok, tok_json)
    for warning in source_warnings(p.srcs, stats, p.val_fraction):
        print(f"smolds prep: warning: {warning}", file=sys.stderr)
    if progress:
        seconds = time.perf_counter() - t0
        counts = ", ".join(f"{s} {len(manifest['splits'][s]['shards'])}" for s in SPLITS)
        print(f"smolds prep: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens, "
              f"{sum(len(manifest['splits'][s]['shards']) for s in SPLITS)} shards ({counts}) in {seconds:.1f} s "
              f"({tokens / seconds / 1e6:.2f}M tok/s this run, {docs:,} documents tokenized) -> {p.out}",
              file=sys.stderr)
    return manifest


def prepare_default(out_dir: str | os.PathLike, workers: int = 1, progress: bool = True) -> dict:
    """The embedded default dataset: pydoc topics with a byte-level BPE of 4096 tokens trained on them.

    Needs no download, ~113k tokens, prepared in about a second. Idempotent and fast: when out_dir
    already holds the default dataset it returns that manifest without touching anything, even if it
    was made by another CPython release (whose topics differ slightly; any of them will do).
    """
    manifest = read_json(Path(out_dir) / "manifest.json")
    if (manifest and [s.get("spec") for s in manifest.get("sources", [])] == [DEFAULT_SOURCE]
            and manifest.get("tokenizer", {}).get("bpe_vocab_size") == DEFAULT_VOCAB_SIZE):
        return manifest
    return prepare([DEFAULT_SOURCE], out_dir, tokenizer="bpe", vocab_size=DEFAULT_VOCAB_SIZE,
                   workers=workers, progress=progress)


def verify(out_dir: str | os.PathLike) -> list[str]:
    """Check the whole dataset; return the problems, one line each.

    Every file the manifest lists (size and sha256); then the manifest against itself (each split's
    totals, full shards but the last, the fingerprint of the shard hashes); then each shard's document
    index against its tokens (every document starts right after an EOS, in order, across shard ends).
    """
    out = Path(out_dir)
    if not (out / "manifest.json").is_file():
        state = read_json(out / "progress.json")
        if state is not None and state.get("tasks"):
            from data_prep.distributed import unfinished_message  # imports datatrove

            return [unfinished_message(out, state)]
        if (out / "progress.json").is_file():
            return [f"{out}: the prep run did not finish (no manifest.json); rerun the same `smolds prep` "
                    "command to resume it"]
        return [f"{out}: no manifest.json; run `smolds prep SOURCES --out {out}` first"]
    try:
        manifest = load_manifest(out)
    except DataError as e:
        return [str(e)]
    itemsize = np.dtype(manifest["dtype"]).itemsize
    files = [("tokenizer.json", manifest["tokenizer"]["sha256"], None)]
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            files.append((shard["file"], shard["sha256"], shard["tokens"] * itemsize))
            files.append((shard["index"], shard["index_sha256"], None))
    problems = []
    fix = "re-create the dataset (its command with --overwrite)"
    for name, sha, size in files:
        path = out / name
        if not path.is_file():
            problems.append(f"{path}: missing; {fix}")
        elif size is not None and path.stat().st_size != size:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {size}; {fix}")
        elif _sha256_file(path) != sha:
            problems.append(f"{path}: sha256 differs from the manifest (corrupt or changed); {fix}")
    return problems or [f"{p}; {fix}" for p in _inconsistencies(out, manifest)]


def _inconsistencies(out: Path, manifest: dict) -> Iterator[str]:
    """What does not add up in a dataset whose files all match their hashes (a packing or merging bug)."""
    shards = {s: manifest["splits"][s]["shards"] for s in SPLITS}
    if _sha256("".join(sh["sha256"] for s in SPLITS for sh in shards[s]))[:16] != manifest["fingerprint"]:
        yield f"{out / 'manifest.json'}: its fingerprint is not that of its shards' sha256"
    for split in SPLITS:
        for field in ("tokens", "documents"):
            if sum(sh[field] for sh in shards[split]) != manifest["splits"][split][field]:
                yield f"{out / 'manifest.json'}: the {split} shards' {field} do not add up to the split's"
        last = manifest["eos_id"]  # the token before the split's first document: as if an EOS
        for k, sh in enumerate(shards[split]):
            tokens = np.memmap(out / sh["file"], dtype=manifest["dtype"], mode="r")
            starts = np.load(out / sh["index"]).astype(np.int64)
            before = np.where(starts > 0, tokens[np.clip(starts - 1, 0, len(tokens) - 1)], last)
            if k < len(shards[split]) - 1 and sh["tokens"] != manifest["shard_tokens"]:
                yield f"{out / sh['file']}: {sh['tokens']} tokens in a shard before the last, not {manifest['shard_tokens']}"
            if (len(starts) != sh["documents"] or np.any(np.diff(starts) <= 0) or np.any(starts >= len(tokens))
                    or np.any(before != manifest["eos_id"]) or (k == 0 and starts[:1].tolist() != [0])):
                yield f"{out / sh['index']}: its document starts are not the positions after EOS in {sh['file']}"
            last = tokens[-1]


def load_manifest(out_dir: str | os.PathLike) -> dict:
    """The manifest of a finished dataset, with every field a reader or `verify` uses checked; a DataError
    in one line (what is wrong, and the fix) for a missing, unfinished, unreadable or malformed one."""
    out = Path(out_dir)
    path = out / "manifest.json"
    if not path.is_file():
        if (out / "progress.json").is_file():
            raise DataError(f"{out} holds an unfinished prep run; rerun the same `smolds prep` command to finish it")
        raise DataError(f"{out} has no manifest.json; run `smolds prep SOURCES --out {out}` first")
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read ({type(e).__name__}); re-create the dataset "
                        "(its command with --overwrite)") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} {problem}; it is damaged or not a smolds dataset: re-create the dataset "
                        "(its command with --overwrite)")
    return manifest


def _manifest_problem(m) -> str | None:
    """What makes `m` unusable as a manifest (a phrase), or None."""
    def bad(d: dict, key: str, kind: type, where: str = "") -> str | None:
        if key not in d:
            return f"lacks {where}{key!r}"
        v = d[key]
        if not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 0):
            return f"has {where}{key} = {v!r}, not {_KINDS[kind]}"
        return None

    if not isinstance(m, dict):
        return f"holds a JSON {type(m).__name__}, not an object"
    for key, kind in (("format", str), ("fingerprint", str), ("dtype", str), ("vocab_size", int), ("eos_id", int),
                      ("shard_tokens", int), ("tokenizer", dict), ("splits", dict)):
        if problem := bad(m, key, kind):
            return problem
    if m["format"] != FORMAT:
        return f"has format {m['format']!r}, this smolds reads {FORMAT!r}"
    if m["dtype"] not in ("uint16", "uint32"):
        return f"has dtype {m['dtype']!r}, not uint16 or uint32"
    if not m["eos_id"] < m["vocab_size"]:
        return f"has eos_id {m['eos_id']} outside its vocab_size {m['vocab_size']}"
    for key in ("file", "sha256"):
        if problem := bad(m["tokenizer"], key, str, "tokenizer."):
            return problem
    for split in SPLITS:
        if problem := bad(m["splits"], split, dict, "splits."):
            return problem
        sp = m["splits"][split]
        for key, kind in (("tokens", int), ("documents", int), ("shards", list)):
            if problem := bad(sp, key, kind, f"splits.{split}."):
                return problem
        for k, shard in enumerate(sp["shards"]):
            where = f"splits.{split}.shards[{k}]."
            if not isinstance(shard, dict):
                return f"has {where[:-1]} = {shard!r}, not an object"
            for key, kind in (("file", str), ("tokens", int), ("documents", int), ("sha256", str), ("index", str),
                              ("index_sha256", str)):
                if problem := bad(shard, key, kind, where):
                    return problem
            for key in ("file", "index"):  # a file beside the manifest, never elsewhere
                if not _OURS.match(shard[key]):
                    return f"has {where}{key} = {shard[key]!r}, not a shard file name"
    return None


def is_val(i, frac: Fraction):
    """The train/val rule: exactly ceil((n-1)*f) of n documents go to val, spread evenly, doc 0 to train.

    Deterministic and streaming (no need to know n), and any corpus of 2+ documents gets both splits.
    `i` is a document index or an int64 array of them (then the answer is a bool array).
    """
    p, q = frac.numerator, frac.denominator
    return (i >= 1) & (-(-i * p // q) > -(-(i - 1) * p // q))


# --- the steps of a prep: prepare() runs them in one process, distributed.py around its tasks --------


@dataclass(frozen=True)
class Plan:
    """A checked prep request: the resolved sources, the settings, and the hash that names the dataset."""

    out: Path
    specs: tuple[str, ...]  # the sources as given
    srcs: tuple[Source, ...]
    tokenizer: str  # as given: bpe, a file, a folder, a hub id, gguf, gguf:PATH
    vocab_size: int  # of a trained bpe
    shard_tokens: int
    val_fraction: float
    text_field: str
    dtype: str  # as given: auto, uint16, uint32
    key: str  # the settings hash
    command: str

    @property
    def frac(self) -> Fraction:
        return Fraction(self.val_fraction).limit_denominator(1_000_000)

    def np_dtype(self, tok: Tokenizer) -> np.dtype:
        return _pick_dtype(self.dtype, vocab_size_of(tok))


def plan(sources: list[str], out_dir: str | os.PathLike, tokenizer: str, vocab_size: int, workers: int,
         shard_tokens: int, val_fraction: float, text_field: str, dtype: str,
         command: str | None) -> tuple[Plan, Tokenizer | None]:
    """Check the arguments, resolve the sources, load the tokenizer (None: a bpe to train) and create out_dir."""
    _check_args(tokenizer, vocab_size, workers, shard_tokens, val_fraction, dtype, text_field)
    out = Path(out_dir)
    srcs = resolve_sources(list(sources))
    tok = None if tokenizer == "bpe" else load_tokenizer(tokenizer)
    _pick_dtype(dtype, vocab_size if tok is None else vocab_size_of(tok))  # fail before any work ...
    if tok is not None:
        eos_id(tok)  # ... on a vocabulary too large for the dtype or without an EOS
    settings = {
        "format": FORMAT,
        "sources": [s.identity() for s in srcs],
        "text_field": text_field,
        "tokenizer": {"bpe_vocab_size": vocab_size} if tok is None else {"sha256": _sha256(tok.to_str())},
        "dtype": dtype,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
    }
    key = _sha256(json.dumps(settings, sort_keys=True))[:16]
    command = command or as_command(sources, out, tokenizer, vocab_size, workers, shard_tokens,
                                     val_fraction, text_field, dtype)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; choose a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create it ({e.strerror}); choose a writable directory") from None
    return Plan(out, tuple(map(str, sources)), tuple(srcs), str(tokenizer), vocab_size, shard_tokens, val_fraction,
                text_field, dtype, key, command), tok


@contextmanager
def locked(out: Path):
    """One run per directory at a time: ranks that all call prepare_default wait, then find it done.

    The kernel drops an flock when its holder dies, so a killed run never leaves this lock held; a live
    holder is waited for, saying so."""
    with open(out / ".lock", "a") as f:  # "a": opening it changes nothing
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"smolds prep: waiting for another prep of {out} to finish (it holds {out / '.lock'})",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def claim(p: Plan, overwrite: bool, tasks: int | None = None) -> dict | None:
    """What out_dir holds: the complete manifest, an unfinished run's progress (to resume), or None (fresh).

    Refuses a directory holding another dataset (unless overwrite), files that are not ours, and an
    unfinished run of this dataset with another task layout (`tasks`: the task count, None for one process).
    """
    out, key = p.out, p.key
    names = [q.name for q in out.iterdir()]
    foreign = [n for n in names if not _OURS.match(n)]
    manifest = read_json(out / "manifest.json")
    if manifest is None and "manifest.json" in names and not overwrite:
        raise DataError(f"{out / 'manifest.json'} is damaged (not a JSON object); pass --overwrite to re-create "
                        "the dataset")
    found = manifest or read_json(out / "progress.json")
    if (manifest is None and found is not None and not found.get("tasks")
            and not any(found["splits"][s]["shards"] for s in SPLITS)):
        found = None  # a run that failed before its first shard: nothing to keep, start afresh
    if found is not None and found.get("settings_hash") == key and not overwrite:
        had = None if manifest else (found.get("tasks") or {}).get("count")
        if had != tasks:
            layout = f"{had}-task prep" if had else "one-process prep"
            again = f"--tasks {had}" if had else "no --tasks"
            raise DataError(f"{out} holds an unfinished {layout} of this dataset; rerun it with {again} to finish "
                            "it, or pass --overwrite to start over")
        damage = manifest is not None and _damage(out, manifest)
        if damage:
            raise DataError(f"{out} holds this dataset, damaged: {damage}; pass --overwrite to re-create it")
        for n in names:  # a crashed run's half-written files
            if n.endswith(".tmp") or (manifest is not None and n == "progress.json"):
                (out / n).unlink()
        return found
    if foreign:
        raise DataError(f"{out} holds files that are not a smolds dataset ({foreign[0]}, ...); "
                        "choose a new or empty --out")
    if found is not None and not overwrite:
        made_by = f" (made by `{found['command']}`)" if found.get("command") else ""
        raise DataError(f"{out} holds a different dataset{made_by}; pass --overwrite to replace it "
                        "or choose another --out")
    for n in names:  # start afresh: every file here is ours (checked above)
        if n == TASKS_DIR:
            shutil.rmtree(out / n)
        elif n != ".lock":
            (out / n).unlink()
    return None


def _damage(out: Path, manifest: dict) -> str | None:
    """What is wrong with a finished dataset at the cost of a stat per file: the manifest's fields, and every
    file it lists present with its size (a truncated copy, a deleted shard). `verify` also checks the hashes."""
    problem = _manifest_problem(manifest)
    if problem:
        return f"manifest.json {problem}"
    itemsize = np.dtype(manifest["dtype"]).itemsize
    files = [(manifest["tokenizer"]["file"], None)]
    for s in SPLITS:
        for sh in manifest["splits"][s]["shards"]:
            files += [(sh["file"], sh["tokens"] * itemsize), (sh["index"], None)]
    for name, size in files:
        path = out / name
        if not path.is_file():
            return f"{path} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{path} holds {path.stat().st_size} bytes, the manifest says {size}"
    return None


def begin(p: Plan, state: dict | None) -> dict:
    """The state to carry on from: `state`, or a fresh one (saved) once the sources prove non-empty."""
    if next(iter_documents(p.srcs, p.text_field), None) is None:
        raise DataError(f"no documents in {' '.join(p.specs)}: every source is empty; "
                        "check the paths and --text-field")
    if state is None:
        state = {"format": FORMAT, "settings_hash": p.key, "command": p.command, "tokenizer_sha256": None,
                 "splits": {s: {"shards": [], "cursor": [0, 0]} for s in SPLITS}}
        save_progress(p.out, state)
    return state


def use_tokenizer(p: Plan, state: dict, tok: Tokenizer | None) -> tuple[Tokenizer, str]:
    """The run's tokenizer (a bpe: reloaded when resuming, else trained) and its JSON, saved as tokenizer.json."""
    tok = tok or _bpe(p.out, state, p.srcs, p.text_field, p.vocab_size)
    tok_json = tok.to_str(pretty=True)
    write_atomic(p.out / "tokenizer.json", tok_json.encode())
    state["tokenizer_sha256"] = _sha256(tok_json)
    save_progress(p.out, state)
    return tok, tok_json


def cursors(state: dict) -> dict[str, tuple[int, int]]:
    """Per split, (document index, token offset) of the first token not yet in a shard."""
    return {s: tuple(state["splits"][s]["cursor"]) for s in SPLITS}


def pack(out: Path, state: dict, results: Iterable[tuple[tuple[str, np.ndarray], np.ndarray, np.ndarray]],
         np_dtype: np.dtype, shard_tokens: int, progress: bool, desc: str = "tokenizing") -> tuple[int, int]:
    """Write ((split, document indices), tokens, lengths) results, in each split's document order and from
    its cursor on (earlier documents already dropped), into shards; return (documents, tokens) written."""
    cursor = cursors(state)

    def commit(split: str, entry: dict, cursor: tuple[int, int]) -> None:
        state["splits"][split]["shards"].append(entry)
        state["splits"][split]["cursor"] = list(cursor)
        save_progress(out, state)

    writers = {s: _ShardWriter(out, s, np_dtype, shard_tokens, len(state["splits"][s]["shards"]), commit)
               for s in SPLITS}
    t0, n_docs, n_tokens = time.perf_counter(), 0, 0
    with tqdm(unit=" docs", file=sys.stderr, disable=not progress, mininterval=0.5, desc=desc) as bar:
        for (split, ids), tokens, lengths in results:
            starts = np.cumsum(lengths) - lengths  # where each document begins in `tokens`
            done = np.zeros(len(ids), dtype=np.int64)  # tokens of each document already in a shard
            doc, offset = cursor[split]
            if ids[0] == doc and offset:  # the document a previous run left half-written
                tokens, starts, done[0] = tokens[offset:], np.maximum(starts - offset, 0), offset
            writers[split].write(np.asarray(ids), starts, done, tokens.astype(np_dtype, copy=False))
            n_docs, n_tokens = n_docs + len(ids), n_tokens + len(tokens)
            bar.update(len(ids))
            bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9) / 1e3:,.0f}k tok/s",
                                refresh=False)
    for s in SPLITS:
        writers[s].finish()
    return n_docs, n_tokens


def finish(p: Plan, state: dict, tok: Tokenizer, tok_json: str) -> dict:
    """Write manifest.json (the dataset is complete from here on), drop progress.json; return the manifest."""
    manifest = _manifest(state, p.key, p.command, p.srcs, p.text_field, p.tokenizer, p.vocab_size, tok_json, tok,
                         eos_id(tok), vocab_size_of(tok), p.np_dtype(tok), p.shard_tokens, p.val_fraction)
    write_atomic(p.out / "manifest.json", json.dumps(manifest, indent=1).encode())
    (p.out / "progress.json").unlink(missing_ok=True)
    return manifest


def _counted(srcs: Iterable[Source], text_field: str, frac: Fraction, stats: list[dict]) -> Iterator[str]:
    """Every document of `srcs` (iter_documents, one source at a time: the same stream), appending to `stats`
    each source's documents, characters, largest document and documents in val, for `source_warnings`."""
    i = 0
    for src in srcs:
        st = {"documents": 0, "chars": 0, "largest": 0, "val": 0}
        stats.append(st)
        for doc in iter_documents([src], text_field):
            st["documents"] += 1
            st["chars"] += len(doc)
            st["largest"] = max(st["largest"], len(doc))
            st["val"] += int(is_val(i, frac))
            i += 1
            yield doc


def source_warnings(srcs: Iterable[Source], stats: list[dict], val_fraction: float) -> list[str]:
    """A line per source of LONE_DOC_CHARS or more that is mostly one document, or that gave val nothing:
    the usual sign of a text file whose document separators are gone (a .txt without blank lines is read as
    one document, all of it in train)."""
    out = []
    for src, st in zip(srcs, stats):
        if st["chars"] < LONE_DOC_CHARS:
            continue
        lone = st["largest"] > st["chars"] / 2
        no_val = val_fraction > 0 and st["val"] == 0
        if not (lone or no_val):
            continue
        said = (f"one document holds {st['largest'] / st['chars']:.0%} of its {st['chars']:,} characters"
                if lone else f"its {st['documents']:,} documents ({st['chars']:,} characters)")
        if no_val:
            said += (" and none of it went to val" if lone else " all went to train, none to val")
        if src.kind == "txt":
            fix = (f"a .txt document ends at a blank line: add blank lines between its documents, or give it as "
                   f"lines:{src.path} to read one document per line")
        else:
            fix = "split it into more documents" + (", or raise --val-fraction" if not lone else "")
        out.append(f"{src.path}: {said}; {fix}")
    return out


def _chunks(docs: Iterable[str], frac: Fraction, cursors: dict) -> Iterator[tuple[tuple[str, list[int]], list[str]]]:
    """((split, document indices), texts) per task; documents already in shards are skipped untokenized."""
    pending: dict[str, tuple[list[int], list[str]]] = {s: ([], []) for s in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)
    for i, text in enumerate(docs):
        split = "val" if is_val(i, frac) else "train"
        if i < cursors[split][0]:
            continue
        ids, texts = pending[split]
        ids.append(i)
        texts.append(text)
        chars[split] += len(text)
        if chars[split] >= CHUNK_CHARS:
            yield (split, ids), texts
            pending[split], chars[split] = ([], []), 0
    for split in SPLITS:
        ids, texts = pending[split]
        if ids:
            yield (split, ids), texts


class _ShardWriter:
    """Appends one split's token stream to fixed-size shard files; a shard appears only once complete."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, index: int, commit):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.index = index  # number of the shard being written
        self.commit = commit  # commit(split, shard entry, cursor) records a finished shard
        self.file = None
        self.last_doc = -1

    def write(self, ids: np.ndarray, starts: np.ndarray, done: np.ndarray, tokens: np.ndarray) -> None:
        """Append documents `ids`, whose (remaining) tokens begin at `starts` in `tokens`."""
        pos = 0
        while pos < len(tokens):
            if self.file is None:
                self.file = open(self._path(".bin.tmp"), "wb")
                self.sha, self.fill, self.doc_starts = hashlib.sha256(), 0, []
            take = min(self.shard_tokens - self.fill, len(tokens) - pos)
            piece = tokens[pos:pos + take]
            self.file.write(piece.data)
            self.sha.update(piece.data)
            begins = (starts >= pos) & (starts < pos + take) & (done == 0)
            self.doc_starts += (starts[begins] - pos + self.fill).tolist()
            self.fill, pos = self.fill + take, pos + take
            if self.fill == self.shard_tokens:
                if pos < len(tokens):  # the first token not in a shard: document j, `offset` tokens in
                    j = int(np.searchsorted(starts, pos, side="right")) - 1
                    self._commit((int(ids[j]), int(pos - starts[j] + done[j])))
                else:
                    self._commit((int(ids[-1]) + 1, 0))
        self.last_doc = int(ids[-1])

    def finish(self) -> None:
        """Write the last, shorter shard; its cursor says every document of the split is done."""
        if self.file is not None:
            self._commit((self.last_doc + 1, 0))

    def _commit(self, cursor: tuple[int, int]) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        os.replace(self._path(".bin.tmp"), self._path(".bin"))
        buf = io.BytesIO()
        np.save(buf, np.asarray(self.doc_starts, dtype=np.uint32))
        write_atomic(self._path(".docs.npy"), buf.getvalue())
        entry = {
            "file": self._path(".bin").name, "tokens": self.fill, "documents": len(self.doc_starts),
            "sha256": self.sha.hexdigest(),
            "index": self._path(".docs.npy").name, "index_sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
        }
        self.index += 1
        self.commit(self.split, entry, cursor)

    def _path(self, suffix: str) -> Path:
        return self.out / f"{self.split}_{self.index:05d}{suffix}"


# --- the output directory -------------------------------------------------------------------------


def _bpe(out: Path, state: dict, srcs: list[Source], text_field: str, vocab_size: int) -> Tokenizer:
    """The run's trained BPE: reloaded when resuming (same bytes), else trained on the corpus."""
    path = out / "tokenizer.json"
    if state["tokenizer_sha256"] and path.is_file() and _sha256_file(path) == state["tokenizer_sha256"]:
        return Tokenizer.from_file(str(path))
    return train_bpe(iter_documents(srcs, text_field), vocab_size)


def _manifest(state, key, command, srcs, text_field, tokenizer, vocab_size, tok_json, tok, eos, vocab,
              np_dtype, shard_tokens, val_fraction) -> dict:
    splits = {
        s: {
            "documents": sum(sh["documents"] for sh in state["splits"][s]["shards"]),
            "tokens": sum(sh["tokens"] for sh in state["splits"][s]["shards"]),
            "shards": state["splits"][s]["shards"],
        }
        for s in SPLITS
    }
    shard_hashes = "".join(sh["sha256"] for s in SPLITS for sh in splits[s]["shards"])
    tok_info = {"spec": str(tokenizer), "file": "tokenizer.json", "sha256": _sha256(tok_json),
                "eos_token": tok.id_to_token(eos)}
    if tokenizer == "bpe":
        tok_info["bpe_vocab_size"] = vocab_size
    return {
        "format": FORMAT,
        "complete": True,
        "fingerprint": _sha256(shard_hashes)[:16],  # identifies the exact tokens; the reader checks it on resume
        "settings_hash": key,
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": tok_info,
        "vocab_size": vocab,
        "eos_id": eos,
        "dtype": np.dtype(np_dtype).name,
        "shard_tokens": shard_tokens,
        "documents": sum(splits[s]["documents"] for s in SPLITS),
        "tokens": sum(splits[s]["tokens"] for s in SPLITS),
        "split": {"val_fraction": val_fraction, "rule": SPLIT_RULE},
        "splits": splits,
        "sources": [s.describe() for s in srcs],
        "text_field": text_field,
    }


def save_progress(out: Path, state: dict) -> None:
    write_atomic(out / "progress.json", json.dumps(state, indent=1).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Atomic write: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`; None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _pick_dtype(dtype: str, vocab: int) -> np.dtype:
    if dtype == "auto":
        return np.dtype(np.uint16 if vocab <= 65535 else np.uint32)
    if dtype == "uint16" and vocab > 65535:
        raise DataError(f"the tokenizer has {vocab:,} tokens, too many for uint16 (at most 65,535); "
                        "pass --dtype uint32 (or auto)")
    return np.dtype(dtype)


def _check_args(tokenizer: str, vocab_size: int, workers: int, shard_tokens: int, val_fraction: float, dtype: str,
                text_field: str) -> None:
    if workers < 1:
        raise DataError(f"--workers {workers}: need at least 1")
    if not 1 <= shard_tokens < 2**32:
        raise DataError(f"--shard-tokens {shard_tokens}: must be between 1 and 2**32-1")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if tokenizer == "bpe" and vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"--vocab-size {vocab_size} is too small for a byte-level BPE; use at least "
                        f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    if dtype not in ("auto", "uint16", "uint32"):
        raise DataError(f"--dtype {dtype}: choose auto, uint16 or uint32")
    if not text_field:
        raise DataError("--text-field is empty; name the field that holds the text")


def as_command(sources, out, tokenizer, vocab_size, workers, shard_tokens, val_fraction, text_field, dtype) -> str:
    args = ["smolds", "prep", *map(str, sources), "--out", str(out), "--tokenizer", str(tokenizer)]
    if tokenizer == "bpe":
        args += ["--vocab-size", str(vocab_size)]
    args += ["--workers", str(workers), "--shard-tokens", str(shard_tokens), "--val-fraction", str(val_fraction),
             "--text-field", text_field, "--dtype", dtype]
    return shlex.join(args)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()
