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
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
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
CHUNK_CHARS = 1 << 18  # text per worker task: big enough to amortize IPC, small enough to balance 2+ workers
SPLIT_RULE = "document i >= 1 goes to val when ceil(i*f) > ceil((i-1)*f), f = val_fraction; document 0 to train"
_OURS = re.compile(r"^(manifest\.json|progress\.json|tokenizer\.json|\.lock|(train|val)_\d{5,}\.(bin|docs\.npy))(\.tmp)?$")


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
    command = command or _as_command(sources, out, tokenizer, vocab_size, workers, shard_tokens,
                                     val_fraction, text_field, dtype)

    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; choose a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create it ({e.strerror}); choose a writable directory") from None
    with _locked(out):
        state = _claim(out, key, overwrite)
        if state is not None and state.get("complete"):
            if progress:
                print(f"smolds prep: {out} already holds this dataset ({state['tokens']:,} tokens); nothing to do",
                      file=sys.stderr)
            return state
        if next(iter_documents(srcs, text_field), None) is None:
            raise DataError(f"no documents in {' '.join(map(str, sources))}: every source is empty; "
                            "check the paths and --text-field")
        if state is None:
            state = {"format": FORMAT, "settings_hash": key, "command": command, "tokenizer_sha256": None,
                     "splits": {s: {"shards": [], "cursor": [0, 0]} for s in SPLITS}}
            _save_progress(out, state)
        resumed = sum(len(state["splits"][s]["shards"]) for s in SPLITS)

        tok = tok or _bpe(out, state, srcs, text_field, vocab_size)
        tok_json = tok.to_str(pretty=True)
        write_atomic(out / "tokenizer.json", tok_json.encode())
        state["tokenizer_sha256"] = _sha256(tok_json)
        _save_progress(out, state)
        eos, vocab = eos_id(tok), vocab_size_of(tok)
        np_dtype = _pick_dtype(dtype, vocab)

        if progress and resumed:
            print(f"smolds prep: resuming {out} after {resumed} finished shards", file=sys.stderr)
        docs, tokens = _pack(out, state, srcs, text_field, tok_json, eos, np_dtype, shard_tokens,
                             Fraction(val_fraction).limit_denominator(1_000_000), workers, progress)

        manifest = _manifest(state, key, command, srcs, text_field, tokenizer, vocab_size, tok_json, tok,
                             eos, vocab, np_dtype, shard_tokens, val_fraction)
        write_atomic(out / "manifest.json", json.dumps(manifest, indent=1).encode())
        (out / "progress.json").unlink(missing_ok=True)
    if progress:
        seconds = time.perf_counter() - t0
        counts = ", ".join(f"{s} {len(manifest['splits'][s]['shards'])}" for s in SPLITS)
        print(f"smolds prep: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens, "
              f"{sum(len(manifest['splits'][s]['shards']) for s in SPLITS)} shards ({counts}) in {seconds:.1f} s "
              f"({tokens / seconds / 1e6:.2f}M tok/s this run, {docs:,} documents tokenized) -> {out}",
              file=sys.stderr)
    return manifest


def prepare_default(out_dir: str | os.PathLike, workers: int = 1, progress: bool = True) -> dict:
    """The embedded default dataset: pydoc topics with a byte-level BPE of 4096 tokens trained on them.

    Needs no download, ~113k tokens, prepared in about a second. Idempotent and fast: when out_dir
    already holds the default dataset it returns that manifest without touching anything, even if it
    was made by another CPython release (whose topics differ slightly; any of them will do).
    """
    manifest = _read_json(Path(out_dir) / "manifest.json")
    if (manifest and [s.get("spec") for s in manifest.get("sources", [])] == [DEFAULT_SOURCE]
            and manifest.get("tokenizer", {}).get("bpe_vocab_size") == DEFAULT_VOCAB_SIZE):
        return manifest
    return prepare([DEFAULT_SOURCE], out_dir, tokenizer="bpe", vocab_size=DEFAULT_VOCAB_SIZE,
                   workers=workers, progress=progress)


