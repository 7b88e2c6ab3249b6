"""Tokenizer processes: chunks of documents in, token ids out, results handed back in chunk order.

Why not multiprocessing.Pool: a spawned pool re-imports the caller's __main__ in every worker, which
hangs a script without a main guard (or one piped to stdin) in an endless respawn loop; a forked pool
copies a process that may run threads (the tokenizers library's after BPE training, torch's and NCCL's
in the trainer) and can deadlock; and both pickle every task and result. Here each worker is a plain
`python -c` subprocess reading and writing length-prefixed raw bytes on its stdin/stdout: UTF-8 text
in, uint32 ids out, nothing pickled, nothing of the caller imported.

Scheduling: each worker holds one chunk at a time and gets the next as soon as it answers (so a big
chunk does not hold up the others); answers are reordered and handed on in chunk order, with at most
4 chunks per worker between the oldest not yet handed on and the newest sent, so memory stays bounded.
"""

from __future__ import annotations

import itertools
import os
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data_prep.errors import DataError

AHEAD = 4  # chunks per worker that may be in flight or waiting to be handed on


def tokenize_in_order(chunks: Iterable[tuple[object, list[str]]], tok_json: str, eos: int,
                      workers: int) -> Iterator[tuple[object, np.ndarray, np.ndarray]]:
    """For each (tag, texts) chunk, yield (tag, tokens, lengths) from `encode_documents`, in chunk order."""
    pool = [_Worker(tok_json, eos) for _ in range(workers)]
    ok = False
    try:
        idle, busy = list(pool), {}  # busy: worker's stdout -> (worker, chunk number)
        tags, results = {}, {}  # chunk number -> tag until handed on; -> (tokens, lengths) once answered
        source, sent, handed, exhausted = iter(chunks), 0, 0, False
        while True:
            while idle and not exhausted and sent - handed < AHEAD * workers:
                chunk = next(source, None)
                if chunk is None:
                    exhausted = True
                    break
                worker = idle.pop()
                worker.send(_pack_texts(chunk[1]))
                busy[worker.stdout] = (worker, sent)
                tags[sent] = chunk[0]
                sent += 1
            if handed in results:
                yield tags.pop(handed), *results.pop(handed)
                handed += 1
                continue
            if not busy:  # nothing in flight and nothing left to send
                ok = True
                return
            for ready in wait(list(busy)):
                worker, k = busy.pop(ready)
                results[k] = _unpack_tokens(worker.receive())
                idle.append(worker)
    finally:
        for worker in pool:
            worker.close(kill=not ok)


def encode_documents(tok: Tokenizer, eos: int, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the texts, each followed by EOS, concatenated (uint32); and each one's length."""
    docs = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]  # no BOS/EOS templates
    for ids in docs:
        ids.append(eos)
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.uint32, count=int(lengths.sum()))
    return tokens, lengths


def worker_main() -> None:
    """A tokenizer process: one init message (eos, tokenizer.json), then chunks until stdin closes."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print from any library must not corrupt the replies
    requests = sys.stdin.buffer
    init = _receive(requests)
    eos = int.from_bytes(init[:8], "little")
    tok = Tokenizer.from_str(init[8:].decode())
    # A document holding the text "<|endoftext|>" must not end there: special tokens in the input are
    # encoded as ordinary text, so EOS appears only where encode_documents puts it.
    tok.encode_special_tokens = True
    try:
        while (message := _receive(requests)) is not None:
            _send(replies, _pack_tokens(*encode_documents(tok, eos, _unpack_texts(message))))
    except BrokenPipeError:  # the parent is gone (killed mid-run): nobody to answer, nothing to report
        os._exit(0)


class _Worker:
    def __init__(self, tok_json: str, eos: int):
        package_root = str(Path(__file__).resolve().parent.parent)  # so the child imports this data_prep
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",  # one core per worker: `workers` is the parallelism
               "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from data_prep.workers import worker_main; worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.stdout = self.proc.stdout
        self.send(eos.to_bytes(8, "little") + tok_json.encode())

    def send(self, payload: bytes) -> None:
        try:
            _send(self.proc.stdin, payload)
        except BrokenPipeError:
            self._died()

    def receive(self) -> bytes:
        message = _receive(self.stdout)
        if message is None:
            self._died()
        return message

    def _died(self):
        raise RuntimeError(f"a tokenizer worker exited with code {self.proc.wait()}; its error is printed above")

    def close(self, kill: bool) -> None:
        if kill:
            self.proc.kill()
        try:
            self.proc.stdin.close()  # the worker's loop ends at end of input
        except BrokenPipeError:
            pass
        self.proc.wait()
        self.proc.stdout.close()


# --- wire format: u64 length, then the payload -----------------------------------------------------


def _send(f, payload: bytes) -> None:
    f.write(struct.pack("<Q", len(payload)))
    f.write(payload)
    f.flush()


def _receive(f) -> bytes | None:
    header = _read_exact(f, 8)
    return None if header is None else _read_exact(f, struct.unpack("<Q", header)[0])


def _read_exact(f, n: int) -> bytes | None:
    parts, got = [], 0
    while got < n:
        part = f.read(n - got)
        if not part:
            return None
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _pack_texts(texts: list[str]) -> bytes:
    """u64 count, u64 byte length of each text, then the texts' UTF-8 bytes."""
    try:
        blobs = [t.encode("utf-8") for t in texts]
    except UnicodeEncodeError as e:
        raise DataError(f"a document holds text that is not valid Unicode ({e.reason}, e.g. a lone surrogate "
                        "from a JSON \\ud800 escape); fix the source") from None
    sizes = np.fromiter(map(len, blobs), dtype=np.uint64, count=len(blobs))
    return struct.pack("<Q", len(blobs)) + sizes.tobytes() + b"".join(blobs)


def _unpack_texts(message: bytes) -> list[str]:
    (count,) = struct.unpack_from("<Q", message)
    ends = 8 + 8 * count + np.cumsum(np.frombuffer(message, dtype=np.uint64, count=count, offset=8), dtype=np.int64)
    starts = np.concatenate([[8 + 8 * count], ends[:-1]])
    return [message[a:b].decode("utf-8") for a, b in zip(starts.tolist(), ends.tolist())]


def _pack_tokens(tokens: np.ndarray, lengths: np.ndarray) -> bytes:
    """u64 count, i64 length of each document, then the uint32 ids."""
    return struct.pack("<Q", len(lengths)) + lengths.astype("<i8").tobytes() + tokens.astype("<u4").tobytes()


def _unpack_tokens(message: bytes) -> tuple[np.ndarray, np.ndarray]:
    (count,) = struct.unpack_from("<Q", message)
    lengths = np.frombuffer(message, dtype="<i8", count=count, offset=8)
    tokens = np.frombuffer(message, dtype="<u4", offset=8 + 8 * count)
    return tokens, lengths
