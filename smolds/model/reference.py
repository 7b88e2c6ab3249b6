"""Naive references: the textbook form of every fast path in smolds/model, used only by the tests.

Each is written for clarity, not speed (explicit masks and softmax, loops over experts, O(T^2) linear
attention), and each test holds a fast path to one of these:
- `mla_reference` <- MLA's expanded (SDPA) and absorbed (latent cache) paths (smolds/model/mla.py);
- `linear_attention_reference` (quadratic), `linear_attention_recurrent` (token by token) and
  `linear_attention_layer_reference` <- the chunked and decode forms of multi-head linear attention
  (smolds/model/linear_attention.py);
- `kda_reference` (the K x K transition matrix, token by token) and `kda_layer_reference` <- Kimi Delta
  Attention's chunked and decode forms (smolds/model/kda.py);
- `naive_moe_reference` <- the MoE dispatches: sorted grouped products, decode forms, expert parallelism
  (smolds/model/moe.py, smolds/model/expert_parallel.py).
(RMSNorm's reference, `layers.rms_norm_reference`, stays beside it: the no-grad path runs it.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smolds.model.attention import AttnContext
from smolds.model.kda import KDA
from smolds.model.linear_attention import LinearAttention, linear_attention_step
from smolds.model.mla import MLA
from smolds.model.moe import MoE
from smolds.model.transformer import eval_mode


def mla_reference(attn: MLA, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """The naive form: per-head keys/values materialized, explicit causal softmax."""
    B, T, _ = x.shape
    q_nope, q_rope, c_kv, k_rope = attn.project(x, ctx)
    w_uk, w_uv = attn.up_weights()
    k_nope = torch.einsum("btc,hnc->bhtn", c_kv, w_uk)
    v = torch.einsum("btc,hvc->bhtv", c_kv, w_uv)
    scores = (q_nope @ k_nope.transpose(-1, -2) + q_rope @ k_rope[:, None].transpose(-1, -2)) * attn.scale
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    scores = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = scores @ v
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, attn.n_heads * attn.v_dim))


def linear_attention_reference(q, k, v, log_decay, scale: float) -> torch.Tensor:
    """Quadratic masked form: o = ((scale q k^T) * M) v with M_ts = exp(A_t - A_s) for s <= t, else 0,
    A = cumsum(log_decay). q, k [B,H,T,K], v [B,H,T,V], log_decay [B,H,T] (<= 0) -> o [B,H,T,V].
    O(T^2) and, over long T, less precise (A grows without bound)."""
    T = q.shape[2]
    A = log_decay.cumsum(-1)  # [B,H,T]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    decay = (A[..., :, None] - A[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [B,H,T,T]
    return ((q @ k.transpose(-1, -2)) * scale * decay) @ v


def linear_attention_recurrent(q, k, v, log_decay, scale: float, state: torch.Tensor | None = None):
    """`linear_attention_step` over every token (what decoding does one token at a time); shapes as chunked."""
    B, H, T, K = q.shape
    if state is None:
        state = q.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for t in range(T):
        o, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], log_decay[:, :, t], scale, state)
        outs.append(o)
    return torch.stack(outs, dim=2), state


def linear_attention_layer_reference(attn: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    """The whole layer through the quadratic reference (no cache, no padding)."""
    q, k, v, log_decay = attn.project(x, None)
    return attn.output(linear_attention_reference(q, k, v, log_decay, attn.scale), x)


def kda_reference(q, k, v, g, beta, scale: float, state: torch.Tensor | None = None):
    """The paper's recurrence token by token with the K x K transition matrix,
    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T, o_t = scale S_t^T q_t.
    Shapes as `kda.kda_chunked`. O(T*K^2*V)."""
    B, H, T, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state
    eye = torch.eye(K, dtype=q.dtype, device=q.device)
    outs = []
    for t in range(T):
        kt, bt = k[:, :, t, :, None], beta[:, :, t, None, None]  # [B,H,K,1], [B,H,1,1]
        transition = (eye - bt * kt @ kt.transpose(-1, -2)) * g[:, :, t, None, :].exp()  # [B,H,K,K]
        S = transition @ S + bt * kt @ v[:, :, t, None, :]
        outs.append(scale * (S.transpose(-1, -2) @ q[:, :, t, :, None]).squeeze(-1))
    return torch.stack(outs, dim=2), S


def kda_layer_reference(attn: KDA, x: torch.Tensor) -> torch.Tensor:
    """The whole KDA layer through `kda_reference` (no cache, no padding)."""
    q, k, v, g, beta, _ = attn.project(x)
    o, _ = kda_reference(q, k, v, g, beta, attn.scale)
    return attn.output(o, x)


def naive_moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Route with the same router (in eval mode: these tokens are not counted), then loop over experts with
    masks. x [B, T, D]."""
    flat = x.reshape(-1, x.shape[-1])
    with eval_mode(moe.gate):
        topk_idx, topk_weight, _ = moe.gate(flat)
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
