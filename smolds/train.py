"""Pretraining on the DeepSpeed engine: the whole loop in one file.

    smolds train                                   # tiny preset on the embedded default corpus, CPU
    smolds train --config configs/tiny-cpu.yaml --train.steps 50
    torchrun --nproc_per_node 2 -m smolds train --config configs/tiny-cpu.yaml --deepspeed.ep_size 2

One optimizer step = `grad_accum` micro-batches per rank, then:
  1. DeepSpeed reduces gradients (ZeRO 0-2; expert gradients over the expert-data-parallel group),
     clips, and steps AdamW;
  2. the router biases take one loss-free update from the token counts summed over all ranks
     (`update_router_biases`), so every rank keeps identical biases;
  3. rank 0 logs (JSONL, wandb, progress bar); every `eval_every` steps the model is evaluated on the
     validation shards; every `checkpoint_every` steps (and on SIGTERM/SIGUSR1) a checkpoint is written.

Failure handling: a non-finite loss on any rank makes every rank skip that step (the optimizer step runs with
zero gradient and zero learning rate, so the weights do not move; Adam's moments decay by one step), and
`max_nonfinite_steps` in a row stop the run with an error. Weights are checked before every checkpoint.
On SIGTERM the run saves and exits with code 75 (EX_TEMPFAIL: "requeue me"); `--resume` continues it. The
signals are caught from the worker's start (smolds/preemption.py): one that arrives during setup, before the
first step, exits 75 without saving, since the run is still where its last checkpoint left it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from data_prep.errors import DataError
from smolds import parallel, preemption
from smolds import train_checkpoint as ckpt
from smolds.config import ConfigError, ModelConfig
from smolds.evaluate import evaluate, greedy_samples
from smolds.metrics import MetricsLogger
from smolds.model.moe import MoE, RoutedExperts, routers, update_router_biases
from smolds.model.transformer import Transformer
from smolds.monitor import RoutingMonitor
from smolds.run_config import DEFAULT_DATA_DIR, RunConfig
from smolds.schedule import lr_at, schedule_warning

EXIT_PREEMPTED = 75
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, for MFU


class TrainError(RuntimeError):
    """A problem with the run's inputs; the message names the fix."""


# ------------------------------------------------------------------------------------------- setup
def load_data(cfg: RunConfig, model_cfg: ModelConfig, env: parallel.Env):
    """(train, val) readers: TokenWindows of one dir, or MixedWindows of a {dir: weight} mixture."""
    from data_prep import TokenWindows, prepare_default
    from data_prep.mixture import MixedWindows

    common = dict(seq_len=cfg.train.seq_len, seed=cfg.train.seed, dp_rank=env.rank, dp_size=env.world)
    if isinstance(cfg.data.dir, dict):  # a mixture: every dir is prepared beforehand
        for d in map(Path, cfg.data.dir):
            if not (d / "manifest.json").is_file():
                raise TrainError(_no_shards(d))
        train = MixedWindows(cfg.data.dir, split="train", **common)
        val = MixedWindows(cfg.data.dir, split="val", **common)
    else:
        data_dir = Path(cfg.data.dir)
        if not (data_dir / "manifest.json").is_file():
            if cfg.data.dir != DEFAULT_DATA_DIR:
                raise TrainError(_no_shards(data_dir))
            failed = None
            if env.is_main:
                try:
                    prepare_default(data_dir)
                except Exception as e:  # tell the other ranks instead of leaving them waiting in a collective
                    failed = e
            if parallel.any_rank(failed is not None, env.device) and failed is None:
                raise TrainError(f"rank 0 could not prepare the default corpus in {data_dir}; see rank 0's error")
            if failed is not None:
                raise failed
        train = TokenWindows(data_dir, split="train", **common)
        val = TokenWindows(data_dir, split="val", **common)
    if not Path(train.tokenizer_path).is_file():  # samples and checkpoints need it: fail now, not at the first eval
        raise TrainError(f"{train.tokenizer_path} is missing; the prepared data is incomplete: run "
                         f"`smolds prep --verify {Path(train.tokenizer_path).parent}`, then re-create it")
    if train.vocab_size > model_cfg.vocab_size:
        raise TrainError(f"the data's tokenizer has {train.vocab_size} tokens but model.vocab_size is "
                         f"{model_cfg.vocab_size}; set --model.vocab_size {train.vocab_size} or re-prepare the data")
    return train, val


