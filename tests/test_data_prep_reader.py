"""TokenWindows: window contents, the rank split, epochs, resume (also across a dp_size change), eval."""

from __future__ import annotations

import json
from pydoc_data.topics import topics

import numpy as np
import pytest

from data_prep import DataError, TokenWindows, prepare
from data_prep.reader import _epoch_key, permute

T = 31  # seq_len; a window is 32 tokens


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small prepared corpus with 500-token shards, so windows cross shard ends."""
    root = tmp_path_factory.mktemp("reader")
    with open(root / "docs.jsonl", "w") as f:
        for name in sorted(topics)[:8]:
            f.write(json.dumps({"text": topics[name]}) + "\n")
    out = root / "data"
    m = prepare([str(root / "docs.jsonl")], out, vocab_size=500, shard_tokens=500, val_fraction=0.3, progress=False)
    stream = np.concatenate([np.fromfile(out / s["file"], dtype=m["dtype"]) for s in m["splits"]["train"]["shards"]])
    return out, stream.astype(np.int64)


def test_windows_are_shifted_pairs_of_the_stream(data):
    out, stream = data
    tw = TokenWindows(out, seq_len=T, seed=3)
    assert tw.num_windows == len(stream) // (T + 1) and len(tw) == tw.num_windows
    assert tw.vocab_size == 500 and tw.eos_id == 0 and tw.tokenizer_path.endswith("tokenizer.json")
    ids = tw.window_ids(0, 8)
    x, y = tw.next_batch(8)
    assert x.shape == y.shape == (8, T) and str(x.dtype) == "torch.int64"
    for row, w in enumerate(ids):
        window = stream[w * (T + 1):(w + 1) * (T + 1)]
        assert x[row].tolist() == window[:-1].tolist() and y[row].tolist() == window[1:].tolist()
    assert sorted(ids.tolist()) != list(range(8))  # shuffled


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 1000, 4099):
        for seed in (0, 1):
            p = permute(np.arange(n), n, _epoch_key(seed, 0))
            assert sorted(p.tolist()) == list(range(n))
    a, b = permute(np.arange(1000), 1000, _epoch_key(0, 0)), permute(np.arange(1000), 1000, _epoch_key(0, 1))
    assert (a != b).mean() > 0.9 and abs(np.corrcoef(a, np.arange(1000))[0, 1]) < 0.2


def test_ranks_cover_every_window_once_per_epoch(data):
    out, stream = data
    dp, B = 3, 2
    ranks = [TokenWindows(out, seq_len=T, seed=7, dp_rank=r, dp_size=dp) for r in range(dp)]
    n = ranks[0].num_windows
    assert len(ranks[0]) == n // dp
    steps = -(-n // (B * dp))  # enough global batches to pass the end of epoch 0
    seen = []  # (position, window) of every row every rank took
    for k in range(steps):
        for r, tw in enumerate(ranks):
            start = k * B * dp + r * B
            ids = tw.window_ids(start, B)
            x, _ = tw.next_batch(B)
            assert x[:, 0].tolist() == stream[ids * (T + 1)].tolist()  # next_batch reads those windows
            seen += list(zip(range(start, start + B), ids.tolist()))
    epoch0 = [w for pos, w in seen if pos < n]
    assert sorted(epoch0) == list(range(n))  # every window exactly once across ranks
    epoch1 = [w for pos, w in seen if pos >= n]
    assert epoch1 and epoch1 != epoch0[:len(epoch1)]  # a new order after the wrap
    assert all(tw.consumed_windows == steps * B * dp for tw in ranks)


def test_resume_and_dp_size_change(data):
    out, _ = data
    a = [TokenWindows(out, seq_len=T, seed=1, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(5):
        for tw in a:
            tw.next_batch(3)
    state = json.loads(json.dumps(a[0].state_dict()))  # what a checkpoint stores
    assert state["consumed_windows"] == 5 * 3 * 2

    again = TokenWindows(out, seq_len=T, seed=1, dp_rank=1, dp_size=2)
    again.load_state_dict(state)
    x1, y1 = a[1].next_batch(3)
    assert all((u == v).all() for u, v in zip(again.next_batch(3), (x1, y1)))

    single = TokenWindows(out, seq_len=T, seed=1)  # the same run continued on one rank: same global order
    single.load_state_dict(state)
    x, y = single.next_batch(6)
    x0, y0 = a[0].next_batch(3)
    assert (x[:3] == x0).all() and (x[3:] == x1).all() and (y[:3] == y0).all() and (y[3:] == y1).all()

    with pytest.raises(DataError, match="seq_len=31.*same dataset, split, seq_len and seed"):
        TokenWindows(out, seq_len=15, seed=1).load_state_dict(state)


def test_eval_is_fixed_disjoint_and_equal_across_ranks(data):
    out, _ = data
    ranks = [TokenWindows(out, split="val", seq_len=T, dp_rank=r, dp_size=3) for r in range(3)]
    batches = [list(tw.iter_eval(batch_size=4)) for tw in ranks]
    assert len({len(b) for b in batches}) == 1  # same number of batches on every rank
    rows = [tuple(row.tolist()) for b in batches for x, _ in b for row in x]
    assert len(rows) == 3 * len(ranks[0]) and len(set(rows)) == len(rows)
    again = [x for x, _ in ranks[0].iter_eval(batch_size=4)]
    assert all((u == v).all() for u, v in zip(again, [x for x, _ in batches[0]]))
    assert len(list(ranks[0].iter_eval(batch_size=1, max_batches=2))) == 2
    assert ranks[0].consumed_windows == 0


def test_reader_errors(data, tmp_path):
    out, stream = data
    with pytest.raises(DataError, match=r"fewer than dp_size = 1; lower seq_len or prep more data"):
        TokenWindows(out, seq_len=len(stream))
    with pytest.raises(DataError, match="split 'test' does not exist"):
        TokenWindows(out, split="test")
    with pytest.raises(DataError, match="no manifest.json; run `smolds prep"):
        TokenWindows(tmp_path)
