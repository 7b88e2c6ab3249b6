"""Documents from every kind of source, one string each, always in the same order.

A source spec is what the user types after `smolds prep`:

    data/a.txt  data/b.jsonl  data/c.parquet   files (any other extension is read as plain text)
    data/                                      a folder: its .txt, .jsonl and .parquet files, recursively
    'data/**/*.jsonl'                          a glob (quoted, so the shell leaves it to us)
    hf:NAME[:CONFIG][:SPLIT]                   a Hugging Face dataset, streamed (split defaults to train)
    lines:data/a.txt                           text files (or a glob or folder of them), one document per line
    pydoc:topics                               the embedded default: CPython's own documentation topics

What a document is, per kind:
    .txt      blocks separated by blank lines (a line that is empty or whitespace only); the blank lines
              go, each block keeps its inner newlines. A file with no blank line is one document (prep
              warns when one document is most of a source): read such a file with lines:.
    lines:    one non-blank line of a text file, without its line ending.
    .jsonl    one JSON object per line, the document is its `text_field` (default "text").
    .parquet  one row, the document is its `text_field` column.
    hf:       one row of the streamed split, its `text_field`.
    pydoc:    one topic (sorted by name).
Empty documents are skipped: they would only add an EOS.

Order is the spec order, with globs and folders expanded in sorted path order, so the same specs give
the same document stream on every machine. That order is what makes `prepare` deterministic.

Positions, for cutting the stream into task slices (slices.py): (source index, offset), the offset in the
source's own unit: a byte for .txt/.jsonl/lines: (a document may start there: see `document_boundary`), a row
group for .parquet, a shard for hf: (datasets' own `IterableDataset.shard`, which keeps the order), and
the whole of pydoc:. `iter_documents(..., start, end)` reads the documents between two positions, and the
slices between consecutive positions, read one after another, give the whole stream.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import DataError, first_line

DEFAULT_SOURCE = "pydoc:topics"
FOLDER_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
FILE_KINDS = ("txt", "lines", "jsonl", "parquet")
HF_SHARD_BYTES = 1 << 30  # the hub tells no shard size cheaply; a typical hub shard holds 0.2-2 GB of text


@dataclass(frozen=True)
class Source:
    """One concrete input: a file, a Hugging Face dataset, or the embedded default."""

    kind: str  # txt | lines | jsonl | parquet | hf | pydoc
    path: str  # absolute file path; the dataset name for hf; "topics" for pydoc
    spec: str  # the spec it came from, as the user wrote it

    def identity(self) -> dict:
        """What must stay the same for a partial run to be resumed (part of the settings hash).

        Files: absolute path, size and mtime (hashing terabytes of input on every start is too slow).
        hf: the spec (the hub gives no cheap content hash). pydoc: the text's sha256 (it is small).
        """
        if self.kind == "hf":
            return {"kind": "hf", "spec": self.path}
        if self.kind == "pydoc":
            text = "\0".join(_pydoc_topics())
            return {"kind": "pydoc", "sha256": hashlib.sha256(text.encode()).hexdigest()}
        st = os.stat(self.path)
        return {"kind": self.kind, "path": self.path, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}

    def describe(self) -> dict:
        """The manifest's record of this source."""
        out = {"spec": self.spec, "kind": self.kind, "path": self.path}
        if self.kind in FILE_KINDS:
            out["bytes"] = os.path.getsize(self.path)
        return out


