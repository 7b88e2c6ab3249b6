"""Pretraining: the training loop, read top to bottom.

    smolds train                                   # tiny preset on the embedded default corpus, CPU
    smolds train --config configs/tiny-cpu.yaml --train.steps 50
    torchrun --nproc_per_node 2 -m smolds train --config configs/tiny-cpu.yaml --deepspeed.ep_size 2

    run = setup(cfg, resume)                 # ranks, data, model in the DeepSpeed engine, resume
    for step in steps:
        train_step(run, step)                # grad_accum micro-batches -> one optimizer step -> router update
        log_step(run, step)                  # loss, lr, tokens/s, grad norm, routing (JSONL, wandb, bar)
        maybe_eval(run, step)                # validation loss, MaxVio_global, greedy samples
        maybe_save(run, step)                # atomic checkpoint (also on SIGTERM/SIGUSR1, then exit 75)

One optimizer step = `grad_accum` micro-batches per rank, then:
  1. DeepSpeed reduces gradients (ZeRO 0-2; expert gradients over the expert-data-parallel group), clips,
     and steps AdamW (smolds/train/engine.py);
  2. the routers' counts are summed over all ranks and the loss-free bias takes one sign-rule update
     (`RoutingStats.end_step`, smolds/model/router.py), so every rank keeps identical biases;
  3. rank 0 logs; every `eval_every` steps the model is evaluated on the validation shards; every
     `checkpoint_every` steps (and on a stop signal) a checkpoint is written (smolds/train/checkpoint.py).

Failure handling: a non-finite loss on any rank makes every rank skip that step (the weights do not move)
and `max_nonfinite_steps` in a row stop the run with an error; weights are checked before every checkpoint.
On SIGTERM/SIGUSR1 the run finishes its step, saves and exits with code 75 (EX_TEMPFAIL: "requeue me");
`--resume` continues it. The signals are caught from the worker's start (smolds/train/preemption.py): one
that arrives during setup exits 75 without saving, since the run is still where its last checkpoint left it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from data_prep.errors import DataError
from smolds.config import ConfigError, ModelConfig
from smolds.infer.evaluate import evaluate, greedy_samples
from smolds.model.expert_parallel import ep_size_error
from smolds.model.router import RoutingStats
from smolds.model.transformer import Transformer
from smolds.monitor.live import RoutingMonitor, window_for
from smolds.train import checkpoint as ckpt
from smolds.train import parallel, preemption
from smolds.train.config import RunConfig, TrainError
from smolds.train.data import load_data
from smolds.train.distill import check_tokenizer
from smolds.train.engine import Engine, check_deepspeed_config
from smolds.train.metrics import MetricsLogger
from smolds.train.schedule import lr_at, schedule_warning

EXIT_PREEMPTED = 75
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, for MFU

__all__ = ["train", "TrainError", "EXIT_PREEMPTED"]


# ------------------------------------------------------------------------------------------- the run's state
@dataclass
class Run:
    """Everything the loop works with, built once by `setup`."""

    cfg: RunConfig
    env: parallel.Env
    engine: Engine
    train_data: object  # TokenWindows or MixedWindows
    val_data: object
    routing: RoutingStats
    resumed_from: Path | None  # the checkpoint loaded, or None for a fresh start
    resume_note: str | None  # what did not carry over exactly from a checkpoint of another shape
    start_step: int
    tokens_seen: int  # tokens trained on so far (survives a change of batch size across a resume)
    nonfinite_total: int  # skipped steps over the whole run
    tokens_per_step: int
    flops_per_token: float
    peak_tflops: float | None  # the device's dense bf16 peak, for MFU (CUDA only)
    log: MetricsLogger | None = None  # opened by `start_logging`, after the startup stop check
    monitor: RoutingMonitor | None = None
    nonfinite_run: int = 0  # skipped steps in a row
    last_saved: Path | None = None
    interval_start: float = field(default_factory=time.time)  # when the current logging interval began
    interval_steps: int = 0  # optimizer steps in the current logging interval
    summary: dict = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)


@dataclass
class StepResult:
    loss: float | None  # mean LM loss over ranks and micro-batches; None for a skipped step
    lr: float
    skipped: bool


# ------------------------------------------------------------------------------------------------- setup
def check_run(cfg: RunConfig, env: parallel.Env, model_cfg: ModelConfig):
    """What the config alone cannot know: the batch against the number of ranks, the context, EP."""
    train_cfg = cfg.train
    if train_cfg.global_batch is not None and train_cfg.global_batch != train_cfg.micro_batch * train_cfg.grad_accum * env.world:
        raise TrainError(f"train.global_batch {train_cfg.global_batch} != micro_batch {train_cfg.micro_batch} x grad_accum "
                         f"{train_cfg.grad_accum} x ranks {env.world} = {train_cfg.micro_batch * train_cfg.grad_accum * env.world}; "
                         "fix one of them (or drop global_batch)")
    if train_cfg.seq_len > model_cfg.max_position_embeddings:
        raise TrainError(f"train.seq_len {train_cfg.seq_len} is longer than the model's context "
                         f"(max_position_embeddings {model_cfg.max_position_embeddings}); lower --train.seq_len")
    ep = cfg.deepspeed.ep_size
    if ep > 1:
        if not model_cfg.moe_layers:
            raise TrainError("deepspeed.ep_size > 1 needs a model with MoE layers")
        problem = ep_size_error(ep, model_cfg.n_routed_experts, env.world)
        if problem:
            raise TrainError(f"deepspeed.{problem}")
    if cfg.deepspeed.zero_stage == 3 and model_cfg.moe_layers:
        raise TrainError("ZeRO-3 does not support MoE parameters in DeepSpeed; use --deepspeed.zero_stage 2")


def check_out_dir(cfg: RunConfig, resume: bool):
    """Refuse to mix two different runs in one output dir (every rank reads the same files, so all raise
    together and none waits in a collective)."""
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


def setup(cfg: RunConfig, resume: bool) -> Run:
    """Ranks, checks, data, the model inside the DeepSpeed engine and, with `resume`, the last checkpoint."""
    train_cfg = cfg.train
    if train_cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device is cuda but no GPU is visible; use --train.device cpu (or auto)")
    env = parallel.init(train_cfg.device, train_cfg.wait_timeout)
    model_cfg = cfg.model_config()
    check_run(cfg, env, model_cfg)
    bf16 = train_cfg.dtype == "bf16" or (train_cfg.dtype == "auto" and env.device.type == "cuda")
    check_deepspeed_config(cfg, env.world, bf16)
    check_out_dir(cfg, resume)
    latest = ckpt.latest_checkpoint(Path(train_cfg.out_dir) / "checkpoints") if resume else None
    saved = {}
    if latest is not None:  # before the slow setup: refuse a damaged or old-format checkpoint early
        saved = ckpt.read_trainer_state(latest)
        if not isinstance(saved.get("data"), dict):
            raise TrainError(f"checkpoint {latest}: its {ckpt.STATE_FILE} holds no data position; the checkpoint is "
                             "damaged: name an intact one in checkpoints/latest, or start a new run from its weights "
                             f"with --train.init_from {latest}")
    train_data, val_data = load_data(cfg, model_cfg, env, start_step=saved.get("step", 0))
    if train_cfg.distill_from:
        check_tokenizer(train_cfg.distill_from, train_data.tokenizer_path)
    engine = Engine(cfg, model_cfg, env, bf16)
    tokens_per_step = train_cfg.micro_batch * train_cfg.grad_accum * env.world * train_cfg.seq_len
    start_step, state, note = 0, {}, None
    if latest is not None:
        state = ckpt.load(engine, latest)  # written at any shape, restored at this one
        start_step = state["step"]
        note = ckpt.carry_note(state.get("layout"), ckpt.layout(env.world, cfg.deepspeed.zero_stage,
                                                                cfg.deepspeed.ep_size))
        try:
            train_data.load_state_dict(state["data"])
        except DataError as e:  # name the flag for the readers' "start afresh" fix
            msg = str(e).replace("start the data from the beginning", "start a new run from the weights")
            raise TrainError(f"{msg} (--train.init_from {latest})") from None
    with torch.device("meta"):  # the whole model's counts (this rank may hold a share: EP, ZeRO-3)
        whole = Transformer(model_cfg)
    peak = next((v for k, v in PEAK_TFLOPS.items()
                 if env.device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    return Run(cfg=cfg, env=env, engine=engine, train_data=train_data, val_data=val_data,
               routing=RoutingStats(engine.model, model_cfg), resumed_from=latest, resume_note=note,
               start_step=start_step,
               tokens_seen=state.get("tokens_seen", start_step * tokens_per_step),
               nonfinite_total=state.get("nonfinite_total", 0), tokens_per_step=tokens_per_step,
               flops_per_token=whole.flops_per_token(train_cfg.seq_len), peak_tflops=peak,
               summary={"out_dir": train_cfg.out_dir, "first_loss": None, "last_loss": None})


def start_logging(run: Run) -> None:
    """The run's config on disk, the metrics logger, and the routing monitor (on every rank: its images on
    rank 0), with the opening line of train.log."""
    cfg, env, train_cfg = run.cfg, run.env, run.cfg.train
    if env.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(run.out_dir / "run_config.yaml")
    run.log = MetricsLogger(run.out_dir, env.is_main, train_cfg.steps, run.start_step, cfg.logging.wandb,
                            cfg.logging.project, cfg.logging.run_name, cfg.to_dict())
    model_cfg = run.engine.model.config
    if model_cfg.moe_layers:
        run.monitor = RoutingMonitor.for_model(run.engine.model, ep_size=cfg.deepspeed.ep_size,
                                               window=window_for(train_cfg.steps),
                                               out_dir=run.out_dir / "routing" if env.is_main else None)
    with torch.device("meta"):
        whole = Transformer(model_cfg)
    n_params, n_active = whole.num_parameters(), whole.num_parameters(active=True)
    run.log.log_text(f"smolds: {n_params / 1e6:.2f}M parameters ({n_active / 1e6:.2f}M active), {env.world} "
                     f"rank(s), ZeRO-{cfg.deepspeed.zero_stage}, ep_size {cfg.deepspeed.ep_size}, "
                     f"{'bf16' if run.engine.bf16 else 'fp32'} on {env.device.type}, "
                     f"{'resumed from ' + str(run.resumed_from) if run.resumed_from else 'fresh start'}")
    if run.resume_note:
        run.log.log_text(run.resume_note)
    warning = schedule_warning(steps=train_cfg.steps, warmup_steps=train_cfg.warmup_steps, schedule=train_cfg.schedule,
                               decay_fraction=train_cfg.decay_fraction)
    if warning and run.start_step == 0:
        run.log.log_text(warning)
    run.interval_start = time.time()


# -------------------------------------------------------------------------------------------------- step
def train_step(run: Run, step: int) -> StepResult:
    """Optimizer step `step` (0-based): grad_accum micro-batches, DeepSpeed's step, the router update."""
    train_cfg = run.cfg.train
    lr = lr_at(step, lr=train_cfg.lr, steps=train_cfg.steps, warmup_steps=train_cfg.warmup_steps, schedule=train_cfg.schedule,
               decay_fraction=train_cfg.decay_fraction, min_lr_ratio=train_cfg.min_lr_ratio)
    losses, skip = [], False
    for _ in range(train_cfg.grad_accum):
        x, y = run.train_data.next_batch(train_cfg.micro_batch)
        loss, skip = run.engine.micro_step(x, y, lr, skip)
        losses.append(loss)
    run.tokens_seen += run.tokens_per_step
    run.interval_steps += 1
    if skip:
        run.routing.discard()  # this step's tokens steer no bias
        run.nonfinite_run += 1
        run.nonfinite_total += 1
        return StepResult(loss=None, lr=lr, skipped=True)
    run.nonfinite_run = 0
    routed = run.routing.end_step()
    if run.monitor is not None and routed is not None:
        run.monitor.update(routed)  # device work only, no collective
    loss = parallel.all_reduce_(torch.stack(losses).mean().to(run.env.device)) / run.env.world
    return StepResult(loss=float(loss), lr=lr, skipped=False)