def _no_shards(data_dir: Path) -> str:
    if data_dir.is_file():
        return (f"data.dir {data_dir} is a file; give the directory `smolds prep --out` wrote "
                f"(the one holding manifest.json), e.g. --data.dir {data_dir.parent}")
    if (data_dir / "progress.json").is_file():
        return (f"data.dir {data_dir} holds an unfinished prep run (progress.json, no manifest.json); rerun the "
                "same `smolds prep` command to finish it")
    return f"data.dir {data_dir} holds no shards (no manifest.json); run `smolds prep SOURCES --out {data_dir}` first"


def check_batch(cfg: RunConfig, env: parallel.Env, model_cfg: ModelConfig):
    t = cfg.train
    if t.global_batch is not None and t.global_batch != t.micro_batch * t.grad_accum * env.world:
        raise TrainError(f"train.global_batch {t.global_batch} != micro_batch {t.micro_batch} x grad_accum "
                         f"{t.grad_accum} x ranks {env.world} = {t.micro_batch * t.grad_accum * env.world}; "
                         "fix one of them (or drop global_batch)")
    if t.seq_len > model_cfg.max_position_embeddings:
        raise TrainError(f"train.seq_len {t.seq_len} is longer than the model's context "
                         f"(max_position_embeddings {model_cfg.max_position_embeddings}); lower --train.seq_len")
    ep = cfg.deepspeed.ep_size
    if ep > 1:
        if not model_cfg.moe_layers:
            raise TrainError("deepspeed.ep_size > 1 needs a model with MoE layers")
        if model_cfg.n_routed_experts % ep:
            raise TrainError(f"deepspeed.ep_size {ep} must divide n_routed_experts {model_cfg.n_routed_experts}")
        if env.world % ep:
            raise TrainError(f"deepspeed.ep_size {ep} must divide the number of ranks {env.world}")
    if cfg.deepspeed.zero_stage == 3 and model_cfg.moe_layers:
        raise TrainError("ZeRO-3 does not support MoE parameters in DeepSpeed; use --deepspeed.zero_stage 2")


def layout(cfg: RunConfig, env: parallel.Env) -> dict:
    """What DeepSpeed's checkpoint files depend on: ZeRO shards per data-parallel rank, experts per EP rank."""
    return {"ranks": env.world, "zero_stage": cfg.deepspeed.zero_stage, "ep_size": cfg.deepspeed.ep_size}


def check_layout(saved: dict | None, now: dict, path: Path):
    """Resuming needs the checkpoint's layout (ZeRO-0 tolerates another rank count). Every rank reads the
    same file, so all raise together."""
    if not saved or saved == now:
        return
    if saved["zero_stage"] == now["zero_stage"] == 0 and saved["ep_size"] == now["ep_size"]:
        return  # ZeRO-0 keeps the whole optimizer state in one file
    said = lambda d: f"{d['ranks']} rank(s), ZeRO-{d['zero_stage']}, ep_size {d['ep_size']}"
    raise TrainError(f"checkpoint {path} was written by {said(saved)} but this run has {said(now)}; resume with "
                     f"the same layout, or start a new run from its weights with --train.init_from {path} "
                     "(optimizer state and data position start over)")


def check_out_dir(cfg: RunConfig, resume: bool):
    """Refuse to mix two different runs in one output dir."""
    out = Path(cfg.train.out_dir)
    saved = out / "run_config.yaml"
    if not saved.exists():
        return
    if not resume and (out / "checkpoints" / "latest").exists():
        raise TrainError(f"train.out_dir {out} already holds a run; pass --resume to continue it, or choose "
                         "another --train.out_dir")
    try:
        old = RunConfig.load(saved)
    except ConfigError as e:
        raise TrainError(f"train.out_dir {out} holds a run whose {saved.name} cannot be read "
                         f"({str(e).removesuffix('; fix the file')}); fix that file, or choose another "
                         "--train.out_dir") from None
    if resume and old.model_config() != cfg.model_config():
        raise TrainError(f"train.out_dir {out} holds a run with a different model; choose another --train.out_dir")


