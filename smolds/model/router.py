"""The DeepSeekMoE router and auxiliary-loss-free load balancing: who chooses the experts, and who counts.

Dimension legend: N tokens (B*T flattened), D model width, E routed experts, K experts per token (top-k),
G expert groups, L MoE layers.

Routing (DeepSeek-V3, section 2.1.2): affinities s = sigmoid(x W_r^T) in fp32. Experts are *chosen* by
top-k on s + b, where b is a per-expert bias that only steers selection; the gate *weights* are the
unbiased affinities of the chosen experts, normalized to sum 1 when norm_topk_prob, times
routed_scaling_factor. Group-limited routing first keeps the topk_group groups whose score (sum of their two
highest biased affinities) is largest and masks the rest with -inf. No token is ever dropped.

Loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for MoE"): after each
optimizer step, b_i += u * sign(mean(c) - c_i), where c_i counts the tokens routed to expert i since the
last update, summed over every data-parallel rank first so that all ranks keep the same bias. Overloaded
experts become less attractive and underloaded ones more, without a gradient that fights the LM loss.

Who touches router state. Each router counts what it routes in two buffers (`tokens_per_expert` [E] and
`entropy_sum` [2]) while training; nothing else writes them but `RoutingStats`, their one owner:
`end_step()` after every optimizer step sums them over all ranks (one all-reduce of an [L, E + 2] tensor),
applies the sign rule to the bias and zeroes them; `discard()` drops a skipped step's counts;
`measure()` counts the forwards of an evaluation without touching the training interval. The routing
monitor and evaluation read what these return; statistics of counts (MaxVio, entropy, ...) are computed
in smolds/monitor/stats.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from smolds.config import ModelConfig


class Router(nn.Module):
    """Sigmoid top-k router with a selection-only bias (the `gate` of HF's DeepseekV3MoE)."""

    fp32_buffers = ("e_score_correction_bias", "tokens_per_expert", "entropy_sum")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        # The bias is state, not a parameter: no gradient, saved with the weights, always fp32.
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        # Counters owned by RoutingStats (not saved): (token, expert) assignments per expert, and
        # (sum over tokens of the entropy of their normalized affinities, tokens).
        self.register_buffer("tokens_per_expert", torch.zeros(self.n_experts), persistent=False)
        self.register_buffer("entropy_sum", torch.zeros(2), persistent=False)
        self.count_in_eval = False  # set by RoutingStats.measure: count an evaluation's forwards too
        # Activation checkpointing (`checkpoint_contexts`): the forward records its expert choice here and the
        # recompute in backward replays it, neither re-choosing nor counting the tokens a second time.
        self.record_to: dict | None = None
        self.replay_from: dict | None = None

    def _apply(self, fn, recurse=True):
        # Module.to(bfloat16) would round the bias to 8 bits of mantissa and swallow u=1e-3 updates:
        # keep fp32 buffers fp32, moving only their device.
        saved = {n: self._buffers[n] for n in self.fp32_buffers}
        super()._apply(fn, recurse)
        for n, b in saved.items():
            self._buffers[n] = b.to(device=self._buffers[n].device)
        return self

    def forward(self, x: torch.Tensor):
        """x [N, D] -> (topk_idx [N, K] long, topk_weight [N, K] fp32, scores [N, E] fp32)."""
        with torch.autocast(x.device.type, enabled=False):  # router math in fp32 even under autocast
            scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [N, E] affinities
        if self.replay_from is not None:  # recompute of a checkpointed block: the forward's choice, counted once
            topk_idx = self.replay_from[self]
        else:
            topk_idx = self.choose(scores)
        topk_weight = scores.gather(1, topk_idx)  # unbiased affinities carry the gradient
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(-1, keepdim=True) + 1e-20)
        topk_weight = topk_weight * self.scaling
        if self.replay_from is not None:
            return topk_idx, topk_weight, scores
        if self.record_to is not None:
            self.record_to[self] = topk_idx
        if self.training or self.count_in_eval:
            self._count(topk_idx, scores)
        return topk_idx, topk_weight, scores

    @torch.no_grad()
    def _count(self, topk_idx: torch.Tensor, scores: torch.Tensor) -> None:
        """Add this forward's assignments and affinity entropy to the counters (device ops only, no host
        sync: index_add_, not bincount)."""
        flat = topk_idx.flatten()
        self.tokens_per_expert.index_add_(0, flat, torch.ones(flat.numel(), device=flat.device))
        p = scores / scores.sum(-1, keepdim=True)  # [N, E] normalized affinities
        self.entropy_sum[0] += -torch.xlogy(p, p).sum()
        self.entropy_sum[1] += scores.shape[0]

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k of the biased affinities [N, E] within the topk_group best groups -> expert ids [N, K]."""
        choice = scores.detach() + self.e_score_correction_bias  # biased, only for selection
        if self.n_group > 1:
            N = scores.shape[0]
            grouped = choice.view(N, self.n_group, -1)  # [N, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(N, -1)
        return choice.topk(self.top_k, dim=-1).indices  # [N, K]

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, rate: float, center: bool = False):
        """The sign rule: b_i += u * sign(mean(c) - c_i) (optionally mean-centered, as torchtitan)."""
        delta = rate * torch.sign(counts.mean() - counts)
        if center:
            delta -= delta.mean()
        self.e_score_correction_bias += delta.to(self.e_score_correction_bias)


def routers(model: nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


# ---------------------------------------------------------------------------- the counters' one owner
@dataclass
class RoutedCounts:
    """What the routers counted over an interval: `counts` [L, E] assignments per expert and `entropy`
    [L, 2] (sum of the tokens' affinity entropies, tokens) per MoE layer."""

    counts: torch.Tensor
    entropy: torch.Tensor


class RoutingStats:
    """Reads and resets the routers' counters, and applies the loss-free bias update.

    `group`: the ranks whose counts are summed (None: all). Every rank must call `end_step` (a collective).
    """

    def __init__(self, model: nn.Module, cfg: ModelConfig | None = None, group=None):
        self.routers = routers(model)
        self.cfg = cfg
        self.group = group

    def _stacked(self) -> torch.Tensor:
        return torch.cat([torch.stack([r.tokens_per_expert for r in self.routers]),
                          torch.stack([r.entropy_sum for r in self.routers])], dim=1)  # [L, E + 2]

    def _zero(self) -> None:
        for r in self.routers:
            r.tokens_per_expert.zero_()
            r.entropy_sum.zero_()

    @torch.no_grad()
    def end_step(self, update_bias: bool = True) -> RoutedCounts | None:
        """Call once after each optimizer step, on every rank: sums the interval's counts over the ranks
        (one all-reduce), applies the sign rule when loss-free balancing is on, and zeroes the counters.
        Returns the summed counts, or None for a model without MoE layers."""
        if not self.routers:
            return None
        both = self._stacked()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(both, group=self.group)
        E = self.routers[0].n_experts
        counts, entropy = both[:, :E], both[:, E:]
        cfg = self.cfg
        if update_bias and cfg is not None and cfg.uses_loss_free and cfg.bias_update_rate > 0:
            for r, c in zip(self.routers, counts):
                r.update_bias(c, cfg.bias_update_rate, cfg.bias_update_center)
        self._zero()
        return RoutedCounts(counts, entropy)

    def discard(self) -> None:
        """Drop the interval's counts without a bias update (a skipped step's tokens steer nothing)."""
        self._zero()

    @contextlib.contextmanager
    def measure(self):
        """Count the routing of the forwards run inside (eval mode too) on this rank, leaving the training
        interval's counters as they were: yields a RoutedCounts filled in on exit."""
        saved = [(r.tokens_per_expert.clone(), r.entropy_sum.clone(), r.count_in_eval) for r in self.routers]
        self._zero()
        for r in self.routers:
            r.count_in_eval = True
        result = RoutedCounts(torch.empty(0), torch.empty(0))
        try:
            yield result
            if self.routers:
                both = self._stacked().clone()
                E = self.routers[0].n_experts
                result.counts, result.entropy = both[:, :E], both[:, E:]
        finally:
            for r, (counts, entropy, flag) in zip(self.routers, saved):
                r.tokens_per_expert.copy_(counts)
                r.entropy_sum.copy_(entropy)
                r.count_in_eval = flag


# ------------------------------------------------------------------------------ activation checkpointing
@contextlib.contextmanager
def _set_routers(rs: list[Router], attr: str, store: dict):
    for r in rs:
        setattr(r, attr, store)
    try:
        yield
    finally:
        for r in rs:
            setattr(r, attr, None)


def checkpoint_contexts(module: nn.Module):
    """`context_fn` for torch.utils.checkpoint around a module that may hold routers: its forward records each
    router's expert choice, the recompute in backward replays it. So the tokens are counted once (for the
    loss-free bias and the monitor; PEERS.md: recompute would count them twice) and the recompute routes
    exactly as the forward did, even where a recomputed score could differ in the last bit (GPU)."""
    rs, store = routers(module), {}
    return _set_routers(rs, "record_to", store), _set_routers(rs, "replay_from", store)


def _save_routing(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.topk.default else CheckpointPolicy.PREFER_RECOMPUTE


def recompute_policy():
    """`context_fn` for a checkpoint that torch.compile traces (`Block._checkpointed`): recompute everything
    in backward but the top-k results, so the recompute routes exactly as the forward did (the eager
    `checkpoint_contexts` replays the choice instead)."""
    return create_selective_checkpoint_contexts(_save_routing)
