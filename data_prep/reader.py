"""The trainer's view of a prepared split: shuffled (input, target) windows, split across ranks, resumable.

Windows are simple on purpose: the split's token stream (documents joined by EOS, shards end to end)
is cut into non-overlapping chunks of T+1 tokens at stride T+1. Window w holds tokens
[w*(T+1), (w+1)*(T+1)); x is its first T tokens and y its last T, so y is x shifted by one. A window
may span documents (EOS marks each join, as in GPT and Megatron pretraining), and the fewer than T+1
tokens after the last full window are never used.

Order: epoch e visits every window once, in a pseudo-random permutation keyed by (seed, e). The only
state is the number of windows consumed globally, as Megatron's `consumed_samples`: each
`next_batch(B)` takes the next B*dp_size positions, and rank r the slice [r*B, (r+1)*B) of them.
Ranks never overlap, each epoch covers every window exactly once, and a saved position resumes the
same global order under a different dp_size (torchtitan's loader refuses such a change).

The permutation is computed, not stored (a Feistel network, see `permute`), and shards are memory-mapped
with only the requested windows read, so memory does not grow with the dataset.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from data_prep.errors import DataError
from data_prep.pack import _sha256_file, load_manifest

FEISTEL_ROUNDS = 6
HASH_BUDGET = 1 << 30  # bytes of shards `check_dataset` hashes at a start (about a second)


class TokenWindows:
    """Windows of T+1 tokens from split `split` of a `smolds prep` directory, for one data-parallel rank.

    Args:
        data_dir: the directory `prepare` wrote (manifest.json, shards, tokenizer.json).
        split: "train" or "val".
        seq_len: T, the model's context; a window is T+1 tokens.
        seed: keys the shuffle; the same seed gives the same order on every machine.
        dp_rank, dp_size: this rank and the number of data-parallel ranks.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", seq_len: int = 1024, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1):
        self.data_dir = Path(data_dir)
        manifest = load_manifest(self.data_dir)
        if split not in manifest["splits"]:
            raise DataError(f"split {split!r} does not exist; use one of {', '.join(manifest['splits'])}")
        if seq_len < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"bad reader settings seq_len={seq_len} dp_rank={dp_rank} dp_size={dp_size}; "
                            "need seq_len >= 1 and 0 <= dp_rank < dp_size")
        self.manifest, self.split, self.seq_len, self.seed = manifest, split, seq_len, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.vocab_size: int = manifest["vocab_size"]
        self.eos_id: int = manifest["eos_id"]
        self.tokenizer_path = str(self.data_dir / manifest["tokenizer"]["file"])

        shards = manifest["splits"][split]["shards"]
        self._dtype = np.dtype(manifest["dtype"])
        self._files = [self.data_dir / s["file"] for s in shards]
        self._sizes = [s["tokens"] for s in shards]
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes, dtype=np.int64)])  # shard k starts here
        self._maps: dict[int, np.memmap] = {}
        tokens = int(self._offsets[-1])
        self.num_windows = tokens // (seq_len + 1)
        where = f"split {split!r} of {self.data_dir}"
        if tokens == 0:
            raise DataError(f"{where} is empty (val_fraction 0, or a single document); "
                            "run `smolds prep` with --val-fraction > 0 on 2+ documents")
        if self.num_windows < dp_size:
            raise DataError(f"{where} holds {tokens:,} tokens: {self.num_windows} windows of seq_len+1 = "
                            f"{seq_len + 1}, fewer than dp_size = {dp_size}; lower seq_len or prep more data")
        self.consumed_windows = 0  # global position: windows taken by all ranks together

    def __len__(self) -> int:
        """Windows per rank per epoch."""
        return self.num_windows // self.dp_size

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next global batch: x, y int64 [batch_size, T], y = x shifted by one."""
        start = self.consumed_windows + self.dp_rank * batch_size
        ids = self.window_ids(start, batch_size)
        self.consumed_windows += batch_size * self.dp_size
        return self._batch(ids)

    def window_ids(self, start: int, count: int) -> np.ndarray:
        """Window indices at global positions [start, start + count), epochs included."""
        pos = np.arange(start, start + count, dtype=np.int64)
        epochs, idx = np.divmod(pos, self.num_windows)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = permute(idx[sel], self.num_windows, _epoch_key(self.seed, int(e)))
        return out

    def iter_eval(self, batch_size: int, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the split once, unshuffled; the training position is left alone.

        Every rank gets num_windows // dp_size windows (a contiguous block), hence the same number of
        batches, so collective ops in an eval loop never wait on a rank that has finished.
        """
        share = len(self)
        first = self.dp_rank * share
        n_batches = math.ceil(share / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            lo, hi = b * batch_size, min((b + 1) * batch_size, share)
            yield self._batch(np.arange(first + lo, first + hi))

    def state_dict(self) -> dict:
        """JSON-serialisable position, global across ranks; the rest identifies what it counts."""
        return {"consumed_windows": self.consumed_windows, "seed": self.seed, "seq_len": self.seq_len,
                "split": self.split, "fingerprint": self.manifest["fingerprint"]}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(state, dict) and "mixture" in state:
            raise DataError("the saved data position is for a mixture of directories (data_prep.mixture), this "
                            "reader has one; resume with the same data.dir mapping, or start the data from the beginning")
        consumed(state)
        for key in ("fingerprint", "split", "seq_len", "seed"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise DataError(f"the saved data position is for {key}={state.get(key)!r}, this reader has "
                                f"{mine!r}; resume with the same dataset, split, seq_len and seed, "
                                "or start the data from the beginning")
        self.consumed_windows = consumed(state)

    def _batch(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.seq_len + 1
        buf = np.empty((len(ids), span), dtype=np.int64)  # (B, T+1)
        for row, w in enumerate(ids):
            self._read(int(w) * span, buf[row])
        if len(ids) and buf.max() >= self.vocab_size:  # a corrupt shard: an embedding lookup would fail or lie
            row, col = np.unravel_index(int(buf.argmax()), buf.shape)
            start = int(ids[row]) * span + int(col)
            shard = self._files[int(np.searchsorted(self._offsets, start, side="right")) - 1]
            raise DataError(f"{shard} holds token id {int(buf.max())}, not below the dataset's vocab_size "
                            f"{self.vocab_size}; the shard is corrupt: run `smolds prep --verify {self.data_dir}`, "
                            "then re-create the dataset")
        data = torch.from_numpy(buf)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()  # x, y: (B, T)

    def _read(self, start: int, out: np.ndarray) -> None:
        """Copy tokens [start, start + len(out)) of the split's stream into out, across shard ends."""
        k = int(np.searchsorted(self._offsets, start, side="right")) - 1
        filled = 0
        while filled < len(out):
            shard = self._shard(k)
            lo = start + filled - int(self._offsets[k])
            n = min(len(out) - filled, len(shard) - lo)
            out[filled:filled + n] = shard[lo:lo + n]
            filled += n
            k += 1

    def _shard(self, k: int) -> np.memmap:
        if k not in self._maps:
            path, tokens = self._files[k], self._sizes[k]
            if not path.is_file() or path.stat().st_size != tokens * self._dtype.itemsize:
                raise DataError(f"shard {path} is missing or has the wrong size; "
                                f"run `smolds prep --verify {self.data_dir}`")
            self._maps[k] = np.memmap(path, dtype=self._dtype, mode="r", shape=(tokens,))
        return self._maps[k]


def permute(i: np.ndarray, n: int, key: tuple[int, ...]) -> np.ndarray:
    """Positions i of a pseudo-random permutation of [0, n), computed without building it.

    A balanced Feistel network is a bijection on [0, 4**h) whatever its round function; applying it
    again while the result is >= n (cycle walking) restricts it to a bijection on [0, n), with fewer
    than 4 steps on average. O(1) memory for any n, where an index array would cost 8 bytes a window
    per rank (Megatron builds one and caches it on disk).
    """
    n = int(n)
    half = max(1, ((n - 1).bit_length() + 1) // 2)  # 4**half >= n
    x = _feistel(np.asarray(i, dtype=np.uint64), half, key)
    while (out := x >= n).any():
        x[out] = _feistel(x[out], half, key)
    return x.astype(np.int64)


def _feistel(x: np.ndarray, half: int, key: tuple[int, ...]) -> np.ndarray:
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    left, right = x >> shift, x & mask
    for k in key:
        left, right = right, left ^ (_mix(right ^ np.uint64(k)) & mask)
    return (left << shift) | right


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit flips about half the output bits (uint64 math wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _epoch_key(seed: int, epoch: int) -> tuple[int, ...]:
    digest = hashlib.blake2b(f"smolds:{seed}:{epoch}".encode(), digest_size=8 * FEISTEL_ROUNDS).digest()
    return tuple(int.from_bytes(digest[8 * r:8 * r + 8], "little") for r in range(FEISTEL_ROUNDS))


def consumed(state) -> int:
    """The `consumed_windows` of a saved position; DataError when the position is not one."""
    n = state.get("consumed_windows") if isinstance(state, dict) else None
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"the saved data position {state!r} has no count of consumed windows; the checkpoint is "
                        "damaged: resume from another, or start the data from the beginning")
    return n


def check_dataset(data_dir: str | os.PathLike, hash_budget: int = HASH_BUDGET, rotate: int = 0) -> None:
    """Check a dataset before training or evaluating on it, at a bounded cost; DataError (one line) if damaged.

    Always: the manifest's fields, tokenizer.json's sha256 against the manifest (another tokenizer, e.g. of
    another vocabulary size, would be copied into every checkpoint), and every shard's size (a truncated or
    deleted file). Then the sha256 of whole shards, up to `hash_budget` bytes: every shard of a dataset that
    fits (the default, 1 GiB, hashes in about a second), else a run of shards starting at shard
    `rotate % count` (the trainer passes the step it starts from, so restarts check different shards).
    Hashing all of a large dataset at every start would cost minutes on every rank; `smolds prep --verify`
    does that once, on demand.
    """
    out = Path(data_dir)
    manifest = load_manifest(out)
    fix = f"run `smolds prep --verify {out}`, then re-create the dataset (its command with --overwrite)"
    tok = out / manifest["tokenizer"]["file"]
    if not tok.is_file():
        raise DataError(f"{tok} is missing; the prepared data is incomplete: {fix}")
    if _sha256_file(tok) != manifest["tokenizer"]["sha256"]:
        raise DataError(f"{tok} is not the tokenizer the shards were made with (its sha256 differs from "
                        f"manifest.json's); put that one back, or {fix.split(', then ')[1]}")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    shards = [sh for split in manifest["splits"].values() for sh in split["shards"]]
    for sh in shards:
        path, size = out / sh["file"], sh["tokens"] * itemsize
        if not path.is_file() or path.stat().st_size != size:
            have = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
            raise DataError(f"shard {path} is {have}, the manifest says {size} bytes; {fix}")
    start = rotate % len(shards) if shards else 0
    spent = 0
    for sh in shards[start:] + shards[:start]:
        if spent and spent + sh["tokens"] * itemsize > hash_budget:
            break
        if _sha256_file(out / sh["file"]) != sh["sha256"]:
            raise DataError(f"shard {out / sh['file']}: sha256 differs from the manifest (corrupt or changed); {fix}")
        spent += sh["tokens"] * itemsize