def _deepspeed_moe_marker(ep_size: int) -> nn.Module:
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class Marker(DeepSpeedMoE):
        """DeepSpeed's engine enables its expert-parameter handling (per-group gradient reduction, ZeRO MoE
        groups, per-EP-rank optimizer files) only when it finds an instance of its own MoE class in the
        model. This subclass holds no parameters and owns no experts; smolds' MoE does the work."""

        def __init__(self):
            nn.Module.__init__(self)
            self.ep_size, self.num_experts, self.num_local_experts = ep_size, 0, 0
            self.expert_group_name = f"ep_size_{ep_size}"

        def set_deepspeed_parallelism(self, *args, **kwargs):  # groups are created by smolds.parallel
            pass

        def forward(self, x):
            return x

    return Marker()


def build_model(cfg: RunConfig, model_cfg: ModelConfig, env: parallel.Env):
    torch.manual_seed(cfg.train.seed)  # identical init on every rank (also for the sliced experts)
    model = Transformer(model_cfg).set_activation_checkpointing(cfg.train.activation_checkpointing)
    model.compile_blocks(cfg.train.compile)
    if cfg.train.init_from:  # whole weights (and router biases) on every rank, before any sharding
        load_weights(model, cfg.train.init_from)
    ep_group = None
    if cfg.deepspeed.ep_size > 1:
        from smolds.model.expert_parallel import shard_experts

        ep_group, group_name = parallel.expert_groups(cfg.deepspeed.ep_size)
        for m in model.modules():
            if isinstance(m, MoE):
                shard_experts(m, ep_group)
        for m in model.modules():
            if isinstance(m, RoutedExperts):
                for p in m.parameters():
                    p.allreduce, p.group_name = False, group_name  # DeepSpeed's expert-parameter marks
        model.add_module("_deepspeed_moe_marker", _deepspeed_moe_marker(cfg.deepspeed.ep_size))
    return model, ep_group


def load_weights(model: Transformer, path: str):
    from smolds.checkpoint import CheckpointError, load_pretrained

    try:
        source, _ = load_pretrained(path)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise TrainError(f"train.init_from: {e}") from None
    if source.config != model.config:
        a, b = source.config.to_dict(), model.config.to_dict()
        diff = ", ".join(f"{k} {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        raise TrainError(f"train.init_from {path}: its model differs from this run's ({diff}); "
                         "drop the --model overrides or pick a matching checkpoint")
    model.load_state_dict(source.state_dict(), strict=True)


