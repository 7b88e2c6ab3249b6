"""The LM head and the cross-entropy in one pass over row chunks, without the [N, V] logits.

Dimension legend: N tokens (B*T flattened), D model width, V vocabulary, c rows per chunk.

`F.cross_entropy(F.linear(h, W).float(), y)` keeps the logits, their fp32 copy and the log-probabilities
for backward, and its backward zero-fills another [N, V] gradient: at smollm2-deepseek-135m, B8 x 2048, each
is 3.2 GB in fp32. Here the rows are taken c at a time: logits = h_c W^T, log-softmax, the target's
log-probability, and, while the chunk is still in cache, its gradient
    dlogits = softmax - onehot(y),   dh_c = dlogits W,   dW += dlogits^T h_c,
so the backward only scales the two stored gradients by dloss / (tokens counted). Nothing of size [N, V] is
ever held, and nothing is recomputed (recomputing the logits in backward instead, as Liger's and Apple's
cut-cross-entropy do in fused kernels, measured 20-30% slower here on CPU: one more [c, D] x [D, V] product).
The gradients cost the same matmuls as the unfused backward; the loss-only path (no grad, evaluation) skips
them. Targets equal to `ignore_index` count neither in the loss nor in the mean; softmax and the loss are
in fp32 whatever the inputs' dtype, as in the unfused form; under autocast the products run in its dtype.
`tests/test_loss.py` holds values and gradients to `F.cross_entropy`.

Distillation (`linear_distill`, for `--train.distill_from`) is the same pass with a soft target mixed in: the
teacher's distribution p_t = softmax(h_t W_t^T), computed chunk by chunk beside the student's, gives
    KL(p_t || p_s) = sum_v p_t (log p_t - log p_s),
and the gradient of (1 - w) CE + w KL is  dlogits = softmax(h W^T) - (1 - w) onehot(y) - w p_t,  so one pass
over the chunks costs one product more than the cross-entropy alone (the teacher's logits), and neither
model's [N, V] logits are held. `tests/test_distill.py` holds it to the unfused F.cross_entropy and F.kl_div.
"""

from __future__ import annotations

