"""The run config: files, overrides and values that are wrong give one ConfigError naming the fix."""

import math

import pytest

from smolds.config import ConfigError
from smolds.train.config import RunConfig
from smolds.train.schedule import lr_at, schedule_warning


@pytest.mark.parametrize("overrides, message", [
    (["--train.lr", "-1"], r"train.lr: must be a number >= 0, got -1.0"),
    (["--train.lr", ".inf"], r"train.lr: must be a number >= 0"),
    (["--train.min_lr_ratio", "2"], r"train.min_lr_ratio: must be a number in \[0, 1\]"),
    (["--train.warmup_steps", "-5"], r"train.warmup_steps: must be an integer >= 0"),
    (["--train.beta2", "1"], r"train.beta2: must be a number in \[0, 1\)"),
    (["--train.eps", "0"], r"train.eps: must be a number > 0"),
    (["--eval.prompts", "hello"], r"eval.prompts: must be a list of strings, got 'hello'"),  # not 5 one-letter prompts
    (["--eval.sample_tokens", "-1"], r"eval.sample_tokens: must be an integer >= 0"),
    (["--deepspeed.config", "5"], r"deepspeed.config: must be a mapping"),
    (["--data.dir", "[a, b]"], r"data.dir: must be a directory or a \{directory: weight\} mapping"),
    (["--train.lr", "[1"], r"override --train.lr: '\[1' is not a valid YAML value"),
    (["--model"], r"override --model needs a value"),
])
def test_bad_values_and_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.load(None, overrides)


def test_good_values_still_load():
    c = RunConfig.load(None, ["--train.lr", "0", "--train.warmup_steps", "0", "--data.dir", "2024",
                              "--eval.prompts", "['a ', 'b ']", "--deepspeed.config", "{zero_optimization: {}}"])
    assert c.train.lr == 0 and c.data.dir == "2024" and c.eval.prompts == ["a ", "b "]


def test_model_override_takes_a_preset_or_a_file():
    assert RunConfig.load(None, ["--model", "smollm2-135m"]).model_config().num_hidden_layers == 30
    c = RunConfig.load(None, ["--model=tiny", "--model.num_hidden_layers", "3"])
    assert c.model == {"preset": "tiny", "num_hidden_layers": 3}


@pytest.mark.parametrize("text, message", [
    ("train: [\n", r"bad.yaml is not valid YAML at line 2"),
    ("- 1\n- 2\n", r"bad.yaml holds a list, not a mapping of sections"),
    ("train: 5\n", r"train: must be a mapping of fields, got 5"),
])
def test_bad_run_config_files(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        RunConfig.load(tmp_path / "bad.yaml")


def test_schedule_warning_when_warmup_overlaps_the_decay():
    assert schedule_warning(steps=400, warmup_steps=40) is None
    assert schedule_warning(steps=50, warmup_steps=40) is None  # decay starts exactly at the end of warmup
    w = schedule_warning(steps=20, warmup_steps=40)
    assert "warmup_steps 40 >= train.steps 20" in w and "at most 16" in w
    assert max(lr_at(s, lr=1.0, steps=20, warmup_steps=40) for s in range(20)) < 1.0  # what it warns about
    w = schedule_warning(steps=45, warmup_steps=40)
    assert "runs into the decay, which starts at step 36 of 45" in w
    assert schedule_warning(steps=30, warmup_steps=40, schedule="cosine") is not None
    assert schedule_warning(steps=50, warmup_steps=40, schedule="cosine") is None


def test_lr_schedules_by_hand():
    """WSD: linear warmup, flat, then linear decay over the last decay_fraction of the steps to lr *
    min_lr_ratio; cosine: warmup, then half a cosine to the same floor."""
    wsd = [lr_at(s, lr=1.0, steps=10, warmup_steps=2, decay_fraction=0.2, min_lr_ratio=0.1) for s in range(10)]
    assert wsd == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 0.55, 0.1])
    cos = [lr_at(s, lr=1.0, steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1) for s in range(10)]
    assert cos[:3] == pytest.approx([0.5, 1, 1])
    assert cos[6] == pytest.approx(0.55) and cos[9] == pytest.approx(0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8)))
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_at(5, lr=1.0, steps=10, warmup_steps=2, schedule="linear")
