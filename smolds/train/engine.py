"""The DeepSpeed engine as the training loop uses it: the only module that talks to DeepSpeed.

What DeepSpeed does here: ZeRO 0-2 (3 for dense models), gradient accumulation, clipping, bf16, AdamW (torch's
fused kernel, `torch_adam`), and the reduction of expert gradients over the expert-data-parallel group.
What it does not: smolds' MoE layer is its own (PEERS.md: DeepSpeed's gate has no selection bias and its
"dropless" pads); DeepSpeed treats a parameter as an expert parameter when it carries `allreduce = False` and
`group_name = "ep_size_<N>"`, and turns its expert handling on only when it finds an instance of its own MoE
class in the model, so `build_model` marks the routed experts and adds a parameterless marker module.

`Engine.micro_step` is one micro-batch: forward, backward and DeepSpeed's step (which steps the optimizer at
the accumulation boundary). A non-finite loss on any rank makes every rank skip the whole optimizer step:
the backward runs on a zero loss and the learning rate is 0, so the weights do not move (Adam's moments decay
by one step).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from smolds.config import ModelConfig
from smolds.model.experts import RoutedExperts
from smolds.model.moe import MoE
from smolds.model.transformer import Transformer
from smolds.train import parallel
from smolds.train.config import RunConfig, TrainError

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state per parameter, besides its step count


# ------------------------------------------------------------------------------------------------ model
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

        def set_deepspeed_parallelism(self, *args, **kwargs):  # groups are created by smolds.train.parallel
            pass

        def forward(self, x):
            return x

    return Marker()


def build_model(cfg: RunConfig, model_cfg: ModelConfig):
    """The model on every rank, identically initialized (also the experts, before each rank keeps its
    slice); with expert parallelism its routed experts sharded and marked. -> (model, ep_group or None)."""
    torch.manual_seed(cfg.train.seed)
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
    from smolds.pretrained import CheckpointError, load_pretrained

    try:
        source, _ = load_pretrained(path)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise TrainError(f"train.init_from: {e}") from None
    a, b = source.config.to_dict(), model.config.to_dict()
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in ModelConfig.TRAINING_ONLY]
    if differ:
        diff = ", ".join(f"{k} {a.get(k)!r} there, {b.get(k)!r} here" for k in differ)
        raise TrainError(f"train.init_from {path}: its model differs from this run's ({diff}); "
                          "drop the --model overrides or pick a matching checkpoint")
    model.load_state_dict(source.state_dict(), strict=True)


def param_groups(model: nn.Module, weight_decay: float, ep: bool) -> list[dict]:
    """Weight decay on matrices only (embeddings, projections, experts, router), not on norms, biases or KDA's
    per-head decay rates (`A_log`, stored [1, 1, H, 1]: decaying it pulls every head towards one forgetting
    rate); with expert parallelism DeepSpeed's split of the expert parameters into their own groups."""
    named = list(model.named_parameters())
    decays = {n: p.dim() >= 2 and not n.endswith("A_log") for n, p in named}
    decay = [p for n, p in named if decays[n]]
    no_decay = [p for n, p in named if not decays[n]]
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    if ep:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


# DeepSpeed settings smolds derives from the run's own fields: a raw deepspeed.config may repeat them, not contradict them
OWNED = {("train_micro_batch_size_per_gpu",): "train.micro_batch",
         ("gradient_accumulation_steps",): "train.grad_accum",
         ("train_batch_size",): "train.micro_batch x train.grad_accum x ranks",
         ("zero_optimization", "stage"): "deepspeed.zero_stage",
         ("bf16", "enabled"): "train.dtype"}


def deepspeed_config(cfg: RunConfig, world: int, bf16: bool) -> dict:
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world,
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
    owned = {path: _get(ds, path) for path in OWNED}
    for k, v in cfg.deepspeed.config.items():  # the user's raw DeepSpeed settings win ...
        ds[k] = {**ds[k], **v} if isinstance(v, dict) and isinstance(ds.get(k), dict) else v
    for path, field in OWNED.items():  # ... except over the run's own fields
        if _get(ds, path) != owned[path]:
            raise TrainError(f"deepspeed.config sets {'.'.join(path)} to {_get(ds, path)!r}, but this run's {field} "
                             f"gives {owned[path]!r}; drop it from deepspeed.config and set {field} instead")
    return ds


