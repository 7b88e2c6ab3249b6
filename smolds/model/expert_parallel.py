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


def ep_size_error(ep_size: int, n_experts: int, world: int | None = None) -> str | None:
    """Why `ep_size` cannot split `n_experts` routed experts over `world` ranks (None: it can). The one place
    this rule is checked: the trainer, `shard_experts` and the monitor's per-rank statistics ask here."""
    if not isinstance(ep_size, int) or ep_size < 1:
        return f"ep_size must be a positive integer, got {ep_size!r}"
    if n_experts % ep_size:
        return f"ep_size {ep_size} must divide n_routed_experts {n_experts}"
    if world is not None and world % ep_size:
        return f"ep_size {ep_size} must divide the number of ranks {world}"
    return None


def shard_experts(moe, group) -> None:
    """Keep only this rank's slice of the (identically initialized) stacked expert weights of `moe` (an
    smolds.model.moe.MoE), and switch it to the all-to-all dispatch."""
    P, p = dist.get_world_size(group), dist.get_rank(group)
    problem = ep_size_error(P, moe.n_experts)
    if problem:
        raise ValueError(problem)
    L = moe.n_experts // P
    ex = moe.experts
    for name in ("gate_proj", "up_proj", "down_proj"):
        full = getattr(ex, name)
        setattr(ex, name, torch.nn.Parameter(full.data[p * L : (p + 1) * L].clone()))
    ex.num_local_experts = L
    moe.ep_group = group


def dispatch_expert_parallel(moe, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor):
    """x [N, D] this rank's tokens, topk_idx/topk_weight [N, K] -> [N, D]: each pair computed by the rank
    that holds its expert."""
    group = moe.ep_group
    P = dist.get_world_size(group)
    E, L = moe.n_experts, moe.experts.num_local_experts
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