def resolve_sources(specs: list[str]) -> list[Source]:
    """Expand specs into concrete sources; a missing file or an empty glob/folder is an error."""
    if not specs:
        raise DataError("no sources given; pass files, folders, globs or hf:NAME (or none for the default)")
    out: list[Source] = []
    for spec in specs:
        spec = str(spec)
        if spec.startswith("lines:"):
            files = resolve_sources([spec[len("lines:"):]])
            other = next((f for f in files if f.kind != "txt"), None)
            if other is not None:
                raise DataError(f"{spec}: lines: reads text files, and {other.path} is {other.kind} "
                                f"(one document per {'row' if other.kind != 'pydoc' else 'topic'} already); "
                                "drop the lines: prefix for it")
            out += [Source("lines", f.path, spec) for f in files]
        elif spec.startswith("hf:"):
            _parse_hf(spec)  # fail early on a malformed spec
            out.append(Source("hf", spec[3:], spec))
        elif spec == DEFAULT_SOURCE:
            out.append(Source("pydoc", "topics", spec))
        elif any(c in spec for c in "*?["):
            paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not paths:
                raise DataError(f"glob {spec!r} matched no files; check the pattern")
            out += [Source(_kind(p), os.path.abspath(p), spec) for p in paths]
        elif os.path.isdir(spec):
            paths = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(spec)
                for name in names
                if Path(name).suffix.lower() in FOLDER_KINDS
            )
            if not paths:
                raise DataError(f"folder {spec!r} holds no .txt, .jsonl or .parquet files; check the path")
            out += [Source(_kind(p), os.path.abspath(p), spec) for p in paths]
        elif os.path.isfile(spec):
            out.append(Source(_kind(spec), os.path.abspath(spec), spec))
        else:
            raise DataError(f"no such file or folder: {spec!r}; check the path (or use hf:NAME for a hub dataset)")
    return out


def iter_documents(sources: list[Source], text_field: str = "text", start: tuple[int, int] = (0, 0),
                   end: tuple[int, int] | None = None) -> Iterator[str]:
    """Yield every non-empty document of the sources, in order, from position `start` to `end` (default: all)."""
    readers = {"txt": _txt, "lines": _lines, "jsonl": _jsonl, "parquet": _parquet, "hf": _hf, "pydoc": _pydoc}
    last, stop = end or (len(sources), 0)
    for i in range(start[0], min(last + 1, len(sources))):
        if i == last and stop == 0:
            break
        lo = start[1] if i == start[0] else 0
        hi = stop if i == last else None
        for doc in readers[sources[i].kind](sources[i], text_field, lo, hi):
            if doc:
                yield doc


def piece_sizes(src: Source) -> list[int] | None:
    """Bytes of each piece a task slice may start or end between; None for .txt/.jsonl/lines:, cut at any document.

    .parquet: each row group's uncompressed size; hf: HF_SHARD_BYTES per shard; pydoc: one piece.
    """
    if src.kind in ("txt", "lines", "jsonl"):
        return None
    if src.kind == "parquet":
        meta = _parquet_file(src).metadata
        return [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
    if src.kind == "hf":
        return [HF_SHARD_BYTES] * _hf_dataset(src).num_shards
    return [sum(map(len, _pydoc_topics()))]


def document_boundary(src: Source, offset: int) -> int:
    """The first byte position >= offset of a .txt/.jsonl/lines: file where reading may start without splitting
    a document: a line start (.jsonl, lines:), a line start after a blank line (.txt); else the file's size.

    Reading [0, b) then [b, size) gives the documents of reading the whole file: at such a b the
    reader holds no unfinished block.
    """
    size = os.path.getsize(src.path)
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size)
    with open(src.path, "rb") as f:
        f.seek(offset - 1)
        pos = offset - 1 + len(f.readline())  # the first line start >= offset
        if src.kind in ("jsonl", "lines"):
            return pos
        for raw in f:
            pos += len(raw)
            if not raw.decode("utf-8", "replace").strip():  # a blank line (a bad byte is never blank)
                return pos
    return size


def _kind(path: str) -> str:
    return FOLDER_KINDS.get(Path(path).suffix.lower(), "txt")