def param_groups(model: nn.Module, weight_decay: float, ep: bool) -> list[dict]:
    """Weight decay on matrices only (embeddings, projections, experts, router), not on norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    if ep:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def deepspeed_config(cfg: RunConfig, env: parallel.Env, bf16: bool) -> dict:
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * env.world,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
                                                  "weight_decay": t.weight_decay, "torch_adam": True,
                                                  "fused": True}},  # torch's fused kernel, CUDA and CPU
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for k, v in cfg.deepspeed.config.items():  # the user's raw DeepSpeed settings win
        ds[k] = {**ds[k], **v} if isinstance(v, dict) and isinstance(ds.get(k), dict) else v
    return ds


# -------------------------------------------------------------------------------------------- loop
class Preemption:
    """SIGTERM/SIGUSR1 set a flag (smolds.preemption; under `smolds train` from the worker's first moments);
    train() checks it once before the first step and again after each step, all ranks agreeing."""

    def __init__(self):
        preemption.install()  # again, for train() called without the CLI; keeps a signal already received

    @property
    def flag(self) -> bool:
        return preemption.received() is not None

    def requested(self, device) -> bool:
        """Did any rank get a stop signal? Checked once before the first step and after each step."""
        t = torch.tensor([1.0 if self.flag else 0.0], device=device)
        return bool(parallel.all_reduce_(t, op=dist.ReduceOp.MAX).item() > 0)


def _all_finite(model, device) -> bool:
    local = [getattr(p, "ds_tensor", p) for p in model.parameters()]  # ZeRO-3: this rank's partition
    ok = torch.tensor([1.0 if all(torch.isfinite(p).all() for p in local) else 0.0], device=device)
    return bool(parallel.all_reduce_(ok, op=dist.ReduceOp.MIN).item() > 0)


@torch.no_grad()
def _grad_norm(model, ep_group) -> float:
    """Global L2 norm of the (already reduced) gradients; expert shards summed over the EP group.
    Sums stay on the device: one host sync per step."""
    device = next(model.parameters()).device
    dense = torch.zeros((), dtype=torch.float64, device=device)
    expert = torch.zeros((), dtype=torch.float64, device=device)
    for p in model.parameters():
        if p.grad is not None:
            sq = p.grad.detach().double().pow(2).sum()
            if getattr(p, "allreduce", True) is False:
                expert += sq
            else:
                dense += sq
    if ep_group is not None:
        parallel.all_reduce_(expert, group=ep_group)
    return float((dense + expert).sqrt())


def train(cfg: RunConfig, resume: bool = False) -> dict:
    """Run (or resume) a pretraining run; returns a summary (first/last loss, val loss/ppl, paths)."""
    preempt = Preemption()  # before the slow setup below: a stop signal during it is kept, not fatal
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device is cuda but no GPU is visible; use --train.device cpu (or auto)")
    env = parallel.init(cfg.train.device)
    model_cfg = cfg.model_config()
    check_batch(cfg, env, model_cfg)
    check_out_dir(cfg, resume)  # every rank reads the same files: all raise together, none waits in a collective
    t = cfg.train
    out_dir, ckpt_root = Path(t.out_dir), Path(t.out_dir) / "checkpoints"
    latest = ckpt.latest_checkpoint(ckpt_root) if resume else None  # before the slow setup: refuse a bad one early
    if latest is not None:
        check_layout(ckpt.read_trainer_state(latest).get("layout"), layout(cfg, env), latest)
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and env.device.type == "cuda")
    train_data, val_data = load_data(cfg, model_cfg, env)

    import deepspeed

    model, ep_group = build_model(cfg, model_cfg, env)
    groups = param_groups(model, t.weight_decay, ep_group is not None)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                                   config=deepspeed_config(cfg, env, bf16))
    model = engine.module

    start_step, state = 0, {}
    if latest is not None:
        state = ckpt.load(engine, model, latest, ep_group)
        start_step = state["step"]
        try:
            train_data.load_state_dict(state["data"])
        except DataError as e:  # name the flag for the readers' "start afresh" fix
            msg = str(e).replace("start the data from the beginning", "start a new run from the weights")
            raise TrainError(f"{msg} (--train.init_from {latest})") from None
    if preempt.requested(env.device):
        # Stopped before the first step: the run is exactly where its last checkpoint (or the fresh start)
        # left it, so exit 75 without saving; --resume starts from the same place and nothing is lost.
        # Running a step first and saving it would gain one step but spend the time the preemption
        # lead leaves (and write a checkpoint identical to the one just loaded when no step ran).
        where = f"checkpoint {latest}" if latest is not None else "a fresh start"
        if env.is_main:
            print(f"smolds train: stop signal (SIGTERM/SIGUSR1) during startup, before step {start_step + 1}: "
                  f"nothing to save, --resume continues from {where}; exiting with {EXIT_PREEMPTED}",
                  file=sys.stderr, flush=True)
        return {"out_dir": str(out_dir), "first_loss": None, "last_loss": None, "preempted": True,
                "step": start_step, "checkpoint": str(latest) if latest is not None else None}
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(out_dir / "run_config.yaml")

    log = MetricsLogger(out_dir, env.is_main, t.steps, start_step, cfg.logging.wandb, cfg.logging.project,
                        cfg.logging.run_name, cfg.to_dict())
    monitor = None  # routing monitor on every rank (it zeroes the routers' entropy sums); images on rank 0
    if model_cfg.moe_layers:
        monitor = RoutingMonitor.for_model(model, ep_size=cfg.deepspeed.ep_size,
                                           out_dir=out_dir / "routing" if env.is_main else None)
    with torch.device("meta"):  # the whole model's counts (this rank may hold a share: EP, ZeRO-3)
        whole = Transformer(model_cfg)
    n_params, n_active = whole.num_parameters(), whole.num_parameters(active=True)
    log.log_text(f"smolds: {n_params / 1e6:.2f}M parameters ({n_active / 1e6:.2f}M active), {env.world} rank(s), "
                 f"ZeRO-{cfg.deepspeed.zero_stage}, ep_size {cfg.deepspeed.ep_size}, "
                 f"{'bf16' if bf16 else 'fp32'} on {env.device.type}, "
                 f"{'resumed from ' + str(latest) if latest else 'fresh start'}")

    warning = schedule_warning(steps=t.steps, warmup_steps=t.warmup_steps, schedule=t.schedule,
                               decay_fraction=t.decay_fraction)
    if warning and start_step == 0:
        log.log_text(warning)
    tokens_per_step = t.micro_batch * t.grad_accum * env.world * t.seq_len
    flops_per_token = whole.flops_per_token(t.seq_len)
    peak = next((v for k, v in PEAK_TFLOPS.items() if env.device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    tokenizer_path = getattr(train_data, "tokenizer_path", None)

    def save(step_):
        def export(state_dict, path):  # the consolidated copy, full model on rank 0, fp32
            from smolds.checkpoint import save_pretrained

            full = Transformer(model_cfg)
            full.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
            save_pretrained(full, path, tokenizer=tokenizer_path, extra={"step": step_})

        if not _all_finite(model, env.device):
            raise TrainError(f"step {step_}: weights are not finite; refusing to checkpoint them "
                             "(lower --train.lr or check the data)")
        trainer_state = {"data": train_data.state_dict(), "nonfinite_total": nonfinite_total,
                         "tokens_seen": (step_) * tokens_per_step, "layout": layout(cfg, env)}
        path = ckpt.save(engine, model, ckpt_root, step_, trainer_state, is_main=env.is_main, ep_group=ep_group,
                         keep=t.keep_checkpoints, export=export)
        log.log_text(f"step {step_}: checkpoint {path}")
        return path

    nonfinite_run, nonfinite_total = 0, state.get("nonfinite_total", 0)
    summary = {"out_dir": str(out_dir), "first_loss": None, "last_loss": None}
    step, last_saved, t_last, t_start, grad_norm = start_step, None, time.time(), time.time(), None
    for step in range(start_step, t.steps):
        lr = lr_at(step, lr=t.lr, steps=t.steps, warmup_steps=t.warmup_steps, schedule=t.schedule,
                   decay_fraction=t.decay_fraction, min_lr_ratio=t.min_lr_ratio)
        losses, skip = [], False
        for _ in range(t.grad_accum):
            x, y = train_data.next_batch(t.micro_batch)
            out = engine(x.to(env.device), targets=y.to(env.device))
            finite = torch.tensor([1.0 if torch.isfinite(out.loss).item() else 0.0], device=env.device)
            skip = skip or parallel.all_reduce_(finite, op=dist.ReduceOp.MIN).item() == 0
            loss = out.loss if not skip else sum(p.reshape(-1)[0] * 0.0 for p in model.parameters())
            losses.append(out.lm_loss.detach().float() if not skip else torch.tensor(float("nan")))
            engine.backward(loss)
            for g in engine.optimizer.param_groups:
                g["lr"] = 0.0 if skip else lr
            if engine.is_gradient_accumulation_boundary() and cfg.deepspeed.zero_stage == 0:
                grad_norm = _grad_norm(model, ep_group)  # ZeRO computes its own; stage 0 does not report it
            engine.step()
        if skip:
            for r in routers(model):  # this step's tokens do not steer the bias
                r.tokens_per_expert.zero_()
                r.entropy_sum.zero_()
            nonfinite_run, nonfinite_total = nonfinite_run + 1, nonfinite_total + 1
            log.log(step + 1, {"skipped_nonfinite": 1, "nonfinite_total": nonfinite_total})
            log.log_text(f"step {step + 1}: non-finite loss, step skipped ({nonfinite_run} in a row)")
            if nonfinite_run >= t.max_nonfinite_steps:
                log.close()
                raise TrainError(f"{nonfinite_run} non-finite losses in a row at step {step + 1}; stopping. "
                                 f"Lower --train.lr, raise warmup, or resume from the last checkpoint")
        else:
            nonfinite_run = 0
            counts = update_router_biases(model, model_cfg)
            if monitor is not None:
                monitor.update(counts)  # device work only, no collective
            loss = parallel.all_reduce_(torch.stack(losses).mean().to(env.device)) / env.world
            if summary["first_loss"] is None:
                summary["first_loss"] = float(loss)
            summary["last_loss"] = float(loss)
            if (step + 1) % t.log_every == 0 or step == start_step or step + 1 == t.steps:
                now = time.time()
                steps_done = (step + 1 - start_step) % t.log_every or t.log_every
                tok_s = tokens_per_step * min(steps_done, step + 1 - start_step) / max(now - t_last, 1e-9)
                t_last = now
                row = {"loss": float(loss), "lr": lr, "tokens_per_s": tok_s, "tokens": (step + 1) * tokens_per_step}
                if cfg.deepspeed.zero_stage > 0:
                    grad_norm = engine.get_global_grad_norm()  # before clipping
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                routing = monitor.report(step + 1) if monitor is not None else None
                if routing is not None:
                    row.update(routing.row)
                if peak:
                    row["mfu"] = tok_s * flops_per_token / (peak * 1e12 * env.world)
                log.log(step + 1, row)
                if routing is not None:
                    monitor.log_wandb(log.wandb, step + 1, routing)
                    for w in routing.warnings:
                        log.log_text(f"step {step + 1}: {w}")
                log.progress(step + 1, {"loss": f"{float(loss):.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}",
                                        **({"maxvio": f"{row['maxvio']:.2f}"} if "maxvio" in row else {}),
                                        **({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {})})
        preempted = preempt.requested(env.device)  # all ranks agree; checked before the long eval too
        if not preempted and ((step + 1) % t.eval_every == 0 or step + 1 == t.steps):
            ev = evaluate(model, val_data, t.eval_batches, t.micro_batch, env.device)
            log.log(step + 1, ev, kind="eval")
            summary.update(val_loss=ev["loss"], val_ppl=ev["ppl"])
            if train_data.tokenizer_path:  # every rank decodes: with expert parallelism the MoE needs all
                samples = greedy_samples(model, train_data.tokenizer_path, cfg.eval.prompts, cfg.eval.sample_tokens)
                log.log(step + 1, {"samples": samples}, kind="samples")
                summary["samples"] = samples
            per_source = ", ".join(f"{k[5:]} {v:.4f}" for k, v in ev.items() if k.startswith("loss/"))
            log.log_text(f"step {step + 1}: val loss {ev['loss']:.4f}" + (f" ({per_source})" if per_source else "")
                         + f", ppl {ev['ppl']:.2f}" + (f", MaxVio {ev['maxvio']:.3f}" if "maxvio" in ev else ""))
            log.draw_curves(step + 1)
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
            last_saved = save(step + 1)
        if preempted:
            if last_saved is None or last_saved.name != f"step_{step + 1:07d}":
                last_saved = save(step + 1)
            log.log_text(f"preempted at step {step + 1}: checkpoint saved, exiting with {EXIT_PREEMPTED} (resume with --resume)")
            log.close()
            summary.update(preempted=True, step=step + 1, checkpoint=str(last_saved))
            return summary
    summary.update(step=t.steps, checkpoint=str(last_saved) if last_saved else None, seconds=time.time() - t_start,
                   nonfinite_total=nonfinite_total)
    log.close()
    return summary


# --------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smolds train", description=__doc__.split("\n\n")[0],
                                epilog="Any field can be overridden: --train.steps 50 --model.num_hidden_layers 2 "
                                       "--deepspeed.zero_stage 2 --logging.wandb online")
    p.add_argument("--config", help="run config YAML (default: the tiny preset on the embedded corpus)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/latest if it exists")
    p.add_argument("--wandb", choices=["offline", "online", "disabled"], help="shortcut for --logging.wandb")
    args, overrides = p.parse_known_args(argv)
    if args.wandb:
        overrides += ["--logging.wandb", args.wandb]
    try:
        cfg = RunConfig.load(args.config, overrides)
        summary = train(cfg, resume=args.resume)
    except (ConfigError, TrainError, DataError, ckpt.ResumeError) as e:
        print(f"smolds train: error: {e}", file=sys.stderr)
        return 2
    if summary.get("preempted"):
        return EXIT_PREEMPTED
    if parallel.env_from_launcher()[0] == 0:
        print(_closing_message(summary))
    return 0


def _closing_message(s: dict) -> str:
    lines = [f"done: {s['step']} steps in {s.get('seconds', 0):.0f} s; loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}"]
    if "val_loss" in s:
        lines.append(f"validation: loss {s['val_loss']:.4f}, perplexity {s['val_ppl']:.2f}"
                     if math.isfinite(s["val_loss"]) else "validation: n/a")
    for prompt, text in (s.get("samples") or {}).items():
        lines.append(f"sample {prompt!r} -> {text!r}")
    lines.append(f"logs: {Path(s['out_dir']) / 'metrics.jsonl'}  (and train.log, wandb/)")
    if s.get("checkpoint"):
        lines.append(f"checkpoint: {s['checkpoint']}  (consolidated: {Path(s['checkpoint']) / 'consolidated'})")
        lines.append(f"next: smolds generate {Path(s['checkpoint']) / 'consolidated'} \"The \"")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
