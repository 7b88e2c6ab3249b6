"""Linear attention: the chunked, recurrent and quadratic forms agree; cached decoding equals the full forward
in linear-only and hybrid models; causality, left padding, gradients, the latent variant,
flash-linear-attention's kernels (on CUDA, or on CPU under Triton's interpreter)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from smolds import ModelConfig, Transformer
from smolds.model.attention import AttnContext
from smolds.model.linear_attention import (
    LinearAttention,
    linear_attention,
    linear_attention_chunked,
)
from smolds.model.reference import (
    linear_attention_layer_reference,
    linear_attention_recurrent,
    linear_attention_reference,
)


def _inputs(B=2, H=3, T=37, K=8, V=6, decay_scale=3.0):
    q, k = torch.randn(B, H, T, K), torch.randn(B, H, T, K)
    v = torch.randn(B, H, T, V)
    log_decay = F.logsigmoid(torch.randn(B, H, T) * decay_scale + 2)  # from ~0 (keep) to very negative (forget)
    return q, k, v, log_decay


def _cfg(pattern, rank=None, **kw):
    """The tiny preset with small linear heads and chunks of 8, so short sequences cross chunk boundaries."""
    return ModelConfig.from_preset("tiny").replace(attention_pattern=pattern, linear_head_dim=16,
                                                   linear_chunk_size=8, linear_kv_rank=rank, **kw)


@pytest.mark.parametrize("T", [1, 5, 8, 17, 37])
def test_chunked_equals_recurrent_equals_reference(T):
    q, k, v, log_decay = _inputs(T=T)
    ref = linear_attention_reference(q, k, v, log_decay, 0.3)
    chunked, s_chunked = linear_attention_chunked(q, k, v, log_decay, 0.3, chunk_size=8)
    recurrent, s_recurrent = linear_attention_recurrent(q, k, v, log_decay, 0.3)
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recurrent, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_chunked, s_recurrent, atol=1e-5, rtol=1e-5)


def test_chunked_resumes_from_a_state():
    q, k, v, log_decay = _inputs(T=41)
    whole, s_whole = linear_attention_chunked(q, k, v, log_decay, 0.3, chunk_size=8)
    head, s = linear_attention_chunked(q[:, :, :13], k[:, :, :13], v[:, :, :13], log_decay[:, :, :13], 0.3, 8)
    tail, s = linear_attention(q[:, :, 13:], k[:, :, 13:], v[:, :, 13:], log_decay[:, :, 13:], 0.3, 8, s)
    torch.testing.assert_close(torch.cat([head, tail], 2), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_whole, atol=1e-5, rtol=1e-5)


def test_strong_decay_stays_finite():
    """Decays near zero (log -60 per token, products far below fp32's range) must not give inf/nan."""
    q, k, v, _ = _inputs(T=64)
    log_decay = torch.full((2, 3, 64), -60.0)
    o, s = linear_attention_chunked(q, k, v, log_decay, 0.3, chunk_size=32)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    # with everything forgotten each step, o_t only sees its own token
    torch.testing.assert_close(o, (q * k).sum(-1, keepdim=True) * v * 0.3, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [None, 8])
def test_layer_equals_quadratic_reference_and_is_causal(rank):
    attn = LinearAttention(_cfg(["linear"], rank))
    x = torch.randn(2, 21, 128)
    ctx = AttnContext(positions=torch.arange(21).expand(2, 21))
    out = attn(x, ctx)
    torch.testing.assert_close(out, linear_attention_layer_reference(attn, x), atol=1e-5, rtol=1e-4)
    x2 = x.clone()
    x2[:, 11] += 1.0  # change one token: nothing before it may move
    out2 = attn(x2, ctx)
    torch.testing.assert_close(out2[:, :11], out[:, :11], atol=1e-6, rtol=0)
    assert (out2[:, 11:] - out[:, 11:]).abs().amax() > 1e-4


def _decode_token_by_token(model, ids, prefill):
    cache = model.new_cache(ids.shape[0], ids.shape[1] + 4)
    logits = [model(ids[:, :prefill], cache=cache).logits]
    for t in range(prefill, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], cache=cache).logits)
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("pattern, rank", [(["linear"], None), (["linear", "mla"], None), (["linear"], 8)],
                         ids=["linear", "hybrid", "latent"])
