"""Two ranks (torchrun, gloo) against one process with the same global batch: ZeRO-1, ZeRO-2, ZeRO-2 + EP 2;
and resumes across shapes (2 ranks ZeRO-2 EP 2 -> 1 rank ZeRO-0, -> 2 ranks ZeRO-1 EP 1; 1 rank -> 2 ranks).

Three torchrun launches run all variants (process start-up and DeepSpeed import dominate on 2 cores): one
process (the oracle, and the start of the 1 -> 2 resume), two ranks, then one process again (the end of the
2 -> 1 resume).
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "dist" / "train_driver.py"
STEPS = 8
# Same global batch (8 windows of 32 tokens): 2 ranks x 4, or 1 rank x 8. fp32 on CPU.
COMMON = (f"--model.num_hidden_layers 2 --train.seq_len 32 --train.steps {STEPS} --train.warmup_steps 2 "
          "--train.log_every 1 --train.eval_every 100 --train.checkpoint_every 100 --train.lr 3e-3")
DENSE = "--model.ffn_pattern [dense]"  # ZeRO-3 is for dense models (DeepSpeed refuses it with MoE)
TOLERANCE = 2e-4  # |loss difference| per step; reduction order differs across ranks, nothing else should


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, out_json, data_dir, root, runs, timeout=420):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_port()), str(DRIVER), str(out_json), str(data_dir), str(root), *runs]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks too, not only the launcher
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s (a hang):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return [json.loads(Path(f"{out_json}.rank{r}").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from data_prep import prepare_default

    tmp = tmp_path_factory.mktemp("dist")
    prepare_default(tmp / "data")
    one, two = f"{COMMON} --train.micro_batch 8", f"{COMMON} --train.micro_batch 4"
    mid = f"checkpoints/step_{STEPS // 2:07d}"  # the shape changes after this step
    single = _torchrun(1, tmp / "single.json", tmp / "data", tmp / "single",
                       [f"single:{one} --train.checkpoint_every {STEPS // 2} --dump",
                        f"single_dense:{one} {DENSE}"])
    dist = _torchrun(2, tmp / "dist.json", tmp / "data", tmp / "dist", [
        f"zero1:{two} --deepspeed.zero_stage 1",
        f"zero2:{two} --deepspeed.zero_stage 2",
        f"zero2_ep2:{two} --deepspeed.zero_stage 2 --deepspeed.ep_size 2 --train.checkpoint_every {STEPS // 2} --dump",
        f"to_zero1:{two} --deepspeed.zero_stage 1 --start-from {tmp / 'dist' / 'zero2_ep2' / mid} --dump",
        f"from_one:{two} --deepspeed.zero_stage 2 --deepspeed.ep_size 2 --start-from {tmp / 'single' / 'single' / mid} "
        "--dump",
        f"zero2_ep2_resumed:{two} --deepspeed.zero_stage 2 --deepspeed.ep_size 2 --preempt-at 4",
        f"zero2_ep2_resumed+resume:{two} --deepspeed.zero_stage 2 --deepspeed.ep_size 2",
        f"zero3_dense:{two} --deepspeed.zero_stage 3 {DENSE}",
        f"zero3_dense_resumed:{two} --deepspeed.zero_stage 3 {DENSE} --preempt-at 4",
        f"zero3_dense_resumed+resume:{two} --deepspeed.zero_stage 3 {DENSE}",
    ])
    back = _torchrun(1, tmp / "back.json", tmp / "data", tmp / "back", [
        f"to_one:{one} --start-from {tmp / 'dist' / 'zero2_ep2' / mid} --dump"])
    return {**single[0], **back[0]}, dist, tmp


@pytest.mark.slow
@pytest.mark.parametrize("run", ["zero1", "zero2", "zero2_ep2"])
def test_two_ranks_follow_single_process(results, run):
    single, dist = results[0]["single"], results[1]
    ref, got = single["losses"], dist[0][run]["losses"]
    assert len(ref) == STEPS and len(got) == STEPS
    diffs = [abs(ref[s] - got[s]) for s in ref]
    assert max(diffs) < TOLERANCE, list(zip(ref.values(), got.values()))
    # Gradient norms (before clipping) agree too, and clipping was active, so it is tested as well.
    ref_norm, got_norm = single["grad_norms"], dist[0][run]["grad_norms"]
    assert max(ref_norm.values()) > 1.0  # train.grad_clip
    for s in ref_norm:
        assert got_norm[s] == pytest.approx(ref_norm[s], rel=1e-3), (s, ref_norm, got_norm)
    # Every rank ends with the same router biases, equal to the single-process ones.
    b0, b1 = dist[0][run]["bias"], dist[1][run]["bias"]
    assert b0 == b1
    flat = lambda b: [v for layer in b for v in layer]
    assert flat(b0) == pytest.approx(flat(single["bias"]), abs=1e-7)


@pytest.mark.slow
def test_expert_parallel_resume_matches_uninterrupted(results):
    dist = results[1]
    full, resumed = dist[0]["zero2_ep2"]["losses"], dist[0]["zero2_ep2_resumed+resume"]["losses"]
    assert str(STEPS) in resumed
    assert {s: resumed[s] for s in list(full)[4:]} == dict(list(full.items())[4:])  # bit for bit


@pytest.mark.slow
def test_zero3_dense_follows_single_process_and_resumes(results):
    """ZeRO-3 partitions every parameter: losses, the gathered consolidated export and resume must not notice."""
    from smolds.pretrained import load_pretrained

    single, dist, tmp = results[0]["single_dense"], results[1], results[2]
    ref, got = single["losses"], dist[0]["zero3_dense"]["losses"]
    assert len(got) == STEPS and max(abs(ref[s] - got[s]) for s in ref) < TOLERANCE, (ref, got)
    resumed = dist[0]["zero3_dense_resumed+resume"]["losses"]
    assert {s: resumed[s] for s in list(got)[4:]} == dict(list(got.items())[4:])  # bit for bit
    # The consolidated copy holds the whole model (gathered from both ranks' partitions), equal to one process's.
    final = f"checkpoints/step_{STEPS:07d}/consolidated"
    a, _ = load_pretrained(tmp / "single" / "single_dense" / final)
    b, _ = load_pretrained(tmp / "dist" / "zero3_dense" / final)
    ids = torch.randint(0, a.config.vocab_size, (2, 16))
    torch.testing.assert_close(b(ids).logits, a(ids).logits, atol=2e-3, rtol=0)


def test_rank0_corpus_failure_stops_every_rank(tmp_path):
    """Rank 0 prepares the default corpus while the others wait; if it fails, they must fail too, not hang."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           str(ROOT / "tests" / "dist" / "prep_failure.py"), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out.rank0").read_text() == f"OSError: disk full while writing {Path('data/pydoc-bpe4096')}"
    assert (tmp_path / "out.rank1").read_text().startswith("TrainError: rank 0 could not prepare the default corpus")


