"""What every attention kind is (the `Attention` interface) and receives besides x (`AttnContext`).

Attention kinds (smolds/model/mla.py, gqa.py, linear_attention.py) are interchangeable per layer: each
implements `Attention` below, and the Transformer (smolds/model/transformer.py) knows them only through it.

Dimension letters: B batch, T new tokens, S key slots (cached + new), H heads.

The Transformer builds one `AttnContext` per forward and hands it to every layer:
- `positions` [B, T]: rotary positions of the new tokens (per row, so left-padded prompts start at 0);
- `mask` [B, 1, T, S] bool (True = may attend) or None, meaning plain causal attention over the new
  tokens alone (training: no cache, no padding; SDPA's `is_causal` fast path);
- `start`: the cache slot of the first new token (0 when there is no cache or it is empty);
- `valid` [B, T] bool or None: False at left-padding tokens (linear attention zeroes their keys/values);
- `slot` [1] long or None: static-shape decoding (`Transformer.decode_step`, one new token per row): the
  cache slot to write, held in a tensor so that one compiled graph serves every step; attention then runs
  over every slot of the preallocated cache, and `mask` [B, 1, 1, S] marks the slots written so far.
Rotary tables are computed once per (dim, theta) per forward and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from smolds.model.rope import rope_cos_sin


@dataclass
class AttnContext:
    positions: torch.Tensor
    mask: torch.Tensor | None = None
    start: int = 0
    valid: torch.Tensor | None = None
    slot: torch.Tensor | None = None
    _rope: dict = field(default_factory=dict)

    def rope(self, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dim, theta)
        if key not in self._rope:
            self._rope[key] = rope_cos_sin(self.positions, dim, theta)
        return self._rope[key]


class LayerCache(Protocol):
    """One layer's decode state, preallocated for `max_len` slots (MLA: latent + rotary key; GQA: K/V;
    linear attention: a constant-size state)."""

    def tensors(self) -> list[torch.Tensor]: ...  # every tensor held (static decoding pins their addresses)

    def bytes_per_token(self) -> int: ...  # cache bytes per token of context (0 for a constant-size state)


class Attention(Protocol):
    """The interface of an attention kind (an nn.Module built from a ModelConfig)."""

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: LayerCache | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; with a cache, the T new tokens are written at ctx.start (or ctx.slot)."""
        ...

    def new_cache(self, batch: int, max_len: int, device, dtype) -> LayerCache: ...

    def mixing_macs(self, seq_len: int) -> float:
        """Forward multiply-adds per token of the token mixing outside the parameter matmuls (attention
        scores and weighted sums), for Transformer.flops_per_token."""
        ...
