"""`smolds prep --tasks N` on datatrove's local executor: slices, the bytes of one process for any N, a failed
task rerun alone, the one-line errors, and `verify` over the whole dataset.

The Slurm executor is tested on the real local cluster in test_data_prep_slurm.py.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import DataError, TokenWindows, cli, pack, prepare, prepare_distributed, sources, verify
from data_prep.distributed import unfinished_tasks
from data_prep.slices import cut
from data_prep.sources import iter_documents, resolve_sources
from data_prep.tokenizer import train_bpe

REPO = Path(__file__).resolve().parent.parent
CORPORA = REPO.parent / "shared" / "corpora"  # tinyshakespeare.txt + tinystories-valid-prefix.txt: 1.9 MB, 11.5k docs


def dataset_files(out: Path) -> dict[str, bytes]:
    """The dataset's data files: shards, document indices, tokenizer (not the manifest, the lock or tasks/)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.is_file() and p.name not in ("manifest.json", ".lock")}


def manifest_of(out: Path) -> dict:
    """The manifest less what names the run rather than the data (its time and command)."""
    m = json.loads((out / "manifest.json").read_text())
    del m["created"], m["command"]
    return m


def small_bpe(folder: Path) -> str:
    """A 1000-token BPE trained on the first paragraphs of the corpora, saved in folder; its path."""
    path = folder / "tokenizer.json"
    train_bpe(itertools.islice(iter_documents(resolve_sources([str(CORPORA)])), 500), 1000).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    """Trained once, so that each prep only tokenizes."""
    return small_bpe(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def settings(tokenizer_file) -> dict:
    """Small shards so both splits span several (val: ~41k tokens in 20k-token shards)."""
    return dict(tokenizer=tokenizer_file, shard_tokens=20_000, val_fraction=0.05, progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, settings) -> Path:
    """A one-process prep of the corpora: what every task count must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("ref")
    prepare([str(CORPORA)], out, workers=1, **settings)
    return out


# --- slices -------------------------------------------------------------------------------------------


def test_slices_read_back_the_whole_stream(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    blocks = [f"block {i} line one\nline two of {i}" for i in range(40)]
    seps = ["\n\n", "\n  \t\n", "\r\n\r\n", "\n\n\n"]  # blank lines: empty, whitespace only, CRLF, several
    (tmp_path / "a.txt").write_bytes(("\ufeff" + "".join(b + seps[i % 4] for i, b in enumerate(blocks))).encode())
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * 5}) + "\n" + "\n" * (i % 3 == 0)
                                              for i in range(30)))
    (tmp_path / "c.txt").write_text("")  # an empty file between the others
    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(40)]}), tmp_path / "d.parquet", row_group_size=7)
    srcs = resolve_sources([str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.txt", "d.parquet")])
    whole = list(iter_documents(srcs))
    assert len(whole) == 40 + 30 + 40
    refused = []
    for n in range(1, 40):
        try:
            slices = cut(srcs, n)
        except DataError as e:
            assert f"--tasks {n}: too many for this input" in str(e)
            refused.append(n)
            continue
        assert slices[0][0] == (0, 0) and slices[-1][1] == (len(srcs), 0)
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:])) and all(a < b for a, b in slices)
        parts = [list(iter_documents(srcs, "text", start, end)) for start, end in slices]
        assert sum(parts, []) == whole, n
    assert min(refused, default=40) > 15  # a few bytes per slice before the first empty one
    with pytest.raises(DataError, match=r"--tasks 500: too many for this input.*use --tasks (\d+) or fewer") as e:
        cut(srcs, 500)
    most = int(e.value.args[0].rsplit("--tasks ", 1)[1].split()[0])
    assert most >= min(refused, default=40) - 1 and len(cut(srcs, most)) == most


def test_slices_are_balanced_by_bytes():
    srcs = resolve_sources([str(CORPORA)])
    sizes = [os.path.getsize(s.path) for s in srcs]
    at = lambda pos: sum(sizes[:pos[0]]) + pos[1]  # byte of a position (both sources are .txt)
    for n in (2, 3, 4, 7):
        lengths = [at(b) - at(a) for a, b in cut(srcs, n)]
        assert max(lengths) < 1.02 * sum(sizes) / n, (n, lengths)


def test_hf_shards_are_slices(tmp_path):
    """hf: goes through datasets' own sharding (IterableDataset.shard); a local folder stands in for the hub."""
    (tmp_path / "ds").mkdir()
    for k in range(3):
        (tmp_path / "ds" / f"part-{k}.jsonl").write_text("".join(json.dumps({"text": f"shard {k} row {i}"}) + "\n"
                                                                for i in range(4)))
    srcs = resolve_sources([f"hf:{tmp_path / 'ds'}"])
    whole = list(iter_documents(srcs))
    assert len(whole) == 12
    slices = cut(srcs, 3)
    assert slices == [((0, 0), (0, 1)), ((0, 1), (0, 2)), ((0, 2), (1, 0))]
    assert [list(iter_documents(srcs, "text", a, b)) for a, b in slices] == [whole[:4], whole[4:8], whole[8:]]
    with pytest.raises(DataError, match="use --tasks 3 or fewer"):
        cut(srcs, 4)


# --- the bytes of one process ---------------------------------------------------------------------------


def test_any_task_count_gives_the_bytes_of_one_process(tmp_path, settings, reference):
    ref = manifest_of(reference)
    assert len(ref["splits"]["train"]["shards"]) > 30 and len(ref["splits"]["val"]["shards"]) >= 2
    for n in (1, 3, 4):
        out = tmp_path / f"tasks{n}"
        m = prepare_distributed([str(CORPORA)], out, n, **settings)
        assert manifest_of(out) == ref and m["fingerprint"] == ref["fingerprint"], n
        assert dataset_files(out) == dataset_files(reference), n  # train and val shards, indices, tokenizer
        assert verify(out) == [] and unfinished_tasks(out, n) == []
        assert not (out / "tasks" / "parts").exists()  # the parts go once the manifest is written
    x, y = TokenWindows(out, "val", seq_len=64, seed=1).next_batch(4)  # the reader takes it unchanged
    x_ref, y_ref = TokenWindows(reference, "val", seq_len=64, seed=1).next_batch(4)
    assert x.equal(x_ref) and y.equal(y_ref)
    assert prepare([str(CORPORA)], out, **settings) == m  # complete: one process finds nothing to do


def test_trained_bpe_and_every_kind_of_source(tmp_path, monkeypatch):
    """The launcher trains the BPE once (as `prepare` does); slices end inside .txt, .jsonl and Parquet files
    (at row groups) and between hf: shards, and the merge still writes the bytes of one process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = (CORPORA / "tinystories-valid-prefix.txt").read_text().split("\n\n")
    (tmp_path / "a.txt").write_text("\n\n".join(text[:300]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in text[300:600]))
    pq.write_table(pa.table({"text": text[600:900]}), tmp_path / "c.parquet", row_group_size=50)
    (tmp_path / "hub").mkdir()
    for k in range(2):
        (tmp_path / "hub" / f"train-{k}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in text[900 + 150 * k:1050 + 150 * k]))
    monkeypatch.setattr(sources, "HF_SHARD_BYTES", (tmp_path / "hub" / "train-0.jsonl").stat().st_size)  # not 1 GB
    specs = [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")] + [f"hf:{tmp_path / 'hub'}"]
    cuts = [start for start, _ in cut(resolve_sources(specs), 6)]
    assert {i for i, offset in cuts if offset} == {0, 1, 2, 3}, cuts  # inside every source
    args = dict(vocab_size=500, shard_tokens=5000, val_fraction=0.1, progress=False)
    prepare(specs, tmp_path / "one", **args)
    m = prepare_distributed(specs, tmp_path / "six", 6, **args)
    assert m["documents"] == 1200 and manifest_of(tmp_path / "six") == manifest_of(tmp_path / "one")
    assert dataset_files(tmp_path / "six") == dataset_files(tmp_path / "one")


def test_local_tasks_need_no_main_guard(tmp_path):
    """A script piped to stdin (no main module a process pool could re-import) runs local tasks to the end."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 50}) + "\n" for i in range(200)))
    script = (f"from data_prep import prepare_distributed\n"
              f"m = prepare_distributed([{str(docs)!r}], {str(tmp_path / 'd')!r}, 2, vocab_size=300, progress=False)\n"
              "print(m['documents'])\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-"], input=script, cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "200", r.stderr[-3000:]
    assert unfinished_tasks(tmp_path / "d", 2) == [] and verify(tmp_path / "d") == []


# --- failures, resume, bad input ------------------------------------------------------------------------


def test_a_failed_task_reruns_alone(tmp_path, settings, reference, monkeypatch):
    """A bad byte in the last slice fails its task; the others keep their parts and markers. Once the byte is
    fixed, a rerun runs that task alone (its half-written part ignored) and the merge, giving the reference."""
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # one task at a time, in order: tasks 0-2 finish first
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPORA, corpus, ignore=lambda d, names: [n for n in names if not n.endswith(".txt")])
    out = tmp_path / "out"
    srcs = resolve_sources([str(corpus)])
    (i, offset), _ = cut(srcs, 4)[3]
    path = Path(srcs[i].path)
    data, st = bytearray(path.read_bytes()), path.stat()
    bad = data.index(b"e", offset + 1000)
    data[bad] = 0xFF  # not UTF-8; same size and (restored) mtime, so the same dataset settings
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    with pytest.raises(DataError, match=f"not UTF-8 at byte {bad}"):
        prepare_distributed([str(corpus)], out, 4, **settings)
    assert unfinished_tasks(out, 4) == [3] and not (out / "manifest.json").exists()
    assert verify(out) == [f"{out}: the 4-task prep did not finish (tasks 3 of 4 have not completed; no "
                           "manifest.json yet); rerun the same `smolds prep` command to finish it"]
    with pytest.raises(DataError, match="holds an unfinished 4-task prep of this dataset; rerun it with --tasks 4"):
        prepare_distributed([str(corpus)], out, 3, **settings)
    with pytest.raises(DataError, match="holds an unfinished 4-task prep of this dataset; rerun it with --tasks 4"):
        prepare([str(corpus)], out, **settings)

    data[bad] = ord("e")
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    (out / "tasks" / "parts" / "00003.bin.tmp").write_bytes(b"half a part from a killed task")
    logs = out / "tasks" / "tokenize" / "logs"
    before = {p.name: p.stat().st_mtime_ns for p in logs.iterdir()}
    prepare_distributed([str(corpus)], out, 4, **settings)
    after = {p.name: p.stat().st_mtime_ns for p in logs.iterdir()}
    assert [name for name in sorted(after) if after[name] != before[name]] == ["task_00003.log"]
    assert dataset_files(out) == dataset_files(reference)
    assert manifest_of(out)["splits"] == manifest_of(reference)["splits"] and verify(out) == []


