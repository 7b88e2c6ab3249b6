"""The model configs the benchmarks run: smolds' presets plus `mid`, a mid-size MoE for CPU.

`mid`: 8 layers of width 384, 8 routed experts (top-2) + 1 shared, MLA without query compression; active FFN
width 2*256 + 256 = 768 = the dense layer's, as in the 135m preset.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from smolds import ModelConfig  # noqa: E402

MID = dict(vocab_size=16384, hidden_size=384, num_hidden_layers=8, max_position_embeddings=2048,
           tie_word_embeddings=True, attention_pattern=["mla"], rope_theta=10000.0, rope_interleave=True,
           num_attention_heads=6, num_key_value_heads=2, head_dim=64, q_lora_rank=None, kv_lora_rank=96,
           qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, intermediate_size=768,
           n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=256, num_experts_per_tok=2,
           n_group=1, topk_group=1, first_k_dense_replace=1)


def model_config(preset: str) -> ModelConfig:
    return ModelConfig(**MID) if preset == "mid" else ModelConfig.from_preset(preset)
