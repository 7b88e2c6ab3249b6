"""Multi-head Latent Attention (DeepSeek-V2/V3): the whole math in one file.

Dimension legend: B batch, T new tokens, S key slots, H heads, D model width,
C kv_lora_rank (the latent), N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim.

Keys and values are not projected from x directly but from a low-rank latent c_KV = norm(W_DKV x) of
width C, shared by all heads; each head's key is [W_UK c_KV ; k_rope] where k_rope is a single rotary key
of width R shared by all heads (decoupled RoPE: the rotary part cannot pass through the latent, since a
position-dependent rotation does not commute with the up-projection). Per token the cache holds only
c_KV and k_rope: C + R numbers, instead of 2*H*head_dim for ordinary multi-head attention.

Two paths compute the same attention (like DeepSeek's `attn_impl = "naive" | "absorb"`):
- expanded (training, prefill): up-project c_KV to per-head keys and values and call fused SDPA.
- absorbed (decode with a cache): fold W_UK into the query (q_nope W_UK: [B, H, T, C]) so scores are taken
  directly against the cached latent, and apply W_UV after attention to the attended latent. The cache is
  never re-expanded, so a decode step costs O(S * H * C) instead of O(S * H * (N + V) * C).
`smolds.model.reference.mla_reference` is the naive textbook form (explicit softmax); tests hold both
paths equal to it.

No-RoPE mode (`mla_use_nope: true`, Kimi Linear's MLA and its config name): nothing is rotated. The query's
"rope" slice and the shared key k_rope keep their widths and enter the scores as plain dot products, so the
weights, the cache (C + R numbers a token) and both paths are unchanged; positions reach the model only
through the layers that carry them (Kimi Linear's KDA layers, whose short convolution and decays are
ordered). transformers' KimiLinearAttention computes exactly this.

Parameter names follow Hugging Face's DeepseekV3Attention, so checkpoints map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smolds.config import ModelConfig
from smolds.model.attention import AttnContext
from smolds.model.layers import RMSNorm
from smolds.model.rope import apply_rope

# The latent norms (q_a_layernorm, kv_a_layernorm) use a fixed eps, not rms_norm_eps: DeepSeek-V3's reference
# and transformers' DeepseekV3 build them with their RMSNorm's default 1e-6, so exported models match exactly.
LATENT_NORM_EPS = 1e-6


class MLACache:
    """Per-layer decode cache: the normalized latent and the shared rotary key, preallocated to max_len."""

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, device, dtype):
        self.c_kv = torch.zeros(batch, max_len, kv_lora_rank, device=device, dtype=dtype)  # [B, S, C]
        self.k_rope = torch.zeros(batch, max_len, rope_dim, device=device, dtype=dtype)  # [B, S, R]

    def write(self, start: int, c_kv: torch.Tensor, k_rope: torch.Tensor):
        end = start + c_kv.shape[1]
        self.c_kv[:, start:end] = c_kv
        self.k_rope[:, start:end] = k_rope
        return self.c_kv[:, :end], self.k_rope[:, :end]

    def write_at(self, slot: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor):
        """Static-shape decode: write one token at slot [1] (a tensor) and return the whole buffers."""
        self.c_kv.index_copy_(1, slot, c_kv)
        self.k_rope.index_copy_(1, slot, k_rope)
        return self.c_kv, self.k_rope

    def tensors(self) -> list[torch.Tensor]:
        return [self.c_kv, self.k_rope]

    def bytes_per_token(self) -> int:
        return (self.c_kv.shape[-1] + self.k_rope.shape[-1]) * self.c_kv.element_size()


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = H = cfg.num_attention_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = self.qk_dim**-0.5
        self.rope_theta, self.rope_interleave = cfg.rope_theta, cfg.rope_interleave
        self.use_rope = not cfg.mla_use_nope
        D = cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_dim, bias=False)
        else:  # query compression (DeepSeek-V3: q_lora_rank 1536)
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=False)  # W_DKV ; W_KR
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)  # W_UK ; W_UV
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=False)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> MLACache:
        return MLACache(batch, max_len, self.kv_lora_rank, self.rope_dim, device, dtype)

    # ----------------------------------------------------------- projections
    def project(self, x: torch.Tensor, ctx: AttnContext):
        """x [B, T, D] -> q_nope [B,H,T,N], q_rope [B,H,T,R], c_kv [B,T,C], k_rope [B,T,R] (q_rope, k_rope
        rotated unless mla_use_nope)."""
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.qk_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        if self.use_rope:
            cos, sin = ctx.rope(self.rope_dim, self.rope_theta)
            q_rope = apply_rope(q_rope, cos, sin, self.rope_interleave)
            k_rope = apply_rope(k_rope, cos, sin, self.rope_interleave)
        return q_nope, q_rope, c_kv, k_rope

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, N, C] and W_UV [H, V, C], views of kv_b_proj.weight."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    # ----------------------------------------------------------------- paths
    def expanded(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Up-project the latent to per-head keys/values, then fused SDPA. c_kv [B,S,C], k_rope [B,S,R].

        Values narrower than keys (V < N + R, as in DeepSeek-V3) are zero-padded to the key width: the
        flash kernels (CUDA's and the CPU one) need equal widths, otherwise SDPA falls back to slower ones
        (the CPU math path materializes the [B,H,T,S] scores); the padded columns of the output are zeros
        and are sliced off."""
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # [B,H,S,N], [B,H,S,V]
        k = torch.cat([k_nope, k_rope[:, None].expand(B, self.n_heads, S, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        if self.v_dim < self.qk_dim:
            v = F.pad(v, (0, self.qk_dim - self.v_dim))  # [B,H,S,N+R]
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return out[..., : self.v_dim]  # [B,H,T,V]

    def absorbed(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Attention against the cached latent without expanding it: W_UK into q, W_UV after."""
        w_uk, w_uv = self.up_weights()
        q_latent = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk)  # [B,H,T,C]
        scores = torch.einsum("bhtc,bsc->bhts", q_latent, c_kv) + torch.einsum("bhtr,bsr->bhts", q_rope, k_rope)
        scores = scores.float() * self.scale
        T, S = scores.shape[-2:]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif T > 1:  # one new token sees every cached slot: no mask
            scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T), float("-inf"))
        probs = scores.softmax(dim=-1).to(c_kv.dtype)
        o_latent = torch.einsum("bhts,bsc->bhtc", probs, c_kv)  # [B,H,T,C]
        return torch.einsum("bhtc,hvc->bhtv", o_latent, w_uv)  # [B,H,T,V]

    def mixing_macs(self, seq_len: int) -> float:
        """Forward multiply-adds per token outside the projections: scores q.k (N + R per head) and the
        weighted sum of values (V per head) over seq_len keys (no causal halving)."""
        return float(seq_len * self.n_heads * (self.qk_dim + self.v_dim))

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: MLACache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_rope, c_kv, k_rope = self.project(x, ctx)
        if cache is None:
            out = self.expanded(q_nope, q_rope, c_kv, k_rope, ctx.mask)
        elif ctx.slot is not None:  # static-shape decode: the whole preallocated cache, unwritten slots masked
            out = self.absorbed(q_nope, q_rope, *cache.write_at(ctx.slot, c_kv, k_rope), ctx.mask)
        else:
            c_all, k_rope_all = cache.write(ctx.start, c_kv, k_rope)
            if ctx.start == 0:  # prefill: nothing cached before these tokens, the fused path is cheaper
                out = self.expanded(q_nope, q_rope, c_kv, k_rope, ctx.mask)
            else:
                out = self.absorbed(q_nope, q_rope, c_all, k_rope_all, ctx.mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))
