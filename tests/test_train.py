"""The trainer in one process (DeepSpeed engine, gloo world of one): loss, resume, crashes, bad input."""

import json
from pathlib import Path

import pytest
import torch

from smolds.config import ConfigError
from smolds.train import TrainError, train
from smolds.train.checkpoint import latest_checkpoint
from smolds.train.config import RunConfig

TINY = ["--model.num_hidden_layers", "2", "--train.seq_len", "32", "--train.micro_batch", "4",
        "--train.warmup_steps", "2", "--train.eval_batches", "2", "--logging.wandb", "disabled",
        "--eval.sample_tokens", "4"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from data_prep import prepare_default

    d = tmp_path_factory.mktemp("data") / "pydoc"
    prepare_default(d)
    return d


def cfg(data_dir, out_dir, *overrides):
    return RunConfig.load(None, [*TINY, "--data.dir", str(data_dir), "--train.out_dir", str(out_dir), *overrides])


def train_losses(out_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train" and "loss" in r}


def test_short_default_run_learns_and_writes_everything(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    s = train(cfg(data_dir, out, "--train.steps", "40", "--train.log_every", "1", "--train.eval_every", "20",
                  "--train.checkpoint_every", "10", "--train.keep_checkpoints", "2", "--logging.wandb", "offline"))
    losses = train_losses(out)
    assert len(losses) == 40
    first, last = sum(list(losses.values())[:3]) / 3, sum(list(losses.values())[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert s["val_loss"] < first and set(s["samples"]) == {"The ", "def ", "In Python, "}
    ck = latest_checkpoint(out / "checkpoints")
    assert ck is not None and ck.name == "step_0000040"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_0000030", "step_0000040"]
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run missing"
    assert (ck / "consolidated" / "model.safetensors").is_file() and (ck / "consolidated" / "tokenizer.json").is_file()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert "maxvio" in train_rows[-1] and len(train_rows[-1]["expert_counts"]) == 1  # 1 MoE layer of 2
    assert any(r["kind"] == "eval" and "maxvio" in r for r in rows)
    from PIL import Image

    with Image.open(out / "curves.png") as im:  # redrawn at each eval; smolds.monitor.curves.FIGSIZE at 100 DPI
        assert im.size == (1350, 700)
    # `smolds eval` on the run dir (resolves checkpoints/latest -> consolidated) gives the trainer's last eval.
    from smolds.infer.evaluate import main as eval_main

    capsys.readouterr()
    assert eval_main([str(out), "--data", str(data_dir), "--seq-len", "32", "--batch-size", "4", "--batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(s["val_loss"], rel=1e-5) and "maxvio_per_layer" in result
    # With no flags it takes the run's own data, seq_len, micro-batch and eval_batches: the same number.
    assert eval_main([str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(s["val_loss"], rel=1e-5)


def test_resume_matches_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    import smolds.train.loop

    common = ["--train.steps", "12", "--train.log_every", "1", "--train.eval_every", "100",
              "--train.checkpoint_every", "100"]
    train(cfg(data_dir, tmp_path / "full", *common))
    # Interrupted: a preemption signal arrives during step 6; the run checkpoints there and returns.
    checks = {"n": 0}

    def preempt_at_6(self, device):  # the first check is the one before step 1
        checks["n"] += 1
        return checks["n"] == 7

    monkeypatch.setattr(smolds.train.loop.Preemption, "requested", preempt_at_6)
    s = train(cfg(data_dir, tmp_path / "part", *common))
    assert s["preempted"] and s["step"] == 6
    monkeypatch.undo()
    train(cfg(data_dir, tmp_path / "part", *common), resume=True)
    full, part = train_losses(tmp_path / "full"), train_losses(tmp_path / "part")
    assert sorted(part) == list(range(1, 13))
    assert {s: part[s] for s in range(7, 13)} == {s: full[s] for s in range(7, 13)}  # bit for bit
    # and so is the state it ends in: weights, router biases, Adam's moments and step
    from safetensors.torch import load_file

    a, b = (tmp_path / r / "checkpoints" / "step_0000012" for r in ("full", "part"))
    for f in ("consolidated/model.safetensors", "optimizer-00000-of-00001.safetensors"):
        x, y = load_file(str(a / f)), load_file(str(b / f))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f
    assert json.loads((a / "trainer_state.json").read_text())["optimizer"]["step"] == 12


def test_crash_while_checkpointing_keeps_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    import smolds.train.checkpoint as ckpt

    out = tmp_path / "run"
    common = ["--train.steps", "4", "--train.checkpoint_every", "2", "--train.eval_every", "100"]
    calls = {"n": 0}
    real = ckpt.write_atomic

    def crash_on_second_state(path, data):
        if path.name == ckpt.STATE_FILE:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk full (injected)")
        return real(path, data)

    monkeypatch.setattr(ckpt, "write_atomic", crash_on_second_state)
    with pytest.raises(TrainError, match=r"step 4: writing the checkpoint failed \(disk full \(injected\)\); "
                                         r"checkpoints/latest still names step_0000002: free space"):
        train(cfg(data_dir, out, *common))
    monkeypatch.setattr(ckpt, "write_atomic", real)
    assert latest_checkpoint(out / "checkpoints").name == "step_0000002"
    assert (out / "checkpoints" / "step_0000004.tmp").exists()  # the partial one, never pointed to
    s = train(cfg(data_dir, out, *common), resume=True)
    assert s["step"] == 4 and latest_checkpoint(out / "checkpoints").name == "step_0000004"
    assert not (out / "checkpoints" / "step_0000004.tmp").exists()


def test_nonfinite_losses_are_skipped_then_stop(data_dir, tmp_path, monkeypatch):
    from smolds.model.transformer import Transformer

    real = Transformer.forward
    calls = {"n": 0}

    def sometimes_nan(self, *a, **k):
        out = real(self, *a, **k)
        if self.training:
            calls["n"] += 1
            if calls["n"] in (3, 4) or calls["n"] >= 8:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", sometimes_nan)
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="3 non-finite losses in a row"):
        train(cfg(data_dir, out, "--train.steps", "20", "--train.max_nonfinite_steps", "3",
                  "--train.eval_every", "100", "--train.checkpoint_every", "5", "--train.log_every", "1"))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    skipped = [r["step"] for r in rows if r.get("skipped_nonfinite")]
    assert skipped == [3, 4, 8, 9, 10]
    # The checkpoint at step 5 was written from finite weights; nothing later was saved.
    assert latest_checkpoint(out / "checkpoints").name == "step_0000005"


def test_hybrid_linear_mla_model_trains_and_resumes(data_dir, tmp_path):
    common = ["--model.attention_pattern", "[linear,mla]", "--train.steps", "4", "--train.eval_every", "4",
              "--train.checkpoint_every", "2", "--eval.sample_tokens", "3"]
    out = tmp_path / "hybrid"
    s = train(cfg(data_dir, out, *common, "--train.steps", "2"))
    assert s["step"] == 2
    s = train(cfg(data_dir, out, *common), resume=True)
    assert s["step"] == 4 and s["val_loss"] < 9 and len(s["samples"]) == 3


def test_bf16_on_cpu_keeps_router_bias_fp32(data_dir, tmp_path):
    from safetensors.torch import load_file

    s = train(cfg(data_dir, tmp_path / "bf16", "--train.steps", "3", "--train.dtype", "bf16",
                  "--train.eval_every", "100"))
    assert s["last_loss"] == s["last_loss"]  # finite (not NaN)
    weights = load_file(str(Path(s["checkpoint"]) / "consolidated" / "model.safetensors"))
    bias = [v for k, v in weights.items() if k.endswith("e_score_correction_bias")]
    assert bias and all(b.dtype == torch.float32 for b in bias)


def test_compiled_blocks_train_like_eager(data_dir, tmp_path):
    """--train.compile true: the same losses and router biases as the eager run (compiled kernels only
    reorder float sums), and a consolidated checkpoint with the plain parameter names."""
    from safetensors.torch import load_file

    common = ["--model.num_hidden_layers", "3", "--train.steps", "4", "--train.eval_every", "4",
              "--train.log_every", "1", "--eval.sample_tokens", "2"]
    from torch._dynamo.utils import counters

    runs = {"false": train(cfg(data_dir, tmp_path / "false", *common, "--train.compile", "false"))}
    before = counters["stats"]["calls_captured"]  # dynamo's count of ops it put into graphs
    runs["true"] = train(cfg(data_dir, tmp_path / "true", *common, "--train.compile", "true"))
    assert counters["stats"]["calls_captured"] > before  # the blocks did run compiled (warm caches count too)
    eager, compiled = train_losses(tmp_path / "false"), train_losses(tmp_path / "true")
    assert len(eager) == 4 and compiled == pytest.approx(eager, rel=1e-4)
    assert runs["true"]["val_loss"] == pytest.approx(runs["false"]["val_loss"], rel=1e-4)
    a, b = (load_file(str(Path(runs[f]["checkpoint"]) / "consolidated" / "model.safetensors")) for f in ("false", "true"))
    assert a.keys() == b.keys() and any(k.endswith("e_score_correction_bias") for k in a)
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert all(diff[k] == 0 for k in a if k.endswith("e_score_correction_bias")), diff  # same token counts
    # AdamW normalizes each update, so float-reordering noise in tiny gradients shows as up to ~1% of a step
    assert max(diff.values()) < 1e-4, sorted(diff.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.parametrize("overrides, message", [
    (["--train.compile", "maybe"], "train.compile: must be true or false"),
    (["--train.compile", "true", "--train.activation_checkpointing", "true", "--deepspeed.ep_size", "2"],
     "ep_size > 1 is not supported"),
    (["--train.compile", "true", "--deepspeed.zero_stage", "3"], "not tested with ZeRO-3"),
    (["--model.preset", "huge"], "unknown preset 'huge'"),
    (["--train.seq_len", "4096"], "longer than the model's context"),
    (["--train.global_batch", "7"], "global_batch 7 != micro_batch 4"),
    (["--deepspeed.ep_size", "3"], "ep_size 3 must divide n_routed_experts 8"),
    (["--deepspeed.ep_size", "2"], "ep_size 2 must divide the number of ranks 1"),
    (["--deepspeed.zero_stage", "3"], "ZeRO-3"),
    (["--train.lr_max", "1"], "train: unknown key"),
    (["--train.schedule", "linear"], "train.schedule"),
])
def test_bad_run_inputs(data_dir, tmp_path, overrides, message):
    with pytest.raises((ConfigError, TrainError), match=message):
        train(cfg(data_dir, tmp_path / "x", *overrides))


def test_missing_shards_and_foreign_out_dir(data_dir, tmp_path):
    with pytest.raises(TrainError, match="holds no shards.*smolds prep"):
        train(cfg(tmp_path / "nothing", tmp_path / "x"))
    out = tmp_path / "run"
    train(cfg(data_dir, out, "--train.steps", "2", "--train.eval_every", "100"))
    with pytest.raises(TrainError, match="already holds a run; pass --resume"):
        train(cfg(data_dir, out, "--train.steps", "2"))
    with pytest.raises(TrainError, match="different model"):
        train(cfg(data_dir, out, "--train.steps", "4", "--model.hidden_size", "64"), resume=True)


def test_cli_reports_errors_in_one_line(capsys, tmp_path):
    from smolds.train import main

    assert main(["--train.out_dir", str(tmp_path), "--data.dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("smolds train: error:") and "smolds prep" in err[0]


def test_resume_at_another_zero_stage_and_init_from_starts_over(data_dir, tmp_path):
    from safetensors.torch import load_file

    common = ["--train.eval_every", "100", "--train.log_every", "1"]
    out = tmp_path / "run"
    train(cfg(data_dir, out, *common, "--train.steps", "2", "--deepspeed.zero_stage", "1"))
    # A checkpoint does not depend on the shape (tests/test_train_distributed.py changes ranks and ep_size):
    # ZeRO-1's flat partitions resume as ZeRO-2's, and the run goes on as one that ran at ZeRO-2 throughout.
    last = train(cfg(data_dir, out, *common, "--train.steps", "4", "--deepspeed.zero_stage", "2"), resume=True)
    train(cfg(data_dir, tmp_path / "zero2", *common, "--train.steps", "4", "--deepspeed.zero_stage", "2"))
    resumed, ref = train_losses(out), train_losses(tmp_path / "zero2")
    assert sorted(resumed) == [1, 2, 3, 4] and resumed == pytest.approx(ref, abs=2e-4)
    note = next(line for line in (out / "train.log").read_text().splitlines() if "another shape" in line)
    assert "(1 rank(s), ZeRO-1, ep_size 1 -> 1 rank(s), ZeRO-2, ep_size 1)" in note and "each rank continues" in note
    # --train.init_from: the new run starts from those weights (lr 0 keeps them, so its export equals them;
    # the router biases still take their one sign-rule step, so they are compared to within that step). A field
    # that steers training, not the weights, may change: here the bias update rate (tiny's is 1e-2), which the
    # biases' step shows.
    again = train(cfg(data_dir, tmp_path / "again", "--train.steps", "1", "--train.eval_every", "100",
                      "--train.lr", "0", "--deepspeed.zero_stage", "2", "--train.init_from", str(out),
                      "--model.bias_update_rate", "0.004"))
    a = load_file(str(Path(last["checkpoint"]) / "consolidated" / "model.safetensors"))
    b = load_file(str(Path(again["checkpoint"]) / "consolidated" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("e_score_correction_bias"):
            assert 0 < (a[k] - b[k]).abs().max() <= 0.004 + 1e-7, k  # this run's rate, not tiny's 1e-2
        else:
            assert torch.equal(a[k], b[k]), k
    with pytest.raises(TrainError, match="init_from.*differs from this run's.*hidden_size 128 there, 64 here"):
        train(cfg(data_dir, tmp_path / "other", "--train.steps", "1", "--model.hidden_size", "64",
                  "--train.init_from", str(out)))
    with pytest.raises(TrainError, match="train.init_from"):
        train(cfg(data_dir, tmp_path / "none", "--train.steps", "1", "--train.init_from", str(tmp_path / "missing")))


def test_damaged_checkpoints_are_refused_in_one_line(data_dir, tmp_path, capsys):
    """--resume never starts afresh over a run, nor dies in a traceback, when `latest` or its checkpoint is damaged."""
    from smolds.train import main

    out = tmp_path / "run"
    train(cfg(data_dir, out, "--train.steps", "2", "--train.eval_every", "100", "--train.checkpoint_every", "1"))
    root = out / "checkpoints"
    args = [*TINY, "--data.dir", str(data_dir), "--train.out_dir", str(out), "--train.steps", "3", "--resume"]

    def refused(message):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("smolds train: error:"), err
        assert message in err[0], err[0]
        assert sorted(p.name for p in root.glob("step_*")) == ["step_0000001", "step_0000002"]  # nothing new
        return err[0]

    (root / "latest").write_text("step_0000009")  # e.g. removed by hand: was a silent fresh start over the run
    assert "echo step_0000002 > " in refused("names 'step_0000009', which is not a complete checkpoint")
    (root / "latest").write_text("step_0000002")
    state = root / "step_0000002" / "trainer_state.json"
    good = state.read_bytes()
    state.write_bytes(good[:20])
    assert "echo step_0000001 > " in refused("trainer_state.json cannot be read")
    state.write_bytes(good)
    moments = root / "step_0000002" / "optimizer-00000-of-00001.safetensors"
    good = moments.read_bytes()
    moments.write_bytes(good[:1000])
    assert "echo step_0000001 > " in refused("checkpoint " + str(root / "step_0000002") + " cannot be loaded")
    moments.write_bytes(good)
    weights = root / "step_0000002" / "consolidated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert "echo step_0000001 > " in refused("checkpoint " + str(root / "step_0000002") + " cannot be loaded")
    (root / "latest").write_text("step_0000001")  # the way out the message gives
    assert train(cfg(data_dir, out, "--train.steps", "2", "--train.eval_every", "100"), resume=True)["step"] == 2
    # Another seed cannot continue the data position: the fix is a flag the trainer has.
    with pytest.raises(TrainError, match=r"seed=0, this reader has 1.*start a new run from the weights "
                                         r"\(--train.init_from .*step_0000002\)"):
        train(cfg(data_dir, out, "--train.steps", "3", "--train.seed", "1"), resume=True)


class _Payload:
    """Unpickled, this writes a marker file: what a file planted in a checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_resume_never_unpickles_a_checkpoint_file(data_dir, tmp_path, capsys):
    """#17: a pickle planted as DeepSpeed's model-states file ran on --resume (DeepSpeed loads its files with
    weights_only=False). Checkpoints are safetensors + JSON now, and DeepSpeed's files are never read."""
    import shutil

    from smolds.train import main

    marker, payload = tmp_path / "marker", tmp_path / "payload.pt"
    torch.save(_Payload(marker), payload)
    torch.load(payload, weights_only=False)  # the payload works: unpickled, it writes the marker
    assert marker.exists()
    marker.unlink()

    def plant(ck):  # where DeepSpeed's loader looked for it, and beside smolds' own files
        for where in (ck / ck.name, ck):
            where.mkdir(exist_ok=True)
            shutil.copy(payload, where / "mp_rank_00_model_states.pt")

    out = tmp_path / "run"
    train(cfg(data_dir, out, "--train.steps", "2", "--train.eval_every", "100"))
    plant(latest_checkpoint(out / "checkpoints"))
    assert train(cfg(data_dir, out, "--train.steps", "3", "--train.eval_every", "100"), resume=True)["step"] == 3
    assert not marker.exists()
    # A checkpoint of the older format (DeepSpeed's pickles; no "format" in its trainer state) is refused.
    ck = latest_checkpoint(out / "checkpoints")
    plant(ck)
    state = json.loads((ck / "trainer_state.json").read_text())
    del state["format"]
    (ck / "trainer_state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main([*TINY, "--data.dir", str(data_dir), "--train.out_dir", str(out), "--train.steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "older smolds format" in err[0] and f"--train.init_from {ck}" in err[0], err
    assert not marker.exists()


def test_broken_data_and_device_fail_before_training(data_dir, tmp_path):
    import shutil

    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    (broken / "tokenizer.json").unlink()  # was a traceback at the first eval, after the training steps
    with pytest.raises(TrainError, match=r"tokenizer.json is missing.*smolds prep --verify"):
        train(cfg(broken, tmp_path / "x"))
    with pytest.raises(TrainError, match=r"manifest.json is a file; give the directory .* e.g. --data.dir "):
        train(cfg(data_dir / "manifest.json", tmp_path / "x"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "progress.json").write_text("{}")
    with pytest.raises(TrainError, match=r"unfinished prep run.*rerun the same `smolds prep` command"):
        train(cfg(tmp_path / "half", tmp_path / "x"))
    if not torch.cuda.is_available():
        with pytest.raises(TrainError, match="train.device is cuda but no GPU is visible"):
            train(cfg(data_dir, tmp_path / "x", "--train.device", "cuda"))
    out = tmp_path / "run"
    (out).mkdir()
    (out / "run_config.yaml").write_text("train: [\n")
    with pytest.raises(TrainError, match=r"run_config.yaml cannot be read \(.*not valid YAML at line 2.*\); fix"):
        train(cfg(data_dir, out), resume=True)
