"""Kimi Delta Attention (smolds/model/kda.py): the chunked, recurrent and reference forms agree (outputs, final
states, gradients; per-channel and per-head decay); the layer equals transformers' KimiLinearDeltaAttention
with the same weights; fla's references and kernels agree with ours; cached decoding, left padding, config.

fla's chunk_kda / fused_recurrent_kda kernels are held to ours by `tests/fla_check.py kda` (on CPU under Triton's
interpreter), which test_fla_kernels_match_pytorch runs in a fresh process.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from smolds import ModelConfig, Transformer
from smolds.config import ConfigError
from smolds.model.attention import AttnContext
from smolds.model.kda import KDA, kda, kda_chunked, kda_recurrent, l2norm
from smolds.model.reference import kda_layer_reference, kda_reference

HAS_FLA = bool(importlib.util.find_spec("fla") and importlib.util.find_spec("triton"))
needs_fla = pytest.mark.skipif(not HAS_FLA, reason="needs flash-linear-attention and triton "
                               "(pip install --no-deps fla-core triton)")


def _inputs(B=2, H=3, T=37, K=8, V=6, per_head=False, dtype=torch.float64, device="cpu"):
    """L2-normalised q, k; per-channel log decays from ~0 (keep) to very negative (forget); a random state."""
    q = l2norm(torch.randn(B, H, T, K, dtype=dtype, device=device))
    k = l2norm(torch.randn(B, H, T, K, dtype=dtype, device=device))
    v = torch.randn(B, H, T, V, dtype=dtype, device=device)
    g = F.logsigmoid(torch.randn(B, H, T, 1 if per_head else K, dtype=dtype, device=device) * 3 + 2)
    beta = torch.rand(B, H, T, dtype=dtype, device=device)
    state = torch.randn(B, H, K, V, dtype=dtype, device=device)
    return q, k, v, g, beta, state


def _cfg(pattern, **kw):
    """The tiny preset with small heads and chunks of 8, so short sequences cross chunk boundaries."""
    return ModelConfig.from_preset("tiny").replace(**{"attention_pattern": pattern, "linear_head_dim": 16,
                                                      "linear_chunk_size": 8, **kw})


# ------------------------------------------------------------------------------------------- the math


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("per_head", [False, True], ids=["per_channel", "per_head"])
@pytest.mark.parametrize("T, C", [(1, 64), (5, 8), (37, 8), (37, 24), (100, 64), (130, 64)])
def test_chunked_equals_recurrent_equals_reference(T, C, per_head, dtype, atol):
    """C = 64 splits each chunk into 4 sub-chunks of 16, C = 24 into 3 of 8, C = 8 into one; from a state."""
    q, k, v, g, beta, state = _inputs(T=T, per_head=per_head, dtype=dtype)
    ref, s_ref = kda_reference(q, k, v, g, beta, 0.3, state)
    chunked, s_chunked = kda_chunked(q, k, v, g, beta, 0.3, C, state)
    recurrent, s_recurrent = kda_recurrent(q, k, v, g, beta, 0.3, state)
    for got, want in ((chunked, ref), (recurrent, ref), (s_chunked, s_ref), (s_recurrent, s_ref)):
        torch.testing.assert_close(got, want, atol=atol, rtol=atol)


@pytest.mark.parametrize("per_head", [False, True], ids=["per_channel", "per_head"])
def test_chunked_gradients_equal_reference(per_head):
    """d/d(q, k, v, g, beta, state) of a loss on the outputs and the final state, fp64."""
    inputs = _inputs(T=41, per_head=per_head)
    do, ds = torch.randn_like(inputs[2]), torch.randn_like(inputs[5])
    grads = []
    for form in (lambda *x: kda_chunked(*x[:5], 0.3, 16, x[5]), lambda *x: kda_reference(*x[:5], 0.3, x[5])):
        leaves = [x.clone().requires_grad_() for x in inputs]
        o, s = form(*leaves)
        ((o * do).sum() + (s * ds).sum()).backward()
        grads.append([x.grad for x in leaves])
    for name, got, want in zip(["q", "k", "v", "g", "beta", "state"], *grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=name)


def test_strong_decay_stays_finite_and_exact():
    """Each channel, at random tokens, forgets everything (log decay -500: a chunk's decay far below fp32's range,
    where exp(g_i) * exp(-g_j) would overflow) and otherwise keeps (-0.05..0: decays that exp(g_i - g_j) of
    prefix sums would round away against the -500s, 2e-4 errors); fp32 chunked equals the recurrence."""
    q, k, v, g, beta, state = _inputs(T=128, K=16, V=16, dtype=torch.float32)
    g = torch.where(torch.rand_like(g) < 0.5, -500.0, g.clamp_min(-0.05))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta, state)]
    o, s = kda_chunked(*leaves[:5], 0.3, 64, leaves[5])
    (o.sum() + s.sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    o_rec, s_rec = kda_recurrent(q, k, v, g, beta, 0.3, state)
    torch.testing.assert_close(o.detach(), o_rec, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(s.detach(), s_rec, atol=2e-6, rtol=2e-6)


def test_chunked_resumes_from_a_state():
    q, k, v, g, beta, _ = _inputs(T=41, dtype=torch.float32)
    whole, s_whole = kda_chunked(q, k, v, g, beta, 0.3, 16)
    cut = lambda x, a, b: x[:, :, a:b]  # noqa: E731
    head, s = kda(*(cut(x, 0, 13) for x in (q, k, v, g, beta)), 0.3, 16)
    tail, s = kda(*(cut(x, 13, 41) for x in (q, k, v, g, beta)), 0.3, 16, s)
    torch.testing.assert_close(torch.cat([head, tail], 2), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_whole, atol=1e-5, rtol=1e-5)


@needs_fla
def test_chunked_equals_fla_reference():
    """fla's naive recurrent and chunked KDA, and its naive gated delta rule for one decay per head ([B,T,H,*]
    layout, scale passed explicitly, state [K, V])."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from fla.ops.kda.naive import naive_chunk_kda, naive_recurrent_kda

    t = lambda x: x.transpose(1, 2)  # noqa: E731 [B,H,T,*] <-> [B,T,H,*]
    q, k, v, g, beta, state = _inputs(T=128, K=16, V=12, dtype=torch.float32)  # fla's naive forms run in fp32
    ours, s_ours = kda_chunked(q, k, v, g, beta, 0.3, 64, state)
    for naive in (naive_recurrent_kda, naive_chunk_kda):
        o, s = naive(t(q), t(k), t(v), t(g), t(beta), scale=0.3, initial_state=state, output_final_state=True)
        torch.testing.assert_close(t(o), ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s, s_ours, atol=1e-5, rtol=1e-5)
    q, k, v, g, beta, state = _inputs(T=50, K=16, V=12, per_head=True, dtype=torch.float32)
    ours, s_ours = kda_chunked(q, k, v, g, beta, 0.3, 16, state)
    o, s = naive_recurrent_gated_delta_rule(t(q), t(k), t(v), t(beta), t(g[..., 0]), scale=0.3,
                                            initial_state=state, output_final_state=True)
    torch.testing.assert_close(t(o), ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ours, atol=1e-5, rtol=1e-5)


