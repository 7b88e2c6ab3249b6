"""`smolds plan` held to what real CPU runs of the trainer hold, per rank, within 10%.

Runs: 2 optimizer steps of 2 micro-batches each, tiny and a mid-size MoE (bench/presets.py's `mid` widths, 3
layers, the data's 4096-token vocabulary: 9.25M parameters), 1 and 2 ranks (gloo), ZeRO 0-2, ep_size 1-2, fp32
and bf16 (DeepSpeed's bf16 path runs on CPU).
What is measured, and why it stands for GPU memory (process RSS does not: glibc keeps or returns freed pages
at its own pace, and DeepSpeed's untouched 1-2 GB gradient bucket never becomes resident on CPU):
- held state: the distinct tensor storages the engine holds after the last backward of a step (its module's
  parameters, gradients and buffers, and every tensor reachable from its optimizer: flat buffers, fp32
  partitions, Adam moments, gradient partitions, buckets); on a GPU torch.cuda.memory_allocated counts them;
- activations: the distinct non-parameter storages autograd saves during a forward (saved-tensor hooks; with
  activation checkpointing, the blocks' inputs the checkpoints keep), the largest micro-batch;
- peak (one rank): the allocator's high-water mark over the training steps, from torch.profiler's memory
  events (every tensor allocation and free on the main thread: the CPU's torch.cuda.max_memory_allocated).
  With two ranks gloo's threads free tensors the profiler does not see, so the peak is taken on one rank;
- checkpoint: the bytes of the files each rank wrote, from disk (`optimizer-R-of-W.safetensors` is rank R's,
  the rest rank 0's);
- all-to-all: the bytes each rank sends to the others in the forward dispatch and combine (the backward
  sends the same again, by construction of the autograd all-to-all).

This file is also the measuring driver under torchrun:
    python -m torch.distributed.run --nproc_per_node 2 tests/test_plan.py OUT_JSON NAME:OVERRIDES...
"""

from __future__ import annotations

import gc
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.10
MID = ("{preset: tiny, vocab_size: 4096, hidden_size: 384, num_hidden_layers: 3, max_position_embeddings: 2048, "
       "rope_theta: 10000.0, num_attention_heads: 6, q_lora_rank: null, kv_lora_rank: 96, qk_nope_head_dim: 64, "
       "qk_rope_head_dim: 32, v_head_dim: 64, intermediate_size: 768, n_routed_experts: 8, n_shared_experts: 1, "
       "moe_intermediate_size: 256, num_experts_per_tok: 2, n_group: 1, topk_group: 1, first_k_dense_replace: 1}")
COMMON = ("--train.steps 2 --train.grad_accum 2 --train.warmup_steps 1 --train.log_every 1 --train.eval_every 100 "
          "--train.eval_batches 1 --train.checkpoint_every 100 --eval.sample_tokens 0 --logging.wandb disabled")
# DeepSpeed's default gradient bucket (5e8 elements, 1-2 GB) would swamp every other term of these small runs
BUCKET = "--deepspeed.config '{zero_optimization: {reduce_bucket_size: 2000000}}'"
TINY = "--train.micro_batch 4 --train.seq_len 128"
MID_RUN = f"--model '{MID}' --train.micro_batch 1 --train.seq_len 64"
ONE_RANK = {  # in this process, profiled
    "tiny_z0_fp32": f"{TINY} --train.dtype fp32",
    "mid_z2_bf16_ckpt": f"{MID_RUN} --train.dtype bf16 --deepspeed.zero_stage 2 --train.activation_checkpointing true "
                        f"{BUCKET}",
}
TWO_RANKS = {  # one torchrun launch
    "tiny_z1_ep2_fp32": f"{TINY} --train.dtype fp32 --deepspeed.zero_stage 1 --deepspeed.ep_size 2 {BUCKET}",
    "mid_z0_ep2_bf16": f"{MID_RUN} --train.dtype bf16 --deepspeed.ep_size 2",
}


# ------------------------------------------------------------------------------------------- measuring
def _storage(t: torch.Tensor):
    """t's storage; the all-to-all's outputs are functional-collective wrappers around a plain tensor."""
    return getattr(t, "elem", t).untyped_storage()


