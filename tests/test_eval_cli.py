"""`smolds eval` on bad input: every mistake is one line on stderr and exit code 2, never a traceback or a
NaN report (--batches 0, --batch-size 0, --seq-len beyond the context, data of another tokenizer)."""

import json

import pytest
import torch

from smolds import ModelConfig, Transformer
from smolds.infer.evaluate import main as eval_main
from smolds.pretrained import save_pretrained


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, max_position_embeddings=64,
                      attention_pattern=["mla"], num_attention_heads=2, kv_lora_rank=8, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48, n_routed_experts=4,
                      n_shared_experts=1, moe_intermediate_size=16, num_experts_per_tok=2, first_k_dense_replace=1)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("eval") / "ck"
    save_pretrained(Transformer(cfg).eval(), out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pydoc_data.topics import topics

    from data_prep import prepare

    root = tmp_path_factory.mktemp("eval_data")
    (root / "a.jsonl").write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:6]))
    prepare([str(root / "a.jsonl")], root / "big", vocab_size=400, shard_tokens=700, val_fraction=0.3, progress=False)
    return root / "big"


@pytest.mark.parametrize("flags, message", [
    (["--batches", "0"], "--batches must be >= 1, got 0"),
    (["--batches", "-1"], "--batches must be >= 1, got -1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["--seq-len", "65"], "--seq-len 65 exceeds the model's context of 64 tokens"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
])
def test_bad_numbers_are_one_line_errors(ckpt, flags, message, capsys):
    assert eval_main([str(ckpt), "--data", "anything", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_data_of_a_larger_vocabulary_is_refused(ckpt, data, capsys):
    assert eval_main([str(ckpt), "--data", str(data), "--seq-len", "16", "--batches", "1"]) == 2
    err = capsys.readouterr().err
    assert "the data's tokenizer has 400 tokens, the model 300" in err and err.count("\n") == 1
