"""Hand-differentiated layers against their autograd references: RMSNorm."""

import pytest
import torch

from smolds.model.layers import RMSNorm, rms_norm_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_reference(dtype):
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 48, dtype=dtype) * 3
    dy = torch.randn(3, 7, 48, dtype=dtype)
    outs = []
    for fn in (norm, lambda t: rms_norm_reference(t, norm.weight, norm.eps)):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(dy)
        outs.append((y.detach(), xi.grad, norm.weight.grad.clone()))
        norm.weight.grad = None
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = outs
    assert torch.equal(y, y_ref)  # the same forward ops
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(dx, dx_ref, **tol)
    torch.testing.assert_close(dw, dw_ref, **tol)


def test_interleaved_rope_complex_equals_real_form(monkeypatch):
    """Eager rotates interleaved pairs as complex numbers; compiled code takes the real form: same values."""
    from smolds.model.rope import apply_rope, rope_cos_sin

    cos, sin = rope_cos_sin(torch.arange(9).expand(2, 9), 16, 10000.0)
    q = torch.randn(2, 9, 3, 24).transpose(1, 2)[..., 8:]  # a strided slice, as MLA's q_rope
    k = torch.randn(2, 9, 16)
    eager = [apply_rope(t, cos, sin, interleave=True) for t in (q, k)]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    real = [apply_rope(t, cos, sin, interleave=True) for t in (q, k)]
    for a, b in zip(eager, real):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
