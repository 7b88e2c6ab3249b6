"""DeepSeekMoE: the router, the experts, and auxiliary-loss-free load balancing, in one file.

Dimension legend: N tokens (B*T flattened), D model width, E routed experts, K experts per token (top-k),
I expert width (moe_intermediate_size), G expert groups.

Routing (DeepSeek-V3, section 2.1.2): affinities s = sigmoid(x W_r^T) in fp32. Experts are *chosen* by
top-k on s + b, where b is a per-expert bias that only steers selection; the gate *weights* are the
unbiased affinities of the chosen experts, normalized to sum 1 when norm_topk_prob, times
routed_scaling_factor. Group-limited routing first keeps the topk_group groups whose score (sum of their two
highest biased affinities) is largest and masks the rest with -inf. Shared experts see every token.
No token is ever dropped: there is no capacity factor.

Loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for MoE"): after each
optimizer step, b_i += u * sign(mean(c) - c_i), where c_i counts the tokens routed to expert i since the
last update, summed over every data-parallel rank first so that all ranks keep the same bias. Overloaded
experts become less attractive and underloaded ones more, without a gradient that fights the LM loss.
Alternatives kept for comparison: `aux_loss` (Switch/GShard alpha * sum f_i P_i over the batch) and `seq_aux`
(DeepSeek-V3's complementary sequence-wise loss, combinable with loss-free).

Experts are stacked ([E, I, D] weights) and run on tokens sorted by expert: torch._grouped_mm on CUDA,
otherwise one matmul per expert over its contiguous slice; `naive_moe_reference` loops over experts with
masks and is the reference the tests hold the fast path to.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from smolds.config import ModelConfig
from smolds.model.layers import SwiGLU


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
        # Tokens routed to each expert since the last bias update (not saved; summed across ranks at update).
        self.register_buffer("tokens_per_expert", torch.zeros(self.n_experts), persistent=False)
        self.last_counts = torch.zeros(self.n_experts)  # the latest forward's counts, for the monitor
        # (sum over training tokens of the entropy of their normalized affinities, tokens); read and zeroed by
        # smolds.monitor.RoutingMonitor.update after every optimizer step (not saved).
        self.register_buffer("entropy_sum", torch.zeros(2), persistent=False)
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
        with torch.no_grad():  # counts per layer per forward; index_add_ (not bincount): no host sync
            flat = topk_idx.flatten()
            self.last_counts = torch.zeros(self.n_experts, device=x.device).index_add_(
                0, flat, torch.ones(flat.numel(), device=x.device))
            if self.training:  # only training tokens steer the bias
                self.tokens_per_expert += self.last_counts
                p = scores / scores.sum(-1, keepdim=True)  # [N, E] normalized affinities
                self.entropy_sum[0] += -torch.xlogy(p, p).sum()
                self.entropy_sum[1] += x.shape[0]
        return topk_idx, topk_weight, scores

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
        """The sign rule: b_i += u * sign(mean(c) - c_i) (optionally mean-centered)."""
        delta = rate * torch.sign(counts.mean() - counts)
        if center:
            delta -= delta.mean()
        self.e_score_correction_bias += delta.to(self.e_score_correction_bias)


class RoutedExperts(nn.Module):
    """E SwiGLU experts with stacked weights, laid out as E per-expert nn.Linear weights ([out, in])."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))  # [E, I, D]
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))  # [E, I, D]
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))  # [E, D, I]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, D] sorted by expert, counts [E] tokens per expert -> [N, D], in autocast's dtype under
        autocast (as the matmuls of the loop would give)."""
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x = x.to(dtype)  # no-ops outside autocast
        w1, w3, w2 = self.gate_proj.to(dtype), self.up_proj.to(dtype), self.down_proj.to(dtype)
        if _grouped_mm_ok(x, w1.shape[1]):
            offs = counts.cumsum(0).to(torch.int32)  # no host sync: offsets stay on the device
            return _grouped_swiglu(x, w1, w3, w2, offs)
        outs = []  # reference loop: one matmul per expert (a host sync for the split sizes)
        for e, xe in enumerate(x.split(counts.tolist())):
            h = F.silu(xe @ w1[e].t()) * (xe @ w3[e].t())
            outs.append(h @ w2[e].t())
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped-mm backward may reject the
    stride-0 gradients that e.g. `out.sum()` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_swiglu(x, w1, w3, w2, offs):
    """All experts' SwiGLU in three grouped matmuls; x [N, D] sorted by expert, offs [E] cumulative counts."""
    mm = torch._grouped_mm if x.is_cuda else grouped_mm_cpu
    h = F.silu(mm(x, w1.transpose(1, 2), offs=offs))  # [N, I]
    h = h * mm(x, w3.transpose(1, 2), offs=offs)
    return _ContiguousGrad.apply(mm(h, w2.transpose(1, 2), offs=offs))  # [N, D]


