"""Routing statistics: every number the monitor, the trainer and `smolds eval` report about expert load,
each computed in one place from a count tensor.

Dimension legend: L MoE layers, E routed experts, P expert-parallel ranks.

Definitions (counts c_i are (token, expert) assignments, so they sum to K per token):
    load share      c_i / sum(c)
    MaxVio          (max c - mean c) / mean c (Wang et al. 2024): MaxVio_batch for one optimizer step's
                    global batch, MaxVio_global over a whole evaluation set. An even load gives 0.
    CV              std(c) / mean(c) (population std)
    load entropy    H(share) / log E: 1 = even, 0 = one expert takes everything
    router entropy  mean over tokens of H(p_t) / log E, p_t = the token's sigmoid affinities normalized to
                    sum 1: how undecided the router is. The routers accumulate (sum of H(p_t), tokens) per
                    layer (smolds/model/router.py); `normalized_entropy` turns that into this number.
    dead expert     no tokens in a window of steps (the window is the caller's)
    EP imbalance    max / mean over EP ranks of the assignments each rank's experts receive (rank p holds
                    experts [p*E/P, (p+1)*E/P)): the slowest rank's share of the all-to-all and expert compute
The functions take torch tensors on any device (so the live monitor runs them on the device without a
host sync) or anything `torch.as_tensor` takes.
"""

from __future__ import annotations

import math

import torch

from smolds.model.expert_parallel import ep_size_error


def _as_2d(counts) -> torch.Tensor:
    c = torch.as_tensor(counts)
    return c[None] if c.dim() == 1 else c


def max_violation(counts) -> tuple[torch.Tensor, float]:
    """MaxVio per layer of counts [L, E] (or [E]) in the counts' float precision (at least fp32), and their
    mean. On a device tensor, call `max_violation_per_layer` to stay free of host syncs."""
    per_layer = max_violation_per_layer(counts)
    return per_layer, float(per_layer.mean())


def max_violation_per_layer(counts) -> torch.Tensor:
    c = _as_2d(counts)
    c = c.double() if c.dtype == torch.float64 else c.float()
    mean = c.mean(-1).clamp_min(1e-9)
    return (c.amax(-1) - mean) / mean  # [L]


def normalized_entropy(entropy, n_experts: int) -> torch.Tensor:
    """Router entropy per layer from accumulated (sum of token entropies, tokens) pairs [L, 2]: the mean
    token entropy over log E (NaN for a layer that saw no token)."""
    e = _as_2d(entropy).double()
    return e[:, 0] / e[:, 1] / (math.log(n_experts) if n_experts > 1 else 1.0)


def tokens_per_ep_rank(counts, ep_size: int) -> torch.Tensor:
    """Assignments received per expert-parallel rank [L, P] from counts [L, E]."""
    c = _as_2d(counts)
    problem = ep_size_error(ep_size, c.shape[-1])
    if problem:
        raise ValueError(problem)
    return c.reshape(c.shape[0], ep_size, -1).sum(-1)


def ep_imbalance(counts, ep_size: int) -> torch.Tensor:
    """max / mean over the EP ranks of the assignments each receives, per layer [L]."""
    per_rank = tokens_per_ep_rank(counts, ep_size)
    return per_rank.amax(-1) / per_rank.mean(-1).clamp_min(1e-9)


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0


def routing_stats(counts, biases=None, prev_biases=None, entropy=None, ep_size: int = 1) -> dict:
    """Everything that follows from one [L, E] count tensor (plus biases / entropy), in float64 on the host.

    counts: [L, E] (or [E]) assignments per expert, already summed over ranks. biases, prev_biases: [L, E]
    router biases now and at the previous report (for the mean |change|). entropy: [L] normalized router
    entropy, passed through. ep_size: P > 1 adds the assignments received per EP rank [L, P]. Returns plain
    Python lists and floats; `*_per_layer` lists have L entries and the key without the suffix is their mean.
    """
    c = _as_2d(torch.as_tensor(counts, dtype=torch.float64).detach().cpu())
    L, E = c.shape
    total = c.sum(-1, keepdim=True)
    share = torch.where(total > 0, c / total.clamp_min(1e-12), torch.zeros_like(c))  # [L, E]
    mean = c.mean(-1)
    cv = torch.where(mean > 0, c.std(-1, unbiased=False) / mean.clamp_min(1e-12), torch.zeros_like(mean))
    ent = -torch.xlogy(share, share).sum(-1) / (math.log(E) if E > 1 else 1.0)
    dead = [torch.nonzero(row == 0).flatten().tolist() for row in c]
    s = {
        "load_share": share.tolist(),
        "load_share_min": share.amin(-1).tolist(),
        "load_share_max": share.amax(-1).tolist(),
        "maxvio_per_layer": max_violation_per_layer(c).tolist(),
        "cv_per_layer": cv.tolist(),
        "load_entropy_per_layer": ent.tolist(),
        "dead_experts_per_layer": dead,
        "dead_experts": sum(len(d) for d in dead),
    }
    for k in ("maxvio", "cv", "load_entropy"):
        s[k] = _mean(s[f"{k}_per_layer"])
    if entropy is not None:
        s["router_entropy_per_layer"] = torch.as_tensor(entropy, dtype=torch.float64).flatten().tolist()
        s["router_entropy"] = _mean(s["router_entropy_per_layer"])
    if biases is not None:
        b = torch.as_tensor(biases, dtype=torch.float64).detach().cpu().view(L, E)
        s.update(bias_min=b.amin(-1).tolist(), bias_max=b.amax(-1).tolist(), bias_mean=b.mean(-1).tolist())
        if prev_biases is not None:
            d = (b - torch.as_tensor(prev_biases, dtype=torch.float64).detach().cpu().view(L, E)).abs().mean(-1)
            s.update(bias_change_per_layer=d.tolist(), bias_change=_mean(d.tolist()))
    if ep_size > 1:
        per_rank = tokens_per_ep_rank(c, ep_size)
        imb = ep_imbalance(c, ep_size)
        whole = torch.equal(per_rank, per_rank.round())
        s.update(tokens_per_ep_rank=(per_rank.long() if whole else per_rank).tolist(),
                 ep_imbalance_per_layer=imb.tolist(), ep_imbalance=_mean(imb.tolist()))
    return s
