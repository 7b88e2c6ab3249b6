"""Hugging Face interop, held to transformers itself on small random configs built here (no downloads):
Llama in (logits within 1e-4), DeepseekV3 out (loads with no missing/unexpected keys, logits within 1e-6 in
float64, back in bit-equal), Llama out, and clear errors for what cannot be expressed."""

import copy
import json

import pytest
import torch
from helpers import byte_tokenizer

from smolds import ModelConfig, Transformer
from smolds.interop.cli import main as interop_main
from smolds.interop.hf import (
    InteropError,
    export_hf,
    half_to_interleaved,
    import_hf,
    interleaved_to_half,
)
from smolds.pretrained import load_pretrained, save_pretrained
from smolds.tokenizer import TextTokenizer

transformers = pytest.importorskip("transformers")
ATOL = 1e-4
EXPORT_ATOL64 = 1e-6


def _ids(vocab, T=24, B=2):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))


def _randomize_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)




# ------------------------------------------------------------------------------------------------ Llama in
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_import_llama_matches_transformers(tmp_path, tied, kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_theta=100000.0)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).eval()
    _randomize_norms(hf)
    hf.save_pretrained(tmp_path / "hf")
    byte_tokenizer().save(str(tmp_path / "hf" / "tokenizer.json"))

    model, tok = import_hf(tmp_path / "hf")
    cfg = model.config
    assert cfg.attention_pattern == ["gqa"] and cfg.rope_interleave is False and cfg.rope_theta == 100000.0
    assert (cfg.num_key_value_heads, cfg.tie_word_embeddings, model.lm_head is None) == (kv_heads, tied, tied)
    assert tok is not None and tok.encode("hi") == [3 + ord("h") - 33, 3 + ord("i") - 33]
    ids = _ids(300)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


def test_import_hf_command_writes_a_checkpoint(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert interop_main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ck")]) == 0
    model, tok = load_pretrained(tmp_path / "ck")
    assert tok is None
    ids = _ids(128, T=8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)
    assert interop_main(["import-hf", str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_import_refuses_pickles_and_unknown_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InteropError, match="config.json: no 'num_attention_heads'"):
        import_hf(tmp_path)
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(InteropError, match="pickled weights are not loaded"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(InteropError, match="model_type 'gpt2' is not supported"):
        import_hf(tmp_path)


def _tiny_llama_dir(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    return path


def test_import_of_damaged_files_is_a_one_line_error(tmp_path, capsys):
    src = _tiny_llama_dir(tmp_path / "hf")
    capsys.readouterr()  # transformers' progress bar
    weights = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # an interrupted download
    with pytest.raises(InteropError, match="model.safetensors is not a readable safetensors file.*truncated"):
        import_hf(src)
    assert interop_main(["import-hf", str(src), str(tmp_path / "ck")]) == 1
    err = capsys.readouterr().err
    assert "not a readable safetensors file" in err and err.count("\n") == 1
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "part-1.safetensors"}}))
    with pytest.raises(InteropError, match="part-1.safetensors .listed in model.safetensors.index.json. is missing"):
        import_hf(src)
    (src / "config.json").write_text("{not json")
    with pytest.raises(InteropError, match="config.json is not valid JSON"):
        import_hf(src)


