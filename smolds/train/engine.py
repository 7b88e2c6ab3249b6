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

import torch
import torch.distributed as dist
from torch import nn

from smolds.config import ModelConfig
from smolds.model.experts import RoutedExperts
from smolds.model.moe import MoE
from smolds.model.transformer import Transformer
from smolds.train import parallel
from smolds.train.config import RunConfig, TrainError


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
    if source.config != model.config:
        a, b = source.config.to_dict(), model.config.to_dict()
        diff = ", ".join(f"{k} {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        raise TrainError(f"train.init_from {path}: its model differs from this run's ({diff}); "
                          "drop the --model overrides or pick a matching checkpoint")
    model.load_state_dict(source.state_dict(), strict=True)


def param_groups(model: nn.Module, weight_decay: float, ep: bool) -> list[dict]:
    """Weight decay on matrices only (embeddings, projections, experts, router), not on norms; with expert
    parallelism DeepSpeed's split of the expert parameters into their own groups."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    if ep:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


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
    for k, v in cfg.deepspeed.config.items():  # the user's raw DeepSpeed settings win
        ds[k] = {**ds[k], **v} if isinstance(v, dict) and isinstance(ds.get(k), dict) else v
    return ds


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

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, skip: bool) -> tuple[torch.Tensor, bool]:
        """One micro-batch: forward, backward, DeepSpeed's step. `skip`: an earlier micro-batch of this
        optimizer step was non-finite on some rank. Returns (this micro-batch's LM loss, NaN when skipped;
        whether the optimizer step is skipped), the same on every rank."""
        out = self.ds(x.to(self.device), targets=y.to(self.device))
        skip = skip or not parallel.all_ranks(bool(torch.isfinite(out.loss).item()), self.device)
        loss = out.loss if not skip else sum(p.reshape(-1)[0] * 0.0 for p in self.model.parameters())
        self.ds.backward(loss)
        for g in self.ds.optimizer.param_groups:
            g["lr"] = 0.0 if skip else lr
        if self.ds.is_gradient_accumulation_boundary() and self.zero_stage == 0:
            self._grad_norm = grad_norm(self.model, self.ep_group)  # ZeRO computes its own; stage 0 does not
        self.ds.step()
        return (out.lm_loss.detach().float() if not skip else torch.tensor(float("nan"))), skip

    def grad_norm(self) -> float | None:
        """The last optimizer step's global gradient norm, before clipping."""
        norm = self.ds.get_global_grad_norm() if self.zero_stage > 0 else self._grad_norm
        return None if norm is None else float(norm)

    def all_finite(self) -> bool:
        """Are the weights finite on every rank (this rank's partition under ZeRO-3)? A collective."""
        local = [getattr(p, "ds_tensor", p) for p in self.model.parameters()]
        ok = torch.tensor([1.0 if all(torch.isfinite(p).all() for p in local) else 0.0], device=self.device)
        return bool(parallel.all_reduce_(ok, op=dist.ReduceOp.MIN).item() > 0)

    # -------------------------------------------------------------------------- DeepSpeed's checkpoint files
    def save_files(self, directory, tag: str, step: int) -> None:
        """DeepSpeed's share of a checkpoint (model states, ZeRO optimizer shards per rank) into directory/tag."""
        self.ds.save_checkpoint(str(directory), tag=tag, client_state={"smolds_step": step}, save_latest=False)

    def load_files(self, directory, tag: str) -> bool:
        """Restore weights and optimizer state from directory/tag; False when DeepSpeed found nothing."""
        load_path, _ = self.ds.load_checkpoint(str(directory), tag=tag, load_module_strict=True)
        return load_path is not None
