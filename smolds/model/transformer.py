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
`decode_step` is the same one-token step with static shapes (for torch.compile and CUDA graphs).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from data_prep.errors import first_line
from smolds.config import ModelConfig
from smolds.model.attention import AttnContext
from smolds.model.experts import RoutedExperts
from smolds.model.gqa import GQA
from smolds.model.kda import KDA
from smolds.model.layers import RMSNorm, SwiGLU
from smolds.model.linear_attention import LinearAttention
from smolds.model.loss import linear_cross_entropy
from smolds.model.mla import MLA
from smolds.model.moe import MoE
from smolds.model.router import Router, checkpoint_contexts, recompute_policy

# Every attention kind implements the same interface (smolds.model.attention.Attention): forward, new_cache,
# mixing_macs. The Transformer knows them only through this table.
ATTENTION = {"mla": MLA, "gqa": GQA, "linear": LinearAttention, "kda": KDA}


def build_attention(kind: str, cfg: ModelConfig) -> nn.Module:
    if kind not in ATTENTION:
        raise ValueError(f"unknown attention kind {kind!r}; known: {', '.join(ATTENTION)}")
    return ATTENTION[kind](cfg)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Run the block in eval mode and restore the module's previous mode afterwards, also on an error."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]; None when targets were given (the loss is fused with the head)
    loss: torch.Tensor | None = None  # lm_loss + balance_loss (what to backpropagate)
    lm_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


