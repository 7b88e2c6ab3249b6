"""Generation: cached decode equals uncached recomputation per layer kind, batches equal single rows, seeded
sampling repeats, top-k/top-p masks, stop strings and streaming, bad input, and the generate/chat commands."""

import importlib.util
import io

import pytest
import torch
from helpers import byte_tokenizer

from smolds import ModelConfig, Transformer
from smolds.infer.generate import (
    _Detokenizer,
    fit_prompts,
    generate,
    generate_ids,
    generate_ids_uncached,
    generate_tokens,
    sample_next,
    stream,
    top_k_mask,
    top_p_mask,
)
from smolds.pretrained import CheckpointError, save_pretrained
from smolds.tokenizer import TextTokenizer

HAS_LINEAR = importlib.util.find_spec("smolds.model.linear_attention") is not None
KINDS = {
    "mla": ["mla"],
    "gqa": ["gqa"],
    "linear": ["linear"],
    "linear+mla": ["linear", "mla"],
    "gqa+mla": ["gqa", "mla"],
}


def tiny_config(pattern, **kw) -> ModelConfig:
    base = dict(vocab_size=260, hidden_size=64, num_hidden_layers=2, max_position_embeddings=64,
                attention_pattern=pattern, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96,
                n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32, num_experts_per_tok=2,
                first_k_dense_replace=1, linear_head_dim=16, linear_chunk_size=8, initializer_range=0.2)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(pattern=("mla",), **kw) -> Transformer:
    if "linear" in pattern and not HAS_LINEAR:
        pytest.skip("smolds.model.linear_attention does not exist yet")
    torch.manual_seed(0)
    model = Transformer(tiny_config(list(pattern), **kw)).eval()
    with torch.no_grad():  # a nonzero router bias, so that selection differs from plain top-k of the scores
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(0, 0.05)
    return model




PROMPTS = [[5, 17, 33, 9, 81], [44, 2 + 3, 7, 120, 19, 3, 3, 60, 200, 11, 14], [99]]


# ------------------------------------------------------------------------------------ cached == uncached
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_greedy_cached_equals_uncached(kind):
    model = tiny_model(KINDS[kind])
    cached = generate_ids(model, PROMPTS, 12, temperature=0)
    assert cached == generate_ids_uncached(model, PROMPTS, 12, temperature=0)
    assert all(len(c) == 12 for c in cached)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_batched_equals_one_by_one(kind):
    model = tiny_model(KINDS[kind])
    batched = generate_ids(model, PROMPTS, 10, temperature=0)
    assert batched == [generate_ids(model, [p], 10, temperature=0)[0] for p in PROMPTS]


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_batched_decode_logits_match_single(kind):
    """Stronger than token equality: the logits of every decode step of a left-padded row equal its own."""
    model = tiny_model(KINDS[kind])
    short, long = PROMPTS[0], PROMPTS[1]

    def step_logits(prompts, row, steps=4):
        T = max(map(len, prompts))
        ids = torch.zeros(len(prompts), T, dtype=torch.long)
        pad = torch.zeros(len(prompts), T, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, T - len(p):], pad[i, T - len(p):] = torch.tensor(p), True
        cache = model.new_cache(len(prompts), T + steps)
        out = [model(ids, cache=cache, pad_mask=pad, last_only=True).logits[row, -1]]
        for t in range(steps):
            out.append(model(torch.full((len(prompts), 1), 7 + t), cache=cache).logits[row, -1])
        return torch.stack(out)

    with torch.no_grad():
        torch.testing.assert_close(step_logits([short, long], 0), step_logits([short], 0), atol=1e-5, rtol=1e-5)


def test_eos_stops_a_row_and_is_not_returned():
    model = tiny_model(["mla"])
    free = generate_ids(model, PROMPTS[:2], 8, temperature=0)
    eos = free[0][3]
    stopped = generate_ids(model, PROMPTS[:2], 8, temperature=0, eos_token_ids=[eos])
    assert stopped[0] == free[0][: free[0].index(eos)]
    assert eos not in stopped[1] and stopped[1] == free[1][: len(stopped[1])]


# ------------------------------------------------------------------------ static-shape and compiled decode
def _prefilled(model, prompts, steps):
    """A left-padded batch prefilled into a fresh cache with room for `steps` more tokens."""
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    pad = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], pad[i, T - len(p):] = torch.tensor(p), True
    cache = model.new_cache(len(prompts), T + steps + 5)  # unwritten slots at the end: masked
    return model(ids, cache=cache, pad_mask=pad, last_only=True).logits[:, -1], cache


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_static_decode_equals_cached_and_uncached(kind):
    """Padded prompts (PROMPTS differ in length); the second call reuses and resets the kept cache."""
    model = tiny_model(KINDS[kind])
    cached = generate_ids(model, PROMPTS, 12, temperature=0)
    assert generate_ids(model, PROMPTS, 12, temperature=0, static=True) == cached
    assert generate_ids(model, PROMPTS, 12, temperature=0, static=True) == cached
    assert generate_ids(model, PROMPTS[1:2], 12, temperature=0, static=True) == cached[1:2]
    assert cached == generate_ids_uncached(model, PROMPTS, 12, temperature=0)


