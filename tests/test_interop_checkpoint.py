"""The consolidated checkpoint (smolds/pretrained.py): bit-exact round trips, atomic writes, the trainer's
directory layouts, tokenizers with chat templates, and one-line errors."""

import json

import pytest
import torch
from helpers import byte_tokenizer
from safetensors import safe_open

from smolds import ModelConfig, Transformer
from smolds.pretrained import (
    CheckpointError,
    load_pretrained,
    read_extra,
    resolve_checkpoint,
    save_pretrained,
)
from smolds.tokenizer import CHATML_TEMPLATE, TextTokenizer


def tiny(**kw) -> Transformer:
    cfg = dict(vocab_size=260, hidden_size=32, num_hidden_layers=2, max_position_embeddings=64,
               attention_pattern=["mla"], num_attention_heads=2, kv_lora_rank=8, qk_nope_head_dim=8,
               qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48, n_routed_experts=4, n_shared_experts=1,
               moe_intermediate_size=16, num_experts_per_tok=2, first_k_dense_replace=1)
    cfg.update(kw)
    model = Transformer(ModelConfig(**cfg))
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 1e-3)
    return model




@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_bit_exact(tmp_path, tied):
    model = tiny(tie_word_embeddings=tied)
    save_pretrained(model, tmp_path / "ck", byte_tokenizer(), extra={"step": 7})
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not tied) and "layers.1.mlp.gate.e_score_correction_bias" in keys
    assert not any("tokens_per_expert" in k for k in keys)  # counters are not state
    back, tok = load_pretrained(tmp_path / "ck")
    assert back.config == model.config and not back.training
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_extra(tmp_path / "ck") == {"step": 7}
    assert tok.encode("hi<|im_end|>") == [3 + ord("h") - 33, 3 + ord("i") - 33, 2]
    assert tok.eos_token_ids == [0] and tok.chat_template == CHATML_TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_bf16_keeps_dtype_and_fp32_router_bias(tmp_path):
    model = tiny().to(torch.bfloat16)
    save_pretrained(model, tmp_path / "ck")
    back, tok = load_pretrained(tmp_path / "ck")
    assert tok is None and back.embed_tokens.weight.dtype == torch.bfloat16
    assert back.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(back.layers[1].mlp.gate.e_score_correction_bias, model.layers[1].mlp.gate.e_score_correction_bias)
    as32, _ = load_pretrained(tmp_path / "ck", dtype=torch.float32)
    assert as32.embed_tokens.weight.dtype == torch.float32


def test_tokenizer_config_passes_through(tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    byte_tokenizer().save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"},
                                                               "chat_template": "{{ messages[0]['content'] }}!"}))
    save_pretrained(tiny(), tmp_path / "ck", tok_dir)
    _, tok = load_pretrained(tmp_path / "ck")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_ids == [2, 0]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x!"


def test_save_is_atomic(tmp_path, monkeypatch):
    save_pretrained(tiny(), tmp_path / "ck", extra={"v": 1})
    import safetensors.torch

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tiny(), tmp_path / "ck", extra={"v": 2})
    with pytest.raises(OSError):
        save_pretrained(tiny(), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no half directory, no temp left behind
    assert read_extra(tmp_path / "ck") == {"v": 1}
    monkeypatch.undo()
    save_pretrained(tiny(), tmp_path / "ck", extra={"v": 3})  # replacing an existing checkpoint
    assert read_extra(tmp_path / "ck") == {"v": 3} and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_resolves_the_trainer_layout(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20):
        save_pretrained(tiny(), run / "checkpoints" / f"step_{step}" / "consolidated", extra={"step": step})
    (run / "checkpoints" / "latest").write_text("step_10\n")
    assert resolve_checkpoint(run) == run / "checkpoints" / "step_10" / "consolidated"
    assert read_extra(run / "checkpoints") == {"step": 10}
    assert read_extra(run / "checkpoints" / "step_20") == {"step": 20}
    assert resolve_checkpoint(run / "checkpoints" / "step_20" / "consolidated" / "model.safetensors").name == "consolidated"
    load_pretrained(run)
    (run / "checkpoints" / "latest").write_text("step_30")
    with pytest.raises(CheckpointError, match="names 'step_30', which is not a directory"):
        load_pretrained(run)


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    save_pretrained(tiny(), tmp_path / "ck")
    (tmp_path / "ck" / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="no config.yaml in"):
        load_pretrained(tmp_path / "ck")
    save_pretrained(tiny(), tmp_path / "ck2")
    (tmp_path / "ck2" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has config.yaml but no model.safetensors"):
        load_pretrained(tmp_path / "ck2")
    save_pretrained(tiny(), tmp_path / "ck3")
    (tmp_path / "ck3" / "config.yaml").write_text(tiny(num_hidden_layers=3).config.to_yaml())
    with pytest.raises(CheckpointError, match="does not match config.yaml: missing .*layers.2"):
        load_pretrained(tmp_path / "ck3")
    save_pretrained(tiny(), tmp_path / "ck4")
    (tmp_path / "ck4" / "config.yaml").write_text(tiny(hidden_size=48).config.to_yaml())
    with pytest.raises(CheckpointError, match="does not match config.yaml: size mismatch"):
        load_pretrained(tmp_path / "ck4")
    save_pretrained(tiny(), tmp_path / "ck5")
    weights = (tmp_path / "ck5" / "model.safetensors").read_bytes()
    (tmp_path / "ck5" / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # an interrupted copy
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read .*truncated"):
        load_pretrained(tmp_path / "ck5")
    with pytest.raises(TypeError, match="Transformer"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")


def test_tokenizer_coerce(tmp_path):
    raw = byte_tokenizer()
    assert TextTokenizer.coerce(None) is None
    t = TextTokenizer.coerce(raw)
    assert TextTokenizer.coerce(t) is t and t.vocab_size == 259
    raw.save(str(tmp_path / "tokenizer.json"))
    lone = TextTokenizer.coerce(tmp_path / "tokenizer.json")  # a data dir's lone tokenizer.json
    assert lone.encode("ab") == t.encode("ab")
    assert lone.config == t.config and lone.eos_token == "<|endoftext|>"  # this project's roles, as coerce(raw)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        TextTokenizer.load(tmp_path / "missing")