class Cache:
    """All layers' decode state plus the bookkeeping shared by every layer.

    `length` counts the slots filled, as a Python int for the eager path's slicing; `slot` holds the same
    count as a tensor for static-shape decoding (`Transformer.decode_step`), which advances `slot`, `valid`
    and `next_pos` inside its graph and leaves `length` to its caller (a Python int read in the graph would
    make every step a new graph)."""

    def __init__(self, layers: list, batch: int, max_len: int, device):
        self.layers = layers
        self.max_len = max_len
        self.length = 0  # slots filled
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # = length, as a tensor
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # real tokens per slot
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # next rotary position per row
        self.padded = False

    def bytes_per_token(self) -> int:
        return sum(c.bytes_per_token() for c in self.layers)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (static decoding marks them as fixed addresses for CUDA graphs)."""
        return [self.slot, self.valid, self.next_pos] + [t for c in self.layers for t in c.tensors()]

    def reset(self) -> Cache:
        """Empty the cache for a new batch of prompts, keeping its memory (and so a CUDA graph's addresses)."""
        for t in self.tensors():
            t.zero_()
        self.length, self.padded = 0, False
        return self

    def static_context(self) -> AttnContext:
        """The context of one new token per row at slot `slot`, with tensor bookkeeping only (traceable)."""
        slot = self.slot.clone()
        self.valid.index_fill_(1, slot, True)
        positions = self.next_pos[:, None].clone()  # [B, 1]
        self.next_pos.add_(1)
        self.slot.add_(1)
        return AttnContext(positions=positions, mask=self.valid[:, None, None, :], slot=slot)  # mask [B,1,1,S]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_kind, self.ffn_kind = cfg.attention_kind(layer), cfg.ffn_kind(layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(self.attention_kind, cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if self.ffn_kind == "moe" else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.activation_checkpointing = False  # see Transformer.set_activation_checkpointing
        self.compiled_forward = self.compiled_checkpointed = None  # see Transformer.compile_blocks

    def forward(self, x, ctx: AttnContext, cache=None):
        checkpointed = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        if self.compiled_forward is not None and cache is None:  # compiled: full sequences; decoding stays eager
            return self._compiled_checkpointed_forward(x, ctx) if checkpointed else self.compiled_forward(x, ctx)
        if checkpointed:
            return checkpoint(self._forward, x, ctx, use_reentrant=False, context_fn=partial(checkpoint_contexts, self))
        return self._forward(x, ctx, cache)

    def _checkpointed(self, x, ctx: AttnContext):
        """What a compiled, activation-checkpointed block runs (`compiled_checkpointed`): torch.compile traces
        the checkpoint into the block's graph, whose backward recomputes the block but keeps the routers'
        top-k (`moe.recompute_policy`); dynamo does not replay forward side effects there, so the routers
        count their tokens once."""
        return checkpoint(self._forward, x, ctx, use_reentrant=False, context_fn=recompute_policy)

    def _compiled_checkpointed_forward(self, x, ctx: AttnContext):
        """Run `compiled_checkpointed`, which only works as one whole graph (it is compiled with fullgraph=True):
        at a graph break dynamo would run the checkpoint eagerly, without the routing replay, and count the
        tokens twice. So the cases that break are refused in one line."""
        if getattr(self.mlp, "ep_group", None) is not None:
            raise ValueError("compiled blocks with activation checkpointing and expert parallelism are not "
                             "supported (the all-to-all splits the compiled checkpoint); turn one off")
        if not hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
            raise ValueError(f"compiled blocks with activation checkpointing need a newer torch than "
                             f"{torch.__version__} (the recompute would count the routers' tokens twice); turn one off")
        try:
            return self.compiled_checkpointed(x, ctx)
        except torch._dynamo.exc.Unsupported as e:
            raise ValueError(f"compiled blocks with activation checkpointing need each block to compile as one "
                             f"graph, and this one breaks ({first_line(e)}); turn one of them off") from None

    def _forward(self, x, ctx: AttnContext, cache=None):
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

    def set_activation_checkpointing(self, enabled: bool = True):
        """Keep only each block's input for backward and recompute the block there (torch.utils.checkpoint,
        non-reentrant): activation memory falls to about one [B, T, D] tensor per layer plus one block's
        worth, for about one more forward of the blocks. Routers replay their forward's choice in the
        recompute and do not count its tokens again (`moe.checkpoint_contexts`; compiled blocks:
        `Block._checkpointed`)."""
        for blk in self.layers:
            blk.activation_checkpointing = enabled
        return self

    def compile_blocks(self, enabled: bool = True, **compile_kwargs):
        """torch.compile each block's body (attention, norms, FFN; torchtitan's per-block compile). The graphs
        are shared by all layers of a kind: one graph per block kind (dense, MoE), unbroken (on CPU the grouped
        products are one opaque op, `moe.grouped_mm_cpu`) but for expert parallelism's all-to-all. Training and full-sequence forwards
        run them; cached decoding stays eager (`generate(compile=True)` compiles its own static-shape step).
        With activation checkpointing the checkpoint is compiled into the graph (`Block._checkpointed`)."""
        if enabled:
            torch._dynamo.config.capture_dynamic_output_shape_ops = True
            if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):  # else refused in forward
                torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        for blk in self.layers:  # torch.compile is lazy: a graph is built at its first call
            blk.compiled_forward = torch.compile(blk._forward, **compile_kwargs) if enabled else None
            blk.compiled_checkpointed = (torch.compile(blk._checkpointed, **{**compile_kwargs, "fullgraph": True})
                                         if enabled else None)
        return self

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
        cache.slot.fill_(start + T)
        if T == 1 and pad_mask is None:  # a decode step: no masks to build unless the prompts were padded
            positions = cache.next_pos[:, None].clone()  # [B, 1]
            cache.valid[:, start] = True
            cache.next_pos += 1
            cache.length = start + 1
            mask = cache.valid[:, None, None, : start + 1] if cache.padded else None  # [B, 1, 1, S]
            return AttnContext(positions=positions, mask=mask, start=start)
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
        """input_ids [B, T]; targets [B, T] (-100 = ignore) for the loss, in which case no logits are returned
        (smolds/model/loss.py: the LM head and the cross-entropy run together over row chunks);
        cache for incremental decoding."""
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
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        out = ModelOutput(logits=None, balance_loss=balance)
        if targets is None:
            out.logits = F.linear(x, head)
        else:  # the head and the loss fused over row chunks: the [B, T, V] logits are never formed
            out.lm_loss = linear_cross_entropy(x.flatten(0, 1), head, targets.flatten(), ignore_index=-100)
            out.loss = out.lm_loss if balance is None else out.lm_loss + balance
        return out

    def decode_step(self, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One new token per row, tokens [B, 1] -> logits [B, V], with shapes that do not change from step to
        step: the token is written at `cache.slot` (a tensor) and attention runs over the whole preallocated
        cache under a validity mask. So one `torch.compile` graph (one CUDA graph with mode="reduce-overhead")
        serves every step. Gives the logits of `forward(tokens, cache=cache)`; the cache must hold a prefill
        (any eager forward), and the caller advances `cache.length` (see `Cache`)."""
        ctx = cache.static_context()
        x = self.embed_tokens(tokens)
        for block, layer_cache in zip(self.layers, cache.layers):
            x, _ = block(x, ctx, layer_cache)
        x = self.norm(x[:, -1])
        return F.linear(x, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)

    # ------------------------------------------------------------ accounting
    def num_parameters(self, active: bool = False) -> int:
        """All parameters (tied embeddings once); with active=True, only those one token uses:
        routed experts count K of E per MoE layer."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            cfg = self.config
            for m in self.modules():
                if isinstance(m, RoutedExperts):
                    per_expert = (m.gate_proj.numel() + m.up_proj.numel() + m.down_proj.numel()) // m.num_local_experts
                    total -= per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM's convention:
        6 * (active matmul parameters, the LM head included, the embedding lookup and norms excluded)
        + 6 * each layer's token mixing outside its parameters (`mixing_macs`: attention scores and weighted
        sums, no causal halving; linear attention its chunked cost)."""
        cfg = self.config
        n = self.num_parameters(active=True) - self.embed_tokens.weight.numel()  # the lookup is no matmul
        if self.lm_head is None:  # tied: the head's matmul reuses the embedding table
            n += cfg.vocab_size * cfg.hidden_size
        n -= sum(p.numel() for name, p in self.named_parameters() if name.endswith("norm.weight") or "layernorm" in name)
        return 6 * n + 6 * sum(blk.self_attn.mixing_macs(seq_len) for blk in self.layers)