@pytest.mark.parametrize("kind", ["mla", "gqa", "linear+mla"])
def test_decode_step_logits_equal_the_cached_forward(kind):
    """Every step's logits, not only the argmax: decode_step over the whole preallocated cache (validity
    mask, write slot in a tensor) against the eager cached forward over the filled slots."""
    model = tiny_model(KINDS[kind])
    with torch.no_grad():
        first_a, eager = _prefilled(model, PROMPTS, 6)
        first_b, static = _prefilled(model, PROMPTS, 6)
        torch.testing.assert_close(first_a, first_b, atol=0, rtol=0)
        for t in range(6):
            tokens = torch.tensor([[7 + t], [100 + t], [3 * t]])
            a = model(tokens, cache=eager, last_only=True).logits[:, -1]
            b = model.decode_step(tokens, static)
            static.length += 1
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        assert static.length == eager.length and int(static.slot) == eager.length
        assert torch.equal(static.valid, eager.valid) and torch.equal(static.next_pos, eager.next_pos)


def test_decode_step_traces_as_one_graph_with_the_compiled_moe_forms(monkeypatch):
    """torch.compile's tracer (backend "eager": no code generation, fast) takes the whole step without a
    graph break, for every attention kind, and the MoE forms it selects when compiling (gathered experts at
    N*K <= E, the sorted grouped dispatch above) give the eager path's tokens."""
    import smolds.infer.generate as gen

    model = tiny_model(["mla", "linear", "gqa"], num_hidden_layers=3)
    expected = generate_ids(model, PROMPTS, 8, temperature=0)
    step = torch.compile(type(model).decode_step, backend="eager", fullgraph=True, dynamic=False)
    monkeypatch.setattr(gen, "_compiled_decode_step", lambda cls, mode: step)
    assert generate_ids(model, PROMPTS, 8, temperature=0, compile=True) == expected  # N*K = 6 > E = 4
    assert generate_ids(model, PROMPTS[:1], 8, temperature=0, compile=True) == expected[:1]  # N*K = 2


@pytest.mark.slow
def test_compiled_decode_equals_eager():
    """The real thing, once (inductor, ~15 s cold): one MoE layer, a padded batch of three."""
    model = tiny_model(["mla"], num_hidden_layers=1, first_k_dense_replace=0)
    expected = generate_ids(model, PROMPTS, 6, temperature=0)
    assert generate_ids(model, PROMPTS, 6, temperature=0, compile=True) == expected


def test_static_cache_lengths_and_reuse():
    from smolds.infer.generate import static_cache, static_cache_length

    assert [static_cache_length(n, 8192) for n in (1, 64, 65, 639, 5000)] == [64, 64, 128, 1024, 8192]
    assert static_cache_length(100, 96) == 96
    model = tiny_model(["mla"])
    a = static_cache(model, 2, 20, None)
    a.length, a.padded = 5, True
    a.valid.fill_(True)
    b = static_cache(model, 2, 30, None)
    assert b is a and b.length == 0 and not b.padded and not b.valid.any()  # same shape: reused, emptied
    assert static_cache(model, 3, 30, None) is not a
    steps = generate_tokens(model, PROMPTS[:2], 6, temperature=0, static=True)  # holds the (2, 64) cache
    first = next(steps)
    inner = generate_ids(model, PROMPTS[:2], 6, temperature=0, static=True)  # must not reset it mid-generation
    assert [first] + list(steps) == [list(t) for t in zip(*inner)]


# ----------------------------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible():
    model = tiny_model(["mla"], initializer_range=0.02)  # flat logits: samples vary
    kw = dict(temperature=1.0, top_k=50, top_p=0.95)
    a = generate_ids(model, PROMPTS, 16, seed=123, **kw)
    assert a == generate_ids(model, PROMPTS, 16, seed=123, **kw)
    assert a != generate_ids(model, PROMPTS, 16, seed=124, **kw)


def test_top_k_mask_on_hand_built_logits():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 2.0, 2.0, 1.0]])
    inf = float("-inf")
    assert top_k_mask(logits, 2).tolist() == [[inf, 5.0, inf, 4.0, inf], [inf, inf, 2.0, 2.0, inf]]
    assert top_k_mask(logits, 3).tolist()[1] == [inf, inf, 2.0, 2.0, 1.0]
    assert torch.equal(top_k_mask(logits, 0), logits) and torch.equal(top_k_mask(logits, 5), logits)


