"""smolds convert (smolds/interop/convert.py) on tiny random Llama-shaped models: MLA equals GQA where the
mapping is exact and its error falls with the latent rank; the MoE layer equals the dense FFN (partition with
every expert at weight 1, virtual groups on every token); linear layers take the GQA projections; every bad
input is a one-line error; the presets the conversion targets fit SmolLM2-135M."""

import pytest
import torch
from helpers import byte_tokenizer

from smolds import ModelConfig, Transformer
from smolds.interop.convert import (
    ConvertError,
    check_target,
    convert,
    main,
    moe_shape,
    rope_slots,
)
from smolds.pretrained import load_pretrained, read_extra, save_pretrained


def llama_config(**kw) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, max_position_embeddings=256,
                attention_pattern=["gqa"], rope_interleave=False, rope_theta=10000.0, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=96, n_routed_experts=0,
                initializer_range=0.05)
    base.update(kw)
    return ModelConfig(**base)


def llama(**kw) -> Transformer:
    """A random Llama-shaped source: unit-scale embeddings (so the norms' eps is negligible), norms not 1."""
    model = Transformer(llama_config(**kw)).eval()
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0.0, 1.0)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def target(src: Transformer, **kw) -> ModelConfig:
    base = dict(attention_pattern=["mla"], q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, kv_lora_rank=32, rope_interleave=True)
    base.update(kw)
    return src.config.replace(**base)


def calib(vocab=256, rows=8, T=64):
    return torch.randint(0, vocab, (rows, T), generator=torch.Generator().manual_seed(1))


TEST_IDS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))


def logits(model):
    with torch.no_grad():
        return model(TEST_IDS).logits


# --------------------------------------------------------------------------------------------------- MLA
@pytest.mark.parametrize("interleave", [True, False], ids=["to-interleaved", "to-half-split"])
def test_mla_equals_gqa_at_full_rank_with_every_rotary_dim(interleave):
    """One KV head (so one shared rotary key can carry all of it), every frequency rotary (R = d), the
    latent at full rank (C = D, an orthogonal transform of the normalized input): logits equal."""
    src = llama(num_key_value_heads=1)
    out = convert(src, target(src, qk_rope_head_dim=16, kv_lora_rank=64, rope_interleave=interleave), calib())
    ref = logits(src)
    assert (logits(out) - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()) / 10)
    # the absorbed decode path (cached latent) gives the same next-token logits
    cache = out.new_cache(2, 48)
    with torch.no_grad():
        out(TEST_IDS[:, :47], cache=cache)
        step = out(TEST_IDS[:, 47:], cache=cache).logits[:, -1]
    torch.testing.assert_close(step, ref[:, -1], atol=1e-3, rtol=0)