def verify(out_dir: str | os.PathLike) -> list[str]:
    """Check every file the manifest lists (size and sha256); return the problems, one line each."""
    out = Path(out_dir)
    if not (out / "manifest.json").is_file():
        if (out / "progress.json").is_file():
            return [f"{out}: the prep run did not finish (no manifest.json); rerun the same `smolds prep` "
                    "command to resume it"]
        return [f"{out}: no manifest.json; run `smolds prep SOURCES --out {out}` first"]
    manifest = _read_json(out / "manifest.json")
    if manifest is None:
        return [f"{out / 'manifest.json'}: not valid JSON; re-create the dataset (its command with --overwrite)"]
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
    return problems


def is_val(i: int, frac: Fraction) -> bool:
    """The train/val rule: exactly ceil((n-1)*f) of n documents go to val, spread evenly, doc 0 to train.

    Deterministic and streaming (no need to know n), and any corpus of 2+ documents gets both splits.
    """
    p, q = frac.numerator, frac.denominator
    return i >= 1 and -(-i * p // q) > -(-(i - 1) * p // q)


# --- the packing loop ------------------------------------------------------------------------------


def _pack(out: Path, state: dict, srcs: list[Source], text_field: str, tok_json: str, eos: int,
          np_dtype: np.dtype, shard_tokens: int, frac: Fraction, workers: int, progress: bool) -> tuple[int, int]:
    """Tokenize every document not yet in a shard and write the shards; return (documents, tokens) done."""
    cursors = {s: tuple(state["splits"][s]["cursor"]) for s in SPLITS}

    def commit(split: str, entry: dict, cursor: tuple[int, int]) -> None:
        state["splits"][split]["shards"].append(entry)
        state["splits"][split]["cursor"] = list(cursor)
        _save_progress(out, state)

    writers = {s: _ShardWriter(out, s, np_dtype, shard_tokens, len(state["splits"][s]["shards"]), commit)
               for s in SPLITS}
    chunks = _chunks(iter_documents(srcs, text_field), frac, cursors)
    t0, n_docs, n_tokens = time.perf_counter(), 0, 0
    with (closing(tokenize_in_order(chunks, tok_json, eos, workers)) as results,
          tqdm(unit=" docs", file=sys.stderr, disable=not progress, mininterval=0.5, desc="tokenizing") as bar):
        for (split, ids), tokens, lengths in results:
            starts = np.cumsum(lengths) - lengths  # where each document begins in `tokens`
            done = np.zeros(len(ids), dtype=np.int64)  # tokens of each document already in a shard
            doc, offset = cursors[split]
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


@contextmanager
def _locked(out: Path):
    """One run per directory at a time: ranks that all call prepare_default wait, then find it done."""
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _claim(out: Path, key: str, overwrite: bool) -> dict | None:
    """What out_dir holds: the complete manifest, an unfinished run's progress (to resume), or None (fresh).

    Refuses a directory holding another dataset (unless overwrite) or files that are not ours.
    """
    names = [p.name for p in out.iterdir()]
    foreign = [n for n in names if not _OURS.match(n)]
    manifest = _read_json(out / "manifest.json")
    found = manifest or _read_json(out / "progress.json")
    if manifest is None and found is not None and not any(found["splits"][s]["shards"] for s in SPLITS):
        found = None  # a run that failed before its first shard: nothing to keep, start afresh
    if found is not None and found.get("settings_hash") == key and not overwrite:
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
        if n != ".lock":
            (out / n).unlink()
    return None


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


def _save_progress(out: Path, state: dict) -> None:
    write_atomic(out / "progress.json", json.dumps(state, indent=1).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Atomic write: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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


def _as_command(sources, out, tokenizer, vocab_size, workers, shard_tokens, val_fraction, text_field, dtype) -> str:
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
