"""Grouped-query attention: SmolLM2's (Llama's) attention, with a preallocated KV cache.

Dimension legend: B batch, T new tokens, S key slots, H query heads, G key/value heads, d head_dim.
Each group of H/G query heads shares one key/value head; the cache holds 2*G*d numbers per token.
Parameter names follow Hugging Face's LlamaAttention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smolds.config import ModelConfig
from smolds.model.attention import AttnContext
from smolds.model.rope import apply_rope


class KVCache:
    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)  # [B,G,S,d]
        self.v = torch.zeros_like(self.k)

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def write_at(self, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Static-shape decode: write one token at slot [1] (a tensor) and return the whole buffers."""
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        return self.k, self.v

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    def bytes_per_token(self) -> int:
        return 2 * self.k.shape[1] * self.k.shape[-1] * self.k.element_size()


class GQA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.rope_theta, self.rope_interleave = cfg.rope_theta, cfg.rope_interleave
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=False)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch, max_len, self.n_kv_heads, self.head_dim, device, dtype)

    def mixing_macs(self, seq_len: int) -> float:
        """Forward multiply-adds per token outside the projections: scores and weighted sum over seq_len keys."""
        return float(seq_len * self.n_heads * 2 * self.head_dim)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B,H,T,d]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B,G,T,d]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.rope(self.head_dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin, self.rope_interleave), apply_rope(k, cos, sin, self.rope_interleave)
        if ctx.slot is not None:  # static-shape decode: the whole preallocated cache, unwritten slots masked
            k, v = cache.write_at(ctx.slot, k, v)
        elif cache is not None:
            k, v = cache.write(ctx.start, k, v)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B,H,S,d]
        if ctx.mask is None and (cache is None or ctx.start == 0):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif ctx.mask is None and T == 1:  # one new token sees every cached slot
            out = F.scaled_dot_product_attention(q, k, v)
        elif ctx.mask is None:  # cached decode without padding: every cached slot is visible
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
