"""Two ranks (torchrun, gloo) against one process with the same global batch: ZeRO-1, ZeRO-2, ZeRO-2 + EP 2.

One torchrun launch runs all distributed variants in sequence (process start-up and DeepSpeed import
dominate on 2 cores); the single-process oracle runs in a second launch with world size 1.
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
    single = _torchrun(1, tmp / "single.json", tmp / "data", tmp / "single",
                       [f"single:{COMMON} --train.micro_batch 8",
                        f"single_dense:{COMMON} --train.micro_batch 8 {DENSE}"])
    two = f"{COMMON} --train.micro_batch 4"
    dist = _torchrun(2, tmp / "dist.json", tmp / "data", tmp / "dist", [
        f"zero1:{two} --deepspeed.zero_stage 1",
        f"zero2:{two} --deepspeed.zero_stage 2",
        f"zero2_ep2:{two} --deepspeed.zero_stage 2 --deepspeed.ep_size 2",
        f"zero2_ep2_resumed:{two} --deepspeed.zero_stage 2 --deepspeed.ep_size 2 --preempt-at 4",
        f"zero2_ep2_resumed+resume:{two} --deepspeed.zero_stage 2 --deepspeed.ep_size 2",
        f"zero3_dense:{two} --deepspeed.zero_stage 3 {DENSE}",
        f"zero3_dense_resumed:{two} --deepspeed.zero_stage 3 {DENSE} --preempt-at 4",
        f"zero3_dense_resumed+resume:{two} --deepspeed.zero_stage 3 {DENSE}",
    ])
    return single[0], dist, tmp


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
    for step in list(full)[4:]:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


@pytest.mark.slow
def test_zero3_dense_follows_single_process_and_resumes(results):
    """ZeRO-3 partitions every parameter: losses, the gathered consolidated export and resume must not notice."""
    from smolds.pretrained import load_pretrained

    single, dist, tmp = results[0]["single_dense"], results[1], results[2]
    ref, got = single["losses"], dist[0]["zero3_dense"]["losses"]
    assert len(got) == STEPS and max(abs(ref[s] - got[s]) for s in ref) < TOLERANCE, (ref, got)
    resumed = dist[0]["zero3_dense_resumed+resume"]["losses"]
    for step in list(got)[4:]:
        assert resumed[step] == pytest.approx(got[step], abs=1e-6), step
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