@needs_fla
def test_fla_kernels_match_pytorch():
    """fla's chunk and fused-recurrent KDA kernels, through `kda(use_fla=True)`, equal the PyTorch form: outputs,
    final states and the chunk kernel's gradients (tests/fla_check.py kda). Without CUDA, Triton's interpreter
    runs the same kernels on CPU; it must be on before triton is imported, hence a fresh process."""
    env = dict(os.environ, TRITON_F32_DEFAULT="ieee")  # on CUDA, fp32 dots in fp32 (Triton's default is tf32)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    script = os.path.join(os.path.dirname(__file__), "fla_check.py")
    run = subprocess.run([sys.executable, script, "kda"], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 12 and all(r["ok"] for r in results.values()), results


# ------------------------------------------------------------------------------------------ the layer


def _kimi_linear_layer():
    """A KDA layer of a tiny random transformers KimiLinear (KDA, then MLA), with its norm weight, dt_bias and
    A_log moved off their init, and our layer with its weights loaded by name (strict: same names, shapes)."""
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    from transformers import KimiLinearConfig

    hf_cfg = KimiLinearConfig(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                              linear_num_heads=4, linear_head_dim=16, linear_conv_kernel_dim=4,
                              layer_types=["linear_attention", "full_attention"], rms_norm_eps=1e-5,
                              intermediate_size=64, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                              v_head_dim=16, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    theirs = kimi.KimiLinearForCausalLM(hf_cfg).eval().model.layers[0].self_attn
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = KDA(_cfg(["kda"], num_attention_heads=4, linear_conv_kernel_dim=4)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return hf_cfg, theirs, ours


@torch.no_grad()
def test_layer_equals_transformers_kimi_linear():
    """Full sequence, cached decode (prefill 6, then one token at a time) and a left-padded row, <= 1e-4."""
    from transformers.cache_utils import DynamicCache

    hf_cfg, theirs, ours = _kimi_linear_layer()
    B, T = 2, 29
    x = torch.randn(B, T, 128)
    ctx = lambda start, n, valid=None: AttnContext(positions=torch.arange(n).expand(B, n), start=start,  # noqa: E731
                                                  valid=valid)
    want = theirs(x)
    torch.testing.assert_close(ours(x, ctx(0, T)), want, atol=1e-4, rtol=1e-4)

    hf_cache, cache = DynamicCache(config=hf_cfg), ours.new_cache(B, T, None, torch.float32)
    got, hf_got = [ours(x[:, :6], ctx(0, 6), cache)], [theirs(x[:, :6], cache=hf_cache)]
    for t in range(6, T):
        got.append(ours(x[:, t:t + 1], ctx(t, 1), cache))
        hf_got.append(theirs(x[:, t:t + 1], cache=hf_cache))
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(hf_got, 1), want, atol=1e-4, rtol=1e-4)

    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :7] = False  # row 0 left-padded by 7
    want = theirs(x, attention_mask=valid)
    torch.testing.assert_close(ours(x, ctx(0, T, valid))[valid], want[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(want[0, 7:], theirs(x[:1, 7:])[0], atol=1e-4, rtol=1e-4)  # padding = row alone


def test_layer_equals_reference_and_is_causal():
    attn = KDA(_cfg(["kda"]))
    x = torch.randn(2, 21, 128)
    ctx = AttnContext(positions=torch.arange(21).expand(2, 21))
    out = attn(x, ctx)
    torch.testing.assert_close(out, kda_layer_reference(attn, x), atol=1e-5, rtol=1e-4)
    x2 = x.clone()
    x2[:, 11] += 1.0  # change one token: nothing before it may move
    out2 = attn(x2, ctx)
    torch.testing.assert_close(out2[:, :11], out[:, :11], atol=1e-6, rtol=0)
    assert (out2[:, 11:] - out[:, 11:]).abs().amax() > 1e-4


@pytest.mark.parametrize("pattern, nope", [(["kda"], False), (["kda", "kda", "kda", "mla"], False),
                                           (["kda", "kda", "kda", "mla"], True)],
                         ids=["kda", "kda3:mla1", "kda3:mla1-nope"])
@torch.no_grad()
def test_cached_and_static_decode_equal_full_forward(pattern, nope):
    """Prefill 6 tokens, then the eager cached forward one token at a time; and the static decode_step. With
    MLA with and without RoPE (Kimi Linear's)."""
    model = Transformer(_cfg(pattern, mla_use_nope=nope)).eval()
    ids = torch.randint(0, 4096, (2, 23))
    full = model(ids).logits
    cache, static = model.new_cache(2, 27), model.new_cache(2, 27)
    logits = [model(ids[:, :6], cache=cache).logits]
    model(ids[:, :6], cache=static)
    for t in range(6, 23):
        logits.append(model(ids[:, t:t + 1], cache=cache).logits)
        torch.testing.assert_close(model.decode_step(ids[:, t:t + 1], static), logits[-1][:, -1], atol=1e-5, rtol=1e-5)
        static.length += 1
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=1e-4)
    kda_caches = [c for c, kind in zip(cache.layers, model.config.layer_kinds()) if kind[0] == "kda"]
    H, K, W = 4, 16, 4
    assert all(c.bytes_per_token() == 0 and c.state_bytes() == 2 * H * K * K * 4 + 2 * 3 * H * K * (W - 1) * 4
               for c in kda_caches)


@torch.no_grad()
def test_mla_without_rope_sees_no_positions():
    """mla_use_nope (Kimi Linear's MLA): the last token's output does not change when the tokens before it are
    permuted (with RoPE it does); the layer equals the naive reference (the absorbed path: the cached decode
    test's nope case)."""
    from smolds.model.mla import MLA
    from smolds.model.reference import mla_reference

    x = torch.randn(2, 12, 128)
    perm = torch.cat([torch.randperm(11), torch.tensor([11])])
    ctx = lambda: AttnContext(positions=torch.arange(12).expand(2, 12))  # noqa: E731
    for nope in (True, False):
        attn = MLA(_cfg(["mla"], mla_use_nope=nope)).eval()
        last, last_permuted = attn(x, ctx())[:, -1], attn(x[:, perm], ctx())[:, -1]
        if nope:
            torch.testing.assert_close(last_permuted, last, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(attn(x, ctx()), mla_reference(attn, x, ctx()), atol=1e-5, rtol=1e-5)
        else:
            assert (last_permuted - last).abs().amax() > 1e-3


@torch.no_grad()
def test_state_size_does_not_depend_on_context():
    model = Transformer(_cfg(["kda", "mla"]))
    short, long = model.new_cache(1, 16), model.new_cache(1, 1024)
    assert [c.state_bytes() for c in short.layers[::2]] == [c.state_bytes() for c in long.layers[::2]]
    assert short.bytes_per_token() == long.bytes_per_token() == 2 * short.layers[1].bytes_per_token()  # MLA only


@torch.no_grad()
def test_left_padded_batch_equals_rows_alone():
    """Row 0 is left-padded by 5; its prefill logits and greedy continuation match running it alone."""
    model = Transformer(_cfg(["kda", "mla"])).eval()
    a, b = torch.randint(0, 4096, (1, 9)), torch.randint(0, 4096, (1, 14))
    ids = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), a], 1), b])
    pad_mask = torch.ones(2, 14, dtype=torch.bool)
    pad_mask[0, :5] = False
    cache = model.new_cache(2, 20)
    batched = [model(ids, cache=cache, pad_mask=pad_mask).logits[:, -1]]
    for _ in range(4):
        batched.append(model(batched[-1].argmax(-1, keepdim=True), cache=cache).logits[:, -1])
    for row, prompt in enumerate((a, b)):
        alone_cache = model.new_cache(1, 20)
        alone = [model(prompt, cache=alone_cache).logits[:, -1]]
        for _ in range(4):
            alone.append(model(alone[-1].argmax(-1, keepdim=True), cache=alone_cache).logits[:, -1])
        torch.testing.assert_close(torch.stack([s[row] for s in batched]), torch.cat(alone), atol=1e-4, rtol=1e-4)


