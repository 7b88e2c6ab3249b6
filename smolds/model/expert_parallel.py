"""Expert parallelism: routed experts split across ranks, tokens moved by all-to-all, dropless.

Dimension legend: N local tokens, K top-k, E routed experts, P ranks in the expert-parallel group,
L = E / P experts held by this rank.

Rank p holds experts [p*L, (p+1)*L). Each rank routes its own tokens, sorts the N*K (token, expert) pairs
by global expert (so pairs for rank 0's experts come first, then rank 1's, ...), exchanges the per-expert
counts (one small all-to-all), then sends each rank exactly the pairs it needs with variable split sizes
(`all_to_all_single`, autograd-aware: the backward pass is the reverse all-to-all). No capacity factor, no
padding, no dropped tokens: a rank receives what it is sent. Received pairs arrive grouped by source rank;
they are regrouped by local expert for the grouped matmul and the results travel back the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from smolds.model.moe import MoE


def shard_experts(moe: MoE, group) -> None:
    """Keep only this rank's slice of the (identically initialized) stacked expert weights."""
    P, p = dist.get_world_size(group), dist.get_rank(group)
    if moe.n_experts % P:
        raise ValueError(f"ep_size {P} must divide n_routed_experts {moe.n_experts}")
    L = moe.n_experts // P
    ex = moe.experts
    for name in ("gate_proj", "up_proj", "down_proj"):
        full = getattr(ex, name)
        setattr(ex, name, torch.nn.Parameter(full.data[p * L : (p + 1) * L].clone()))
    ex.n_experts = L
    moe.ep_group = group


def dispatch_expert_parallel(moe: MoE, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor):
    group = moe.ep_group
    P = dist.get_world_size(group)
    E, L = moe.n_experts, moe.experts.n_experts
    N, K = topk_idx.shape
    flat_idx = topk_idx.flatten()
    order = flat_idx.argsort(stable=True)  # pairs sorted by global expert = by destination rank
    token_of = order // K
    send_counts = torch.bincount(flat_idx, minlength=E).view(P, L)  # [P, L] pairs I send to rank q's experts
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)  # [P, L] pairs rank q sends to my experts
    send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()

    x_recv = all_to_all_single_autograd(x[token_of], recv_splits, send_splits, group)  # by source, then expert
    local_expert = torch.arange(L, device=x.device).repeat(P).repeat_interleave(recv_counts.flatten())
    regroup = local_expert.argsort(stable=True)  # group by local expert across sources
    y_sorted = moe.experts(x_recv[regroup], recv_counts.sum(0))
    y_recv = torch.empty_like(y_sorted).index_copy(0, regroup, y_sorted)  # undo the regrouping
    y = all_to_all_single_autograd(y_recv, send_splits, recv_splits, group)
    y = y * topk_weight.flatten()[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, y)
