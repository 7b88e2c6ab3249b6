"""`smolds monitor` end to end: a run trained by smolds.train, a checkpoint over evaluation shards, and the
rows the live monitor writes (read back exactly, while being written with --follow, across a resume)."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from smolds.model.router import RoutingStats, routers
from smolds.model.transformer import Transformer
from smolds.monitor import checkpoint_report, run_report
from smolds.monitor.cli import main as monitor_main
from smolds.monitor.live import RoutingMonitor
from smolds.monitor.stats import routing_stats
from smolds.train.config import RunConfig
from smolds.train.metrics import MetricsLogger


def png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_prep import prepare_default

    d = tmp_path_factory.mktemp("monitor_data") / "pydoc"
    prepare_default(d)
    return d


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    from smolds.train import train

    out = tmp_path_factory.mktemp("monitor_run") / "run"
    train(RunConfig.load(None, [
        "--model.num_hidden_layers", "3", "--train.seq_len", "32", "--train.micro_batch", "4",
        "--train.steps", "4", "--train.warmup_steps", "1", "--train.log_every", "1", "--train.eval_every", "4",
        "--train.eval_batches", "1", "--eval.sample_tokens", "1", "--logging.wandb", "disabled",
        "--data.dir", str(data_dir), "--train.out_dir", str(out)]))
    return out


@pytest.mark.slow
def test_cli_on_a_trained_run(trained_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert monitor_main([str(trained_run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "last logged step 4 of 4" in text and "MaxVio" in text
    table = text[text.index("layer  share min"):].splitlines()
    assert [line.split()[0] for line in table[1:3]] == ["1", "2"]  # the model's MoE layers
    for name in ("load_heatmap.png", "maxvio.png", "bias.png"):
        assert (out / name).is_file()
    assert png_size(out / "load_heatmap.png") == (900, 500) and png_size(out / "maxvio.png") == (900, 450)
    assert png_size(out / "bias.png") == (600, 275)  # 2 layer panels + title band
    md = (out / "routing_report.md").read_text()
    assert "](load_heatmap.png)" in md and "| layer |" in md
    # A directory without metrics.jsonl (and no --data / --tokens) is a clear error.
    assert monitor_main([str(tmp_path)]) == 2 and "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_on_a_checkpoint_with_data_and_tokens(trained_run, data_dir, tmp_path, capsys):
    from data_prep import TokenWindows
    from smolds.infer.evaluate import evaluate
    from smolds.pretrained import load_pretrained

    out = tmp_path / "ck"
    args = [str(trained_run), "--data", str(data_dir), "--seq-len", "32", "--batch-size", "4", "--batches", "2",
            "--out", str(out), "--tokens", "def f(x): return x"]
    assert monitor_main(args) == 0
    text = capsys.readouterr().out
    assert "MaxVio_global" in text and "256 evaluation tokens" in text  # 2 batches x 4 windows x 32
    assert png_size(out / "maxvio.png") == (900, 450) and png_size(out / "bias.png") == (600, 275)
    routes = json.loads((out / "routing_tokens.json").read_text())
    assert [r["layer"] for r in routes["layers"]] == [1, 2]
    assert all(len(e) == 2 for r in routes["layers"] for e in r["experts"]) and len(routes["tokens"]) == len(routes["ids"])
    # MaxVio_global agrees with the trainer's evaluate() on the same batches.
    model, _ = load_pretrained(trained_run)
    data = TokenWindows(data_dir, split="val", seq_len=32)
    res = checkpoint_report.route_batches(model, data.iter_eval(4, 2))
    s = routing_stats(res["counts"])
    ev = evaluate(model, data, 2, 4, torch.device("cpu"))
    assert s["maxvio_per_layer"] == pytest.approx(ev["maxvio_per_layer"], rel=1e-6)
    assert res["loss"] == pytest.approx(ev["loss"], rel=1e-5) and res["counts"].sum() == 256 * 2 * 2  # K=2, 2 layers


def simulated_run(out: Path, steps: int, log_every: int, start: int = 0, model=None, seed: int = 0):
    """The trainer's loop without DeepSpeed or optimizer (forward passes in training mode, the loss-free bias
    update), as smolds/train/loop.py calls them.
    Returns (model, sum of every step's all-reduced counts)."""
    cfg = RunConfig.load(None, ["--model.num_hidden_layers", "3", "--model.vocab_size", "256", "--train.steps", str(steps),
                                "--train.log_every", str(log_every)])
    model_cfg = cfg.model_config()
    if model is None:
        torch.manual_seed(seed)
        model = Transformer(model_cfg).train()
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "run_config.yaml")
    log = MetricsLogger(out, True, steps, start, "disabled")
    mon = RoutingMonitor.for_model(model, ep_size=2, window=3, log_images_every=0)
    total = 0
    gen = torch.Generator().manual_seed(seed + start)
    for step in range(start, steps):
        x = torch.randint(0, 64, (2, 16), generator=gen)  # a small vocabulary: a skewed load
        with torch.no_grad():  # routing is all the monitor sees; the weights need not move
            loss = model(x, targets=x).loss
        routed = RoutingStats(model, model_cfg).end_step()
        mon.update(routed)
        total = total + routed.counts
        if (step + 1) % log_every == 0 or step == start or step + 1 == steps:
            rep = mon.report(step + 1)
            log.log(step + 1, {"loss": float(loss), **rep.row})
            for w in rep.warnings:
                log.log_text(f"step {step + 1}: {w}")
    log.close()
    return model, total


