"""The chunked LM head + cross-entropy (smolds/model/loss.py) against F.cross_entropy(F.linear(h, W))."""

import pytest
import torch
import torch.nn.functional as F

from smolds import ModelConfig, Transformer
from smolds.model.loss import linear_cross_entropy


def _reference(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)


def _value_and_grads(fn, h, w, y):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, y)
    (loss * 3.0).backward()  # a non-unit upstream gradient
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("rows", [7, 64, 1000])  # chunks that do not divide N, several chunks, one chunk
def test_matches_cross_entropy_with_ignored_targets(rows):
    N, D, V = 100, 16, 50
    h, w = torch.randn(N, D), torch.randn(V, D) * 0.3
    y = torch.randint(0, V, (N,))
    y[::5] = -100  # ignored targets count neither in the loss nor in the mean
    ref = _value_and_grads(_reference, h, w, y)
    ours = _value_and_grads(lambda a, b, t: linear_cross_entropy(a, b, t, rows=rows), h, w, y)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_no_grad_path_and_all_ignored():
    h, w, y = torch.randn(10, 8), torch.randn(20, 8), torch.randint(0, 20, (10,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y, rows=3), _reference(h, w, y))
    # every target ignored: nan loss and zero gradients, as F.cross_entropy
    ignored = torch.full((10,), -100)
    loss, gh, gw = _value_and_grads(lambda a, b, t: linear_cross_entropy(a, b, t, rows=3), h, w, ignored)
    assert loss.isnan() and not gh.any() and not gw.any()


def test_bf16_inputs_accumulate_in_fp32():
    N, D, V = 64, 32, 300
    h, w, y = torch.randn(N, D), torch.randn(V, D) * 0.1, torch.randint(0, V, (N,))
    ref = _value_and_grads(_reference, h.bfloat16(), w.bfloat16(), y)
    ours = _value_and_grads(lambda a, b, t: linear_cross_entropy(a, b, t, rows=16), h.bfloat16(), w.bfloat16(), y)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == torch.bfloat16
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    # under autocast the products run in bf16 over fp32 weights, the gradients come back in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _value_and_grads(lambda a, b, t: linear_cross_entropy(a, b, t, rows=16), h, w, y)
        ref = _value_and_grads(_reference, h, w, y)
    assert ours[1].dtype == ours[2].dtype == torch.float32
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_and_grads_equal_the_unfused_head(tied):
    """Transformer.forward's loss (chunked, no logits kept) equals F.cross_entropy over its logits, and so do
    all gradients, the tied embedding's included (it gets both the lookup's and the head's gradient)."""
    cfg = ModelConfig.from_preset("tiny").replace(num_hidden_layers=2, vocab_size=512, tie_word_embeddings=tied)
    torch.manual_seed(0)
    m = Transformer(cfg).train()
    x, y = torch.randint(0, 512, (2, 24)), torch.randint(0, 512, (2, 24))
    y[:, :3] = -100
    out = m(x, targets=y)
    assert out.logits is None  # the fused loss never forms them
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    logits = m(x).logits
    ref = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, ref)
    ref.backward()
    refs = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert ours.keys() == refs.keys()
    for n in ours:
        torch.testing.assert_close(ours[n], refs[n], atol=1e-6, rtol=1e-4, msg=n)
