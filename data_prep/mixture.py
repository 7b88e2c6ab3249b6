"""A weighted mixture of prepared directories, read like one: `MixedWindows`.

    data = MixedWindows({"data/fineweb-edu": 0.7, "data/stack": 0.3}, split="train", seq_len=2048,
                        seed=0, dp_rank=rank, dp_size=world)

Assignment: position n of the global sample stream goes to the source with the largest
`weight * (n + 1) - consumed[source]` (ties to the lowest index): Megatron's BlendedDataset rule. It
always serves the source furthest behind its share, so after any n windows a source is never a
whole window ahead of weight * n, and is behind it by less than one window with up to three sources
(a little more with many: 1.22 is the worst seen with eight). The rule depends only on the per-source counters, so, as in
`TokenWindows`, nothing is stored: the counters are the whole position. Each source walks its own
windows with TokenWindows' computed permutation, under its own seed (from the run seed and the
source's index, so two sources of equal size do not walk in lockstep), and starts a new epoch when it
runs out (a small source with a large weight is repeated).

Ranks: `next_batch(B)` assigns the B * dp_size positions of the global batch (every rank computes the
same assignment) and rank r reads positions [r*B, (r+1)*B). The global stream does not depend on
dp_size, so a saved position resumes the same order under another dp_size.

Resume with other sources or weights is refused: with old counters, the rule would first "catch up"
the new weights, serving a burst of one source; start a new run from the weights instead.
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
from data_prep.reader import TokenWindows, consumed


def normalized_weights(sources: dict) -> dict[str, float]:
    """{path: weight} with positive numeric weights -> {path: weight / sum}; one-line DataError otherwise."""
    if not isinstance(sources, dict) or not sources:
        raise DataError("the mixture is empty; give one or more `path: weight` entries, "
                        "e.g. {data/a: 0.7, data/b: 0.3}")
    weights = {}
    for path, w in sources.items():
        if isinstance(w, str):  # YAML 1.1 reads 3e-1 (no dot) as a string
            try:
                w = float(w)
            except ValueError:
                pass
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise DataError(f"the weight of {path} is {w!r}, not a number; give a positive number, e.g. {path}: 0.3")
        if not math.isfinite(w) or w <= 0:
            raise DataError(f"the weight of {path} is {w!r}; weights must be finite and > 0 "
                            "(drop a source rather than giving it 0)")
        weights[str(path)] = float(w)
    total = sum(weights.values())
    return {path: w / total for path, w in weights.items()}


def source_seed(seed: int, index: int) -> int:
    """Source `index`'s shuffle seed: a hash of (run seed, index), so sources never share an order."""
    digest = hashlib.blake2b(f"smolds-mixture:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class MixedWindows:
    """Windows of T+1 tokens drawn from several `smolds prep` directories in proportion to weights.

    The same interface as `TokenWindows` (next_batch, state_dict, load_state_dict, iter_eval, vocab_size,
    eos_id, tokenizer_path, seq_len, len), plus `sources` (one TokenWindows per directory, for per-source
    evaluation), `names` (the directories' basenames) and `weights` (normalized).

    Args:
        sources: {directory: weight}; weights are positive and normalized to sum 1. Order matters: it
            breaks ties and numbers the sources' seeds.
        split, seq_len, seed, dp_rank, dp_size: as for TokenWindows.
    """

    def __init__(self, sources: dict[str | os.PathLike, float], split: str = "train", seq_len: int = 1024,
                 seed: int = 0, dp_rank: int = 0, dp_size: int = 1):
        weights = normalized_weights(sources)
        paths = [Path(p) for p in weights]
        seen: dict[Path, str] = {}
        for p in paths:
            if p.resolve() in seen:
                raise DataError(f"the mixture lists {seen[p.resolve()]} twice (also as {p}); "
                                "give each directory once with its total weight")
            seen[p.resolve()] = str(p)
        self.sources = [TokenWindows(p, split=split, seq_len=seq_len, seed=source_seed(seed, i),
                                     dp_rank=dp_rank, dp_size=dp_size) for i, p in enumerate(paths)]
        first = self.sources[0]
        for p, src in zip(paths[1:], self.sources[1:]):
            a, b = first.manifest["tokenizer"], src.manifest["tokenizer"]
            if (a["sha256"], first.vocab_size, first.eos_id) != (b["sha256"], src.vocab_size, src.eos_id):
                raise DataError(f"{p} was tokenized with another tokenizer than {paths[0]} (tokenizer.json "
                                f"sha256 {b['sha256'][:12]} vs {a['sha256'][:12]}, vocab {src.vocab_size} vs "
                                f"{first.vocab_size}); a mixture needs one tokenizer: re-prepare {p} with "
                                f"`smolds prep ... --out {p} --tokenizer {paths[0] / 'tokenizer.json'} --overwrite`")
        basenames = [p.name or p.resolve().name for p in paths]
        self.names = [b if basenames.count(b) == 1 else str(p) for b, p in zip(basenames, paths)]
        self.weights = list(weights.values())
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.vocab_size: int = first.vocab_size
        self.eos_id: int = first.eos_id
        self.tokenizer_path = first.tokenizer_path
        self.consumed = [0] * len(self.sources)  # global windows taken from each source by all ranks together

    @property
    def consumed_windows(self) -> int:
        """Global position in the mixed stream."""
        return sum(self.consumed)

    def __len__(self) -> int:
        """Windows per rank until the first source has been seen once (then it starts a new epoch)."""
        return int(min(src.num_windows / w for src, w in zip(self.sources, self.weights))) // self.dp_size

    def assign(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Sources of the next `count` global positions, and each one's position within its source.

        Megatron's BlendedDataset rule: position n goes to argmax_s weight_s * (n + 1) - consumed_s.
        Leaves the counters alone.
        """
        consumed = list(self.consumed)
        n = sum(consumed)
        order = range(len(self.sources))
        src, local = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
        for j in range(count):
            s = max(order, key=lambda i: self.weights[i] * (n + j + 1) - consumed[i])  # first max: lowest index
            src[j], local[j] = s, consumed[s]
            consumed[s] += 1
        return src, local

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next global batch: x, y int64 [batch_size, T], y = x shifted by one."""
        total = batch_size * self.dp_size
        src, local = self.assign(total)
        lo, hi = self.dp_rank * batch_size, (self.dp_rank + 1) * batch_size
        x = torch.empty(batch_size, self.seq_len, dtype=torch.int64)  # (B, T)
        y = torch.empty_like(x)
        for s, reader in enumerate(self.sources):
            rows = np.flatnonzero(src[lo:hi] == s)
            if len(rows):  # this source's positions in the slice are consecutive within the source
                ids = reader.window_ids(int(local[lo + rows[0]]), len(rows))
                x[torch.from_numpy(rows)], y[torch.from_numpy(rows)] = reader._batch(ids)
        for s in range(len(self.sources)):
            self.consumed[s] += int((src == s).sum())
        return x, y

    def iter_eval(self, batch_size: int, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each source's TokenWindows.iter_eval in turn (up to max_batches each); the evaluator reports
        sources separately through `sources` instead."""
        for src in self.sources:
            yield from src.iter_eval(batch_size, max_batches)

    def state_dict(self) -> dict:
        """JSON-serialisable: per-source global counters, and what identifies the mixture."""
        return {"mixture": [{"name": name, "fingerprint": src.manifest["fingerprint"], "weight": w,
                             "consumed_windows": c}
                            for name, src, w, c in zip(self.names, self.sources, self.weights, self.consumed)],
                "seed": self.seed, "seq_len": self.seq_len, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("mixture", []), list) or not all(
                isinstance(s, dict) and {"name", "fingerprint", "weight"} <= s.keys() for s in state.get("mixture", [])):
            raise DataError("the saved data position is not one of a mixture; the checkpoint is damaged: "
                            "resume from another, or start a new run from the weights")
        if "mixture" not in state:
            raise DataError("the saved data position is for a single directory, this run reads a mixture; "
                            "resume with the same data.dir, or start a new run from the weights")
        mine = self.state_dict()
        for key in ("split", "seq_len", "seed"):
            if state.get(key) != mine[key]:
                raise DataError(f"the saved data position is for {key}={state.get(key)!r}, this reader has "
                                f"{mine[key]!r}; resume with the same split, seq_len and seed, or start a new "
                                "run from the weights")
        said = lambda m: ", ".join(f"{s['name']} {s['weight']:.4g} (fingerprint {s['fingerprint']})" for s in m)
        saved = state["mixture"]
        if len(saved) != len(mine["mixture"]) or any(
                a["fingerprint"] != b["fingerprint"] or not math.isclose(a["weight"], b["weight"], rel_tol=1e-9)
                for a, b in zip(saved, mine["mixture"])):
            raise DataError(f"the saved data position is for the mixture [{said(saved)}], this run's is "
                            f"[{said(mine['mixture'])}]; resume with the same sources, order and weights, or "
                            "start a new run from the weights (changed weights would first be caught up)")
        self.consumed = [consumed(s) for s in saved]


def open_windows(spec: str | os.PathLike | dict, split: str = "val", seq_len: int = 1024, **kw):
    """A command's `--data`: one prepared directory -> TokenWindows; a mixture, as a dict or as the text
    `"{data/a: 0.7, data/b: 0.3}"` (YAML, as `--data.dir` takes it) -> MixedWindows. DataError when the
    text is not a mapping of directories to weights."""
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        import yaml

        try:
            spec = yaml.safe_load(spec)
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise DataError(f"--data {spec!r} is not a YAML mapping ({problem}); write a mixture as "
                            "\"{data/a: 0.7, data/b: 0.3}\"") from None
        if not isinstance(spec, dict):
            raise DataError(f"--data {spec!r} is not a mapping; write a mixture as \"{{data/a: 0.7, data/b: 0.3}}\"")
    if isinstance(spec, dict):
        return MixedWindows(spec, split=split, seq_len=seq_len, **kw)
    return TokenWindows(spec, split=split, seq_len=seq_len, **kw)