def test_rows_written_live_read_back_exactly(tmp_path, capsys):
    run = tmp_path / "run"
    model, total = simulated_run(run, steps=7, log_every=3)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 3, 6, 7] and [r["routing_steps"] for r in rows] == [1, 2, 3, 1]
    assert {"maxvio", "cv", "router_entropy", "dead_experts", "bias_change", "ep_imbalance",
            "tokens_per_ep_rank", "expert_counts", "router_bias"} <= set(rows[-1])
    bias = torch.stack([r.e_score_correction_bias for r in routers(model)]).double()
    torch.testing.assert_close(torch.tensor(rows[-1]["router_bias"], dtype=torch.float64), bias, rtol=1e-6, atol=0)
    log = run_report.RunLog(run)
    assert log.poll() == 4
    s = run_report.summarize_run(log, window=100, ep_size=2)
    assert s["steps_covered"] == 7
    total = total.double()
    torch.testing.assert_close(torch.tensor(s["load_share"], dtype=torch.float64), total / total.sum(-1, keepdim=True),
                               rtol=1e-12, atol=0)
    assert s["tokens_per_ep_rank"] == total.view(2, 2, 4).sum(-1).tolist()
    assert monitor_main([str(run), "--out", str(tmp_path / "rep"), "--window", "100"]) == 0
    assert "7 steps" in capsys.readouterr().out


def test_follow_reads_a_growing_log_and_stops_when_the_run_ends(tmp_path, capsys):
    src, run = tmp_path / "src", tmp_path / "run"
    simulated_run(src, steps=4, log_every=1)
    lines = (src / "metrics.jsonl").read_text().splitlines(keepends=True)
    run.mkdir()
    (run / "run_config.yaml").write_text((src / "run_config.yaml").read_text())
    (run / "metrics.jsonl").write_text("".join(lines[:2]) + lines[2][:10])  # a half-written line

    def writer():  # the rest of the log, once the monitor has shown the first part
        deadline = time.time() + 60
        while not (tmp_path / "rep" / "routing_report.md").exists() and time.time() < deadline:
            time.sleep(0.05)
        with open(run / "metrics.jsonl", "a") as f:
            f.write(lines[2][10:] + "".join(lines[3:]))

    t = threading.Thread(target=writer)
    t.start()
    rc = monitor_main([str(run), "--follow", "--interval", "0.1", "--out", str(tmp_path / "rep")])
    t.join()
    out = capsys.readouterr().out
    assert rc == 0 and "last logged step 2 of 4" in out and "last logged step 4 of 4" in out


def test_follow_started_before_the_trainer_reads_its_config_and_stops(tmp_path, capsys):
    """`smolds monitor RUN --follow` launched together with the trainer: run_config.yaml appears after the
    monitor started; it must still learn the planned steps (and stop) and the MoE layer indices."""
    src, run = tmp_path / "src", tmp_path / "run"
    simulated_run(src, steps=4, log_every=1)

    def writer():
        time.sleep(0.3)
        run.mkdir()
        (run / "run_config.yaml").write_text((src / "run_config.yaml").read_text())
        (run / "metrics.jsonl").write_text((src / "metrics.jsonl").read_text())

    t = threading.Thread(target=writer)
    t.start()
    result = {}
    follower = threading.Thread(target=lambda: result.setdefault("rc", monitor_main(
        [str(run), "--follow", "--interval", "0.1", "--out", str(tmp_path / "rep")])), daemon=True)
    follower.start()
    follower.join(timeout=60)
    t.join()
    assert not follower.is_alive(), "--follow never stopped: the planned steps were never read"
    out = capsys.readouterr().out
    layer_ids = run_report.run_info(run).layer_ids
    assert result["rc"] == 0 and "last logged step 4 of 4" in out
    assert [int(line.split()[0]) for line in out.splitlines()[-len(layer_ids) - 1:-1]] == layer_ids


def test_a_resumed_run_keeps_one_row_per_step(tmp_path):
    run = tmp_path / "run"
    simulated_run(run, steps=4, log_every=1)
    with open(run / "metrics.jsonl", "a") as f:  # resumed from a step-2 checkpoint: steps 3.. are re-logged
        f.write(json.dumps({"kind": "train", "step": 3, "expert_counts": [[1] * 8] * 2, "router_bias": [[0.0] * 8] * 2,
                            "routing_steps": 1}) + "\n")
    log = run_report.RunLog(run)
    log.poll()
    assert sorted(log.rows) == [1, 2, 3] and log.rows[3].counts.sum() == 16


def test_bad_numbers_for_a_checkpoint_are_one_line_errors(tmp_path, capsys):
    from smolds.pretrained import save_pretrained

    cfg = RunConfig.load(None, ["--model.num_hidden_layers", "3", "--model.vocab_size", "256"]).model_config()
    save_pretrained(Transformer(cfg).eval(), tmp_path / "ck")
    for flags, message in [(["--batches", "0"], "--batches must be >= 1, got 0"),
                           (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                           (["--seq-len", str(cfg.max_position_embeddings + 1)], "exceeds the model's context")]:
        assert monitor_main([str(tmp_path / "ck"), "--data", "anything", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
