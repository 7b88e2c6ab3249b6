"""The routed experts: E SwiGLU FFNs with stacked weights, run on tokens sorted by expert.

Dimension legend: N (token, expert) pairs sorted by expert, D model width, I expert width
(moe_intermediate_size), E experts held here (all of them, or this rank's share under expert parallelism).

Weights are stacked ([E, I, D] gate/up, [E, D, I] down: E per-expert nn.Linear weights) so that all experts
run as three grouped matmuls over their contiguous slices: `torch._grouped_mm` on CUDA (bf16, Hopper) and,
on CPU, the same kernel wrapped as the custom op `smolds::grouped_mm`, so that torch.compile keeps it inside
a block's graph. Where neither applies (an old torch, unaligned widths), a loop runs one matmul per expert
over its slice. `smolds.model.reference.naive_moe_reference` is the reference the tests hold both to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RoutedExperts(nn.Module):
    """E SwiGLU experts with stacked weights, laid out as E per-expert nn.Linear weights ([out, in])."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_local_experts = n_experts  # all E, or this rank's share after expert_parallel.shard_experts
        cpu_grouped_mm_works()  # probe once, before any forward is traced (grouped_mm_ok reads the answer)
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
        if grouped_mm_ok(x, w1.shape[1]):
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


_CPU_GROUPED_MM: bool | None = None  # probed when the first RoutedExperts is built, not at import


def cpu_grouped_mm_works() -> bool:
    """Recent torch has a CPU kernel for torch._grouped_mm, older torch none: probe once (forward and
    the backward's forms)."""
    global _CPU_GROUPED_MM
    if _CPU_GROUPED_MM is None:
        _CPU_GROUPED_MM = _probe_cpu_grouped_mm()
    return _CPU_GROUPED_MM


def _probe_cpu_grouped_mm() -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.inference_mode(False), torch.enable_grad():  # whatever mode the first caller is in
            x = torch.ones(3, 4, requires_grad=True, device="cpu")  # not a meta model's device
            w = torch.ones(2, 4, 4, requires_grad=True, device="cpu")
            y = grouped_mm_cpu(x, w, torch.tensor([1, 3], dtype=torch.int32, device="cpu"))
            y.backward(torch.ones_like(y))
        return bool((y == 4).all() and (x.grad == 4).all() and (w.grad[1] == 2).all())
    except (RuntimeError, NotImplementedError):
        return False


def grouped_mm_ok(x: torch.Tensor, hidden: int) -> bool:
    """torch._grouped_mm takes bf16 on CUDA (Hopper), fp32/bf16 on CPU where probed, and rows of
    multiples of 16 bytes; otherwise the experts run in the loop."""
    aligned = (x.shape[-1] * x.element_size()) % 16 == 0 and (hidden * x.element_size()) % 16 == 0
    if x.is_cuda:
        return aligned and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
    return aligned and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and bool(_CPU_GROUPED_MM)
