"""kill -9 at random moments, then the same command again: training (1 process and 2 ranks) ends with the
losses and weights of an uninterrupted run, bit for bit, and prep with the same bytes (#17).

The loop is bench/kill_loop.py's (its docstring says what is checked), run short: a tiny model, 6 steps, 5
kills at seeded random moments from the start of each run (startup included) to near its end, each run forked
from a helper that imported torch and DeepSpeed once (a fresh interpreter would spend most of the time
importing). `python bench/kill_loop.py --kills 50` is the long version, through torchrun.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("kill_loop", ROOT / "bench" / "kill_loop.py")
kill_loop = sys.modules["kill_loop"] = importlib.util.module_from_spec(spec)  # (dataclasses look it up)
spec.loader.exec_module(kill_loop)

KILLS = 5


@pytest.fixture(scope="module")
def launcher():
    fork = kill_loop.Fork()
    yield fork
    fork.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data_prep import prepare_default

    d = tmp_path_factory.mktemp("data") / "pydoc"
    prepare_default(d, progress=False)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_training_killed_at_random_resumes_bit_for_bit(launcher, data, tmp_path, ranks):
    r = kill_loop.train_loop(launcher, KILLS, ranks, tmp_path, seed=ranks, steps=6, data=data)
    assert r.kills == KILLS and r.resumes >= 1, r.line()
    assert r.rows_compared >= 6 and r.max_loss_diff == 0.0, r.line()
    assert r.checkpoints_loaded >= 1, r.line()


@pytest.mark.slow
def test_prep_killed_at_random_gives_the_same_bytes(launcher, tmp_path):
    r = kill_loop.prep_loop(launcher, KILLS, tmp_path, seed=0, sources=["pydoc:topics"], shard_tokens=4000)
    assert r.kills == KILLS and r.files_compared >= 10, r.line()