def held_bytes(engine) -> int:
    """Distinct storages reachable from the engine's module and optimizer (objects of DeepSpeed's and
    torch.optim's classes, and the containers they hold)."""
    sizes, seen, stack = {}, set(), [engine.optimizer, engine.module]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta" and _storage(obj).nbytes():
                sizes[_storage(obj).data_ptr()] = _storage(obj).nbytes()
            if obj.grad is not None:
                stack.append(obj.grad)
        elif isinstance(obj, dict):
            stack.extend(list(obj.keys()) + list(obj.values()))
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif isinstance(obj, torch.nn.Module):
            stack.extend(list(obj.parameters()) + list(obj.buffers()))
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")):
            stack.extend(vars(obj).values())
    return sum(sizes.values())


def checkpoint_bytes_per_rank(step_dir: Path, world: int) -> list[int]:
    """Bytes of one checkpoint's files by the rank that wrote them: `optimizer-R-of-W.safetensors` is rank R's,
    everything else (the consolidated model, the tokenizer, the trainer state) rank 0's."""
    per_rank = [0] * world
    for f in step_dir.rglob("*"):
        if f.is_file():
            m = re.match(r"optimizer-(\d+)-of-", f.name)
            per_rank[int(m.group(1)) if m else 0] += f.stat().st_size
    return per_rank


