"""KimiLinear interop, held to transformers' KimiLinearForCausalLM on small random configs built here (no
downloads): our KDA + MLA (no RoPE) + MoE models export to a directory transformers loads with no missing or
unexpected keys and equal logits (fp32, <= 1e-4) and equal greedy generations (its cached decode against our
full forward); its save_pretrained directories import with equal logits and round-trip bit-equal; what
KimiLinear cannot express is refused in one line."""

import json

import pytest
import torch
from helpers import byte_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file

from smolds import ModelConfig, Transformer
from smolds.infer.generate import generate_ids, generate_ids_uncached
from smolds.interop.cli import main as interop_main
from smolds.interop.hf import InteropError, export_hf, import_hf
from smolds.pretrained import save_pretrained
from smolds.tokenizer import TextTokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.kimi_linear")
ATOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # zero-width shared experts


def _ids(vocab, T=24, B=2):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))


def kimi_config(**kw) -> ModelConfig:
    """Kimi Linear's shape in miniature: KDA 3 : MLA 1 (no RoPE), a dense first layer, then DeepSeekMoE.
    K = V = 16 and 4 heads; chunks of 8, so 24 tokens cross chunk boundaries."""
    base = dict(vocab_size=300, hidden_size=64, num_hidden_layers=4, max_position_embeddings=128,
                attention_pattern=["kda", "kda", "kda", "mla"], mla_use_nope=True, num_attention_heads=4,
                q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                linear_head_dim=16, linear_chunk_size=8, linear_conv_kernel_dim=4, intermediate_size=96,
                n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=24, num_experts_per_tok=2,
                first_k_dense_replace=1, initializer_range=0.05)
    base.update(kw)
    return ModelConfig(**base)