import torch


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk. CPU: 128 rows (of 64-384, the fastest or within 2% at V = 4k, 16k and 49k on one
    core: the chunk's logits stay near cache). CUDA: ~2^26 logits (256 MiB in fp32) a chunk, large enough for full GEMM tiles."""
    if device.type == "cuda":
        return max(1024, 2**26 // vocab)
    return 128


def _chunks(h, weight, targets, ignore_index: int, rows: int, with_grad: bool):
    """Sum of the per-token losses (fp32) and, with_grad, the unscaled dh [N, D] and dW [V, D] (fp32)."""
    N = h.shape[0]
    valid = targets != ignore_index  # [N]
    target = targets.masked_fill(~valid, 0)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if with_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if with_grad else None
    rows = min(rows, N)
    # one logits and one log-prob buffer, reused by every chunk (a fresh [c, V] a chunk costs 10% at tiny)
    logits_buf = h.new_empty(rows, weight.shape[0])
    logp_buf = torch.empty(rows, weight.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, N, rows):
        e = min(s + rows, N)
        h_c, y_c, keep = h[s:e], target[s:e, None], valid[s:e, None]  # [c, D], [c, 1], [c, 1]
        logits = torch.mm(h_c, weight.t(), out=logits_buf[: e - s])  # [c, V]
        logp = torch.log_softmax(logits.float(), dim=-1, out=logp_buf[: e - s])  # [c, V] fp32
        loss -= logp.gather(1, y_c).masked_fill_(~keep, 0.0).sum()
        if not with_grad:
            continue
        g = logp.exp_()  # softmax, in place
        g = g.scatter_add_(1, y_c, torch.full_like(y_c, -1.0, dtype=g.dtype)).to(h.dtype)  # - onehot(y)
        # ignored rows get no gradient: zero them in the [c, D] operands, not in the [c, V] one
        torch.mm(g, weight, out=grad_h[s:e]).mul_(keep)  # [c, D]
        h_keep = h_c * keep
        if weight.dtype == torch.float32:
            grad_w.addmm_(g.t(), h_keep)  # [V, D]
        else:  # bf16 products, summed over chunks in fp32
            grad_w += g.t() @ h_keep
    return loss, valid.sum(), grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, rows: int):
        loss, n, grad_h, grad_w = _chunks(h, weight, targets, ignore_index, rows, with_grad=True)
        ctx.save_for_backward(grad_h, grad_w, n)
        ctx.weight_dtype = weight.dtype
        return loss / n  # nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, n = ctx.saved_tensors
        scale = grad_out / n.clamp_min(1)  # all ignored: zero gradients, as F.cross_entropy
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         rows: int | None = None) -> torch.Tensor:
    """mean over tokens with targets != ignore_index of -log softmax(h W^T)[target].
    h [N, D], weight [V, D] (the LM head or the tied embedding), targets [N] -> scalar fp32."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):  # the products in autocast's dtype, as F.linear would run
        dtype = torch.get_autocast_dtype(dev)
        h, weight = h.to(dtype), weight.to(dtype)
    rows = rows or chunk_rows(weight.shape[0], h.device)
    with torch.autocast(dev, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, rows)
        loss, n, _, _ = _chunks(h, weight, targets, ignore_index, rows, with_grad=False)
        return loss / n



def _distill_chunks(h, weight, targets, teacher_h, teacher_weight, kl_weight: float, ignore_index: int, rows: int,
                    with_grad: bool):
    """Sums over the counted rows of the cross-entropy and of KL(p_t || p_s) (fp32), their count, and, with_grad,
    the unscaled dh [N, D] and dW [V, D] (fp32) of (1 - kl_weight) CE + kl_weight KL."""
    N = h.shape[0]
    valid = targets != ignore_index  # [N]
    target = targets.masked_fill(~valid, 0)
    ce = torch.zeros((), dtype=torch.float32, device=h.device)
    kl = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if with_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if with_grad else None
    for s in range(0, N, rows):
        e = min(s + rows, N)
        y_c, keep = target[s:e, None], valid[s:e, None]  # [c, 1]
        logp = torch.log_softmax((h[s:e] @ weight.t()).float(), dim=-1)  # [c, V] the student's
        logp_t = torch.log_softmax((teacher_h[s:e] @ teacher_weight.t()).float(), dim=-1)  # [c, V] the teacher's
        p_t = logp_t.exp()
        ce -= logp.gather(1, y_c).masked_fill_(~keep, 0.0).sum()
        kl += ((p_t * (logp_t - logp)).sum(1, keepdim=True) * keep).sum()
        if not with_grad:
            continue
        # softmax - (1 - w) onehot(y) - w p_t: the two targets' weights sum to 1, as the softmax's
        g = logp.exp_().sub_(p_t, alpha=kl_weight)
        g = g.scatter_add_(1, y_c, torch.full_like(y_c, kl_weight - 1.0, dtype=g.dtype)).to(h.dtype)
        h_keep = h[s:e] * keep  # ignored rows get no gradient
        torch.mm(g, weight, out=grad_h[s:e]).mul_(keep)  # [c, D]
        if weight.dtype == torch.float32:
            grad_w.addmm_(g.t(), h_keep)  # [V, D]
        else:  # bf16 products, summed over chunks in fp32
            grad_w += g.t() @ h_keep
    return ce, kl, valid.sum(), grad_h, grad_w


class _LinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, teacher_h, teacher_weight, kl_weight, ignore_index, rows):
        ce, kl, n, grad_h, grad_w = _distill_chunks(h, weight, targets, teacher_h, teacher_weight, kl_weight,
                                                    ignore_index, rows, with_grad=True)
        ctx.save_for_backward(grad_h, grad_w, n)
        ctx.weight_dtype = weight.dtype
        ce, kl = ce / n, kl / n
        ctx.mark_non_differentiable(ce, kl)
        return (1.0 - kl_weight) * ce + kl_weight * kl, ce, kl

    @staticmethod
    def backward(ctx, grad_out, _grad_ce, _grad_kl):
        grad_h, grad_w, n = ctx.saved_tensors
        scale = grad_out / n.clamp_min(1)
        return (grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None, None,
                None, None)


def linear_distill(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, teacher_h: torch.Tensor,
                   teacher_weight: torch.Tensor, kl_weight: float, ignore_index: int = -100,
                   rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1 - kl_weight) x cross-entropy + kl_weight x KL(softmax(teacher_h teacher_weight^T) || softmax(h weight^T)),
    both means over the tokens whose target is not ignore_index, and the two terms (detached): a student's LM
    head (h [N, D], weight [V, D], targets [N]) distilled from a teacher's (teacher_h [N, D_t], teacher_weight
    [V, D_t], which get no gradient) -> (loss, ce, kl), scalars in fp32."""
    teacher_h, teacher_weight = teacher_h.detach(), teacher_weight.detach()
    dev = h.device.type
    if torch.is_autocast_enabled(dev):  # the products in autocast's dtype, as F.linear would run
        dtype = torch.get_autocast_dtype(dev)
        h, weight, teacher_h, teacher_weight = (t.to(dtype) for t in (h, weight, teacher_h, teacher_weight))
    rows = rows or chunk_rows(weight.shape[0], h.device)
    with torch.autocast(dev, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearDistill.apply(h, weight, targets, teacher_h, teacher_weight, kl_weight, ignore_index, rows)
        ce, kl, n, _, _ = _distill_chunks(h, weight, targets, teacher_h, teacher_weight, kl_weight, ignore_index,
                                          rows, with_grad=False)
        ce, kl = ce / n, kl / n
        return (1.0 - kl_weight) * ce + kl_weight * kl, ce, kl
