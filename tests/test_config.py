import pytest
import torch

from smolds import ConfigError, ModelConfig, Transformer
from smolds.config import presets

# Documented in each preset's header comment; the model builds on the meta device, so this is cheap.
EXPECTED = {
    "smollm2-135m": (134_515_008, 134_515_008),
    "smollm2-deepseek-135m": (294_259_776, 140_315_712),
    "tiny": (1_876_480, 1_212_928),
    "smollm2-deepseek-hybrid-135m": (307_943_695, 153_999_631),  # 23 linear + 7 MLA layers
    "smollm2-kimi-135m": (303_876_559, 149_932_495),  # 23 KDA + 7 MLA (no RoPE) layers
}


def _meta_model(cfg):
    with torch.device("meta"):
        return Transformer(cfg)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parameter_counts(name):
    m = _meta_model(ModelConfig.from_preset(name))
    assert (m.num_parameters(), m.num_parameters(active=True)) == EXPECTED[name]


def test_every_preset_loads_and_builds():
    for name in presets():
        cfg = ModelConfig.from_preset(name)
        assert len(cfg.layer_kinds()) == cfg.num_hidden_layers
        _meta_model(cfg)


def test_smollm2_shapes_exact():
    cfg = ModelConfig.from_preset("smollm2-135m")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta, cfg.tie_word_embeddings) == (1536, 49152, 1e5, True)
    assert cfg.rope_interleave is False and set(cfg.layer_kinds()) == {("gqa", "dense")}


def test_deepseek_preset_active_ffn_width_matches_smollm2():
    cfg = ModelConfig.from_preset("smollm2-deepseek-135m")
    kinds = cfg.layer_kinds()
    assert kinds[0] == ("mla", "dense") and set(kinds[1:]) == {("mla", "moe")}
    active_width = cfg.num_experts_per_tok * cfg.moe_intermediate_size + cfg.n_shared_experts * cfg.moe_intermediate_size
    assert active_width == 1536


def test_kimi_preset_is_kimi_linears_stack():
    """KDA : MLA = 3 : 1 (23 : 7 over 30 layers), MLA without RoPE, SmolLM2's width, depth, heads and vocabulary,
    the DeepSeek preset's MoE."""
    cfg, deepseek = ModelConfig.from_preset("smollm2-kimi-135m"), ModelConfig.from_preset("smollm2-deepseek-135m")
    attention = [a for a, _ in cfg.layer_kinds()]
    assert (attention.count("kda"), attention.count("mla"), cfg.mla_use_nope) == (23, 7, True)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (576, 30, 9, 49152)
    assert cfg.num_attention_heads * cfg.linear_head_dim == cfg.hidden_size
    assert [f for _, f in cfg.layer_kinds()] == [f for _, f in deepseek.layer_kinds()]
    moe = ("n_routed_experts", "n_shared_experts", "moe_intermediate_size", "num_experts_per_tok", "balance_mode")
    assert all(getattr(cfg, k) == getattr(deepseek, k) for k in moe)


def test_yaml_round_trip(tmp_path):
    cfg = ModelConfig.from_preset("tiny").replace(attention_pattern=["gqa", "mla"], balance_mode="seq_aux")
    cfg.to_yaml(tmp_path / "m.yaml")
    assert ModelConfig.from_yaml(tmp_path / "m.yaml") == cfg


def test_preset_with_overrides():
    cfg = ModelConfig.load({"preset": "tiny", "num_hidden_layers": 2})
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == ModelConfig.from_preset("tiny").hidden_size


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"attention_pattern": ["gqa"], "num_key_value_heads": 3}, "num_key_value_heads"),  # 4 heads, 3 kv heads
        ({"attention_pattern": ["gqa"], "head_dim": 16}, "num_attention_heads"),  # heads*head_dim != width
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),  # top-k > experts
        ({"n_group": 3}, "n_group"),  # 8 experts not divisible by 3 groups
        ({"kv_lora_rank": 0}, "kv_lora_rank"),
        ({"q_lora_rank": -4}, "q_lora_rank"),
        ({"attention_pattern": ["flash"]}, "attention_pattern"),
        ({"ffn_pattern": ["mlp"]}, "ffn_pattern"),
        ({"balance_mode": "aux"}, "balance_mode"),
        ({"topk_group": 5}, "topk_group"),
        ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),
    ],
)
def test_bad_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"model\.{field}"):
        ModelConfig.from_preset("tiny").replace(**changes)


def test_unknown_key_and_unknown_preset():
    with pytest.raises(ConfigError, match="unknown key.*kv_rank"):
        ModelConfig.from_dict({"preset": "tiny", "kv_rank": 3})
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        ModelConfig.from_preset("huge")