def test_mla_error_falls_as_the_latent_rank_grows():
    """Two KV groups, half the frequencies rotary: the error of the logits falls with each rank step up to
    the key/value width (2 groups x (16 key + 16 value) = 64)."""
    src = llama(num_key_value_heads=2)
    ref = logits(src)
    errors = []
    for rank in (4, 8, 16, 32, 48, 64):
        out = convert(src, target(src, kv_lora_rank=rank), calib())
        errors.append(float((logits(out) - ref).pow(2).mean().sqrt()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_rotary_slots_take_the_matching_source_frequencies():
    src = llama_config(head_dim=64, hidden_size=256, rope_theta=100000.0)
    assert rope_slots(src, src.replace(qk_rope_head_dim=32)) == list(range(0, 32, 2))  # every second one
    assert rope_slots(src, src.replace(qk_rope_head_dim=32, rope_theta=100000.0 ** 0.5)) == list(range(16))
    with pytest.raises(ConvertError, match="set rope_theta to 100000 .one source frequency in 2. or 316.228"):
        rope_slots(src, src.replace(qk_rope_head_dim=32, rope_theta=10000.0))


def test_every_source_frequency_turns_at_the_kept_one_at_or_above_it():
    """TransMLA's FreqFold: with every second frequency kept, a single KV head and the latent at full rank,
    the only error left is the folded planes turning at their neighbour's frequency; folding them beats
    leaving them position-free (MHA2MLA's partial RoPE), which beats dropping them."""
    src = llama(num_key_value_heads=1)
    ref = logits(src)
    folded = convert(src, target(src, kv_lora_rank=64), calib())
    full = convert(src, target(src, kv_lora_rank=64, qk_rope_head_dim=16), calib())
    assert float((logits(full) - ref).abs().max()) < 1e-3 < float((logits(folded) - ref).abs().max())


# ---------------------------------------------------------------------------------------------------- MoE
def test_partition_with_every_routed_expert_at_weight_one_equals_the_dense_ffn():
    src = llama()
    # 96 neurons = shared 32 (2 x 16) + 4 routed experts of 16; top-4 of 4 with routed_scaling_factor 4 and
    # the router at zero: every expert chosen at gate weight exactly 1
    tgt = src.config.replace(n_routed_experts=4, n_shared_experts=2, moe_intermediate_size=16, num_experts_per_tok=4,
                             routed_scaling_factor=4.0, first_k_dense_replace=1)
    out = convert(src, tgt, calib())
    moe, dense = out.layers[1].mlp, src.layers[1].mlp
    assert moe_shape(src.config, tgt) == ("partition", 4)
    with torch.no_grad():
        moe.gate.weight.zero_()
        x = torch.randn(3, 10, 64)
        torch.testing.assert_close(moe(x)[0], dense(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.layers[0].mlp(x), src.layers[0].mlp(x), atol=0, rtol=0)  # dense: copied


def test_partition_experts_split_the_neurons_and_the_router_prefers_the_loudest():
    src = llama(intermediate_size=128)
    tgt = src.config.replace(n_routed_experts=6, n_shared_experts=2, moe_intermediate_size=16, num_experts_per_tok=2,
                             routed_scaling_factor=2.0, first_k_dense_replace=0)
    out = convert(src, tgt, calib())
    moe, dense = out.layers[0].mlp, src.layers[0].mlp
    rows = torch.cat([moe.shared_experts.gate_proj.weight, moe.experts.gate_proj.data.flatten(0, 1)])
    assert torch.equal(rows[rows[:, 0].argsort()], dense.gate_proj.weight[dense.gate_proj.weight[:, 0].argsort()])
    assert not moe.gate.e_score_correction_bias.any()


def test_virtual_groups_equal_the_dense_ffn_on_every_token():
    """smollm2-deepseek-135m's shape in small: shared 32 + 4 shards of 16, copied twice (8 experts), top-4:
    each token takes one whole copy, so the model is the source exactly."""
    src = llama()
    tgt = src.config.replace(n_routed_experts=8, n_shared_experts=2, moe_intermediate_size=16, num_experts_per_tok=4,
                             routed_scaling_factor=1.0, first_k_dense_replace=1)
    assert moe_shape(src.config, tgt) == ("virtual", 4)
    out = convert(src, tgt, calib())
    torch.testing.assert_close(logits(out), logits(src), atol=1e-4, rtol=0)
    chosen = out.layers[1].mlp.gate(out.layers[1].post_attention_layernorm(torch.randn(50, 64)))[0]
    copy = chosen // 4
    assert (copy == copy[:, :1]).all() and (chosen % 4).sort(1).values.eq(torch.arange(4)).all()
    assert len(copy[:, 0].unique()) == 2  # both copies get tokens


# ----------------------------------------------------------------------------------------- linear attention
def test_linear_layers_take_the_gqa_projections():
    src = llama()
    tgt = target(src, attention_pattern=["linear", "mla"], linear_head_dim=16, linear_chunk_size=8)
    out = convert(src, tgt, calib())
    a, b = out.layers[0].self_attn, src.layers[0].self_attn
    assert torch.equal(a.q_proj.weight, b.q_proj.weight) and torch.equal(a.o_proj.weight, b.o_proj.weight)
    assert torch.equal(a.k_proj.weight.view(4, 16, 64)[1], b.k_proj.weight.view(2, 16, 64)[0])  # head 1, group 0
    assert torch.equal(a.v_proj.weight.view(4, 16, 64)[3], b.v_proj.weight.view(2, 16, 64)[1])
    assert (a.g_proj.weight == a.g_proj.weight[:1]).all()  # one gate direction (x.u ~ 1 on real text)
    assert torch.isfinite(logits(out)).all()


# ------------------------------------------------------------------------------------------------- export
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_converted_model_exports_to_deepseek_v3_and_decodes_the_same_tokens(tmp_path):
    """smollm2-deepseek-135m's shape in small (MLA, interleaved rope, layer 0 dense, virtual-group MoE), with
    its routers a little trained (so the copies' ties are broken): transformers' DeepseekV3ForCausalLM gives
    the same logits and greedy-decodes the same 12 tokens."""
    from transformers import AutoModelForCausalLM

    from smolds.infer.generate import generate_ids
    from smolds.interop.hf import export_hf

    src = llama()
    tgt = target(src, n_routed_experts=8, n_shared_experts=2, moe_intermediate_size=16, num_experts_per_tok=4,
                 routed_scaling_factor=1.0, first_k_dense_replace=1)
    out = convert(src, tgt, calib())
    with torch.no_grad():
        out.layers[1].mlp.gate.weight.add_(0.05 * torch.randn_like(out.layers[1].mlp.gate.weight))
        out.layers[1].mlp.gate.e_score_correction_bias.uniform_(0.0, 0.01)
    hf = AutoModelForCausalLM.from_pretrained(export_hf(out, tmp_path / "hf"), attn_implementation="eager",
                                              experts_implementation="eager", dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(hf(TEST_IDS).logits, logits(out), atol=1e-4, rtol=0)
        theirs = hf.generate(TEST_IDS[:, :16], max_new_tokens=12, do_sample=False, min_new_tokens=12)[:, 16:]
    assert generate_ids(out, TEST_IDS[:, :16].tolist(), 12, temperature=0) == theirs.tolist()


# -------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("change, message", [
    (dict(hidden_size=128, num_attention_heads=8), "target hidden_size 128 cannot take the source's weights"),
    (dict(vocab_size=300), "target vocab_size 300 cannot take"),
    (dict(num_hidden_layers=3), "target num_hidden_layers 3 cannot take"),
    (dict(kv_lora_rank=65), "kv_lora_rank 65 > hidden_size 64"),
    (dict(qk_nope_head_dim=8), "qk_nope_head_dim .8. and v_head_dim .16. must be >= the source head_dim 16"),
    (dict(qk_rope_head_dim=32), "qk_rope_head_dim 32 > the source head_dim 16"),
    (dict(q_lora_rank=32), "q_lora_rank must be null"),
    (dict(rope_theta=500.0), "the target's rotary frequencies .qk_rope_head_dim 8, rope_theta 500. are not among"),
    (dict(intermediate_size=64), "target intermediate_size 64 != the source's 96"),
    (dict(n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=16, num_experts_per_tok=2),
     "the routed experts cannot take the 80 routed neurons"),
])
def test_targets_that_cannot_take_the_weights_are_refused(change, message):
    src = llama_config()
    with pytest.raises(ConvertError, match=message):
        check_target(src, target(Transformer(src), **change))


def test_a_source_that_is_not_llama_is_refused():
    src = Transformer(target(llama()))
    with pytest.raises(ConvertError, match="the source is not a Llama/SmolLM2 checkpoint"):
        convert(src, src.config, calib())


def test_cli_converts_a_checkpoint_and_refuses_in_one_line(tmp_path, capsys):
    src = llama()
    save_pretrained(src, tmp_path / "src", byte_tokenizer())
    (tmp_path / "calib.txt").write_text("Once upon a time there was a little model. " * 200)
    target(src).to_yaml(tmp_path / "mla.yaml")
    from smolds.cli import main as smolds

    assert smolds(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", str(tmp_path / "mla.yaml"),
                   "--calib", str(tmp_path / "calib.txt"), "--calib-tokens", "2048"]) == 0
    model, tok = load_pretrained(tmp_path / "out")
    assert model.config.attention_pattern == ["mla"] and tok is not None
    extra = read_extra(tmp_path / "out")
    assert extra["calibration_tokens"] == 2048 and len(extra["layers"]) == 2
    capsys.readouterr()
    target(src, kv_lora_rank=100).to_yaml(tmp_path / "bad.yaml")
    for args, message in [([str(tmp_path / "out"), str(tmp_path / "x"), "--to", str(tmp_path / "mla.yaml")],
                           "the source is not a Llama/SmolLM2 checkpoint"),
                          ([str(tmp_path / "src"), str(tmp_path / "x"), "--to", str(tmp_path / "bad.yaml")],
                           "kv_lora_rank 100 > hidden_size 64"),
                          ([str(tmp_path / "src"), str(tmp_path / "x"), "--to", "no-such-preset"], "unknown preset"),
                          ([str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "tiny"], "does not exist")]:
        assert main(args) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name, mode", [("smollm2-mla-135m", None), ("smollm2-deepseek-135m", "virtual"),
                                        ("smollm2-deepseek-moefied-135m", "partition"),
                                        ("smollm2-deepseek-hybrid-135m", "virtual")])
def test_the_135m_targets_take_smollm2(name, mode):
    src, tgt = ModelConfig.from_preset("smollm2-135m"), ModelConfig.from_preset(name)
    check_target(src, tgt)
    assert rope_slots(src, tgt) == list(range(0, 32, 2))
    assert (moe_shape(src, tgt)[0] if tgt.moe_layers else None) == mode


@pytest.mark.parametrize("name, total, active", [("smollm2-mla-135m", 140_048_448, 140_048_448),
                                                 ("smollm2-deepseek-moefied-135m", 140_315_712, 101_829_696)])
def test_conversion_preset_parameter_counts(name, total, active):
    with torch.device("meta"):
        m = Transformer(ModelConfig.from_preset(name))
    assert (m.num_parameters(), m.num_parameters(active=True)) == (total, active)
