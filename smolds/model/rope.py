"""Rotary position embeddings in the two layouts that checkpoints use.

- interleaved (DeepSeek-V3, HF `rope_interleave=True`): dimension pairs (x0, x1), (x2, x3), ... are rotated
  by frequency 0, 1, ...; this is DeepSeek's complex-number formulation.
- half-split (Llama, SmolLM2): pairs (x_i, x_{i+d/2}) are rotated by frequency i (`rotate_half`).

Both rotate the same 2-D planes by the same angles; they differ only in which coordinates form a plane.
`apply_rope` applies either to x: [..., T, d] with cos/sin: [B or 1, T, d/2] broadcast over heads.
"""

from __future__ import annotations

import torch


def inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of angle positions * inv_freq; positions: [B, T] (any int) -> [B, T, dim/2] fp32.
    Computed in fp32 exactly as transformers does, so imported checkpoints give the same logits."""
    angles = positions.float()[..., None] * inv_freq(dim, theta, positions.device)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x: [B, H, T, d] (or [B, T, d]) by (cos, sin): [B, T, d/2]; computed in fp32, returned in x.dtype."""
    if x.dim() == 4:  # broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    if interleave and not torch.compiler.is_compiling():
        # pairs are adjacent: one complex product (x0 + i x1)(cos + i sin), as DeepSeek writes it; half the
        # time of the real form below, forward + backward, same values (inductor has no complex codegen,
        # so compiled code takes the real form, which it fuses)
        pairs = xf.unflatten(-1, (-1, 2))  # [..., d/2, 2], a view
        if pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
            pairs = pairs.contiguous()  # view_as_complex needs whole complex numbers
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin)).flatten(-2)
    elif interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)