def test_another_layout_and_too_many_tasks_are_one_line_errors(tmp_path, settings, monkeypatch, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(6)))
    assert cli.main([str(docs), "--out", str(tmp_path / "o"), "--tasks", "10", "--tokenizer", settings["tokenizer"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smolds prep: error: --tasks 10: too many for this input") and "\n" not in err
    assert err.endswith("use --tasks 6 or fewer")

    real_save, calls = pack.save_progress, []

    def crash_on_fourth(out_dir, state):  # the second shard is on disk: an unfinished one-process prep
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated crash")
        real_save(out_dir, state)

    monkeypatch.setattr(pack, "save_progress", crash_on_fourth)
    out = tmp_path / "one"
    with pytest.raises(KeyboardInterrupt):
        prepare([str(CORPORA)], out, workers=1, **settings)
    monkeypatch.setattr(pack, "save_progress", real_save)
    with pytest.raises(DataError, match="holds an unfinished one-process prep of this dataset; rerun it with no "
                                        "--tasks to finish it, or pass --overwrite"):
        prepare_distributed([str(CORPORA)], out, 2, **settings)

    with pytest.raises(DataError, match="--tasks 0: need at least 1"):
        prepare_distributed([str(docs)], tmp_path / "z", 0, **settings)
    with pytest.raises(DataError, match="--executor ray: choose local or slurm"):
        prepare_distributed([str(docs)], tmp_path / "z", 2, executor="ray", **settings)
    assert cli.main([str(docs), "--out", str(tmp_path / "z"), "--tasks", "2", "--time", "1:00:00"]) == 2
    assert capsys.readouterr().err.strip() == ("smolds prep: error: --slurm-partition, --time, --merge-time and "
                                               "--sbatch-arg are for --executor slurm; add it or drop them")
    with pytest.raises(SystemExit):
        cli.main([str(docs), "--out", str(tmp_path / "z"), "--executor", "slurm"])
    assert "--executor needs --tasks N" in capsys.readouterr().err


# --- verify -----------------------------------------------------------------------------------------------


def test_verify_checks_the_whole_dataset(tmp_path, reference):
    """Files that match their hashes but do not fit together (what a merge bug would write) are reported."""
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][3]
    starts = np.load(out / shard["index"])
    np.save(out / shard["index"], starts + 1)  # every document one token late
    shard["index_sha256"] = pack._sha256_file(out / shard["index"])
    manifest["splits"]["val"]["tokens"] += 1
    manifest["fingerprint"] = "0" * 16
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(out)
    assert len(problems) == 3 and all(p.endswith("; re-create the dataset (its command with --overwrite)")
                                      for p in problems), problems
    found = "\n".join(problems)
    assert "manifest.json: its fingerprint is not that of its shards' sha256" in found
    assert "manifest.json: the val shards' tokens do not add up to the split's" in found
    assert f"{shard['index']}: its document starts are not the positions after EOS in {shard['file']}" in found