def _randomized(model):
    """Norm weights and router biases off their init (biases >= 0, see test_interop_hf's DSV3 cases)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(0.0, 0.1)
    return model


def _load_transformers(path):
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32,
                                                    output_loading_info=True)
    assert type(hf).__name__ == "KimiLinearForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# ------------------------------------------------------------------------------------------------- out
KIMI_CASES = {
    # the smollm2-kimi-135m shape: KDA 3 : MLA 1, no query compression, one dense layer, tied embeddings
    "hybrid_tied": dict(),
    # query compression, 2 groups of 4 (top-1 group), scaled unnormalized gates, no shared expert, untied,
    # a dense layer after an MoE layer (KimiLinear's mlp_layer_types take any order; DeepseekV3 cannot)
    "q-lora_groups_dense-after-moe": dict(q_lora_rank=24, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                          norm_topk_prob=False, n_shared_experts=0, tie_word_embeddings=False,
                                          ffn_pattern=["moe", "dense"], attention_pattern=["mla", "kda"]),
    # KDA everywhere, dense FFNs: no MLA, no MoE
    "kda-only_dense": dict(attention_pattern=["kda"], n_routed_experts=0, num_hidden_layers=2,
                           tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", sorted(KIMI_CASES))
def test_export_kimi_linear_matches_transformers(tmp_path, case):
    torch.manual_seed(0)
    model = _randomized(Transformer(kimi_config(**KIMI_CASES[case])).eval())
    cfg = model.config
    out = export_hf(model, tmp_path / "hf", TextTokenizer.coerce(byte_tokenizer()))  # arch auto: kimi_linear

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "kimi_linear" and config["tie_word_embeddings"] is False
    kinds = {"kda": "linear_attention", "mla": "full_attention", "dense": "dense", "moe": "sparse"}
    assert config["layer_types"] == [kinds[a] for a, _ in cfg.layer_kinds()]
    assert config["mlp_layer_types"] == [kinds[f] for _, f in cfg.layer_kinds()]
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # Moonshot's layout, a head even when tied
        keys = set(f.keys())
        torch.testing.assert_close(f.get_tensor("lm_head.weight"), model.state_dict()[
            "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"], atol=0, rtol=0)
    for i, (attn, _) in enumerate(cfg.layer_kinds()):
        assert (f"model.layers.{i}.self_attn.q_conv1d.weight" in keys) == (attn == "kda")
    for i in cfg.moe_layers:
        assert f"model.layers.{i}.block_sparse_moe.experts.{cfg.n_routed_experts - 1}.w2.weight" in keys

    hf = _load_transformers(out)
    ids = _ids(300)
    with torch.no_grad():  # no cache: transformers 5.25 cannot build one for a model without attention layers
        torch.testing.assert_close(model(ids).logits, hf(ids, use_cache=False).logits, atol=ATOL, rtol=0)

    back, tok = import_hf(out)
    assert back.config.layer_kinds() == cfg.layer_kinds() and tok is not None
    ours = model.state_dict()
    if cfg.tie_word_embeddings:  # KimiLinear never ties: the head comes back as its own (equal) weight
        assert back.lm_head is not None
        ours["lm_head.weight"] = ours["embed_tokens.weight"]
    _assert_same_state(ours, back.state_dict())


@torch.no_grad()
def test_transformers_greedy_generation_equals_ours(tmp_path):
    """transformers' cached generate (its KDA recurrent step, conv state and MLA cache) gives the tokens of our
    uncached greedy loop (the full forward at every step) and of our cached generate."""
    torch.manual_seed(0)
    model = _randomized(Transformer(kimi_config()).eval())
    hf = _load_transformers(export_hf(model, tmp_path / "hf"))
    prompts = _ids(300, T=11).tolist()
    theirs = hf.generate(torch.tensor(prompts), max_new_tokens=6, do_sample=False, min_new_tokens=6)[:, 11:]
    assert generate_ids_uncached(model, prompts, 6, temperature=0) == theirs.tolist()
    assert generate_ids(model, prompts, 6, temperature=0) == theirs.tolist()


# -------------------------------------------------------------------------------------------------- in
def _transformers_kimi(tmp_path, layout: str):
    """A tiny random transformers KimiLinear (KDA, MLA, KDA; dense, MoE, MoE), its norms, gate parameters and
    router bias moved off their init, saved by its save_pretrained (Moonshot's layout) or, for layout
    "in_memory", as its in-memory state_dict under a remote-code config.json (Moonshot's
    linear_attn_config and first_k_dense_replace in place of layer_types and mlp_layer_types)."""
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    hf_cfg = KimiLinearConfig(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=4, linear_num_heads=4, linear_head_dim=16, linear_conv_kernel_dim=3,
                              layer_types=["linear_attention", "full_attention", "linear_attention"],
                              mlp_layer_types=["dense", "sparse", "sparse"], intermediate_size=96, q_lora_rank=24,
                              kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                              num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                              n_shared_experts=2, routed_scaling_factor=2.446, pad_token_id=None,
                              bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = KimiLinearForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "dt_bias" in name or "A_log" in name:
                p.add_(torch.rand_like(p) * 0.5)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(0.0, 0.1)
    path = tmp_path / "kimi"
    hf.save_pretrained(path)
    if layout == "in_memory":
        config = json.loads((path / "config.json").read_text())
        for key in ("layer_types", "mlp_layer_types", "linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim"):
            config.pop(key)
        config |= {"linear_attn_config": {"kda_layers": [1, 3], "full_attn_layers": [2], "num_heads": 4,
                                          "head_dim": 16, "short_conv_kernel_size": 3},
                   "first_k_dense_replace": 1, "mla_use_nope": True}
        (path / "config.json").write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path / "model.safetensors"))
    return hf, path


@pytest.mark.parametrize("layout", ["save_pretrained", "in_memory"])
def test_import_kimi_linear_matches_transformers_and_round_trips(tmp_path, layout):
    hf, path = _transformers_kimi(tmp_path, layout)
    model, _ = import_hf(path)
    cfg = model.config
    assert cfg.layer_kinds() == [("kda", "dense"), ("mla", "moe"), ("kda", "moe")] and cfg.mla_use_nope
    assert (cfg.linear_conv_kernel_dim, cfg.n_shared_experts, cfg.routed_scaling_factor) == (3, 2, 2.446)
    ids = _ids(300)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)

    out = export_hf(model, tmp_path / "again")
    _assert_same_state(model.state_dict(), import_hf(out)[0].state_dict())
    if layout == "save_pretrained":  # our export writes the tensors transformers wrote, by the same names
        with safe_open(str(path / "model.safetensors"), "pt") as theirs, \
                safe_open(str(out / "model.safetensors"), "pt") as ours:
            # but a dense layer's FFN under mlp (Moonshot's name), not transformers' block_sparse_moe
            rename = lambda k: k.replace("layers.0.block_sparse_moe.", "layers.0.mlp.")  # noqa: E731
            assert {rename(k) for k in theirs.keys()} == set(ours.keys())
            assert all(torch.equal(theirs.get_tensor(k), ours.get_tensor(rename(k))) for k in theirs.keys())


# ----------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("change, arch, message", [
    (dict(attention_pattern=["kda", "gqa"]), "kimi_linear", "layer 1 uses 'gqa' attention: a KimiLinear export"),
    (dict(attention_pattern=["kda", "linear"]), "auto", "layer 1 uses 'linear' attention: a KimiLinear export"),
    (dict(mla_use_nope=False), "auto", "KimiLinear's MLA applies no RoPE and this model's does (mla_use_nope: false)"),
    (dict(attention_pattern=["mla"]), "deepseek_v3", "MLA applies no RoPE (mla_use_nope: true), which DeepseekV3"),
])
def test_export_refuses_what_kimi_linear_cannot_express(tmp_path, capsys, change, arch, message):
    cfg = kimi_config(num_key_value_heads=2, head_dim=16, **change)
    with pytest.raises(InteropError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_hf(Transformer(cfg), tmp_path / "hf", arch=arch)
    assert not (tmp_path / "hf").exists()
    save_pretrained(Transformer(cfg), tmp_path / "ck")
    assert interop_main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "hf"), "--arch", arch]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_export_hf_command_picks_kimi_linear(tmp_path):
    """Without --arch, a model with KDA layers (or MLA without RoPE) exports as KimiLinear, an MLA model with
    RoPE as DeepseekV3."""
    for name, cfg, arch in (("kda", kimi_config(), "kimi_linear"),
                            ("nope", kimi_config(attention_pattern=["mla"]), "kimi_linear"),
                            ("rope", kimi_config(attention_pattern=["mla"], mla_use_nope=False), "deepseek_v3")):
        model = Transformer(cfg).eval()
        save_pretrained(model, tmp_path / name / "ck", byte_tokenizer())
        assert interop_main(["export-hf", str(tmp_path / name / "ck"), str(tmp_path / name / "hf")]) == 0
        assert json.loads((tmp_path / name / "hf" / "config.json").read_text())["model_type"] == arch


@pytest.mark.parametrize("change, message", [
    (dict(linear_num_heads=2), "linear_num_heads must equal num_attention_heads"),
    (dict(mla_use_nope=False), "mla_use_nope=false"),
    (dict(layer_types=["linear_attention", "mamba", "linear_attention"]), "layer_types must list one of"),
    (dict(num_key_value_heads=2), "num_key_value_heads must equal num_attention_heads"),
])
def test_import_refuses_what_we_cannot_express(tmp_path, change, message):
    _, path = _transformers_kimi(tmp_path, "save_pretrained")
    config = json.loads((path / "config.json").read_text()) | change
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InteropError, match=message) as err:
        import_hf(path)
    assert "\n" not in str(err.value)