# On CPU the grouped products run as an opaque op with its own backward. torch.compile's shape rule for
# _grouped_mm takes only bf16 (CUDA), so traced directly the CPU kernel would split every compiled MoE block
# into pieces; as a custom op it stays inside the graph (no break), and a compiled block can be
# activation-checkpointed whole. The SwiGLU's elementwise math around it stays visible to the compiler.
@torch.library.custom_op("smolds::grouped_mm", mutates_args=())
def grouped_mm_cpu(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm with offs over a's rows: a [N, K] (rows sorted by group) x b [G, K, M] -> [N, M],
    group g's rows times b[g]; or over the shared dimension: a [K, N] x b [N, M] -> [G, K, M], group g's
    columns of a times its rows of b (the weight gradient)."""
    return torch._grouped_mm(a, b, offs=offs)


@grouped_mm_cpu.register_fake
def _(a, b, offs):
    return a.new_empty(a.shape[0], b.shape[2]) if b.dim() == 3 else a.new_empty(offs.shape[0], a.shape[0], b.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_grad(ctx, grad):
    a, b, offs = ctx.saved_tensors
    if b.dim() != 3:
        raise NotImplementedError("smolds::grouped_mm: no gradient for the weight-gradient form")
    grad = grad.contiguous()  # the CPU kernel rejects stride-0 gradients such as those of `out.sum()`
    return grouped_mm_cpu(grad, b.transpose(1, 2), offs), grouped_mm_cpu(a.t(), grad, offs), None


grouped_mm_cpu.register_autograd(_grouped_mm_grad, setup_context=_grouped_mm_setup)


def _cpu_grouped_mm_works() -> bool:
    """Recent torch has a CPU kernel for torch._grouped_mm, older torch none: probe once (forward and
    the backward's forms)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x, w = torch.ones(3, 4, requires_grad=True), torch.ones(2, 4, 4, requires_grad=True)
        y = grouped_mm_cpu(x, w, torch.tensor([1, 3], dtype=torch.int32))
        y.backward(torch.ones_like(y))
        return bool((y == 4).all() and (x.grad == 4).all() and (w.grad[1] == 2).all())
    except (RuntimeError, NotImplementedError):
        return False


_CPU_GROUPED_MM = _cpu_grouped_mm_works()


def _grouped_mm_ok(x: torch.Tensor, hidden: int) -> bool:
    """torch._grouped_mm takes bf16 on CUDA (Hopper), fp32/bf16 on CPU where probed, and rows of
    multiples of 16 bytes; otherwise the experts run in the loop."""
    aligned = (x.shape[-1] * x.element_size()) % 16 == 0 and (hidden * x.element_size()) % 16 == 0
    if x.is_cuda:
        return aligned and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
    return aligned and x.device.type == "cpu" and _CPU_GROUPED_MM and x.dtype in (torch.float32, torch.bfloat16)


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
            from smolds.model.expert_parallel import dispatch_expert_parallel

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
        if _grouped_mm_ok(x.to(_expert_dtype(x)), w.gate_proj.shape[1]):
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


def naive_moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Route with the same router, then loop over experts with masks (slow; for tests). x [B, T, D]."""
    flat = x.reshape(-1, x.shape[-1])
    was_training = moe.gate.training
    moe.gate.eval()  # do not count these tokens
    topk_idx, topk_weight, _ = moe.gate(flat)
    moe.gate.train(was_training)
    y = torch.zeros_like(flat)
    w = moe.experts
    for e in range(moe.n_experts):
        for k in range(moe.top_k):
            rows = (topk_idx[:, k] == e).nonzero().flatten()
            if rows.numel() == 0:
                continue
            xe = flat[rows]
            h = F.silu(xe @ w.gate_proj[e].t()) * (xe @ w.up_proj[e].t())
            y[rows] += (h @ w.down_proj[e].t()) * topk_weight[rows, k, None].to(x.dtype)
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(flat)
    return y.view_as(x)


# ---------------------------------------------------------------------------------------------- balancing
def routers(model: nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


@torch.no_grad()
def update_router_biases(model: nn.Module, cfg: ModelConfig, group=None) -> torch.Tensor | None:
    """Call once after each optimizer step. Sums the per-expert counts of every MoE layer over all ranks
    (one all-reduce of a [layers, E] tensor), applies the sign rule when loss-free balancing is on, resets
    the counts, and returns the summed counts [layers, E] (the monitor's input), or None without MoE."""
    rs = routers(model)
    if not rs:
        return None
    counts = torch.stack([r.tokens_per_expert for r in rs])  # [L, E]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, group=group)
    if cfg.uses_loss_free and cfg.bias_update_rate > 0:
        for r, c in zip(rs, counts):
            r.update_bias(c, cfg.bias_update_rate, cfg.bias_update_center)
    for r in rs:
        r.tokens_per_expert.zero_()
    return counts


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


def max_violation(counts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """MaxVio = (max load - mean load) / mean load, per layer of counts [L, E] (or [E]), and their mean."""
    counts = counts.float()
    if counts.dim() == 1:
        counts = counts[None]
    mean = counts.mean(-1).clamp_min(1e-9)
    per_layer = (counts.max(-1).values - mean) / mean
    return per_layer, float(per_layer.mean())