def measure(overrides: str, profile: bool) -> dict:
    """Train one run and measure it (see the module docstring); returns this rank's numbers."""
    import deepspeed
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, record_function

    import smolds.model.expert_parallel as expert_parallel
    from smolds.train import train
    from smolds.train.config import RunConfig

    cfg = RunConfig.load(None, shlex.split(overrides))
    out = {"held": [], "saved": [], "all_to_all": 0}
    real_init, real_a2a = deepspeed.initialize, expert_parallel.all_to_all_single_autograd

    def initialize(*args, **kwargs):
        engine, *rest = real_init(*args, **kwargs)
        forward, backward, step = engine.forward, engine.backward, engine.step
        params = {_storage(p).data_ptr() for p in engine.module.parameters()}

        def counted_forward(*a, **k):
            saved, keep = {}, []  # keep: no address is reused while we count

            def pack(t):
                if _storage(t).data_ptr() not in params:
                    saved[_storage(t).data_ptr()] = _storage(t).nbytes()
                    keep.append(t)
                return t

            def keep_input(module, args):  # a checkpointed block keeps its input for the recompute
                pack(args[0])

            inputs = [b.register_forward_pre_hook(keep_input) for b in engine.module.layers if b.activation_checkpointing]
            with record_function("plan:forward"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                result = forward(*a, **k)
            for h in inputs:
                h.remove()
            out["saved"].append(sum(saved.values()))
            return result

        def measured_backward(*a, **k):
            with record_function("plan:backward"):
                result = backward(*a, **k)
            if engine.is_gradient_accumulation_boundary():
                out["held"].append(held_bytes(engine))
            return result

        def timed_step(*a, **k):
            with record_function("plan:step"):
                return step(*a, **k)

        engine.forward, engine.backward, engine.step = counted_forward, measured_backward, timed_step
        return (engine, *rest)

    def all_to_all(x, output_splits, input_splits, group):
        if torch.is_grad_enabled():  # training forwards, not the evaluation
            row = x[0].numel() * x.element_size() if x.shape[0] else 0
            out["all_to_all"] += (sum(input_splits) - input_splits[dist.get_rank(group)]) * row
        return real_a2a(x, output_splits, input_splits, group)

    import matplotlib.figure

    savefig, threads = matplotlib.figure.Figure.savefig, torch.get_num_threads()
    matplotlib.figure.Figure.savefig = lambda fig, *a, **k: None  # the run's plots are not what is measured
    torch.set_num_threads(1)  # two cores shared with other jobs: one thread a process (bench/README.md)
    deepspeed.initialize, expert_parallel.all_to_all_single_autograd = initialize, all_to_all
    try:
        if profile:
            gc.collect()
            with torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                summary = train(cfg)
            out["peak"] = _profiled_peak(prof)
        else:
            summary = train(cfg)
    finally:
        deepspeed.initialize, expert_parallel.all_to_all_single_autograd = real_init, real_a2a
        matplotlib.figure.Figure.savefig = savefig
        torch.set_num_threads(threads)
    world = dist.get_world_size() if dist.is_initialized() else 1
    out["checkpoint"] = checkpoint_bytes_per_rank(Path(summary["checkpoint"]), world)
    return out


def _profiled_peak(prof) -> int:
    """The most bytes of tensors alive at once between the first forward and the last optimizer step, counted
    from the allocations and frees the profiler saw since it started."""
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    memory = sorted((e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events
                    if e.get("name") == "[memory]")
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events
             if e.get("ph") == "X" and str(e.get("name", "")).startswith("plan:")]
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    base = memory[0][1] - memory[0][2]  # the counter when profiling began (it spans profiling sessions)
    return max(total for ts, total, _ in memory if start <= ts <= end) - base


def _driver():
    out_json, *runs = sys.argv[1:]
    import torch.distributed as dist

    results = {}
    for spec in runs:
        name, _, overrides = spec.partition(":")
        results[name] = measure(overrides, profile=False)
    Path(f"{out_json}.rank{dist.get_rank()}").write_text(json.dumps(results))


# -------------------------------------------------------------------------------------------- fixtures
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_prep import prepare_default

    d = tmp_path_factory.mktemp("plan_data") / "pydoc"
    prepare_default(d)
    return d


def _overrides(name: str, spec: str, data_dir: Path, root: Path) -> str:
    return f"{COMMON} {spec} --data.dir {data_dir} --train.out_dir {root / name}"


@pytest.fixture(scope="module")
def one_rank(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_one")
    return {name: (measure(_overrides(name, spec, data_dir, root), profile=True), _overrides(name, spec, data_dir, root))
            for name, spec in ONE_RANK.items()}


@pytest.fixture(scope="module")
def two_ranks(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_two")
    out = root / "measured.json"
    runs = {name: _overrides(name, spec, data_dir, root) for name, spec in TWO_RANKS.items()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           str(Path(__file__)), str(out), *(f"{name}:{o}" for name, o in runs.items())]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out (a hang):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]
    return {name: ([ranks[r][name] for r in range(2)], o) for name, o in runs.items()}


def _plan(overrides: str, gpus: int):
    from smolds.plan import HARDWARE, estimate
    from smolds.train.config import RunConfig

    run = RunConfig.load(None, shlex.split(overrides))
    return estimate(run.model_config(), run, gpus, HARDWARE["h100"], device="cpu")


def _close(estimated: float, measured: float, what: str):
    assert abs(estimated / measured - 1) <= TOLERANCE, \
        f"{what}: estimated {estimated / 2**20:,.2f} MiB, measured {measured / 2**20:,.2f} MiB"


# ------------------------------------------------------------------------------- against real runs
def _check_run(ranks: list[dict], plan, what: str):
    """The plan is for the most loaded rank: held state, activations and peak against the largest measured
    (ranks differ: routing is not balanced at initialization; DeepSpeed's partitions are not all alike)."""
    _close(plan.weights + plan.optimizer + plan.gradients, max(max(r["held"]) for r in ranks), f"{what}: held state")
    _close(plan.activations, max(max(r["saved"]) for r in ranks), f"{what}: activations")
    if "peak" in ranks[0]:
        _close(plan.peak, ranks[0]["peak"], f"{what}: peak")
    for rank, written in enumerate(ranks[0]["checkpoint"]):
        _close(plan.checkpoint_bytes[rank], written, f"{what}: checkpoint bytes of rank {rank}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ONE_RANK))
def test_one_rank_memory_and_checkpoint(one_rank, name):
    measured, overrides = one_rank[name]
    _check_run([measured], _plan(overrides, 1), name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_two_ranks_memory_and_checkpoint(two_ranks, name):
    ranks, overrides = two_ranks[name]
    _check_run(ranks, _plan(overrides, 2), name)


@pytest.mark.slow
def test_all_to_all_bytes(two_ranks):
    """The forward's dispatch and combine, doubled for the backward, per optimizer step."""
    ranks, overrides = two_ranks["mid_z0_ep2_bf16"]
    plan = _plan(overrides, 2)
    for rank, measured in enumerate(ranks):
        per_step = 2 * measured["all_to_all"] / 2  # 2 steps, backward = forward
        _close(plan.all_to_all_bytes, per_step, f"all-to-all bytes of rank {rank}")


# -------------------------------------------------------------------------- activations, layer by layer
KINDS = {  # (model, batch, seq): each attention kind and both FFN kinds
    "mla_moe": ("{preset: tiny}", 2, 64),
    "gqa_dense": ("{preset: smollm2-135m, num_hidden_layers: 2, vocab_size: 512}", 2, 64),
    "linear_mla_moe": ("{preset: tiny, attention_pattern: [linear, mla]}", 1, 128),
    "kda": ("{preset: tiny, attention_pattern: [kda], linear_head_dim: 32, num_hidden_layers: 2}", 1, 100),
}


def _alive_after_forward(model, ids) -> int:
    """Bytes the allocator holds after a training forward beyond what it held before: what autograd keeps for
    backward (and the loss), by the profiler's count of every allocation and free."""
    from torch.profiler import ProfilerActivity

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared with other jobs: one thread (bench/README.md)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(ids, targets=ids)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    memory = sorted((e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events
                    if e.get("name") == "[memory]")
    del out
    return memory[-1][1] - (memory[0][1] - memory[0][2])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activations_per_layer_kind(kind, dtype):
    import yaml

    from smolds.config import ModelConfig
    from smolds.model.transformer import Transformer
    from smolds.plan import activations

    spec, batch, seq = KINDS[kind]
    cfg = ModelConfig.load(yaml.safe_load(spec))
    model = Transformer(cfg).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    estimate = activations(cfg, batch, seq, 2 if dtype == "bf16" else 4, device="cpu")
    _close(estimate["saved"], _alive_after_forward(model, ids), f"{kind} {dtype}")
    model.set_activation_checkpointing(True)
    _close(estimate["checkpointed"], _alive_after_forward(model, ids), f"{kind} {dtype}, checkpointed")


# ---------------------------------------------------------------------------------------------------- CLI
def _main(capsys, *argv) -> tuple[int, str, str]:
    from smolds.plan import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_table_and_json(capsys):
    from smolds.config import ModelConfig
    from smolds.model.transformer import Transformer

    args = ("--config", str(ROOT / "configs/smollm2-deepseek-135m.yaml"), "--gpus", "8", "--tokens", "1e12")
    code, out, _ = _main(capsys, *args)
    assert code == 0 and "fits" in out and "GPU-hours" in out and "all-to-all" in out
    code, out, _ = _main(capsys, *args, "--json")
    plan = json.loads(out)
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset("smollm2-deepseek-135m"))
    assert plan["flops_per_token"] == model.flops_per_token(2048)  # the model's own count
    assert plan["params"] == model.num_parameters() and plan["ep_size"] == 8 and plan["precision"] == "bf16"
    assert plan["cache_bytes_per_token"] == 30 * (128 + 32) * 2  # 30 MLA layers: latent + rotary key, bf16
    assert plan["peak"] >= plan["weights"] + plan["optimizer"] + plan["gradients"]
    assert plan["steps"] == -(-10**12 // (8 * 2048 * 4 * 8)) and len(plan["checkpoint_bytes"]) == 8
    assert plan["gpu_hours"] == pytest.approx(plan["wall_s"] * 8 / 3600)


def test_a_config_that_does_not_fit_gets_the_change_that_fits(capsys):
    small = "memory_gib=16,tflops=989,nvlink_gbs=450,network_gbs=50"
    args = ("--config", str(ROOT / "configs/smollm2-deepseek-135m.yaml"), "--gpus", "8", "--gpu", small,
            "--deepspeed.zero_stage", "0", "--deepspeed.ep_size", "1", "--json")
    code, out, _ = _main(capsys, *args)
    plan = json.loads(out)
    assert code == 1 and not plan["fits"] and plan["fix"].startswith("--")
    flags = shlex.split(plan["fix"].split(" (")[0])
    code, out, _ = _main(capsys, *args, *flags)
    assert code == 0 and json.loads(out)["fits"], plan["fix"]


@pytest.mark.parametrize("argv, fix", [
    (["--gpus", "0"], "positive integer"),
    (["--gpus", "8", "--gpu", "v100"], "h100"),
    (["--gpus", "8", "--gpu", "memory_gib=80"], "tflops"),
    (["--gpus", "3", "--deepspeed.ep_size", "2"], "change one of them"),
    (["--gpus", "8", "--deepspeed.ep_size", "3"], "must divide n_routed_experts"),
    (["--gpus", "8", "--train.global_batch", "7"], "fix one of them"),
    (["--gpus", "8", "--train.seq_len", "99999"], "lower --train.seq_len"),
    (["--gpus", "8", "--efficiency", "1.5"], "(0, 1]"),
    (["--gpus", "8", "--tokens", "-1"], "positive number"),
])
def test_bad_input_is_one_line_naming_the_fix(capsys, argv, fix):
    code, out, err = _main(capsys, "--config", str(ROOT / "configs/smollm2-deepseek-135m.yaml"), *argv)
    assert code == 2 and not out
    assert err.startswith("smolds plan: error: ") and err.count("\n") == 1 and fix in err, err


if __name__ == "__main__":
    _driver()