@torch.no_grad()
def test_cached_decode_equals_full_forward(pattern, rank):
    model = Transformer(_cfg(pattern, rank)).eval()
    ids = torch.randint(0, 4096, (2, 23))
    full = model(ids).logits
    decoded, cache = _decode_token_by_token(model, ids, prefill=6)
    torch.testing.assert_close(decoded, full, atol=1e-4, rtol=1e-4)
    linear_caches = [c for c in cache.layers if hasattr(c, "state_bytes")]
    assert all(c.bytes_per_token() == 0 for c in linear_caches)
    H, d = 4, rank or 16
    assert all(c.state.shape == (2, H, d, d) and c.state_bytes() == 2 * H * d * d * 4 for c in linear_caches)


@torch.no_grad()
def test_state_size_does_not_depend_on_context():
    model = Transformer(_cfg(["linear", "mla"]))
    short, long = model.new_cache(1, 16), model.new_cache(1, 1024)
    assert [c.state_bytes() for c in short.layers[::2]] == [c.state_bytes() for c in long.layers[::2]]
    assert all(c.bytes_per_token() == 0 for c in short.layers[::2] + long.layers[::2])
    assert short.bytes_per_token() == long.bytes_per_token() == 2 * short.layers[1].bytes_per_token()  # MLA only


@torch.no_grad()
def test_left_padded_batch_equals_rows_alone():
    """Row 0 is left-padded by 5; its prefill logits and greedy continuation match running it alone."""
    model = Transformer(_cfg(["linear", "mla"])).eval()
    a, b = torch.randint(0, 4096, (1, 9)), torch.randint(0, 4096, (1, 14))
    ids = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), a], 1), b])
    pad_mask = torch.ones(2, 14, dtype=torch.bool)
    pad_mask[0, :5] = False
    cache = model.new_cache(2, 20)
    batched = [model(ids, cache=cache, pad_mask=pad_mask).logits[:, -1]]
    next_ids = batched[0].argmax(-1, keepdim=True)
    for _ in range(4):
        batched.append(model(next_ids, cache=cache).logits[:, -1])
        next_ids = batched[-1].argmax(-1, keepdim=True)
    for row, prompt in enumerate((a, b)):
        alone_cache = model.new_cache(1, 20)
        alone = [model(prompt, cache=alone_cache).logits[:, -1]]
        for _ in range(4):
            alone.append(model(alone[-1].argmax(-1, keepdim=True), cache=alone_cache).logits[:, -1])
        torch.testing.assert_close(torch.stack([s[row] for s in batched]), torch.cat(alone), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rank", [None, 8])
def test_gradients_reach_every_parameter(rank):
    model = Transformer(_cfg(["linear", "mla"], rank))
    ids = torch.randint(0, 4096, (2, 19))
    model(ids, targets=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".self_attn." in name:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_latent_variant_shrinks_parameters_and_state():
    full, latent = LinearAttention(_cfg(["linear"])), LinearAttention(_cfg(["linear"], rank=8))
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(latent) < n(full)
    assert latent.new_cache(1, 64, None, None).state_bytes() < full.new_cache(1, 64, None, None).state_bytes()
    assert not hasattr(latent, "k_proj") and latent.kv_a_proj.out_features == 8


def test_bf16_model_runs_with_fp32_core():
    model = Transformer(_cfg(["linear", "mla"])).to(torch.bfloat16)
    logits = model(torch.randint(0, 4096, (1, 20))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_init_spreads_decays_like_retnet_and_flops_grow_linearly():
    attn = LinearAttention(_cfg(["linear"]))
    gamma = torch.sigmoid(attn.gk_proj.bias)
    torch.testing.assert_close(gamma, 1 - 2.0 ** (-5.0 - torch.arange(4.0)))
    model = Transformer(_cfg(["linear"]))
    # per-token cost beyond one chunk does not grow with the sequence
    assert model.flops_per_token(4096) == model.flops_per_token(512)


@pytest.mark.skipif(not (importlib.util.find_spec("fla") and importlib.util.find_spec("triton")),
                    reason="needs flash-linear-attention and triton (pip install --no-deps fla-core triton)")
def test_fla_kernels_match_pytorch():
    """fla's chunk and fused-recurrent kernels, through `linear_attention(use_fla=True)`, equal the PyTorch form:
    outputs, final states and the chunk kernel's gradients (tests/fla_check.py). Without CUDA, Triton's
    interpreter runs the same kernels on CPU; it must be on before triton is imported, hence a fresh process."""
    env = dict(os.environ, TRITON_F32_DEFAULT="ieee")  # on CUDA, fp32 dots in fp32 (Triton's default is tf32)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    script = os.path.join(os.path.dirname(__file__), "fla_check.py")
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 11 and all(r["ok"] for r in results.values()), results
