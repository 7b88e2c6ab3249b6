"""Cut the document stream of a prep's sources into N contiguous task slices of about equal size.

A slice is a pair of positions [start, end) (sources.py: (source index, offset in that source's unit)),
and slice k ends where slice k+1 begins, so the slices read one after another give exactly the stream
that one process reads: that is what lets N tasks write the bytes of one process (distributed.py).

Cut k goes near k/N of the input's bytes, at a position where a document may begin: a document
boundary of a .txt/.jsonl file, a row-group boundary of a .parquet file, a shard boundary of an hf:
dataset. Of the first such position after the target and the last one known before it (the previous
cut, or the start of the source or piece), the nearer wins, so one huge document or row group does not
drag a cut far forward. A .txt/.jsonl boundary is found by reading forward a few lines from the target
byte; sizes come from file sizes, Parquet metadata and, for hf:, a nominal size per shard
(sources.HF_SHARD_BYTES), so cutting reads almost none of the corpus. Two cuts that land on the same
position would leave an empty slice: too many tasks for the input, refused with the count that works.
"""

from __future__ import annotations

import os

import numpy as np

from data_prep.errors import DataError
from data_prep.sources import Source, document_boundary, piece_sizes

Position = tuple[int, int]


def cut(srcs: list[Source], tasks: int) -> list[tuple[Position, Position]]:
    """The `tasks` slices of the sources' document stream, in order; every one non-empty."""
    if tasks < 1:
        raise DataError(f"--tasks {tasks}: need at least 1")
    pieces = [piece_sizes(s) for s in srcs]
    slices = _slices(srcs, pieces, tasks)
    empty = sum(start == end for start, end in slices)
    if empty:
        most = tasks - empty
        while most > 1 and any(a == b for a, b in _slices(srcs, pieces, most)):
            most -= 1
        raise DataError(f"--tasks {tasks}: too many for this input, which is cut only at document, Parquet row-group "
                        f"and hf: shard boundaries ({empty} of the slices would be empty); use --tasks {most} or fewer")
    return slices


def _slices(srcs: list[Source], pieces: list[list[int] | None], tasks: int) -> list[tuple[Position, Position]]:
    axis = _Axis(srcs, pieces)
    cuts = [(0, 0)]
    for k in range(1, tasks):
        cuts.append(axis.cut(-(-k * axis.total // tasks), cuts[-1]))  # near ceil(k/N of the bytes)
    cuts.append((len(srcs), 0))
    return list(zip(cuts[:-1], cuts[1:]))


class _Axis:
    """The sources end to end on one byte axis, and the positions where a document may begin on it."""

    def __init__(self, srcs: list[Source], pieces: list[list[int] | None]):
        self.srcs, self.pieces = srcs, pieces
        # piece k of source i starts at byte bounds[i][k] of that source; .txt/.jsonl: [0, size]
        self.bounds = [np.concatenate([[0], np.cumsum([os.path.getsize(s.path)] if p is None else p, dtype=np.int64)])
                       for s, p in zip(srcs, pieces)]
        self.begins = np.concatenate([[0], np.cumsum([int(b[-1]) for b in self.bounds], dtype=np.int64)])
        self.total = int(self.begins[-1])

    def cut(self, target: int, previous: Position) -> Position:
        """The position nearest byte `target` among the last one at or before it (never before `previous`)
        and the first one after it; the later one on a tie or when the earlier one is `previous`."""
        i = int(np.searchsorted(self.begins, target, side="right")) - 1
        if i >= len(self.srcs):
            return (len(self.srcs), 0)
        local, bounds = target - int(self.begins[i]), self.bounds[i]
        if self.pieces[i] is None:  # .txt / .jsonl: offsets are bytes, any document boundary will do
            after = self._normal(i, document_boundary(self.srcs[i], local))
            before = max(previous, (i, 0))  # the last boundary known without reading backwards
        else:
            j = int(np.searchsorted(bounds, local, side="left"))
            after, before = self._normal(i, j), max(previous, (i, j if bounds[j] == local else j - 1))
        if before != previous and target - self._byte(before) < self._byte(after) - target:
            return before
        return after

    def _normal(self, i: int, offset: int) -> Position:
        """(i, offset), or (i + 1, 0) when the offset is the end of source i."""
        end = int(self.bounds[i][-1]) if self.pieces[i] is None else len(self.pieces[i])
        return (i + 1, 0) if offset >= end else (i, offset)

    def _byte(self, pos: Position) -> int:
        i, offset = pos
        if i >= len(self.srcs):
            return self.total
        return int(self.begins[i]) + (offset if self.pieces[i] is None else int(self.bounds[i][offset]))
