"""Bad input across the whole CLI: every case exits non-zero with exactly one line on stderr that names the
problem and the fix, prints no traceback, and changes no file that existed before it ran.

Each case runs the command in this process (`smolds.cli.main(argv)`, as the `smolds` command would) on a
small world built once: the default dataset, a consolidated checkpoint of a tiny model with that data's
tokenizer, and a two-step training run. Cases that damage something damage a copy of it. The expected text of
each case is a regex over the one line: the problem, then the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

TINY = ["--model.num_hidden_layers", "2", "--train.seq_len", "32", "--train.micro_batch", "4",
        "--train.warmup_steps", "1", "--train.eval_batches", "1", "--train.eval_every", "100",
        "--logging.wandb", "disabled", "--eval.sample_tokens", "0"]


class World:
    """The shared inputs (built once) and damaged copies of them (made per case under `tmp`)."""

    def __init__(self, root: Path):
        from data_prep import prepare_default
        from smolds.config import ModelConfig
        from smolds.model.transformer import Transformer
        from smolds.pretrained import save_pretrained
        from smolds.train.cli import main as train_main

        self.root = root
        self.data = root / "data"
        prepare_default(self.data, progress=False)
        cfg = ModelConfig.load({"preset": "tiny", "num_hidden_layers": 2})
        self.ckpt = save_pretrained(Transformer(cfg), root / "ckpt", tokenizer=self.data / "tokenizer.json")
        dense = ModelConfig.load({"preset": "tiny", "num_hidden_layers": 2, "ffn_pattern": ["dense"]})
        self.dense = save_pretrained(Transformer(dense), root / "dense", tokenizer=self.data / "tokenizer.json")
        self.no_tok = save_pretrained(Transformer(cfg), root / "no-tokenizer")
        self.run = root / "run"
        assert train_main(self.run_args(self.run, "--train.steps", "2", "--train.checkpoint_every", "1")) == 0
        self.tmp = root

    def run_args(self, out: Path, *more: str, data: Path | None = None) -> list[str]:
        return [*TINY, "--data.dir", str(data or self.data), "--train.out_dir", str(out), *more]

    def copy(self, src: Path, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(src, dst)
        return dst

    def data_with(self, name: str, edit) -> Path:
        """A copy of the dataset whose manifest went through edit(manifest) (edit returns the new JSON value)."""
        d = self.copy(self.data, name)
        m = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(json.dumps(edit(m)))
        return d

    def manifest(self, d: Path) -> dict:
        return json.loads((d / "manifest.json").read_text())


def _drop(key):
    def edit(m):
        del m[key]
        return m
    return edit


def out_of_vocab(w: World) -> Path:
    """A dataset whose first train shard holds token ids >= its vocab_size, with matching hashes (as a packing
    bug or a hand-edited manifest would leave it): only the reader's check of each batch can see it."""
    d = w.copy(w.data, "oov")
    m = w.manifest(d)
    shard = m["splits"]["train"]["shards"][0]
    tokens = np.fromfile(d / shard["file"], dtype=m["dtype"])
    tokens[::7] = m["vocab_size"] + 5
    tokens.tofile(d / shard["file"])
    shard["sha256"] = hashlib.sha256((d / shard["file"]).read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def changed_shard(w: World) -> Path:
    d = w.copy(w.data, "changed")
    f = d / w.manifest(d)["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(f.read_bytes())
    raw[100] ^= 1  # one bit, same size: only a hash sees it
    f.write_bytes(bytes(raw))
    return d


def other_tokenizer(w: World) -> Path:
    """The dataset with a tokenizer.json of another vocabulary size (the manifest's sha256 no longer matches)."""
    from helpers import byte_tokenizer

    d = w.copy(w.data, "othertok")
    byte_tokenizer().save(str(d / "tokenizer.json"))
    return d


def truncated_shard(w: World) -> Path:
    d = w.copy(w.data, "truncated")
    f = d / w.manifest(d)["splits"]["train"]["shards"][0]["file"]
    f.write_bytes(f.read_bytes()[:1000])
    return d


def run_without_data_position(w: World) -> Path:
    run = w.copy(w.run, "run-nodata")
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((latest / "trainer_state.json").read_text())
    del state["data"]
    (latest / "trainer_state.json").write_text(json.dumps(state))
    return run


def text_file(w: World, name: str, data: bytes) -> Path:
    p = w.tmp / name
    p.write_bytes(data)
    return p


def resume(w: World, run: Path, *more: str) -> list[str]:
    return ["train", *w.run_args(run, "--train.steps", "4", *more), "--resume"]


def train(w: World, *more: str, data: Path | None = None) -> list[str]:
    return ["train", *w.run_args(w.tmp / "new-run", "--train.steps", "2", *more, data=data)]


MANIFEST_DAMAGE = [("no-dtype", _drop("dtype"), "lacks 'dtype'"), ("no-splits", _drop("splits"), "lacks 'splits'"),
                   ("no-vocab", _drop("vocab_size"), "lacks 'vocab_size'"),
                   ("list", lambda m: [m], "holds a JSON list, not an object")]

# (id, argv from the world, regex the single stderr line must match: the problem ... the fix)
CASES = [
    # --- the cases: damaged manifests, prep --verify and train -----------------------------------
    *[(f"verify-manifest-{k}", lambda w, k=k, e=e: ["prep", "--verify", str(w.data_with(k, e))],
       rf"manifest.json {msg}.*re-create the dataset") for k, e, msg in MANIFEST_DAMAGE],
    *[(f"train-manifest-{k}", lambda w, k=k, e=e: train(w, data=w.data_with(k, e)),
       rf"manifest.json {msg}.*re-create the dataset") for k, e, msg in MANIFEST_DAMAGE],
    ("train-other-tokenizer", lambda w: train(w, data=other_tokenizer(w)),
     r"tokenizer.json is not the tokenizer the shards were made with.*put that one back"),
    ("eval-other-tokenizer", lambda w: ["eval", str(w.ckpt), "--data", str(other_tokenizer(w)), "--seq-len", "32"],
     r"tokenizer.json is not the tokenizer the shards were made with.*put that one back"),
    ("train-token-ids-over-vocab", lambda w: train(w, data=out_of_vocab(w)),
     r"holds token id \d+, not below the dataset's vocab_size 4096.*smolds prep --verify"),
    ("eval-token-ids-over-vocab", lambda w: ["eval", str(w.ckpt), "--data", str(out_of_vocab(w)), "--seq-len", "32",
                                             "--split", "train"],
     r"holds token id \d+, not below the dataset's vocab_size 4096.*smolds prep --verify"),
    ("train-shard-hash-differs", lambda w: train(w, data=changed_shard(w)),
     r"train_00000.bin: sha256 differs from the manifest.*re-create the dataset"),
    ("prep-again-on-truncated-shard", lambda w: ["prep", "pydoc:topics", "--out", str(truncated_shard(w)),
                                                 "--vocab-size", "4096", "--workers", "1"],
     r"holds this dataset, damaged: .*train_00000.bin holds 1000 bytes.*--overwrite"),
    ("resume-without-data-position", lambda w: resume(w, run_without_data_position(w)),
     r"holds no data position; the checkpoint is damaged.*--train.init_from"),
    ("raw-deepspeed-batch", lambda w: train(w, "--deepspeed.config", "{train_batch_size: 7}"),
     r"deepspeed.config sets train_batch_size to 7, but .* gives 4; drop it"),
    ("raw-deepspeed-stage", lambda w: train(w, "--deepspeed.config", "{zero_optimization: {stage: 2}}"),
     r"sets zero_optimization.stage to 2, but this run's deepspeed.zero_stage gives 0; .*set deepspeed.zero_stage"),
    ("raw-deepspeed-refused", lambda w: train(w, "--deepspeed.config", "{zero_optimization: {offload_optimizer: 3}}"),
     r"DeepSpeed refuses this run's config .*fix --deepspeed.config"),
    # --- prep ----------------------------------------------------------------------------------------
    ("prep-missing-file", lambda w: ["prep", str(w.tmp / "nope.txt"), "--out", str(w.tmp / "o")],
     r"no such file or folder.*check the path"),
    ("prep-empty-glob", lambda w: ["prep", str(w.tmp / "*.nothing"), "--out", str(w.tmp / "o")],
     r"matched no files; check the pattern"),
    ("prep-val-fraction", lambda w: ["prep", "--out", str(w.tmp / "o"), "--val-fraction", "1.5"],
     r"--val-fraction 1.5: must be in \[0, 1\)"),
    ("prep-workers", lambda w: ["prep", "--out", str(w.tmp / "o"), "--workers", "0"],
     r"--workers 0: need at least 1"),
    ("prep-shard-tokens", lambda w: ["prep", "--out", str(w.tmp / "o"), "--shard-tokens", "0"],
     r"--shard-tokens 0: must be between"),
    ("prep-vocab-size", lambda w: ["prep", "--out", str(w.tmp / "o"), "--vocab-size", "10"],
     r"--vocab-size 10 is too small.*use at least"),
    ("prep-out-is-file", lambda w: ["prep", "--out", str(text_file(w, "f.txt", b"x"))],
     r"is a file; choose a directory"),
    ("prep-out-foreign", lambda w: ["prep", "--out", str(w.copy(w.run, "foreign"))],
     r"holds files that are not a smolds dataset.*choose a new or empty --out"),
    ("prep-other-dataset", lambda w: ["prep", "--out", str(w.copy(w.data, "other")), "--vocab-size", "300"],
     r"holds a different dataset.*pass --overwrite"),
    ("prep-not-utf8", lambda w: ["prep", str(text_file(w, "latin.txt", "caf\xe9\n".encode("latin1"))),
                                 "--out", str(w.tmp / "o")], r"not UTF-8 at byte 3; re-encode it"),
    ("prep-jsonl-bad-line", lambda w: ["prep", str(text_file(w, "b.jsonl", b'{"text": "a"}\n{oops\n')),
                                       "--out", str(w.tmp / "o")], r"line 2: not valid JSON.*fix or drop the line"),
    ("prep-jsonl-not-object", lambda w: ["prep", str(text_file(w, "l.jsonl", b'[1, 2]\n')), "--out", str(w.tmp / "o")],
     r"line 1: a JSON list, not an object; write one object per line"),
    ("prep-jsonl-no-field", lambda w: ["prep", str(text_file(w, "n.jsonl", b'{"body": "a"}\n')),
                                       "--out", str(w.tmp / "o")], r"text.*--text-field"),
    ("prep-empty-source", lambda w: ["prep", str(text_file(w, "empty.txt", b"\n\n")), "--out", str(w.tmp / "o")],
     r"no documents in .*every source is empty; check the paths"),
    ("prep-missing-tokenizer", lambda w: ["prep", "--out", str(w.tmp / "o"), "--tokenizer", str(w.tmp / "tok.json")],
     r"no such tokenizer file or folder: .*tok.json; check the path"),
    ("prep-lines-on-jsonl", lambda w: ["prep", "lines:" + str(text_file(w, "x.jsonl", b'{"text": "a"}\n')),
                                       "--out", str(w.tmp / "o")], r"lines: reads text files.*drop the lines: prefix"),
    ("prep-verify-no-manifest", lambda w: ["prep", "--verify", str(w.tmp)], r"no manifest.json; run `smolds prep"),
    ("prep-verify-changed-shard", lambda w: ["prep", "--verify", str(changed_shard(w))],
     r"sha256 differs from the manifest.*re-create the dataset"),
    ("prep-damaged-manifest", lambda w: ["prep", "pydoc:topics", "--out", str(w.data_with("notjson", lambda m: [m])),
                                         "--vocab-size", "4096"], r"manifest.json is damaged.*--overwrite"),
    # --- train ---------------------------------------------------------------------------------------
    ("train-no-data", lambda w: train(w, data=w.tmp / "none"), r"holds no shards.*run `smolds prep"),
    ("train-data-is-file", lambda w: train(w, data=w.data / "manifest.json"), r"is a file; give the directory"),
    ("train-unfinished-prep", lambda w: train(w, data=_half(w)),
     r"unfinished prep run.*rerun the same `smolds prep`"),
    ("train-steps-zero", lambda w: train(w, "--train.steps", "0"), r"train.steps: must be a positive integer"),
    ("train-lr-negative", lambda w: train(w, "--train.lr", "-1"), r"train.lr: must be a number >= 0"),
    ("train-unknown-preset", lambda w: train(w, "--model.preset", "huge"), r"unknown preset 'huge'; choose one of"),
    ("train-seq-len", lambda w: train(w, "--train.seq_len", "100000"), r"longer than the model's context.*lower"),
    ("train-global-batch", lambda w: train(w, "--train.global_batch", "7"), r"global_batch 7 != .*fix one of them"),
    ("train-ep-size", lambda w: train(w, "--deepspeed.ep_size", "3"), r"ep_size 3 must divide"),
    ("train-schedule", lambda w: train(w, "--train.schedule", "linear"), r"train.schedule: unknown 'linear'; allowed"),
    ("train-wait-timeout", lambda w: train(w, "--train.wait_timeout", "0"), r"train.wait_timeout: must be a number"),
    ("train-unknown-key", lambda w: train(w, "--train.lr_max", "1"), r"train: unknown key\(s\) lr_max; known"),
    ("train-missing-config", lambda w: ["train", "--config", str(w.tmp / "no.yaml")], r"does not exist; see configs"),
    ("train-bad-yaml", lambda w: ["train", "--config", str(text_file(w, "bad.yaml", b"train: [\n"))],
     r"not valid YAML at line 2.*fix the file"),
    ("train-config-list", lambda w: ["train", "--config", str(text_file(w, "list.yaml", b"- 1\n"))],
     r"holds a list, not a mapping of sections"),
    ("train-model-vocab", lambda w: train(w, "--model.vocab_size", "1000"), r"has 4096 tokens but model.vocab_size"),
    ("train-mixture-missing", lambda w: train(w, "--data.dir", f"{{{w.data}: 0.5, {w.tmp / 'none'}: 0.5}}"),
     r"holds no shards.*run `smolds prep"),
    ("train-mixture-weight", lambda w: train(w, "--data.dir", f"{{{w.data}: 0}}"), r"weights must be finite and > 0"),
    ("train-rerun-without-resume", lambda w: ["train", *w.run_args(w.copy(w.run, "again"), "--train.steps", "2")],
     r"already holds a run; pass --resume"),
    ("train-resume-latest-missing", lambda w: resume(w, _latest_names(w, "step_0000009")),
     r"names 'step_0000009', which is not a complete checkpoint.*echo step_"),
    ("train-resume-other-seed", lambda w: resume(w, w.copy(w.run, "seed"), "--train.seed", "3"),
     r"seed=0, this reader has 3.*--train.init_from"),
    ("train-resume-other-model", lambda w: resume(w, w.copy(w.run, "model"), "--model.hidden_size", "64"),
     r"holds a run with a different model; choose another --train.out_dir"),
    ("train-cuda-without-gpu", lambda w: train(w, "--train.device", "cuda"), r"no GPU is visible; use --train.device"),
    # --- eval ----------------------------------------------------------------------------------------
    ("eval-missing-checkpoint", lambda w: ["eval", str(w.tmp / "nope"), "--data", str(w.data)],
     r"nope does not exist; check the path"),
    ("eval-seq-len-zero", lambda w: ["eval", str(w.ckpt), "--data", str(w.data), "--seq-len", "0"],
     r"--seq-len must be >= 1"),
    ("eval-seq-len-context", lambda w: ["eval", str(w.ckpt), "--data", str(w.data), "--seq-len", "100000"],
     r"exceeds the model's context.*pass --seq-len"),
    ("eval-no-data", lambda w: ["eval", str(w.ckpt)], r"not inside a training run.*pass --data"),
    ("eval-data-missing", lambda w: ["eval", str(w.ckpt), "--data", str(w.tmp / "none")],
     r"no manifest.json; run `smolds prep"),
    ("eval-mixture-yaml", lambda w: ["eval", str(w.ckpt), "--data", "{a: [}"],
     r"is not a YAML mapping.*write a mixture"),
    ("eval-device", lambda w: ["eval", str(w.ckpt), "--data", str(w.data), "--device", "cuda:7"],
     r"--device cuda:7: CUDA is not available on this machine; use --device cpu"),
    ("eval-shard-truncated", lambda w: ["eval", str(w.ckpt), "--data", str(truncated_shard(w)), "--seq-len", "32"],
     r"train_00000.bin is 1000 bytes, the manifest says .*smolds prep --verify"),
    # --- generate, chat ------------------------------------------------------------------------------
    ("generate-missing", lambda w: ["generate", str(w.tmp / "nope"), "hi"], r"nope does not exist; check the path"),
    ("generate-no-tokenizer", lambda w: ["generate", str(w.no_tok), "hi"], r"has no tokenizer.json"),
    ("generate-temperature", lambda w: ["generate", str(w.ckpt), "hi", "--temperature", "-1"],
     r"--temperature\) must be a finite number >= 0"),
    ("generate-max-new-tokens", lambda w: ["generate", str(w.ckpt), "hi", "--max-new-tokens", "-1"],
     r"--max-new-tokens\) must be >= 0, got -1"),
    ("generate-top-k", lambda w: ["generate", str(w.ckpt), "hi", "--top-k", "-1"], r"--top-k\) must be >= 0"),
    ("generate-top-p", lambda w: ["generate", str(w.ckpt), "hi", "--top-p", "2"], r"--top-p\) must be in \(0, 1\]"),
    ("generate-device", lambda w: ["generate", str(w.ckpt), "hi", "--device", "floppy"], r"is not a device; use cpu"),
    ("generate-prompt-too-long", lambda w: ["generate", str(w.ckpt), "x " * 2000], r"--truncate left"),
    ("chat-missing", lambda w: ["chat", str(w.tmp / "nope")], r"nope does not exist; check the path"),
    ("chat-no-tokenizer", lambda w: ["chat", str(w.no_tok)], r"has no tokenizer.json"),
    # --- monitor, curves -----------------------------------------------------------------------------
    ("monitor-no-metrics", lambda w: ["monitor", str(w.tmp)], r"no metrics.jsonl in .*pass a run's train.out_dir"),
    ("monitor-batches", lambda w: ["monitor", str(w.ckpt), "--data", str(w.data), "--batches", "0"],
     r"--batches must be >= 1"),
    ("monitor-dense-model", lambda w: ["monitor", str(w.dense), "--tokens", "hi"], r"has no MoE layers to monitor"),
    ("monitor-data-missing", lambda w: ["monitor", str(w.ckpt), "--data", str(w.tmp / "none")],
     r"no manifest.json; run `smolds prep"),
    ("monitor-missing-checkpoint", lambda w: ["monitor", str(w.tmp / "nope"), "--tokens", "hi"],
     r"nope does not exist; check the path"),
    ("curves-no-metrics", lambda w: ["curves", str(w.tmp / "nope"), "--out", str(w.tmp / "c.png")],
     r"nope has no metrics.jsonl; pass a training run"),
    # --- export-hf, import-hf, import-gguf ---------------------------------------------------------------
    ("export-missing", lambda w: ["export-hf", str(w.tmp / "nope"), str(w.tmp / "hf")],
     r"nope does not exist; check the path"),
    ("export-out-is-file", lambda w: ["export-hf", str(w.ckpt), str(text_file(w, "out.txt", b"x"))],
     r"is a file; give a directory path"),
    ("export-out-holds-files", lambda w: ["export-hf", str(w.ckpt), str(w.copy(w.run, "hfout"))],
     r"already exists and holds other files.*choose a new directory"),
    ("export-bad-repo-id", lambda w: ["export-hf", str(w.ckpt), str(w.tmp / "hf"), "--push-to-hub", "not a repo"],
     r"expected a repo id like"),
    ("export-over-source", lambda w: ["export-hf", str(w.ckpt), str(w.ckpt)], r"would replace the source"),
    ("import-hf-no-config", lambda w: ["import-hf", str(w.data), str(w.tmp / "imp")],
     r"has no config.json; pass a Hugging Face model directory"),
    ("import-gguf-missing", lambda w: ["import-gguf", str(w.tmp / "no.gguf"), str(w.tmp / "imp")], r"no.gguf"),
    ("import-gguf-not-gguf", lambda w: ["import-gguf", str(text_file(w, "x.gguf", b"not a gguf file")),
                                        str(w.tmp / "imp")], r"x.gguf is not a readable GGUF file.*pass a whole .gguf"),
]


def _half(w: World) -> Path:
    d = w.tmp / "half"
    d.mkdir()
    (d / "progress.json").write_text("{}")
    return d


def _latest_names(w: World, name: str) -> Path:
    run = w.copy(w.run, "latest")
    (run / "checkpoints" / "latest").write_text(name)
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("fuzz"))


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file's (size, mtime, inode): any write changes one of them (an atomic replace, the inode)."""
    return {str(p): (st.st_size, st.st_mtime_ns, st.st_ino) for p in sorted(root.rglob("*"))
            if p.is_file() and (st := p.stat())}


def test_fuzz_suite_is_large_enough():
    assert len(CASES) >= 40 + 17 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line(world, tmp_path, capsys, argv, expect):
    from smolds.cli import main

    world.tmp = tmp_path
    args = argv(world)  # builds the damaged copies
    before = {**tree(world.root), **tree(tmp_path)}
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors exit; none of these cases should get there
        code = e.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code not in (0, None), (out, err)
    assert "Traceback" not in out + err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"smolds {args[0]}: error: "), lines[0]
    assert re.search(expect, lines[0]), lines[0]
    after = {**tree(world.root), **tree(tmp_path)}
    assert {p: h for p, h in after.items() if p in before} == before, "a file that existed before was changed"
