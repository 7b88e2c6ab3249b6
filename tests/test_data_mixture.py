"""MixedWindows: weighted proportions, determinism, the rank split, resume (also across a dp_size change),
the one-line errors, and a short training run on a mixture that logs per-source validation losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest

from data_prep import DataError, TokenWindows, prepare
from data_prep.mixture import MixedWindows, source_seed
from smolds.config import ConfigError
from smolds.train.config import RunConfig

T = 15  # seq_len; a window is 16 tokens
TOPICS = [topics[k] for k in sorted(topics)]
SHAKESPEARE = Path(__file__).resolve().parent.parent.parent / "shared" / "corpora" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """a: pydoc topics (its own BPE); b: another corpus with a's tokenizer; a2: a copy of a under another
    name (same size and tokens); other: a BPE of its own (another tokenizer)."""
    root = tmp_path_factory.mktemp("mixture")
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TOPICS[:8]))
    if SHAKESPEARE.is_file():  # ../shared/README.md; any other text does as well
        (root / "b.txt").write_text(SHAKESPEARE.read_text()[:8_000])
    else:
        (root / "b.txt").write_text("\n\n".join(TOPICS[8:11]))
    small = dict(shard_tokens=700, val_fraction=0.3, progress=False)
    prepare([str(root / "a.jsonl")], root / "a", vocab_size=500, **small)
    prepare([str(root / "b.txt")], root / "b", tokenizer=str(root / "a" / "tokenizer.json"), **small)
    prepare([str(root / "a.jsonl")], root / "other", vocab_size=400, **small)
    shutil.copytree(root / "a", root / "a2")
    return {name: root / name for name in ("a", "b", "a2", "other")}


def mixed(dirs, weights: dict[str, float], **kw) -> MixedWindows:
    return MixedWindows({str(dirs[k]): w for k, w in weights.items()}, seq_len=T, **kw)


def stream(reader, steps: int, batch_size: int) -> np.ndarray:
    return np.concatenate([reader.next_batch(batch_size)[0].numpy() for _ in range(steps)])


def test_proportions_follow_the_weights_within_a_window(dirs):
    mw = mixed(dirs, {"a": 0.7, "b": 0.3}, seed=1)
    assert mw.names == ["a", "b"] and mw.vocab_size == 500 and mw.eos_id == 0 and mw.seq_len == T
    assert mw.tokenizer_path.endswith("tokenizer.json") and len(mw) > 0
    for _ in range(150):  # 1,050 windows: both sources wrap into later epochs
        mw.next_batch(7)
        n = mw.consumed_windows
        assert all(abs(c - w * n) < 1 for c, w in zip(mw.consumed, mw.weights)), (n, mw.consumed)
    assert mw.consumed_windows == 1050 and all(c > s.num_windows for c, s in zip(mw.consumed, mw.sources))
    # Three sources, unnormalized weights, and many other weight sets: the rule alone.
    mw = mixed(dirs, {"a": 5, "b": 3, "a2": 2})
    assert mw.weights == pytest.approx([0.5, 0.3, 0.2])
    rng = np.random.default_rng(0)
    for _ in range(40):
        mw.weights = list(rng.dirichlet(np.ones(3) * 0.5))
        src, _ = mw.assign(500)
        counts = np.cumsum(np.eye(3)[src], axis=0)  # (n, S): windows per source after each position
        assert np.abs(counts - np.outer(np.arange(1, 501), mw.weights)).max() < 1


def test_rows_are_the_assigned_sources_windows_in_order(dirs):
    mw = mixed(dirs, {"a": 0.6, "b": 0.4}, seed=3)
    plain = [TokenWindows(d, seq_len=T, seed=source_seed(3, i)) for i, d in enumerate((dirs["a"], dirs["b"]))]
    for _ in range(3):
        src, local = mw.assign(10)
        x, y = mw.next_batch(10)
        for row, (s, p) in enumerate(zip(src, local)):
            ex, ey = plain[s]._batch(plain[s].window_ids(int(p), 1))
            assert (x[row] == ex[0]).all() and (y[row] == ey[0]).all()
        assert set(src.tolist()) == {0, 1}


def test_deterministic_and_seeded(dirs):
    a, b = stream(mixed(dirs, {"a": 0.7, "b": 0.3}), 8, 5), stream(mixed(dirs, {"a": 0.7, "b": 0.3}), 8, 5)
    assert (a == b).all()
    assert not (stream(mixed(dirs, {"a": 0.7, "b": 0.3}, seed=1), 8, 5) == a).all()
    # Two equal-sized sources (here: the same tokens) do not walk in lockstep: their seeds differ.
    twins = mixed(dirs, {"a": 0.5, "a2": 0.5})
    rows = stream(twins, 10, 4)
    assert not (rows[0::2] == rows[1::2]).all(axis=1).all()


def test_rank_slices_partition_the_single_rank_stream(dirs):
    weights, B, steps = {"a": 0.55, "b": 0.45}, 3, 12
    single = stream(mixed(dirs, weights, seed=2), steps, 2 * B)
    ranks = [mixed(dirs, weights, seed=2, dp_rank=r, dp_size=2) for r in range(2)]
    for k in range(steps):
        x0, x1 = (tw.next_batch(B)[0].numpy() for tw in ranks)
        assert (np.concatenate([x0, x1]) == single[k * 2 * B:(k + 1) * 2 * B]).all()
    assert ranks[0].consumed == ranks[1].consumed and sum(ranks[0].consumed) == steps * 2 * B


def test_resume_matches_uninterrupted_also_under_another_dp_size(dirs):
    weights = {"a": 0.7, "b": 0.3}
    full = stream(mixed(dirs, weights, seed=4), 10, 6)
    first = mixed(dirs, weights, seed=4)
    stream(first, 4, 6)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert [s["name"] for s in state["mixture"]] == ["a", "b"] and sum(s["consumed_windows"] for s in state["mixture"]) == 24
    again = mixed(dirs, weights, seed=4)
    again.load_state_dict(state)
    assert (stream(again, 6, 6) == full[24:]).all()
    for dp in (2, 3):  # the same global order on 2 or 3 ranks
        ranks = [mixed(dirs, weights, seed=4, dp_rank=r, dp_size=dp) for r in range(dp)]
        for tw in ranks:
            tw.load_state_dict(state)
        rows = [np.concatenate([tw.next_batch(6 // dp)[0].numpy() for tw in ranks]) for _ in range(6)]
        assert (np.concatenate(rows) == full[24:]).all()


def test_resume_with_another_mixture_is_refused(dirs):
    state = mixed(dirs, {"a": 0.7, "b": 0.3}).state_dict()
    for other, match in [({"a": 0.5, "b": 0.5}, r"mixture \[a 0\.7 .*b 0\.3 .*\], this run's is \[a 0\.5"),
                         ({"b": 0.3, "a": 0.7}, "same sources, order and weights"),
                         ({"a": 1}, "same sources")]:
        with pytest.raises(DataError, match=match):
            mixed(dirs, other).load_state_dict(state)
    mixed(dirs, {"a": 7, "b": 3}).load_state_dict(state)  # the same weights, normalized
    with pytest.raises(DataError, match="seq_len=15"):
        MixedWindows({str(dirs["a"]): 0.7, str(dirs["b"]): 0.3}, seq_len=7).load_state_dict(state)
    single = TokenWindows(dirs["a"], seq_len=T)
    with pytest.raises(DataError, match="for a single directory, this run reads a mixture"):
        mixed(dirs, {"a": 0.7, "b": 0.3}).load_state_dict(single.state_dict())
    with pytest.raises(DataError, match="for a mixture of directories"):
        single.load_state_dict(state)


def test_eval_per_source(dirs):
    mw = mixed(dirs, {"a": 0.7, "b": 0.3}, split="val")
    assert [len(s) for s in mw.sources] == [s.num_windows for s in mw.sources]
    batches = list(mw.iter_eval(4, max_batches=2))
    assert len(batches) == 4 and mw.consumed_windows == 0


@pytest.mark.parametrize("value, message", [
    ("{}", "data.dir: the mixture is empty"),
    ("{data/a: 0.7, data/b: -0.3}", "data.dir: the weight of data/b is -0.3; weights must be finite and > 0"),
    ("{data/a: 0}", "weights must be finite and > 0"),
    ("{data/a: .nan}", "weights must be finite and > 0"),
    ("{data/a: lots}", "data.dir: the weight of data/a is 'lots', not a number; give a positive number"),
    ("{data/a: [1]}", "not a number"),
])
def test_bad_weights_are_config_errors(value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.load(None, ["--data.dir", value])


def test_mixture_config_syntax(tmp_path):
    cfg = RunConfig.load(None, ["--data.dir", "{data/a: 3e-1, data/b: 7}"])  # YAML 1.1 reads 3e-1 as a string
    assert cfg.data.dir == {"data/a": "3e-1", "data/b": 7}
    cfg.to_yaml(tmp_path / "run.yaml")  # a run's saved config loads back the same
    assert RunConfig.load(tmp_path / "run.yaml").data.dir == cfg.data.dir
    assert RunConfig.load(None, ["--data.dir", "data/a"]).data.dir == "data/a"


def test_bad_sources(dirs, tmp_path):
    with pytest.raises(DataError, match=r"other was tokenized with another tokenizer than .*a \(tokenizer.json "
                                        r"sha256 .*--tokenizer .*a/tokenizer.json --overwrite"):
        mixed(dirs, {"a": 0.5, "other": 0.5})
    with pytest.raises(DataError, match="lists .*a twice"):
        MixedWindows({str(dirs["a"]): 1, str(dirs["a"]) + "/": 1, str(dirs["b"]): 1})
    from smolds.train import TrainError, train

    missing = RunConfig.load(None, ["--data.dir", f"{{{dirs['a']}: 0.5, {tmp_path / 'none'}: 0.5}}",
                                    "--train.out_dir", str(tmp_path / "run"), "--logging.wandb", "disabled"])
    with pytest.raises(TrainError, match=r"data.dir .*none holds no shards \(no manifest.json\); run `smolds prep"):
        train(missing)


def test_training_on_a_mixture_logs_per_source_val_loss(dirs, tmp_path, capsys):
    from smolds.train import main, train

    out = tmp_path / "run"
    args = ["--model.num_hidden_layers", "2", "--train.seq_len", "32", "--train.micro_batch", "4",
            "--train.warmup_steps", "1", "--train.eval_batches", "2", "--logging.wandb", "disabled",
            "--eval.sample_tokens", "2", "--train.steps", "3", "--train.eval_every", "3",
            "--train.checkpoint_every", "3", "--train.out_dir", str(out)]
    s = train(RunConfig.load(None, [*args, "--data.dir", f"{{{dirs['a']}: 0.75, {dirs['b']}: 0.25}}"]))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    ev = [r for r in rows if r["kind"] == "eval"][-1]
    assert ev["loss"] == pytest.approx(0.75 * ev["loss/a"] + 0.25 * ev["loss/b"]) == pytest.approx(s["val_loss"])
    assert ev["loss/a"] != ev["loss/b"] and "ppl" in ev and "maxvio" in ev
    assert "val loss" in (out / "train.log").read_text() and f"(a {ev['loss/a']:.4f}, b" in (out / "train.log").read_text()
    # Resuming with other weights stops in one line before any step.
    capsys.readouterr()
    assert main([*args, "--train.steps", "4", "--data.dir", f"{{{dirs['a']}: 0.5, {dirs['b']}: 0.5}}", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "same sources, order and weights" in err[0]
    # The run's last checkpoint through `smolds eval` and `smolds monitor` with the same mixture: the same
    # per-source losses as the trainer's eval (same windows: batch 4 x 2 batches per source, seq_len 32).
    from smolds.infer import evaluate
    from smolds.monitor import cli as monitor

    mixture = f"{{{dirs['a']}: 0.75, {dirs['b']}: 0.25}}"
    capsys.readouterr()
    assert evaluate.main([str(out), "--data", mixture, "--seq-len", "32", "--batch-size", "4", "--batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("loss", "loss/a", "loss/b"):
        assert result[key] == pytest.approx(ev[key], rel=1e-4), key
    assert monitor.main([str(out), "--data", mixture, "--seq-len", "32", "--batches", "2",
                         "--out", str(tmp_path / "mon")]) == 0
    assert "MaxVio" in capsys.readouterr().out and (tmp_path / "mon" / "routing_report.md").is_file()
    for bad, message in [("{" + str(dirs["a"]) + ": 0.5", "is not a YAML mapping"),
                         ("{" + str(dirs["a"]) + ": 0}", "weights must be finite and > 0")]:
        assert evaluate.main([str(out), "--data", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
