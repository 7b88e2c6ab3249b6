"""Generation: one prefill pass over the (left-padded) prompts, then one token per step against each
layer's cache, with greedy, temperature, top-k and top-p sampling, stop strings, and streaming.

Dimension letters: B prompts in the batch, T prompt tokens (the longest), V vocabulary.

The caches are whatever `model.new_cache` returns (MLA's latent + rotary key with absorbed decode, GQA's
K/V, linear attention's constant-size state), preallocated once for prompt + new tokens; nothing here
depends on the layer kind. Prompts of unequal length are left-padded and the prefill passes `pad_mask`,
so every row sees only its own tokens at its own rotary positions and a batch decodes as its rows would
one by one. `generate_ids_uncached` recomputes the whole sequence at every step without a cache: the slow
reference the tests hold the cached path to.

With `compile=True` the steps after the prefill run `Transformer.decode_step` under torch.compile: static
shapes (a cache of a power-of-two length, kept and reused per batch size), so one graph, and on CUDA one
CUDA graph, serves every step. It pays a one-off compile (tens of seconds) for steps 1.1-3x faster than
eager on CPU (most at small models and batches), so it is off by default. `static=True` runs the same step
uncompiled (the tests use it).

Layers:
- `sample_next`, `top_k_mask`, `top_p_mask`: logits [B, V] -> next tokens [B].
- `compile_mode`, `static_cache`: the compiled static-shape step's mode and kept caches.
- `generate_tokens` (token ids in, one list of next ids per step out), `generate_ids`.
- `stream_batch`, `stream`, `generate`: text in, text out (incremental detokenization, stop strings).
- `main`: the `smolds generate CKPT "prompt"` command.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch

from smolds.model.transformer import eval_mode
from smolds.pretrained import CheckpointError, load_pretrained
from smolds.tokenizer import TextTokenizer


# ------------------------------------------------------------------------------------------------ sampling
def top_k_mask(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept too), -inf elsewhere."""
    if k is None or k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to >= p, -inf elsewhere.
    A token is dropped when the tokens more likely than it already reach p; the most likely is always kept."""
    if p is None or p >= 1.0:
        return logits
    if p <= 0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p  # mass strictly before each token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy (argmax); otherwise temperature, then top-k,
    then top-p (transformers' order), then one draw from the renormalized distribution."""
    if not temperature >= 0:  # also NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_mask(top_k_mask(logits.float() / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


# ----------------------------------------------------------------------------------------- prompt checks
def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the first sampling setting out of range (flag names in brackets), before any
    work: a bad value must not be ignored (top_p > 1, top_k < 0) or surface as a tensor error (NaN)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens (--max-new-tokens) must be >= 0, got {max_new_tokens}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature (--temperature) must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k (--top-k) must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p (--top-p) must be in (0, 1] (1 = off), got {top_p}")


def fit_prompts(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, context: int,
                truncate: str | None = None) -> list[list[int]]:
    """Check each prompt against the context; with truncate="left", keep the last tokens that fit."""
    if truncate not in (None, "left"):
        raise ValueError(f"truncate must be None or 'left', got {truncate!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the model's context "
                         f"of {context} tokens")
    if not prompt_ids:
        raise ValueError("no prompts given")
    out = []
    for i, ids in enumerate(prompt_ids):
        ids = [int(t) for t in ids]
        which = "prompt" if len(prompt_ids) == 1 else f"prompt {i}"
        if not ids:
            raise ValueError(f"{which} is empty (0 tokens); give some text to continue")
        room = context - max_new_tokens
        if len(ids) > room:
            if truncate != "left":
                raise ValueError(
                    f"{which} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                    f"model's context of {context} tokens (shorten it, lower max_new_tokens, or truncate left: "
                    f"--truncate left keeps the last {room} tokens)")
            ids = ids[-room:]
        out.append(ids)
    return out