def test_gradients_reach_every_parameter():
    model = Transformer(_cfg(["kda", "mla"]))
    ids = torch.randint(0, 4096, (2, 19))
    model(ids, targets=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".self_attn." in name:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_decay_rates_and_norms_get_no_weight_decay():
    """AdamW's decay would pull every head's forgetting rate (A_log, stored [1, 1, H, 1]) towards one value."""
    from smolds.train.engine import param_groups

    model = Transformer(_cfg(["kda", "mla"]))
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, 0.1, ep=False)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = sorted(names[i] for i in groups["no_decay"])
    assert any(n.endswith("A_log") for n in no_decay) and any(n.endswith("dt_bias") for n in no_decay)
    assert not any(names[i].endswith("A_log") or "norm" in names[i] for i in groups["decay"])
    assert any(names[i].endswith("q_proj.weight") for i in groups["decay"])


def test_init_bf16_and_flops():
    """fla's gate init (A in [1, 16], softplus(dt_bias) in [1e-3, 1e-1]); a bf16 model runs with the fp32 core;
    the per-token cost beyond one chunk does not grow with the sequence."""
    attn = KDA(_cfg(["kda"]))
    A, dt = attn.forget_gate.A_log.exp(), F.softplus(attn.forget_gate.dt_bias)
    assert A.min() >= 1 and A.max() <= 16 and dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    model = Transformer(_cfg(["kda", "mla"])).to(torch.bfloat16)
    logits = model(torch.randint(0, 4096, (1, 20))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    model = Transformer(_cfg(["kda"]))
    assert model.flops_per_token(4096) == model.flops_per_token(512) > model.flops_per_token(4)


@pytest.mark.parametrize("change, message", [
    (dict(linear_head_dim=320), "model.linear_head_dim: kda layers take head dims up to 256"),
    (dict(linear_kv_rank=8), "model.linear_kv_rank: the latent variant is for 'linear' layers only"),
    (dict(linear_conv_kernel_dim=0), "model.linear_conv_kernel_dim: must be a positive integer"),
    (dict(attention_pattern=["kda", "mamba"]), "unknown kind 'mamba'; allowed: mla, gqa, linear, kda"),
    (dict(mla_use_nope="yes"), "model.mla_use_nope: must be true or false"),
])
def test_config_errors_name_the_fix(change, message):
    with pytest.raises(ConfigError, match=message) as err:
        _cfg(["kda", "mla"], **change)
    assert "\n" not in str(err.value)