def test_outputs_that_hold_other_files_are_refused_not_deleted(tmp_path, capsys):
    """export-hf / import-hf replace OUT as a whole: an OUT holding anything they did not write (a run
    directory, notes, the source itself) is refused and left as it was; a previous output is replaced."""
    model = Transformer(mla_moe_config()).eval()
    run = tmp_path / "run"
    save_pretrained(model, run / "checkpoints" / "step_1" / "consolidated", byte_tokenizer())
    (run / "checkpoints" / "latest").write_text("step_1")
    (run / "metrics.jsonl").write_text("{}\n")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    _tiny_llama_dir(tmp_path / "hf")
    capsys.readouterr()  # transformers' progress bar

    def refused(args, message):
        assert interop_main(args) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    refused(["export-hf", str(run), str(run)], "would replace the source")
    refused(["export-hf", str(run / "checkpoints" / "step_1"), str(run)], "would replace the source")
    refused(["import-hf", str(tmp_path / "hf"), str(run)], "holds other files (checkpoints/")
    refused(["import-hf", str(tmp_path / "hf"), str(tmp_path / "hf")], "would replace the source")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    refused(["export-hf", str(run), str(tmp_path / "notes")], "holds other files (todo.txt)")
    (tmp_path / "file").write_text("x")
    refused(["export-hf", str(run), str(tmp_path / "file")], "is a file")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert (tmp_path / "hf" / "config.json").is_file()
    # A previous export (or an empty directory) is replaced.
    assert interop_main(["export-hf", str(run), str(tmp_path / "out")]) == 0
    assert interop_main(["export-hf", str(run), str(tmp_path / "out")]) == 0
    (tmp_path / "empty").mkdir()
    assert interop_main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "empty")]) == 0
    assert interop_main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "empty")]) == 0


def test_export_names_the_eos_that_ends_our_generation(tmp_path):
    """A trained run's checkpoint has no eos_token in tokenizer_config.json (the data dir has only
    tokenizer.json); smolds generation stops at <|endoftext|> (id 0) anyway, so the export must tell
    transformers the same, or its generate never stops and AutoTokenizer has no eos_token."""
    from transformers import AutoTokenizer, GenerationConfig

    byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.load(tmp_path / "tokenizer.json")  # a data dir's lone tokenizer.json
    assert tok.eos_token_ids == [0]
    export_hf(Transformer(mla_moe_config()).eval(), tmp_path / "hf", tok)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 0
    assert GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == 0
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf_tok.eos_token, hf_tok.eos_token_id) == ("<|endoftext|>", 0)
    _, back = import_hf(tmp_path / "hf")
    assert back.eos_token_ids == [0]


# ------------------------------------------------------------------------------------------- DeepseekV3 out
def mla_moe_config(**kw) -> ModelConfig:
    base = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, max_position_embeddings=128,
                attention_pattern=["mla"], num_attention_heads=4, q_lora_rank=None, kv_lora_rank=16,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, intermediate_size=96, n_routed_experts=8,
                n_shared_experts=1, moe_intermediate_size=24, num_experts_per_tok=2, first_k_dense_replace=1,
                rope_theta=10000.0, initializer_range=0.05)
    base.update(kw)
    return ModelConfig(**base)


