"""The small building blocks every layer kind shares: RMSNorm and the SwiGLU feed-forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (as Llama and DeepSeek-V3)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # decode/eval: no autograd.Function call overhead, same values
            return rms_norm_reference(x, self.weight, self.eps)
        return _RMSNorm.apply(x, self.weight, self.eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The textbook form, differentiated by autograd (for tests); `_RMSNorm` gives the same forward bit for bit."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """RMSNorm with a hand-written backward: it saves x and the [..., 1] reciprocal rms instead of the
    normalized x, and takes 8 passes over x where autograd's chain of pow/mean/rsqrt/mul backwards takes
    about twice as many (35-40% less time for forward + backward on CPU; 17 norms a step at tiny).
    With x_hat = x * r, r = (mean(x^2) + eps)^-1/2, y = w * x_hat and g = dy * w:
    dx = r * (g - x_hat * mean(g * x_hat)),  dw = sum over tokens of dy * x_hat."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1] fp32
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x.float() * rstd
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * x_hat.to(dy.dtype)).reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            g = (dy * weight).float()
            dx = torch.addcmul(g, x_hat, (g * x_hat).mean(-1, keepdim=True), value=-1).mul_(rstd).to(x.dtype)
        return dx, dw, None


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN of SmolLM2, DeepSeek's dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
