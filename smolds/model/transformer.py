"""The Transformer: embedding -> N pre-norm blocks (attention kind + FFN kind per layer) -> norm -> LM head.

Module names follow Hugging Face (`embed_tokens`, `layers.i.self_attn`, `layers.i.mlp`, `input_layernorm`,
`post_attention_layernorm`, `norm`, `lm_head`) so that Llama and DeepseekV3 checkpoints map by name.

Init scheme (documented, as GPT-2/Megatron): every Linear, embedding, router and expert weight ~ N(0, 0.02);
the projections that write into the residual stream (attention `o_proj`, FFN `down_proj`, expert
`down_proj`) ~ N(0, 0.02 / sqrt(2 * layers)) so the residual variance does not grow with depth; RMSNorm
weights 1; router biases 0.

Caches: `new_cache(batch, max_len)` preallocates one cache per layer (MLA latent, GQA K/V, linear-attention
state). Left-padded batches pass `pad_mask` [B, T] (True = real token) with the prompt; the cache remembers
which slots are real and each row's next rotary position, so a batched decode equals one-by-one decodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smolds.config import ModelConfig
from smolds.model.attention import AttnContext
from smolds.model.gqa import GQA
from smolds.model.layers import RMSNorm, SwiGLU
from smolds.model.mla import MLA
from smolds.model.moe import MoE, RoutedExperts, Router


def build_attention(kind: str, cfg: ModelConfig) -> nn.Module:
    if kind == "mla":
        return MLA(cfg)
    if kind == "gqa":
        return GQA(cfg)
    if kind == "linear":
        from smolds.model.linear_attention import LinearAttention

        return LinearAttention(cfg)
    raise ValueError(f"unknown attention kind {kind!r}")


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + balance_loss (what to backpropagate)
    lm_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


class Cache:
    """All layers' decode state plus the bookkeeping shared by every layer."""

    def __init__(self, layers: list, batch: int, max_len: int, device):
        self.layers = layers
        self.max_len = max_len
        self.length = 0  # slots filled
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # real tokens per slot
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # next rotary position per row
        self.padded = False

    def bytes_per_token(self) -> int:
        return sum(c.bytes_per_token() for c in self.layers)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_kind, self.ffn_kind = cfg.attention_kind(layer), cfg.ffn_kind(layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(self.attention_kind, cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if self.ffn_kind == "moe" else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, ctx: AttnContext, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), ctx, cache)
        h = self.post_attention_layernorm(x)
        if self.ffn_kind == "moe":
            out, balance = self.mlp(h)
            return x + out, balance
        return x + self.mlp(h), None


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self):
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, out_std if name.endswith(("o_proj", "down_proj")) else std)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, RoutedExperts):
                nn.init.normal_(m.gate_proj, 0.0, std)
                nn.init.normal_(m.up_proj, 0.0, std)
                nn.init.normal_(m.down_proj, 0.0, out_std)
            elif isinstance(m, Router):
                nn.init.normal_(m.weight, 0.0, std)
                m.e_score_correction_bias.zero_()
            elif hasattr(m, "init_weights"):  # a layer kind with parameters of its own (linear attention)
                m.init_weights(std, out_std)

    # --------------------------------------------------------------- forward
    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> Cache:
        p = self.embed_tokens.weight
        device, dtype = device or p.device, dtype or p.dtype
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings}); generate fewer tokens or truncate the prompt")
        layers = [blk.self_attn.new_cache(batch, max_len, device, dtype) for blk in self.layers]
        return Cache(layers, batch, max_len, device)

    def _context(self, input_ids, cache: Cache | None, pad_mask: torch.Tensor | None) -> AttnContext:
        B, T = input_ids.shape
        device = input_ids.device
        if cache is None:
            if pad_mask is not None:
                raise ValueError("pad_mask needs a cache (it is for batched generation of unequal prompts)")
            return AttnContext(positions=torch.arange(T, device=device).expand(B, T))
        start = cache.length
        if start + T > cache.max_len:
            raise ValueError(f"cache is full: {start} + {T} tokens > max_len {cache.max_len}")
        valid = torch.ones(B, T, dtype=torch.bool, device=device) if pad_mask is None else pad_mask.bool()
        positions = cache.next_pos[:, None] + valid.long().cumsum(1) - 1  # [B, T]
        positions = positions.clamp_min(0)
        cache.valid[:, start : start + T] = valid
        cache.next_pos += valid.long().sum(1)
        cache.padded = cache.padded or pad_mask is not None and not bool(valid.all())
        cache.length = start + T
        mask = None
        if cache.padded:
            S = start + T
            ones = torch.ones(T, S, dtype=torch.bool, device=device)
            mask = ones.tril(start)[None] & cache.valid[:, None, :S]  # [B, T, S] causal and not padding
            mask = mask | (ones.tril(start) & ~ones.tril(start - 1))[None]  # pads attend to themselves (no NaN)
            mask = mask[:, None]  # [B, 1, T, S]
        return AttnContext(positions=positions, mask=mask, start=start, valid=valid if cache.padded else None)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, cache: Cache | None = None,
                pad_mask: torch.Tensor | None = None, last_only: bool = False) -> ModelOutput:
        """input_ids [B, T]; targets [B, T] (-100 = ignore) for the loss; cache for incremental decoding."""
        T = input_ids.shape[1]
        if cache is None and T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings ({self.config.max_position_embeddings})")
        ctx = self._context(input_ids, cache, pad_mask)
        x = self.embed_tokens(input_ids)
        balance = None
        for i, block in enumerate(self.layers):
            x, b = block(x, ctx, None if cache is None else cache.layers[i])
            if b is not None:
                balance = b if balance is None else balance + b
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        logits = F.linear(x, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)
        out = ModelOutput(logits=logits, balance_loss=balance)
        if targets is not None:
            out.lm_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
            out.loss = out.lm_loss if balance is None else out.lm_loss + balance
        return out

    # ------------------------------------------------------------ accounting
    def num_parameters(self, active: bool = False) -> int:
        """All parameters (tied embeddings once); with active=True, only those one token uses:
        routed experts count K of E per MoE layer."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            cfg = self.config
            for m in self.modules():
                if isinstance(m, RoutedExperts):
                    per_expert = (m.gate_proj.numel() + m.up_proj.numel() + m.down_proj.numel()) // m.n_experts
                    total -= per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM's convention:
        6 * (active matmul parameters, LM head included, embedding lookup excluded)
        + the attention scores and weighted sums: 6 * seq_len * sum over layers of H * (d_qk + d_v)
        (no causal halving; linear-attention layers count their chunked cost instead)."""
        cfg = self.config
        n = self.num_parameters(active=True) - cfg.vocab_size * cfg.hidden_size  # drop the embedding table
        n += cfg.vocab_size * cfg.hidden_size  # the LM head matmul (tied or not)
        n -= sum(p.numel() for name, p in self.named_parameters() if name.endswith("norm.weight") or "layernorm" in name)
        attn = 0.0
        for blk in self.layers:
            a = blk.self_attn
            if blk.attention_kind == "mla":
                attn += 6 * seq_len * a.n_heads * (a.qk_dim + a.v_dim)
            elif blk.attention_kind == "gqa":
                attn += 6 * seq_len * a.n_heads * 2 * a.head_dim
            else:
                attn += 6 * a.flops_per_token_attention(seq_len)
        return 6 * n + attn