def _decoded_lines(src: Source, start: int, end: int | None) -> Iterator[str]:
    """The lines of the file's bytes [start, end), decoded one at a time: a huge file never sits in memory
    whole, and a decoding error names its byte offset."""
    offset = start
    with open(src.path, "rb") as f:
        f.seek(start)
        for raw in f:
            if end is not None and offset >= end:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{src.path}: not UTF-8 at byte {offset + e.start}; re-encode it (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if offset == 0:
                line = line.removeprefix("\ufeff")  # a byte-order mark is not text
            offset += len(raw)
            yield line


def _txt(src: Source, text_field: str, start: int = 0, end: int | None = None) -> Iterator[str]:
    """Paragraphs: runs of non-blank lines."""
    block: list[str] = []
    for line in _decoded_lines(src, start, end):
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).rstrip("\r\n")
            block = []
    if block:
        yield "".join(block).rstrip("\r\n")


def _lines(src: Source, text_field: str, start: int = 0, end: int | None = None) -> Iterator[str]:
    for line in _decoded_lines(src, start, end):
        if line.strip():
            yield line.rstrip("\r\n")


def _jsonl(src: Source, text_field: str, start: int = 0, end: int | None = None) -> Iterator[str]:
    offset = start
    with open(src.path, "rb") as f:
        f.seek(start)
        for lineno, raw in enumerate(f, 1):
            if end is not None and offset >= end:
                break
            # a slice that starts inside the file does not know its line numbers: name the byte instead
            where = f"{src.path} line {lineno}" if start == 0 else f"{src.path} line at byte {offset}"
            offset += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8; re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); fix or drop the line") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: a JSON {type(row).__name__}, not an object; write one object per line")
            yield _field(row, text_field, where)


def _parquet(src: Source, text_field: str, start: int = 0, end: int | None = None) -> Iterator[str]:
    pf = _parquet_file(src)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{src.path} has no column {text_field!r} (columns: {', '.join(names)}); "
                        "pass --text-field with the right one")
    groups = list(range(start, pf.num_row_groups if end is None else end))
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield _check_text(value, text_field, src.path)


def _parquet_file(src: Source):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(src.path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{src.path}: not a readable Parquet file ({first_line(e)})") from None


def _hf(src: Source, text_field: str, start: int = 0, end: int | None = None) -> Iterator[str]:
    """Stream a Hugging Face dataset: rows arrive as they download, nothing is cached whole."""
    ds = _hf_dataset(src)
    if start == 0 and end is None:
        shards = [(None, ds)]
    else:  # shard j alone, in datasets' own order: concatenating shards 0..n-1 gives the whole split
        n = ds.num_shards
        shards = [(j, ds.shard(num_shards=n, index=j, contiguous=True)) for j in range(start, n if end is None else end)]
    for j, part in shards:
        where = src.spec if j is None else f"{src.spec} shard {j}"
        for i, row in enumerate(part):
            yield _field(row, text_field, f"{where} row {i}")


def _hf_dataset(src: Source):
    import datasets

    name, config, split = _parse_hf(src.spec)
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # the hub, the network and the builders raise many types; all mean "cannot open"
        raise DataError(f"{src.spec}: datasets.load_dataset failed ({first_line(e)}); "
                        "check the name, config and split") from None


def _parse_hf(spec: str) -> tuple[str, str | None, str]:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"bad dataset spec {spec!r}; write hf:NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def _pydoc(src: Source, text_field: str, start: int = 0, end: int | None = None) -> Iterator[str]:
    if start == 0:
        yield from _pydoc_topics()


def _pydoc_topics() -> list[str]:
    """Python's documentation topics: ~465 kB of English and code shipped inside CPython, no download."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _field(row: dict, text_field: str, where: str) -> str:
    if text_field not in row:
        keys = ", ".join(map(str, row)) or "none"
        raise DataError(f"{where} has no field {text_field!r} (fields: {keys}); pass --text-field with the right one")
    return _check_text(row[text_field], text_field, where)


def _check_text(value, text_field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, not text; "
                        "pass --text-field naming a text field")
    return value