# ---------------------------------------------------------------------------------- static-shape decoding
def compile_mode(compile: bool | str, device: torch.device) -> str | None:
    """The torch.compile mode of a `compile` argument: None (eager) for False; for True "reduce-overhead" on
    CUDA (the step replays as one CUDA graph) and "default" elsewhere; a string names the mode."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "reduce-overhead" if device.type == "cuda" else "default"
    return compile


@functools.cache
def _compiled_decode_step(cls, mode: str):
    """`cls.decode_step` (a Transformer's) under torch.compile: one graph per (model, batch, cache length);
    the model is an argument, so this holds no reference to it."""
    return torch.compile(cls.decode_step, mode=mode, dynamic=False, fullgraph=True)


def static_cache_length(n: int, context: int) -> int:
    """Static caches come in few lengths, so that few graphs are compiled: the next power of two >= n, at
    least 64, at most the context."""
    return min(max(64, 1 << (n - 1).bit_length()), context)


_static_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(B, S, mode): Cache}
_busy_caches: weakref.WeakSet = weakref.WeakSet()  # held by a generation still running


def static_cache(model, batch: int, length: int, mode: str | None):
    """An empty cache for `batch` rows and at least `length` tokens, reused from the last calls with the same
    shape (a CUDA graph replays on the addresses it was recorded with; up to 4 shapes are kept per model).
    A cache that an unfinished generation still holds is not handed out again: a new one is made instead."""
    S = static_cache_length(length, model.config.max_position_embeddings)
    p = model.embed_tokens.weight
    key = (batch, S, mode, p.device, p.dtype)
    caches = _static_caches.setdefault(model, OrderedDict())
    cache = caches.get(key)
    if cache is None or cache in _busy_caches:
        cache = model.new_cache(batch, S)
        if mode is not None:
            for t in cache.tensors():  # CUDA graphs: fixed inputs, not copied in at every replay
                torch._dynamo.mark_static_address(t)
        if key not in caches:
            caches[key] = cache
        while len(caches) > 4:
            caches.popitem(last=False)
    if key in caches:
        caches.move_to_end(key)
    return cache.reset()


# ------------------------------------------------------------------------------------------- token level
@torch.inference_mode()
def generate_tokens(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    eos_token_ids: Sequence[int] = (), truncate: str | None = None, static: bool = False,
                    compile: bool | str = False) -> Iterator[list[int | None]]:
    """Yield, per decode step, the next token of every row ([B] ints); a row that has produced an eos token
    yields None from then on. Stops when every row is done or after max_new_tokens steps.

    static: decode with static shapes (`Transformer.decode_step`: the cache preallocated to
    `static_cache_length`, the step's write position in a tensor, attention over the whole cache under a
    validity mask). compile: also compile that step (implies static; see `compile_mode`); the first call per
    (batch, cache length) compiles, later calls reuse the graph and the cache."""
    cfg = model.config
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    prompts = fit_prompts(prompt_ids, max_new_tokens, cfg.max_position_embeddings, truncate)
    if max_new_tokens == 0:
        return
    device = model.embed_tokens.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, T, dtype=torch.long)
    pad_mask = torch.zeros(B, T, dtype=torch.bool)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token is at column T-1
        ids[i, T - len(p):] = torch.tensor(p)
        pad_mask[i, T - len(p):] = True
    ids, pad_mask = ids.to(device), pad_mask.to(device)
    generator = _generator(device, seed)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    mode = compile_mode(compile, device)
    static = static or mode is not None
    with eval_mode(model):
        cache = None
        try:
            length = T + max_new_tokens - 1  # the last token is sampled, never fed back
            cache = static_cache(model, B, length, mode) if static else model.new_cache(B, length)
            _busy_caches.add(cache)
            logits = model(ids, cache=cache, pad_mask=None if bool(pad_mask.all()) else pad_mask,
                           last_only=True).logits[:, -1]  # [B, V]
            cls = type(model)
            step_fn = None if not static else cls.decode_step if mode is None else _compiled_decode_step(cls, mode)
            for step in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, top_p, generator)  # [B]
                out = [None if d else t for t, d in zip(nxt.tolist(), done.tolist())]
                yield out
                done |= torch.isin(nxt, eos)
                if step == max_new_tokens - 1 or bool(done.all()):
                    return
                if step_fn is None:
                    logits = model(nxt[:, None], cache=cache, last_only=True).logits[:, -1]
                else:
                    if mode is not None and device.type == "cuda":
                        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are consumed
                    logits = step_fn(model, nxt[:, None], cache)
                    cache.length += 1
        finally:
            if cache is not None:
                _busy_caches.discard(cache)


def generate_ids(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, **kwargs) -> list[list[int]]:
    """The new tokens of every row (eos not included); kwargs as `generate_tokens`."""
    eos = set(kwargs.get("eos_token_ids", ()))
    out: list[list[int]] = [[] for _ in prompt_ids]
    done = [False] * len(prompt_ids)
    for step in generate_tokens(model, prompt_ids, max_new_tokens, **kwargs):
        for i, t in enumerate(step):
            if t is None or done[i]:
                continue
            if t in eos:
                done[i] = True
            else:
                out[i].append(t)
    return out


@torch.inference_mode()
def generate_ids_uncached(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
                          temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                          seed: int | None = None, eos_token_ids: Sequence[int] = ()) -> list[list[int]]:
    """The slow reference: no cache, no padding; each row alone, the whole sequence recomputed every step."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    device = model.embed_tokens.weight.device
    outs = []
    with eval_mode(model):
        for p in fit_prompts(prompt_ids, max_new_tokens, model.config.max_position_embeddings):
            generator = _generator(device, seed)
            seq, new = list(p), []
            for _ in range(max_new_tokens):
                logits = model(torch.tensor([seq], device=device), last_only=True).logits[:, -1]
                t = int(sample_next(logits, temperature, top_k, top_p, generator)[0])
                if t in eos_token_ids:
                    break
                seq.append(t)
                new.append(t)
            outs.append(new)
    return outs


# -------------------------------------------------------------------------------------------- text level
class _Detokenizer:
    """Turns one row's new token ids into text deltas: holds back an incomplete UTF-8 character and any tail
    that could still become a stop string, and cuts the text before the first stop string."""

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.done = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for its last byte
            return ""
        return self._emit(text, final=False)

    def finish(self) -> str:
        return "" if self.done else self._emit(self.tokenizer.decode(self.ids), final=True)

    def _emit(self, text: str, final: bool) -> str:
        if self.stop:
            lo = max(0, len(self.emitted) - max(map(len, self.stop)))
            hits = [i for i in (text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                text, final = text[: min(hits)], True
        end = len(text)
        if not final:  # hold back the longest tail that is a proper prefix of a stop string
            for s in self.stop:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        end = min(end, len(text) - n)
                        break
        end = max(end, len(self.emitted))
        delta = text[len(self.emitted) : end]
        self.emitted += delta
        self.done = final
        return delta


def stream_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 128, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: Sequence[str] | str | None = None, truncate: str | None = None,
                 eos_token_ids: Sequence[int] | None = None, compile: bool | str = False) -> Iterator[list[str]]:
    """Yield, per decode step, the new text of every row ("" where there is none yet)."""
    tok = TextTokenizer.coerce(tokenizer)
    if tok is None:
        raise ValueError("generation from text needs a tokenizer (the checkpoint has no tokenizer.json)")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    eos = tok.eos_token_ids if eos_token_ids is None else list(eos_token_ids)
    rows = [_Detokenizer(tok, stop) for _ in prompts]
    steps = generate_tokens(model, [tok.encode(p) for p in prompts], max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, eos_token_ids=eos, truncate=truncate,
                            compile=compile)
    try:
        for step in steps:
            deltas = []
            for row, t in zip(rows, step):
                if row.done or t is None:
                    deltas.append("")
                elif t in eos:
                    deltas.append(row.finish())
                else:
                    deltas.append(row.push(t))
            if any(deltas):
                yield deltas
            if all(r.done for r in rows):
                return
        tail = [r.finish() for r in rows]
        if any(tail):
            yield tail
    finally:
        steps.close()


def stream(model, tokenizer, prompt: str, **kwargs) -> Iterator[str]:
    """Yield the continuation of one prompt piece by piece; kwargs as `generate`."""
    for deltas in stream_batch(model, tokenizer, [prompt], **kwargs):
        if deltas[0]:
            yield deltas[0]


def generate(model, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 128, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop: Sequence[str] | str | None = None, truncate: str | None = None,
             eos_token_ids: Sequence[int] | None = None, compile: bool | str = False) -> str | list[str]:
    """Continue one prompt (-> str) or a batch of prompts of any lengths (-> list[str], one prefill pass).

    temperature 0 is greedy; top_k/top_p None or 0/1 are off; seed makes sampling reproducible; generation of
    a row ends at an eos token (the tokenizer's, default `<|endoftext|>`), a stop string (not included in the
    text) or after max_new_tokens; truncate="left" keeps the end of a prompt too long for the context;
    compile=True decodes with a compiled static-shape step (`generate_tokens`)."""
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    texts = [""] * len(batch)
    for deltas in stream_batch(model, tokenizer, batch, max_new_tokens, temperature, top_k, top_p, seed, stop,
                               truncate, eos_token_ids, compile):
        texts = [t + d for t, d in zip(texts, deltas)]
    return texts[0] if single else texts


# ---------------------------------------------------------------------------------------------------- CLI
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--truncate", choices=["left"], default=None,
                   help="keep the end of a prompt too long for the context instead of failing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as saved")
    p.add_argument("--compile", action="store_true",
                   help="decode with a torch.compile'd static-shape step (CUDA graphs on CUDA): faster steps after "
                        "a one-off compile of tens of seconds")


def sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                top_p=args.top_p, seed=args.seed, stop=args.stop, truncate=args.truncate, compile=args.compile)


