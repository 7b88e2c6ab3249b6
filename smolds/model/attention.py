"""What every attention kind receives besides x: positions, the mask, and where the cache writes.

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


def causal_mask(T: int, device=None) -> torch.Tensor:
    """[1, 1, T, T] bool lower-triangular mask."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