def _whole(tmp: Path, run: str, event: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Every parameter's fp32 master weight and Adam moments, whole, put together from the fragments the
    ranks of `run` held at `event` (tests/dist/train_driver.py --dump), and Adam's step counts."""
    from safetensors import safe_open

    whole, steps = {}, set()
    for path in sorted(tmp.glob(f"*.json.{run}.{event}.rank*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            where = json.loads(f.metadata()["fragments"])
            steps.update(json.loads(f.metadata()["steps"]))
            for name, w in where.items():
                shape = [w["local_shape"][0] * w["ep_size"], *w["local_shape"][1:]]
                for key in ("fp32", "exp_avg", "exp_avg_sq"):
                    full = whole.setdefault(f"{name}.{key}", torch.full(shape, float("nan")))
                    mine = full if w["ep_rank"] < 0 else full[w["ep_rank"] * w["local_shape"][0]:][:w["local_shape"][0]]
                    frag = f.get_tensor(f"{name}.{key}")
                    mine.view(-1)[w["start"]:w["start"] + frag.numel()] = frag
    assert whole, f"no dumps of {run}.{event}"
    holes = [k for k, v in whole.items() if v.isnan().any()]
    assert not holes, f"{run}.{event}: no rank held part of {holes[:3]}"
    return whole, sorted(steps)


@pytest.mark.slow
@pytest.mark.parametrize("source, launch, run, oracle", [
    ("zero2_ep2", "back", "to_one", ["single", "zero2_ep2"]),  # 2 ranks ZeRO-2 EP 2 -> 1 rank ZeRO-0
    ("zero2_ep2", "dist", "to_zero1", ["zero1"]),  # -> 2 ranks ZeRO-1 EP 1
    ("single", "dist", "from_one", ["zero2_ep2", "single"]),  # 1 rank ZeRO-0 -> 2 ranks ZeRO-2 EP 2
])
def test_resume_at_another_shape(results, source, launch, run, oracle):
    """A checkpoint written at one shape continues at another: Adam's moments, master weights and step are
    exactly the ones the writing ranks held (assembled from DeepSpeed's own partitions on both sides), and
    the losses follow an uninterrupted run at the new shape (and the old) within the distributed tolerance."""
    single, dist, tmp = results
    runs = {**dist[0], **single}
    before, src_steps = _whole(tmp, source, f"save{STEPS // 2}")
    after, steps = _whole(tmp, run, "load")
    assert src_steps == steps == [STEPS // 2]
    assert before.keys() == after.keys()
    unequal = [k for k in before if not torch.equal(before[k], after[k])]
    assert not unequal, unequal[:5]
    got = runs[run]["losses"]
    assert sorted(got, key=int) == [str(s) for s in range(STEPS // 2 + 1, STEPS + 1)]  # (JSON keys)
    for ref in oracle:
        diffs = {s: abs(got[s] - runs[ref]["losses"][s]) for s in got}
        assert max(diffs.values()) < TOLERANCE, (ref, diffs)
    log = (tmp / launch / run / "train.log").read_text()
    assert "resumed at another shape" in log and "carry over exactly" in log


@pytest.mark.slow
def test_ckpt_info_names_what_a_checkpoint_holds(results, capsys, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from smolds.train.ckpt_cli import main

    tmp = results[2]
    assert main(["info", str(tmp / "dist" / "zero2_ep2")]) == 0  # the run dir: its latest
    out = capsys.readouterr().out
    assert f"step_{STEPS:07d}" in out and "written by 2 rank(s), ZeRO-2, ep_size 2" in out
    assert "optimizer-00000-of-00002.safetensors" in out and "optimizer-00001-of-00002.safetensors" in out
    step = tmp / "dist" / "zero2_ep2" / f"checkpoints/step_{STEPS:07d}"
    sizes = [(step / f"optimizer-0000{r}-of-00002.safetensors").stat().st_size for r in range(2)]
    assert max(sizes) < 1.5 * min(sizes), sizes  # each rank writes about half of the moments
    # A damaged or foreign file is named in one line (the same check `--resume` makes before it loads).
    bad = tmp_path / step.name
    shutil.copytree(step, bad)
    shard = bad / "optimizer-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(shard))
    for damage, message in ((lambda: None, f"does not fit this model ({dropped}: missing)"),
                            (lambda: shard.write_bytes(shard.read_bytes()[:-100]), "cannot be loaded")):
        damage()
        capsys.readouterr()
        assert main(["info", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