DSV3_CASES = {
    # the smollm2-deepseek-135m shape: no query compression, interleaved rope, one dense layer, tied
    "q-none_interleave_tied": dict(),
    # query compression, Llama-layout rope, 2 groups of 4 (top-1 group), scaled and unnormalized gates, untied,
    # no dense layer, no shared expert. The router bias is >= 0 so every kept score is > 0: transformers
    # versions that mask dropped groups with 0.0 instead of -inf pick the same experts.
    "q-lora_half_groups_untied": dict(q_lora_rank=24, rope_interleave=False, n_group=2, topk_group=1,
                                      routed_scaling_factor=2.5, norm_topk_prob=False, tie_word_embeddings=False,
                                      first_k_dense_replace=0, n_shared_experts=0),
    # all layers dense: first_k_dense_replace = depth
    "all-dense": dict(n_routed_experts=0, num_hidden_layers=2),
}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the zero-width shared expert
@pytest.mark.parametrize("case", sorted(DSV3_CASES))
def test_export_deepseek_v3_matches_transformers(tmp_path, case):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = Transformer(mla_moe_config(**DSV3_CASES[case])).eval()
    _randomize_norms(model)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(0.0, 0.1)
    cfg = model.config
    out = export_hf(model, tmp_path / "hf", TextTokenizer.coerce(byte_tokenizer()))

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["q_lora_rank"] == cfg.q_lora_rank
    assert config["rope_interleave"] == cfg.rope_interleave
    assert config["first_k_dense_replace"] == (cfg.moe_layers[0] if cfg.moe_layers else cfg.num_hidden_layers)
    for key in ("n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "tie_word_embeddings"):
        assert config[key] == getattr(cfg, key), key
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for i in cfg.moe_layers:
            assert f"model.layers.{i}.mlp.experts.{cfg.n_routed_experts - 1}.down_proj.weight" in keys
            assert torch.equal(f.get_tensor(f"model.layers.{i}.mlp.gate.e_score_correction_bias"),
                               model.layers[i].mlp.gate.e_score_correction_bias)
    assert ("lm_head.weight" in keys) == (not cfg.tie_word_embeddings)

    # float64 on both sides, so that a difference of definition is not hidden by rounding (the latent norms'
    # eps once differed: 3e-5 here). Ours rotates in fp32 and both routers score in fp32: <= 7e-7 is left.
    hf, info = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", experts_implementation="eager",
                                                    dtype=torch.float64, output_loading_info=True)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = _ids(300)
    with torch.no_grad():
        ours64 = copy.deepcopy(model).double()(ids).logits
        torch.testing.assert_close(ours64, hf.eval()(ids).logits, atol=EXPORT_ATOL64, rtol=0)
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok("hello <|im_end|>")["input_ids"] == TextTokenizer.load(out).encode("hello <|im_end|>")

    back, tok = import_hf(out)
    assert back.config.layer_kinds() == cfg.layer_kinds() and tok is not None
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_export_hf_command_from_a_checkpoint(tmp_path):
    model = Transformer(mla_moe_config()).eval()
    save_pretrained(model, tmp_path / "ck", byte_tokenizer())
    assert interop_main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "tokenizer_config.json").is_file()
    back, _ = import_hf(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


@pytest.mark.parametrize("pattern, ffn, message", [
    (["mla", "gqa"], None, "layer 1 uses 'gqa' attention"),
    (["mla", "mla", "linear"], None, "layer 2 uses 'linear' attention"),
    (["mla"], ["moe", "dense"], "layer 1 is a dense FFN after MoE layer 0"),
])
def test_export_refuses_what_deepseek_v3_cannot_express(tmp_path, pattern, ffn, message, capsys):
    cfg = mla_moe_config(attention_pattern=pattern, ffn_pattern=ffn, num_key_value_heads=2, head_dim=16,
                         linear_head_dim=16, linear_chunk_size=8)
    with pytest.raises(InteropError, match=message):
        export_hf(Transformer(cfg), tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())
    save_pretrained(Transformer(cfg), tmp_path / "ck")
    assert interop_main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 1
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ Llama out
@pytest.mark.parametrize("interleave", [False, True])
def test_export_llama_matches_transformers(tmp_path, interleave):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, max_position_embeddings=128,
                      attention_pattern=["gqa"], num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      intermediate_size=96, n_routed_experts=0, rope_interleave=interleave, initializer_range=0.05)
    model = Transformer(cfg).eval()
    _randomize_norms(model)
    out = export_hf(model, tmp_path / "hf", arch="llama")
    hf, info = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32,
                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = _ids(300)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf.eval()(ids).logits, atol=ATOL, rtol=0)
    with pytest.raises(InteropError, match="layer 0 is mla attention"):
        export_hf(Transformer(mla_moe_config()), tmp_path / "x", arch="llama")


def test_rope_row_permutations_invert_and_match_llama_cpp():
    import numpy as np

    w = torch.randn(3 * 8, 5)  # 3 heads of dim 8
    # llama.cpp convert_hf_to_gguf.py: permute(weights, n_head) for the half-split -> interleaved layout
    ref = w.numpy().reshape(3, 2, 4, 5).swapaxes(1, 2).reshape(24, 5)
    assert np.array_equal(half_to_interleaved(w, 3).numpy(), ref)
    assert torch.equal(interleaved_to_half(half_to_interleaved(w, 3), 3), w)