def _get(d: dict, path: tuple[str, ...]):
    for k in path:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def check_deepspeed_config(cfg: RunConfig, world: int, bf16: bool) -> None:
    """The DeepSpeed config this run would pass, validated by DeepSpeed itself before the slow setup: a raw
    deepspeed.config that DeepSpeed refuses (an assertion, a validation error) is a one-line TrainError."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(deepspeed_config(cfg, world, bf16))
    except TrainError:
        raise
    except Exception as e:  # DeepSpeed validates with asserts, pydantic and ValueErrors
        problem = " ".join(str(e).split())[:300] or type(e).__name__
        raise TrainError(f"DeepSpeed refuses this run's config ({problem}); fix --deepspeed.config") from None


@torch.no_grad()
def grad_norm(model, ep_group) -> float:
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


# ----------------------------------------------------------------------------------------------- engine
class Engine:
    """The model inside DeepSpeed's engine, and the few things the loop asks of it."""

    def __init__(self, cfg: RunConfig, model_cfg: ModelConfig, env: parallel.Env, bf16: bool):
        import deepspeed

        model, self.ep_group = build_model(cfg, model_cfg)
        groups = param_groups(model, cfg.train.weight_decay, self.ep_group is not None)
        self.ds, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                                config=deepspeed_config(cfg, env.world, bf16))
        self.model: Transformer = self.ds.module
        self.device, self.bf16 = env.device, bf16
        self.zero_stage = cfg.deepspeed.zero_stage
        self._grad_norm: float | None = None
        self.teacher, self.distill_weight = None, cfg.train.distill_weight
        if cfg.train.distill_from:  # frozen, whole on every rank (smolds/train/distill.py)
            from smolds.train.distill import Teacher

            self.teacher = Teacher(cfg.train.distill_from, self.model, self.device,
                                   torch.bfloat16 if bf16 else torch.float32)

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, skip: bool) -> tuple[torch.Tensor, bool]:
        """One micro-batch: forward, backward, DeepSpeed's step. `skip`: an earlier micro-batch of this
        optimizer step was non-finite on some rank. Returns (this micro-batch's LM loss, NaN when skipped;
        whether the optimizer step is skipped), the same on every rank."""
        x, y = x.to(self.device), y.to(self.device)
        if self.teacher is None:
            out = self.ds(x, targets=y)
            loss, lm_loss = out.loss, out.lm_loss
        else:  # (1 - w) LM loss + w KL(teacher || student), one fused pass (smolds/train/distill.py)
            out = self.ds(x, last_only=True)
            loss, lm_loss, _ = self.teacher.loss(x, y, self.distill_weight)
            loss = loss if out.balance_loss is None else loss + out.balance_loss
        skip = skip or not parallel.all_ranks(bool(torch.isfinite(loss).item()), self.device)
        loss = loss if not skip else sum(p.reshape(-1)[0] * 0.0 for p in self.model.parameters())
        self.ds.backward(loss)
        for g in self.ds.optimizer.param_groups:
            g["lr"] = 0.0 if skip else lr
        if self.ds.is_gradient_accumulation_boundary() and self.zero_stage == 0:
            self._grad_norm = grad_norm(self.model, self.ep_group)  # ZeRO computes its own; stage 0 does not
        self.ds.step()
        return (lm_loss.detach().float() if not skip else torch.tensor(float("nan"))), skip

    def grad_norm(self) -> float | None:
        """The last optimizer step's global gradient norm, before clipping."""
        norm = self.ds.get_global_grad_norm() if self.zero_stage > 0 else self._grad_norm
        return None if norm is None else float(norm)

    def all_finite(self) -> bool:
        """Are the weights finite on every rank (this rank's partition under ZeRO-3)? A collective."""
        local = [getattr(p, "ds_tensor", p) for p in self.model.parameters()]
        ok = torch.tensor([1.0 if all(torch.isfinite(p).all() for p in local) else 0.0], device=self.device)
        return bool(parallel.all_reduce_(ok, op=dist.ReduceOp.MIN).item() > 0)

    # ------------------------------------------------------------------- the optimizer's state, whole per parameter
    # What a checkpoint needs of DeepSpeed, at any ZeRO stage: each parameter's fp32 master weight and Adam
    # moments as whole tensors, and Adam's step count. Where they live differs by stage:
    #   ZeRO-0 fp32   the torch AdamW over the model's own parameters (`state[p]`)
    #   ZeRO-0 bf16   DeepSpeed's FP16_UnfusedOptimizer: one fp32 copy per parameter (`fp32_groups`)
    #   ZeRO-1/2      flat fp32 partitions over the data-parallel group (for expert parameters, the
    #                 expert-data-parallel group); ZeRO-3: partitioned parameters too
    # At ZeRO 1-3 DeepSpeed's per-parameter accessors (`safe_get_full_*` / `safe_set_full_*`) assemble and
    # scatter them; each `get` is a collective over the parameter's group, so every rank calls these for
    # every parameter in the same order. A routed-expert parameter under expert parallelism is this rank's
    # experts: gathering them over the EP group is the checkpoint's business (smolds/train/checkpoint.py).
    @functools.cached_property
    def _masters(self) -> dict:
        """ZeRO-0: each model parameter -> the fp32 tensor the optimizer steps (itself in fp32)."""
        opt = self.ds.optimizer
        if opt is self.ds.basic_optimizer:
            return {p: p for g in opt.param_groups for p in g["params"]}
        return {lp: hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}

    def _adam_tensors(self) -> list[list[torch.Tensor]]:
        """Per optimizer param group, the fp32 tensors torch's AdamW keeps state for."""
        opt = self.ds.basic_optimizer
        if self.zero_stage == 3:  # the groups hold no tensors between steps; each sub-group's partition
            groups = [[] for _ in opt.param_groups]
            for sub, hp in enumerate(self.ds.optimizer.fp32_partitioned_groups_flat):
                groups[self.ds.optimizer.sub_group_to_group_id[sub]].append(hp)
            return groups
        return [list(g["params"]) for g in opt.param_groups]

    def ensure_optimizer_state(self) -> None:
        """Create Adam's state where it does not exist yet (ZeRO 1-3 create it at the first step, so a fresh
        engine has none to restore into): one step with zero gradients at learning rate 0, which makes torch
        create it in its own format and moves no weight (the decoupled decay is lr x wd = 0); the step count
        it leaves is overwritten by the caller. Then DeepSpeed's ZeRO-1/2 per-parameter views of it are
        (re)linked: DeepSpeed links them once, after the first param group's first step, when the later
        groups have no state yet, so without this `safe_get_full_optimizer_state` fails for their parameters."""
        opt = self.ds.basic_optimizer
        missing = [[t for t in ts if not opt.state.get(t)] for ts in self._adam_tensors()]
        if any(missing):
            self._zero_grad_step(missing)
        zero = self.ds.optimizer
        if hasattr(zero, "_hp_optimizer_states_linked"):  # ZeRO-1/2 and BF16_Optimizer
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _zero_grad_step(self, tensors: list[list[torch.Tensor]]) -> None:
        """One AdamW step at learning rate 0 on `tensors` (per param group) alone, with zero gradients."""
        opt = self.ds.basic_optimizer
        saved = [(g["params"], g["lr"]) for g in opt.param_groups]
        for g, ts in zip(opt.param_groups, tensors):
            g["params"], g["lr"] = ts, 0.0
            for t in ts:
                t.grad = torch.zeros_like(t)
        try:
            opt.step()
        finally:
            for g, (params, lr) in zip(opt.param_groups, saved):
                g["params"], g["lr"] = params, lr
            for t in (t for ts in tensors for t in ts):
                t.grad = None

    def fp32_state(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        """Parameter p's fp32 master weight ("fp32") and Adam moments, whole on this rank (an expert
        parameter: this rank's experts). A collective at ZeRO 1-3; the optimizer state must exist."""
        if self.zero_stage == 0:
            hp = self._masters[p]
            state = self.ds.basic_optimizer.state[hp]
            return {"fp32": hp.detach(), **{k: state[k] for k in MOMENTS}}
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        return {"fp32": safe_get_full_fp32_param(p), **{k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}}

    def set_fp32_state(self, p: nn.Parameter, values: dict[str, torch.Tensor]) -> None:
        """Set p's master weight, its working copy (bf16 or fp32) and its moments from whole tensors (an
        expert parameter: this rank's experts); each rank keeps its own partition. Every rank calls it for
        every parameter (ZeRO-3 re-partitions the working copy collectively)."""
        values = {k: v.to(self.device) for k, v in values.items()}
        with torch.no_grad():
            if self.zero_stage == 0:
                hp = self._masters[p]
                hp.copy_(values["fp32"])
                if hp is not p:
                    p.copy_(values["fp32"])
                for k in MOMENTS:
                    self.ds.basic_optimizer.state[hp][k].copy_(values[k])
                return
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            safe_set_full_fp32_param(p, values["fp32"])
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, values[k], k)
            if self.zero_stage == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.copy_(values["fp32"])
            else:
                p.copy_(values["fp32"])

    def optimizer_step(self) -> int:
        """Adam's step count (the bias correction's t), the same for every tensor it steps."""
        steps = {int(s["step"]) for s in self.ds.basic_optimizer.state.values()}
        if len(steps) != 1:
            raise RuntimeError(f"Adam's step counts differ across parameters ({sorted(steps)}); a checkpoint "
                               "keeps one: report this with the run's config")
        return steps.pop()

    def set_optimizer_step(self, step: int) -> None:
        for s in self.ds.basic_optimizer.state.values():
            if torch.is_tensor(s["step"]):
                s["step"].fill_(step)
            else:
                s["step"] = step