def device_error(device: str) -> str | None:
    """Why `--device DEVICE` cannot be used on this machine (None when it can): checked before loading, since
    torch reports it as a bare AssertionError or RuntimeError from deep inside the model's construction."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device {device!r} is not a device; use cpu, cuda or cuda:N"
    if d.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {device}: CUDA is not available on this machine; use --device cpu"
        if d.index is not None and d.index >= torch.cuda.device_count():
            return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    if d.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {device}: MPS is not available on this machine; use --device cpu"
    return None


def check_sampling_args(prog: str, args) -> bool:
    """False (and a printed one-line error) when a sampling flag is out of range or --device is unusable;
    checked before loading."""
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        problem = device_error(args.device)
        if problem:
            raise ValueError(problem)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return False
    return True


def load_for_cli(prog: str, path: str, args):
    """(model, tokenizer) or a printed one-line error and None."""
    try:
        model, tok = load_pretrained(path, device=args.device, dtype=DTYPES.get(args.dtype))
    except (CheckpointError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return None
    if tok is None:
        print(f"{prog}: error: checkpoint {path} has no tokenizer.json; generation needs one", file=sys.stderr)
        return None
    return model, tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smolds generate", description="Continue prompts with a checkpoint "
                                "(one prompt streams to the terminal; several run as one batch).")
    p.add_argument("checkpoint", help="checkpoint directory (or a run/step directory of the trainer)")
    p.add_argument("prompts", nargs="+", help="prompt text(s)")
    add_sampling_args(p)
    args = p.parse_args(argv)
    if not check_sampling_args("smolds generate", args):
        return 2
    loaded = load_for_cli("smolds generate", args.checkpoint, args)
    if loaded is None:
        return 1
    model, tok = loaded
    try:  # before the prompt is echoed: an error is then the only output
        fit_prompts([tok.encode(p) for p in args.prompts], args.max_new_tokens,
                    model.config.max_position_embeddings, args.truncate)
    except ValueError as e:
        print(f"smolds generate: error: {e}", file=sys.stderr)
        return 1
    try:
        if len(args.prompts) == 1:
            sys.stdout.write(args.prompts[0])
            for piece in stream(model, tok, args.prompts[0], **sampling_kwargs(args)):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            for i, (prompt, text) in enumerate(zip(args.prompts, generate(model, tok, args.prompts,
                                                                         **sampling_kwargs(args)))):
                print(f"=== {i}\n{prompt}{text}")
    except ValueError as e:
        print(f"smolds generate: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