# --------------------------------------------------------------------------------------------------- log
def log_step(run: Run, step: int, result: StepResult) -> None:
    """Log completed step `step` (1-based): every `log_every` steps, the first, and every eval step."""
    train_cfg, log = run.cfg.train, run.log
    if result.skipped:
        log.log(step, {"skipped_nonfinite": 1, "nonfinite_total": run.nonfinite_total})
        log.log_text(f"step {step}: non-finite loss, step skipped ({run.nonfinite_run} in a row)")
        if run.nonfinite_run >= train_cfg.max_nonfinite_steps:
            log.close()
            raise TrainError(f"{run.nonfinite_run} non-finite losses in a row at step {step}; stopping. "
                             f"Lower --train.lr, raise warmup, or resume from the last checkpoint")
        return
    run.summary["first_loss"] = run.summary["first_loss"] if run.summary["first_loss"] is not None else result.loss
    run.summary["last_loss"] = result.loss
    if not (step % train_cfg.log_every == 0 or step == run.start_step + 1 or _eval_due(run, step)):
        return  # (the last step is an eval step; at eval steps the routing images are drawn too)
    tok_s = run.tokens_per_step * run.interval_steps / max(time.time() - run.interval_start, 1e-9)
    row = {"loss": result.loss, "lr": result.lr, "tokens_per_s": tok_s, "tokens": run.tokens_seen}
    grad_norm = run.engine.grad_norm()
    if grad_norm is not None:
        row["grad_norm"] = grad_norm
    routing = run.monitor.report(step, draw=_eval_due(run, step)) if run.monitor is not None else None
    if routing is not None:
        row.update(routing.row)
    if run.peak_tflops:
        row["mfu"] = tok_s * run.flops_per_token / (run.peak_tflops * 1e12 * run.env.world)
    log.log(step, row)
    if routing is not None:
        run.monitor.log_wandb(log.wandb, step, routing)
        for w in routing.warnings:
            log.log_text(f"step {step}: {w}")
    log.progress(step, {"loss": f"{result.loss:.3f}", "lr": f"{result.lr:.2e}", "tok/s": f"{tok_s:,.0f}",
                        **({"maxvio": f"{row['maxvio']:.2f}"} if "maxvio" in row else {}),
                        **({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {})})
    _restart_interval(run)


def _restart_interval(run: Run) -> None:
    """Tokens/s covers training steps only: the interval restarts after a log, an eval and a save."""
    run.interval_start, run.interval_steps = time.time(), 0


# -------------------------------------------------------------------------------------------------- eval
def _eval_due(run: Run, step: int) -> bool:
    return step % run.cfg.train.eval_every == 0 or step == run.cfg.train.steps


def maybe_eval(run: Run, step: int) -> None:
    """Validation loss (per source for a mixture), MaxVio_global and greedy samples, every `eval_every` steps
    and at the last; every rank takes part (the loss is summed over ranks, and with expert parallelism the
    MoE needs all of them)."""
    if not _eval_due(run, step):
        return
    cfg, log, model = run.cfg, run.log, run.engine.model
    result = evaluate(model, run.val_data, cfg.train.eval_batches, cfg.train.micro_batch, run.env.device)
    log.log(step, result, kind="eval")
    run.summary.update(val_loss=result["loss"], val_ppl=result["ppl"])
    if run.train_data.tokenizer_path and cfg.eval.sample_tokens > 0 and cfg.eval.prompts:
        samples = greedy_samples(model, run.train_data.tokenizer_path, cfg.eval.prompts, cfg.eval.sample_tokens)
        log.log(step, {"samples": samples}, kind="samples")
        run.summary["samples"] = samples
    per_source = ", ".join(f"{k[5:]} {v:.4f}" for k, v in result.items() if k.startswith("loss/"))
    log.log_text(f"step {step}: val loss {result['loss']:.4f}" + (f" ({per_source})" if per_source else "")
                 + f", ppl {result['ppl']:.2f}" + (f", MaxVio {result['maxvio']:.3f}" if "maxvio" in result else ""))
    log.draw_curves(step)
    _restart_interval(run)


# -------------------------------------------------------------------------------------------------- save
def maybe_save(run: Run, step: int, force: bool = False) -> None:
    """A checkpoint every `checkpoint_every` steps, at the last step, and when `force`d (a stop signal),
    unless this step is saved already."""
    train_cfg = run.cfg.train
    due = step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps or force
    if not due or (run.last_saved is not None and run.last_saved.name == ckpt.step_name(step)):
        return
    if not run.engine.all_finite():
        raise TrainError(f"step {step}: weights are not finite; refusing to checkpoint them "
                         "(lower --train.lr or check the data)")
    trainer_state = {"data": run.train_data.state_dict(), "nonfinite_total": run.nonfinite_total,
                     "tokens_seen": run.tokens_seen,
                     "layout": ckpt.layout(run.env.world, run.cfg.deepspeed.zero_stage, run.cfg.deepspeed.ep_size)}
    root = run.out_dir / "checkpoints"
    try:
        run.last_saved = ckpt.save(run.engine, root, step, trainer_state,
                                   is_main=run.env.is_main, keep=train_cfg.keep_checkpoints,
                                   tokenizer=getattr(run.train_data, "tokenizer_path", None),
                                   extra={"step": step, "tokens_seen": run.tokens_seen})
    except (OSError, SafetensorError) as e:  # a full disk, a quota, a lost mount: `latest` is still complete
        latest = root / "latest"
        kept = f"checkpoints/latest still names {latest.read_text().strip()}" if latest.is_file() else "no checkpoint yet"
        why = f"{e.strerror}: {e.filename}" if getattr(e, "strerror", None) and e.filename else str(e)
        raise TrainError(f"step {step}: writing the checkpoint failed ({why}); {kept}: free space in {root} (or "
                         "lower --train.keep_checkpoints), then --resume") from None
    run.log.log_text(f"step {step}: checkpoint {run.last_saved}")
    _restart_interval(run)


# -------------------------------------------------------------------------------------------------- loop
class Preemption:
    """SIGTERM/SIGUSR1 set a flag (smolds.train.preemption; under `smolds train` from the worker's first
    moments); the loop checks it once before the first step and again after each step, all ranks agreeing."""

    def __init__(self):
        preemption.install()  # again, for train() called without the CLI; keeps a signal already received

    @property
    def flag(self) -> bool:
        return preemption.received() is not None

    def requested(self, device) -> bool:
        """Did any rank get a stop signal? A collective: every rank calls it at the same points."""
        t = torch.tensor([1.0 if self.flag else 0.0], device=device)
        return bool(parallel.all_reduce_(t, op=dist.ReduceOp.MAX).item() > 0)


def train(cfg: RunConfig, resume: bool = False) -> dict:
    """Run (or resume) a pretraining run; returns a summary (first/last loss, val loss/ppl, paths)."""
    preempt = Preemption()  # before the slow setup: a stop signal during it is kept, not fatal
    run = setup(cfg, resume)
    if preempt.requested(run.env.device):
        return _stopped_at_startup(run)
    start_logging(run)
    t_start = time.time()
    for step in range(run.start_step, cfg.train.steps):
        result = train_step(run, step)
        log_step(run, step + 1, result)
        stop = preempt.requested(run.env.device)  # all ranks agree; checked before the long eval too
        if not stop:
            maybe_eval(run, step + 1)
        maybe_save(run, step + 1, force=stop)
        if stop:
            run.log.log_text(f"preempted at step {step + 1}: checkpoint saved, exiting with {EXIT_PREEMPTED} "
                             "(resume with --resume)")
            run.log.close()
            return {**run.summary, "preempted": True, "step": step + 1, "checkpoint": str(run.last_saved)}
    run.log.close()
    last = run.last_saved or run.resumed_from  # a resume with no step left saves nothing: its checkpoint is the last
    return {**run.summary, "step": cfg.train.steps, "seconds": time.time() - t_start,
            "checkpoint": str(last) if last else None, "nonfinite_total": run.nonfinite_total,
            "wandb": run.log.wandb_dir}


def _stopped_at_startup(run: Run) -> dict:
    """Stopped before the first step: the run is exactly where its last checkpoint (or the fresh start) left
    it, so exit 75 without saving; --resume starts from the same place and nothing is lost. Running a step
    first and saving it would gain one step but spend the time the preemption lead leaves (and write a
    checkpoint identical to the one just loaded when no step ran)."""
    where = f"checkpoint {run.resumed_from}" if run.resumed_from is not None else "a fresh start"
    if run.env.is_main:
        print(f"smolds train: stop signal (SIGTERM/SIGUSR1) during startup, before step {run.start_step + 1}: "
              f"nothing to save, --resume continues from {where}; exiting with {EXIT_PREEMPTED}",
              file=sys.stderr, flush=True)
    return {**run.summary, "preempted": True, "step": run.start_step,
            "checkpoint": str(run.resumed_from) if run.resumed_from is not None else None}