def test_top_p_mask_on_hand_built_logits():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.05, 0.9, 0.03, 0.02]])
    logits = probs.log()
    inf = float("-inf")
    kept = lambda p: (top_p_mask(logits, p) != inf).tolist()
    # sorted: row 0 = 0.5, 0.3, 0.15, 0.05; row 1 = 0.9, 0.05, 0.03, 0.02
    assert kept(0.45) == [[True, False, False, False], [False, True, False, False]]
    assert kept(0.55) == [[True, False, True, False], [False, True, False, False]]
    assert kept(0.79) == [[True, False, True, False], [False, True, False, False]]
    assert kept(0.81) == [[True, False, True, True], [False, True, False, False]]
    assert kept(0.93) == [[True, False, True, True], [True, True, False, False]]
    assert kept(0.96) == [[True, True, True, True], [True, True, True, False]]
    assert torch.equal(top_p_mask(logits, 1.0), logits)
    assert torch.allclose(top_p_mask(logits, 0.8)[0, [0, 2]], logits[0, [0, 2]])  # kept logits unchanged


def test_sampling_respects_masks_and_greedy():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {1, 2}
    assert set(sample_next(logits, 1.0, top_p=0.3, generator=g).tolist()) == {1}
    assert sample_next(logits, 0.0).eq(1).all()
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, -1.0)


# -------------------------------------------------------------------------------------------- text level
def test_stream_concatenates_to_generate_and_stop_strings_cut():
    model, tok = tiny_model(["mla"]), byte_tokenizer()
    kw = dict(max_new_tokens=20, temperature=0)
    full = generate(model, tok, "hello", **kw)
    assert "".join(stream(model, tok, "hello", **kw)) == full
    assert generate(model, tok, ["hello", "a much longer prompt"], **kw)[0] == full
    stop = full[5:8]
    cut = generate(model, tok, "hello", stop=[stop], **kw)
    assert cut == full[: full.index(stop)]
    assert "".join(stream(model, tok, "hello", stop=stop, **kw)) == cut


def test_detokenizer_holds_split_characters_and_stop_prefixes():
    tok = TextTokenizer.coerce(byte_tokenizer())
    ids = tok.encode("héllo wörld")
    assert len(ids) == 13  # two 2-byte characters
    d = _Detokenizer(tok, stop=[])
    deltas = [d.push(i) for i in ids] + [d.finish()]
    assert "".join(deltas) == "héllo wörld" and not any("\ufffd" in x for x in deltas)
    d = _Detokenizer(tok, stop=["o w"])
    deltas = [d.push(i) for i in tok.encode("hello")]
    assert "".join(deltas) == "hell"  # the "o" may start the stop string
    assert d.push(tok.encode(" ")[0]) == "" and d.push(tok.encode("w")[0]) == "" and d.done
    d = _Detokenizer(tok, stop=["o w"])
    assert "".join(d.push(i) for i in tok.encode("hello")) + d.finish() == "hello"  # ended: release the tail


# -------------------------------------------------------------------------------------------- bad input
def test_prompt_longer_than_context():
    model = tiny_model(["mla"])  # context 64
    long = list(range(3, 63))
    with pytest.raises(ValueError, match="context of 64 tokens.*truncate left"):
        generate_ids(model, [long], 10)
    got = generate_ids(model, [long], 10, temperature=0, truncate="left")
    assert got == generate_ids(model, [long[-54:]], 10, temperature=0)
    with pytest.raises(ValueError, match="leaves no room"):
        fit_prompts([[1]], 64, 64)


def test_empty_prompt():
    model, tok = tiny_model(["mla"]), byte_tokenizer()
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, tok, "", max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_ids(model, [[5], []], 4)


