"""Attention paths and the whole Transformer: causality, absorbed == naive MLA, cached decode == full."""

import pytest
import torch

from smolds import ModelConfig, Transformer
from smolds.config import presets
from smolds.model.attention import AttnContext
from smolds.model.mla import MLA
from smolds.model.reference import mla_reference
from smolds.model.rope import apply_rope


def small(preset: str, layers: int = 3, **changes) -> ModelConfig:
    """A preset with its layer kinds and head shapes kept, but shallow and with a small vocabulary."""
    return ModelConfig.from_preset(preset).replace(num_hidden_layers=layers, vocab_size=512, **changes)


KIND_CONFIGS = {
    "mla": small("tiny", attention_pattern=["mla"]),
    "mla-no-q-lora": small("smollm2-deepseek-135m", hidden_size=128, intermediate_size=256, num_attention_heads=4),
    "gqa": small("smollm2-135m", hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2),
    "gqa+mla+moe": small("tiny", attention_pattern=["gqa", "mla"], num_key_value_heads=2),
}


def _model(cfg, dtype=torch.float32):
    torch.manual_seed(0)
    m = Transformer(cfg).to(dtype).eval()
    # Non-zero router biases so that they take part in every comparison.
    for name, buf in m.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn_like(buf) * 0.05)
    return m


@pytest.mark.parametrize("name", sorted(KIND_CONFIGS))
def test_causal(name):
    m = _model(KIND_CONFIGS[name])
    x = torch.randint(0, 512, (2, 24))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        a, b = m(x).logits, m(y).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3  # later positions did change: the test can fail


def test_mla_paths_equal_naive_reference():
    cfg = small("tiny")
    attn = MLA(cfg).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(2, 17, cfg.hidden_size)
    ctx = AttnContext(positions=torch.arange(17).expand(2, 17))
    ref = mla_reference(attn, x, ctx)
    torch.testing.assert_close(attn(x, ctx), ref, rtol=1e-4, atol=1e-5)  # expanded + SDPA
    q_nope, q_rope, c_kv, k_rope = attn.project(x, ctx)
    absorbed = attn.absorbed(q_nope, q_rope, c_kv, k_rope, None)  # all 17 queries against the latent
    out = attn.o_proj(absorbed.transpose(1, 2).reshape(2, 17, -1))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_mla_cache_holds_only_latent_and_rope_key():
    cfg = ModelConfig.from_preset("smollm2-deepseek-135m")
    attn = MLA(cfg)
    cache = attn.new_cache(1, 8, "cpu", torch.bfloat16)
    assert cache.bytes_per_token() == (128 + 32) * 2  # vs 2 * 9 heads * 64 * 2 bytes = 2304 for MHA


@pytest.mark.parametrize("name", sorted(KIND_CONFIGS))
def test_cached_decode_equals_full_forward(name):
    m = _model(KIND_CONFIGS[name])
    x = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = m(x).logits
        cache = m.new_cache(2, 32)
        pre = m(x[:, :8], cache=cache).logits  # prefill 8 tokens, then decode one by one
        steps = [m(x[:, t : t + 1], cache=cache).logits for t in range(8, 20)]
    torch.testing.assert_close(torch.cat([pre, *steps], 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", presets())
def test_cached_decode_per_preset(preset):
    cfg = small(preset, layers=2)
    m = _model(cfg)
    x = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        full = m(x).logits
        cache = m.new_cache(1, 10)
        m(x[:, :4], cache=cache)
        last = [m(x[:, t : t + 1], cache=cache).logits for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(last, 1), full[:, 4:], rtol=1e-4, atol=1e-4)


def test_left_padded_batch_equals_rows_one_by_one():
    m = _model(KIND_CONFIGS["gqa+mla+moe"])
    a, b = torch.randint(0, 512, (1, 9)), torch.randint(0, 512, (1, 5))
    padded = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    pad_mask = torch.ones(2, 9, dtype=torch.bool)
    pad_mask[1, :4] = False
    with torch.no_grad():
        cache = m.new_cache(2, 12)
        batched = m(padded, cache=cache, pad_mask=pad_mask).logits[:, -1]
        nxt = torch.tensor([[7], [11]])
        batched_step = m(nxt, cache=cache).logits[:, -1]
        for row, ids, tok in ((0, a, 7), (1, b, 11)):
            c = m.new_cache(1, 12)
            alone = m(ids, cache=c).logits[:, -1]
            torch.testing.assert_close(batched[row], alone[0], rtol=1e-4, atol=1e-4)
            step = m(torch.tensor([[tok]]), cache=c).logits[:, -1]
            torch.testing.assert_close(batched_step[row], step[0], rtol=1e-4, atol=1e-4)


def test_rope_layouts_rotate_the_same_planes():
    x = torch.randn(1, 2, 5, 8)
    angles = torch.randn(1, 5, 4)
    cos, sin = angles.cos(), angles.sin()
    half = apply_rope(x, cos, sin, interleave=False)
    # Interleaving the coordinates maps one layout onto the other.
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    inter = apply_rope(x[..., perm], cos, sin, interleave=True)
    torch.testing.assert_close(inter, half[..., perm])
    # A rotation keeps norms.
    assert torch.allclose(half.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_loss_and_balance_parts():
    cfg = small("tiny", balance_mode="seq_aux")
    m = Transformer(cfg).train()
    x = torch.randint(0, 512, (2, 16))
    out = m(x, targets=x)
    assert out.balance_loss is not None and out.balance_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.balance_loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "experts" not in n or "shared" in n)


def test_too_long_sequence_is_a_clear_error():
    m = Transformer(small("tiny", max_position_embeddings=16))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_flops_per_token_by_hand_and_the_lm_head_once():
    """6 x (active matmul parameters + the LM head) + 6 x each layer's attention mixing, by hand for a small
    dense GQA model and an MLA + MoE model; an untied head costs what a tied one does (one V x D matmul)."""
    cfg = ModelConfig.from_preset("tiny").replace(num_hidden_layers=2, attention_pattern=["gqa"], hidden_size=64,
                                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                  intermediate_size=96, n_routed_experts=0, vocab_size=100)
    V, D, L, T = 100, 64, 2, 32
    per_layer = D * 4 * 16 + 2 * D * 2 * 16 + 4 * 16 * D + 3 * D * 96  # q, k+v, o, SwiGLU
    mixing = T * 4 * 2 * 16  # scores and weighted sum over T keys, 4 heads of 16
    expected = 6 * (L * per_layer + V * D) + 6 * L * mixing
    assert Transformer(cfg).flops_per_token(T) == expected
    assert Transformer(cfg.replace(tie_word_embeddings=False)).flops_per_token(T) == expected
    moe = ModelConfig.from_preset("tiny")
    tied, untied = Transformer(moe), Transformer(moe.replace(tie_word_embeddings=False))
    assert tied.flops_per_token(128) == untied.flops_per_token(128)
