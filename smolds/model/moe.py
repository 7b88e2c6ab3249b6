"""The DeepSeekMoE layer: shared experts plus fine-grained routed experts behind a sigmoid top-k router.

Dimension legend: N tokens (B*T flattened), D model width, E routed experts, K experts per token (top-k),
I expert width (moe_intermediate_size).

y = sum over the token's K chosen experts of g_k * FFN_k(x) + shared(x) (DeepSeek-V3, eq. 12-16). The router
and the loss-free bias live in smolds/model/router.py, the experts' kernels in smolds/model/experts.py, the
expert-parallel all-to-all in smolds/model/expert_parallel.py. This file holds how tokens reach the experts:
- `dispatch_local` (training, prefill): sort the N*K (token, expert) pairs by expert, run every expert on its
  contiguous slice (grouped matmuls), scatter back weighted by the gates;
- `dispatch_decode` (a few tokens without grad): one of the small-batch forms below;
- expert parallelism: `dispatch_expert_parallel`.
The balance losses kept for comparison with loss-free balancing: `aux_loss` (Switch/GShard alpha * sum f_i P_i
over the batch) and `seq_aux` (DeepSeek-V3's complementary sequence-wise loss, combinable with loss-free).
Every form equals `smolds.model.reference.naive_moe_reference` (tests/test_moe.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smolds.config import ModelConfig
from smolds.model.expert_parallel import dispatch_expert_parallel
from smolds.model.experts import RoutedExperts, grouped_mm_ok
from smolds.model.layers import SwiGLU
from smolds.model.router import Router

# ------------------------------------------------------------------------------------ decoding: few tokens
# A decode step routes B tokens (B = batch), far fewer than the sort/grouped-GEMM dispatch is built for: its
# sort, scatter and per-group launches (grouped_mm's CPU kernel calls a matmul for every expert, empty or not)
# cost more than the experts' products when run eagerly. `MoE.dispatch_decode` takes forwards of at most
# DECODE_MAX_TOKENS tokens without grad and picks one of the three forms below (or, compiled on CPU with more
# (token, expert) pairs than experts, the training dispatch, whose sort and scatter inductor compiles away);
# each equals `naive_moe_reference` (tests/test_moe.py).
DECODE_MAX_TOKENS = 64


def _expert_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype under autocast (as the experts' matmuls would run), else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def experts_loop(x, topk_idx, topk_weight, w1, w3, w2) -> torch.Tensor:
    """One SwiGLU per expert that has tokens, on its tokens only, with the expert ids read on the host (free
    on CPU, a sync on CUDA: CPU only). x [N, D], topk_idx and topk_weight [N, K], w1/w3 [E, I, D],
    w2 [E, D, I] -> [N, D]."""
    N, K = topk_idx.shape
    dtype = _expert_dtype(x)
    xe = x.to(dtype)
    if N == 1:  # one token: its K experts in turn, nothing to sort or scatter
        y = torch.zeros_like(x)
        for k, e in enumerate(topk_idx[0].tolist()):
            h = F.silu(F.linear(xe, w1[e].to(dtype))) * F.linear(xe, w3[e].to(dtype))  # [1, I]
            y += (F.linear(h, w2[e].to(dtype)) * topk_weight[:, k, None].to(dtype)).to(x.dtype)
        return y
    flat = topk_idx.flatten()
    order = flat.argsort(stable=True)  # [N*K] pairs by expert
    token_of = order // K
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    outs = []
    for e, xs in enumerate(xe[token_of].split(counts)):
        if counts[e]:
            h = F.silu(F.linear(xs, w1[e].to(dtype))) * F.linear(xs, w3[e].to(dtype))
            outs.append(F.linear(h, w2[e].to(dtype)))
    out = torch.cat(outs) * topk_weight.flatten()[order, None].to(dtype)  # [N*K, D]
    return torch.zeros_like(x).index_add_(0, token_of, out.to(x.dtype))


@torch.library.custom_op("smolds::experts_loop", mutates_args=())
def _experts_loop_op(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w1: torch.Tensor,
                     w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """`experts_loop` as one opaque op, so that a compiled decode step keeps it in its graph (no break)."""
    return experts_loop(x, topk_idx, topk_weight, w1, w3, w2)


@_experts_loop_op.register_fake
def _(x, topk_idx, topk_weight, w1, w3, w2):
    return torch.empty_like(x)


def experts_gathered(x, topk_idx, topk_weight, w1, w3, w2) -> torch.Tensor:
    """Each token's K experts by indexing the stacked weights with the expert ids: static shapes, no host
    sync (CUDA graphs). Written as products summed over the input width (in fp32), which torch.compile fuses
    into one pass over the chosen experts' weights; run eagerly, the indexing copies them. For N*K <= E,
    where it reads no more weights than grouped_mm. Shapes as `experts_loop`."""
    xf = x.float()[:, None, None, :]  # [N, 1, 1, D]
    g = (w1[topk_idx].float() * xf).sum(-1)  # [N, K, I]
    u = (w3[topk_idx].float() * xf).sum(-1)
    h = (F.silu(g) * u)[:, :, None, :]  # [N, K, 1, I]
    o = (w2[topk_idx].float() * h).sum(-1)  # [N, K, D]
    return (o * topk_weight[..., None].float()).sum(1).to(x.dtype)


def experts_dense(x, topk_idx, topk_weight, w1, w3, w2) -> torch.Tensor:
    """Every expert on every token, combined through a dense [N, E] gate that is zero off the top-k: reads
    each expert's weights once, as grouped_mm does, with static shapes, no sort, no scatter and no host sync.
    For N*K > E on a GPU, where the extra products of a few tokens cost nothing next to reading the weights.
    (An unchosen expert's output is multiplied by 0, so it must be finite.) Shapes as `experts_loop`."""
    dtype = _expert_dtype(x)
    gate = torch.zeros(x.shape[0], w1.shape[0], device=x.device).scatter(1, topk_idx, topk_weight.float())
    xe = x.to(dtype)
    h = F.silu(xe @ w1.to(dtype).transpose(1, 2)) * (xe @ w3.to(dtype).transpose(1, 2))  # [E, N, I]
    o = h @ w2.to(dtype).transpose(1, 2)  # [E, N, D]
    return torch.einsum("end,ne->nd", o.float(), gate).to(x.dtype)


class MoE(nn.Module):
    """Shared experts + routed experts behind the router; returns (output, balance loss or None).

    `ep_group` (set by the trainer) switches the routed experts to expert parallelism: this rank holds
    E/ep experts and tokens travel by all-to-all (see smolds/model/expert_parallel.py).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        self.ep_group = None  # torch.distributed group for expert parallelism, or None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        topk_idx, topk_weight, scores = self.gate(flat)
        if self.ep_group is None and flat.shape[0] <= DECODE_MAX_TOKENS and not torch.is_grad_enabled():
            y = self.dispatch_decode(flat, topk_idx, topk_weight)
        elif self.ep_group is None:
            y = self.dispatch_local(flat, topk_idx, topk_weight)
        else:
            y = dispatch_expert_parallel(self, flat, topk_idx, topk_weight)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(B, T, D), self.balance_loss(topk_idx, scores, B, T)

    def dispatch_local(self, x, topk_idx, topk_weight):
        """Sort the N*K (token, expert) pairs by expert, run each expert on its slice, scatter back."""
        N, K = topk_idx.shape
        sorted_idx, order = topk_idx.flatten().sort(stable=True)  # [N*K] pairs by expert
        token_of = order // K  # source token of each sorted pair
        # tokens per expert read off the sorted ids: bincount's output size would cost a host sync on CUDA
        ends = torch.searchsorted(sorted_idx, torch.arange(1, self.n_experts + 1, device=x.device))  # [E]
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        out = self.experts(x[token_of], counts)  # [N*K, D]
        out = out * topk_weight.flatten()[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, out.to(x.dtype))

    def dispatch_decode(self, x, topk_idx, topk_weight):
        """A few tokens without grad (decoding): on CPU the host-synced loop over the chosen experts, or under
        torch.compile, for N*K <= E, the gathered form that the compiler fuses, and for more tokens the sorted
        grouped products (the compiler fuses the sort and scatter: 3-28% faster steps than the loop op,
        `bench/decode_forms.py`); on a GPU (no host sync, CUDA graphs) the gathered form for N*K <= E, otherwise every expert on
        every token."""
        w = self.experts
        args = (x, topk_idx, topk_weight, w.gate_proj, w.up_proj, w.down_proj)
        few = topk_idx.numel() <= self.n_experts
        if x.device.type != "cpu":
            return experts_gathered(*args) if few else experts_dense(*args)
        if not torch.compiler.is_compiling():
            return experts_loop(*args)
        if few:
            return experts_gathered(*args)
        if grouped_mm_ok(x.to(_expert_dtype(x)), w.gate_proj.shape[1]):
            return self.dispatch_local(x, topk_idx, topk_weight)
        return _experts_loop_op(*args)

    def balance_loss(self, topk_idx, scores, B, T) -> torch.Tensor | None:
        mode = self.cfg.balance_mode
        if not self.training or mode in ("loss_free", "none"):
            return None
        E, K = self.n_experts, self.top_k
        probs = scores / scores.sum(-1, keepdim=True)  # normalized affinities s'_{t,i}
        chosen = F.one_hot(topk_idx, E).sum(1).float()  # [N, E] 1 where expert i is in token t's top-k
        if mode == "aux_loss":  # over the whole batch
            f = chosen.mean(0) * E / K
            return self.cfg.aux_loss_alpha * (f * probs.mean(0)).sum()
        # seq_aux: per sequence, then averaged (DeepSeek-V3 eq. 17-20)
        f = chosen.view(B, T, E).mean(1) * E / K  # [B, E]
        P = probs.view(B, T, E).mean(1)
        return self.cfg.seq_aux_alpha * (f * P).sum(-1).mean()