def test_cli_missing_checkpoint(tmp_path, capsys):
    from smolds.infer.generate import main

    assert main([str(tmp_path / "nope"), "hi"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------- commands
def test_generate_and_chat_commands(tmp_path, capsys, monkeypatch):
    from smolds.infer.chat import ChatSession
    from smolds.infer.chat import main as chat_main
    from smolds.infer.generate import main as generate_main

    model, tok = tiny_model(["mla"], max_position_embeddings=256), byte_tokenizer()
    save_pretrained(model, tmp_path / "ckpt", tok)
    expected = generate(model, tok, "hi", max_new_tokens=6, temperature=0)
    assert generate_main([str(tmp_path / "ckpt"), "hi", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "hi" + expected + "\n"

    session = ChatSession(model, tok, max_new_tokens=5, temperature=0)
    first = "".join(session.reply("hello"))
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.prompt().startswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    session.reset()
    assert session.messages == []
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nhello\n/quit\n"))
    assert chat_main([str(tmp_path / "ckpt"), "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out == f"{first}\n(history cleared)\n{first}\n"


def test_chat_drops_oldest_turns_when_history_outgrows_the_context():
    from smolds.infer.chat import ChatSession

    model, tok = tiny_model(["mla"], max_position_embeddings=128), byte_tokenizer()
    session = ChatSession(model, tok, system="sys", max_new_tokens=8, temperature=0)
    for text in ["first question", "second question", "third question"]:
        "".join(session.reply(text))
    assert session.messages[0]["role"] == "system" and session.messages[1]["role"] == "user"
    assert len(tok.encode(session.prompt())) + 8 <= 128
    with pytest.raises(ValueError, match="context"):
        "".join(session.reply("x" * 200))
    assert session.messages[-1]["role"] == "assistant"  # the rejected message is not kept


def test_load_errors_are_one_line(tmp_path):
    from smolds.pretrained import load_pretrained

    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.yaml"):
        load_pretrained(tmp_path / "empty")


@pytest.mark.parametrize("kw, message", [
    (dict(top_p=1.5), r"top_p \(--top-p\) must be in \(0, 1\]"),
    (dict(top_p=-0.5, temperature=0), r"top_p \(--top-p\) must be in \(0, 1\]"),  # even when greedy
    (dict(top_k=-3), r"top_k \(--top-k\) must be >= 0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
])
def test_sampling_settings_out_of_range_are_refused(kw, message):
    model = tiny_model(["mla"])
    with pytest.raises(ValueError, match=message):
        generate_ids(model, PROMPTS[:1], 4, **kw)
    with pytest.raises(ValueError, match=message):
        generate_ids_uncached(model, PROMPTS[:1], 4, **kw)


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "1.5"], "top_p (--top-p) must be in (0, 1]"),
    (["--top-k", "-1"], "top_k (--top-k) must be >= 0"),
    (["--temperature", "nan"], "temperature (--temperature) must be a finite number >= 0"),
    (["--max-new-tokens", "-2"], "max_new_tokens (--max-new-tokens) must be >= 0"),
    (["--max-new-tokens", "250"], "exceeds the model's context of 256 tokens"),  # the prompt does not fit
    (["--device", "gpu"], "--device 'gpu' is not a device; use cpu, cuda or cuda:N"),
])
def test_cli_bad_input_prints_one_line_and_no_prompt(tmp_path, capsys, flags, message):
    """The single-prompt command echoes the prompt before streaming: a bad flag or a prompt that does not fit
    must be refused before that, so the error is the only output (and exactly one line)."""
    from smolds.infer.chat import main as chat_main
    from smolds.infer.generate import main as generate_main

    save_pretrained(tiny_model(["mla"], max_position_embeddings=256), tmp_path / "ckpt", byte_tokenizer())
    assert generate_main([str(tmp_path / "ckpt"), "a prompt of some length", *flags]) != 0
    out, err = capsys.readouterr()
    assert out == "" and message in err and err.count("\n") == 1
    if "context" not in message:  # chat refuses a bad flag at start, not once per message
        assert chat_main([str(tmp_path / "ckpt"), *flags]) == 2
        out, err = capsys.readouterr()
        assert out == "" and message in err and err.count("\n") == 1


def test_chat_turn_interrupted_or_failed_leaves_the_history_unchanged(tmp_path, capsys, monkeypatch):
    from smolds.infer.chat import ChatSession
    from smolds.infer.chat import main as chat_main

    model, tok = tiny_model(["mla"], max_position_embeddings=256), byte_tokenizer()
    session = ChatSession(model, tok, max_new_tokens=6, temperature=0)
    first = "".join(session.reply("hello"))
    history = list(session.messages)
    pieces = session.reply("second")
    next(pieces)
    pieces.close()  # the caller stopped reading (Ctrl-C in the terminal)
    assert session.messages == history  # no unanswered "second" left behind
    assert "".join(session.reply("hello again"))  # and the next turn works

    # The command: Ctrl-C while an answer streams drops that turn and keeps the chat going.
    save_pretrained(model, tmp_path / "ckpt", tok)
    import smolds.infer.chat as chat_module

    real_stream, calls = chat_module.stream, []

    def interrupted_once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        yield from real_stream(*a, **k)

    monkeypatch.setattr(chat_module, "stream", interrupted_once)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nhello\n/quit\n"))
    assert chat_main([str(tmp_path / "ckpt"), "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == f"\n(interrupted)\n{first}\n"


def test_unavailable_device_is_named_before_loading(monkeypatch):
    from smolds.infer.generate import device_error

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_error("cpu") is None
    assert "CUDA is not available on this machine; use --device cpu" in device_error("cuda")
    assert "is not a device" in device_error("gpu:0")
