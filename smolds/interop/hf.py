"""Hugging Face checkpoint directories in and out: Llama (SmolLM2), DeepseekV3 and KimiLinear.

A Hugging Face directory is `config.json` + `model.safetensors` (or shards with `model.safetensors.index.json`)
+ tokenizer files. Our module names follow HF's, so most weights map by dropping or adding the `model.`
prefix; what differs:

| ours                                          | Hugging Face                                              |
|-----------------------------------------------|-----------------------------------------------------------|
| `embed_tokens.weight`, `layers.i.*`, `norm.*` | `model.embed_tokens.weight`, `model.layers.i.*`, `model.norm.*` |
| `lm_head.weight` (absent when tied)           | `lm_head.weight` (absent when `tie_word_embeddings`)      |
| `layers.i.mlp.experts.gate_proj` [E, I, D]    | `model.layers.i.mlp.experts.{j}.gate_proj.weight` [I, D] per expert (same for up/down) |
| `layers.i.mlp.gate.e_score_correction_bias`   | `model.layers.i.mlp.gate.e_score_correction_bias` (the loss-free router bias, fp32) |

Llama in (`import_hf` on a `model_type: llama` directory, e.g. SmolLM2-135M): GQA + dense SwiGLU layers,
half-split rotary (`rope_interleave: false`), the `smollm2-135m` kind of model.
DeepseekV3 out (`export_hf`): MLA attention on every layer, `first_k_dense_replace` dense layers then
DeepSeekMoE layers. transformers 5 fuses the experts in memory (`gate_up_proj` [E, 2I, D]) and its
conversion mapping (`qwen2_moe` pattern) builds that from the per-expert keys written here.
GQA or linear-attention layers, or a dense layer after an MoE layer, have no DeepseekV3 equivalent: the export
refuses them with an error naming the layer (an all-GQA dense model can be exported as Llama instead).
DeepseekV3 in: the same mapping backwards, so export -> import gives bit-equal weights.
KimiLinear out and in (models with `kda` layers; MLA only without RoPE, `mla_use_nope: true`): per-layer
`layer_types` (KDA = linear_attention, MLA = full_attention) and `mlp_layer_types` (dense / sparse, in any
order), the weights in Moonshot's layout (below, `to_kimi_linear_state_dict`), a separate `lm_head` since
KimiLinear never ties it. Import reads that layout and transformers' in-memory one; a tied model comes back
untied, any other bit-equal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from smolds.config import ConfigError, ModelConfig
from smolds.model.transformer import Transformer
from smolds.pretrained import atomic_dir, save_pretrained, unwrap
from smolds.tokenizer import TextTokenizer


class InteropError(ValueError):
    """A checkpoint cannot be converted; the message says which field or layer and why."""


# --------------------------------------------------------------------------------------------- common
def read_hf_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise InteropError(f"{path} is not a directory (expected a Hugging Face model directory)")
    f = path / "config.json"
    if not f.is_file():
        hint = ("; it is a smolds checkpoint already: use it as is" if (path / "config.yaml").is_file()
                else "; pass a Hugging Face model directory (config.json, model.safetensors, tokenizer files)")
        raise InteropError(f"{path} has no config.json{hint}")
    try:
        hf = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InteropError(f"{f} is not valid JSON ({e}); re-download or re-save the model") from None
    if not isinstance(hf, dict):
        raise InteropError(f"{f} is not a JSON object; expected a Hugging Face model config")
    return hf


def read_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory: model.safetensors, or the shards its index lists. Never unpickles."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {', '.join(bins)}: pickled weights are not loaded; convert them to safetensors)" if bins else ""
        raise InteropError(f"{path} has no model.safetensors{hint}")
    state = {}
    for f in files:
        if not (path / f).is_file():
            raise InteropError(f"{path}: {f} (listed in model.safetensors.index.json) is missing; download it too")
        try:
            state.update(load_file(str(path / f)))
        except Exception as e:  # SafetensorError: truncated or not a safetensors file
            raise InteropError(f"{path / f} is not a readable safetensors file ({e}); it may be truncated: "
                               "download or save it again") from None
    return state


def rope_theta_of(hf: dict) -> float:
    """rope_theta from a transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`) config."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise InteropError(f"config.json: rope type {kind!r} is not supported (only plain RoPE)")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise InteropError("config.json: no rope_theta")
    return float(theta)


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection [n_heads*d, in] from interleaved rotary pairs (x0,x1),(x2,x3)..
    (DeepSeek; llama.cpp's permuted Llama weights) to half-split pairs (x_i, x_{i+d/2}) (Llama)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half` (llama.cpp's `permute` in convert_hf_to_gguf.py)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                source: str = "") -> Transformer:
    """A Transformer holding exactly `state` (strict: every weight present, nothing left over)."""
    model = Transformer(cfg)
    dtype = dtype or next(v.dtype for k, v in state.items() if v.is_floating_point() and "e_score" not in k)
    model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InteropError(f"{source}: weights do not match the config: missing {missing[:6]}, "
                           f"unexpected {unexpected[:6]}")
    return model.eval()


def _hf_tokenizer(path: Path) -> TextTokenizer | None:
    return TextTokenizer.load(path) if (path / "tokenizer.json").is_file() else None


def _strip_model_prefix(hf_state: dict, n_layers: int) -> dict:
    out = {}
    for k, v in hf_state.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        m = re.match(r"model\.layers\.(\d+)\.", k)
        if m and int(m.group(1)) >= n_layers:  # DeepSeek's multi-token-prediction layers: not part of the model
            continue
        out[k[len("model."):] if k.startswith("model.") else k] = v
    return out


# --------------------------------------------------------------------------------------------- Llama in
def llama_config(hf: dict) -> ModelConfig:
    """ModelConfig (GQA + dense SwiGLU, half-split rotary) of a HF Llama config.json dict."""
    if hf.get("model_type") not in ("llama", None):
        raise InteropError(f"config.json: model_type {hf.get('model_type')!r} is not llama")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise InteropError(f"config.json: {key}=true is not supported (SmolLM2/Llama use no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise InteropError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
    heads = hf["num_attention_heads"]
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=hf["num_hidden_layers"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            initializer_range=hf.get("initializer_range", 0.02), attention_pattern=["gqa"],
            rope_theta=rope_theta_of(hf), rope_interleave=False, num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            intermediate_size=hf["intermediate_size"], n_routed_experts=0)
    except ConfigError as e:
        raise InteropError(f"config.json cannot be expressed: {e}") from None


# ---------------------------------------------------------------------------------------- DeepseekV3 in
def deepseek_v3_config(hf: dict) -> ModelConfig:
    """ModelConfig (MLA; dense then DeepSeekMoE layers) of a HF DeepseekV3 config.json dict."""
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads:
        raise InteropError("config.json: num_key_value_heads must equal num_attention_heads for MLA")
    if hf.get("attention_bias"):
        raise InteropError("config.json: attention_bias=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise InteropError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported")
    L, E = hf["num_hidden_layers"], hf.get("n_routed_experts") or 0
    first_dense = min(hf.get("first_k_dense_replace") or 0, L)
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=L,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            initializer_range=hf.get("initializer_range", 0.02), attention_pattern=["mla"],
            ffn_pattern=None if E and first_dense < L else ["dense"],
            rope_theta=rope_theta_of(hf), rope_interleave=bool(hf.get("rope_interleave", True)),
            num_attention_heads=heads, q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"], intermediate_size=hf["intermediate_size"],
            n_routed_experts=E if first_dense < L else 0, n_shared_experts=hf.get("n_shared_experts") or 0,
            moe_intermediate_size=hf.get("moe_intermediate_size", 256),
            num_experts_per_tok=hf.get("num_experts_per_tok") or 1, n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1, routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)), first_k_dense_replace=first_dense)
    except ConfigError as e:
        raise InteropError(f"config.json cannot be expressed: {e}") from None


def deepseek_v3_state_dict(hf_state: dict, cfg: ModelConfig) -> dict:
    """HF DeepseekV3 tensors (per-expert keys) -> our names (stacked experts)."""
    state = _strip_model_prefix(hf_state, cfg.num_hidden_layers)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for i in cfg.moe_layers:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            keys = [f"layers.{i}.mlp.experts.{j}.{proj}.weight" for j in range(cfg.n_routed_experts)]
            if all(k in state for k in keys):
                state[f"layers.{i}.mlp.experts.{proj}"] = torch.stack([state.pop(k) for k in keys])
    if cfg.n_shared_experts == 0:  # a zero-width shared expert: transformers keeps [0, D] tensors
        state = {k: v for k, v in state.items() if not (".shared_experts." in k and v.numel() == 0)}
    return state


# ---------------------------------------------------------------------------------------- KimiLinear in
# KimiLinear (transformers' KimiLinearForCausalLM, Moonshot's Kimi Linear): per layer KDA or MLA without RoPE,
# then a dense SwiGLU or DeepSeekMoE FFN. Its per-layer types (config.json) and our kinds:
KIMI_ATTENTION = {"linear_attention": "kda", "full_attention": "mla"}  # layer_types -> attention kinds
KIMI_FFN = {"dense": "dense", "sparse": "moe"}  # mlp_layer_types -> ffn kinds


def _first(hf: dict, names: tuple[str, ...], default):
    """The value of the first of `names` in hf (a saved name, then transformers' attribute), else default."""
    return next((hf[n] for n in names if hf.get(n) is not None), default)


def _shortest_cycle(kinds: list[str]) -> list[str]:
    """The shortest pattern that, repeated cyclically, gives `kinds` (ModelConfig's layer plans)."""
    return next(kinds[:p] for p in range(1, len(kinds) + 1)
                if all(kinds[i] == kinds[i % p] for i in range(len(kinds))))


def kimi_linear_layer_types(hf: dict) -> tuple[list[str], list[str]]:
    """Per-layer attention and FFN kinds of a KimiLinear config.json, read as transformers reads them:
    `layer_types`, else Moonshot's `linear_attn_config` (1-indexed `kda_layers` / `full_attn_layers`);
    `mlp_layer_types`, else dense for the first `first_k_dense_replace` (default 1) layers."""
    L = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        lac = hf.get("linear_attn_config") or {}
        if "kda_layers" not in lac or "full_attn_layers" not in lac:
            raise InteropError("config.json: no layer_types (or linear_attn_config.kda_layers/full_attn_layers)")
        types = ["full_attention" if i in lac["full_attn_layers"] else "linear_attention" if i in lac["kda_layers"]
                 else None for i in range(1, L + 1)]
    mlp = hf.get("mlp_layer_types") or ["dense" if i < hf.get("first_k_dense_replace", 1) else "sparse"
                                        for i in range(L)]
    for name, got, known in (("layer_types", types, KIMI_ATTENTION), ("mlp_layer_types", mlp, KIMI_FFN)):
        if len(got) != L or any(t not in known for t in got):
            raise InteropError(f"config.json: {name} must list one of {', '.join(known)} for each of the {L} "
                               f"layers, got {got}")
    return [KIMI_ATTENTION[t] for t in types], [KIMI_FFN[t] for t in mlp]


def kimi_linear_config(hf: dict) -> ModelConfig:
    """ModelConfig of a KimiLinear config.json dict (transformers' keys, or Moonshot's remote-code ones)."""
    heads = hf["num_attention_heads"]
    lac = hf.get("linear_attn_config") or {}
    checks = [
        (hf.get("num_key_value_heads", heads) == heads, "num_key_value_heads must equal num_attention_heads for MLA"),
        (_first(hf, ("linear_num_heads",), lac.get("num_heads", heads)) == heads,
         "linear_num_heads must equal num_attention_heads (smolds' KDA layers have as many heads as its MLA)"),
        (hf.get("mla_use_nope", True) is True, "mla_use_nope=false (RoPE in MLA) is not what KimiLinear computes"),
        (not hf.get("attention_bias"), "attention_bias=true is not supported"),
        (hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r} is not supported"),
        (hf.get("moe_router_activation_func", "sigmoid") == "sigmoid", "only the sigmoid router is supported"),
    ]
    for ok, message in checks:
        if not ok:
            raise InteropError(f"config.json: {message}")
    attention, ffn = kimi_linear_layer_types(hf)
    moe = "moe" in ffn
    first_dense = ffn.index("moe") if moe else len(ffn)
    dense_then_moe = ffn == ["dense"] * first_dense + ["moe"] * (len(ffn) - first_dense)
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=len(attention),
            max_position_embeddings=_first(hf, ("model_max_length", "max_position_embeddings"), 1048576),
            tie_word_embeddings=False,  # KimiLinearForCausalLM never ties (its _tied_weights_keys is empty)
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5), initializer_range=hf.get("initializer_range", 0.02),
            attention_pattern=_shortest_cycle(attention),
            ffn_pattern=None if moe and dense_then_moe else _shortest_cycle(ffn),
            num_attention_heads=heads, q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"], mla_use_nope=True,
            linear_head_dim=_first(hf, ("linear_head_dim",), lac.get("head_dim", 128)),
            linear_conv_kernel_dim=_first(hf, ("linear_conv_kernel_dim",), lac.get("short_conv_kernel_size", 4)),
            intermediate_size=hf["intermediate_size"],
            n_routed_experts=_first(hf, ("num_experts", "num_local_experts"), 256) if moe else 0,
            n_shared_experts=_first(hf, ("num_shared_experts", "n_shared_experts"), 1),
            moe_intermediate_size=hf.get("moe_intermediate_size", 1024),
            num_experts_per_tok=_first(hf, ("num_experts_per_token", "num_experts_per_tok"), 8),
            n_group=_first(hf, ("num_expert_group", "n_group"), 1), topk_group=hf.get("topk_group") or 1,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.446)),
            norm_topk_prob=bool(_first(hf, ("moe_renormalize", "norm_topk_prob"), True)),
            first_k_dense_replace=first_dense if moe else 0)
    except ConfigError as e:
        raise InteropError(f"config.json cannot be expressed: {e}") from None


def kimi_linear_state_dict(hf_state: dict, cfg: ModelConfig) -> dict:
    """KimiLinear tensors -> our names. Reads Moonshot's layout (what transformers' save_pretrained writes:
    `block_sparse_moe`, experts' w1/w3/w2, q/k/v_conv1d, the forget gate's weights flat in self_attn) and
    transformers' in-memory one (`mlp`, fused `experts.gate_up_proj` [E, 2I, D], `conv1d`, `forget_gate.*`)."""
    state = {}
    for k, v in _strip_model_prefix(hf_state, cfg.num_hidden_layers).items():
        k = k.replace(".block_sparse_moe.", ".mlp.")
        state[re.sub(r"self_attn\.(f_a_proj|f_b_proj|dt_bias|A_log)", r"self_attn.forget_gate.\1", k)] = v
    for i, (attn, ffn) in enumerate(cfg.layer_kinds()):
        p = f"layers.{i}"
        convs = [f"{p}.self_attn.{x}_conv1d.weight" for x in "qkv"]
        if attn == "kda" and all(k in state for k in convs):
            state[f"{p}.self_attn.conv1d.weight"] = torch.cat([state.pop(k) for k in convs])  # [3*H*K, 1, W]
        if ffn != "moe":
            continue
        e = f"{p}.mlp.experts"
        if f"{e}.gate_up_proj" in state:
            state[f"{e}.gate_proj"], state[f"{e}.up_proj"] = state.pop(f"{e}.gate_up_proj").chunk(2, dim=1)
        for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            keys = [f"{e}.{j}.{theirs}.weight" for j in range(cfg.n_routed_experts)]
            if all(k in state for k in keys):
                state[f"{e}.{ours}"] = torch.stack([state.pop(k) for k in keys])  # [E, I, D] / [E, D, I]
    if cfg.n_shared_experts == 0:  # a zero-width shared expert, as exported
        state = {k: v for k, v in state.items() if not (".shared_experts." in k and v.numel() == 0)}
    return state


# --------------------------------------------------------------------------------------------- import
def import_hf(path: str | Path, dtype: torch.dtype | None = None,
              revision: str | None = None) -> tuple[Transformer, TextTokenizer | None]:
    """A HF Llama, DeepseekV3 or KimiLinear directory, or a Hub repo id (downloaded or taken from the cache, see
    `smolds.interop.hub`) -> (our model, its tokenizer or None). dtype None keeps the saved one."""
    from smolds.interop.hub import resolve_model_dir

    path = resolve_model_dir(path, revision)
    hf = read_hf_config(path)
    kind = hf.get("model_type")
    readers = {"llama": llama_config, "deepseek_v3": deepseek_v3_config, "kimi_linear": kimi_linear_config}
    if kind not in readers:
        raise InteropError(f"{path}/config.json: model_type {kind!r} is not supported ({', '.join(readers)})")
    try:
        cfg = readers[kind](hf)
    except KeyError as e:
        raise InteropError(f"{path}/config.json: no {e.args[0]!r}") from None
    if kind == "llama":
        state = _strip_model_prefix(read_safetensors_dir(path), cfg.num_hidden_layers)
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
    elif kind == "kimi_linear":
        state = kimi_linear_state_dict(read_safetensors_dir(path), cfg)
    else:
        state = deepseek_v3_state_dict(read_safetensors_dir(path), cfg)
    return build_model(cfg, state, dtype, source=str(path)), _hf_tokenizer(path)


def import_hf_to(path: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
                 revision: str | None = None) -> Path:
    """`smolds import-hf DIR|REPO_ID OUT`: convert and save as a smolds checkpoint."""
    model, tok = import_hf(path, dtype, revision)
    source = str(Path(path).resolve()) if Path(path).is_dir() else f"{path}{'@' + revision if revision else ''}"
    return save_pretrained(model, out_dir, tok, extra={"imported_from": source})


# ---------------------------------------------------------------------------------------- DeepseekV3 out
def check_deepseek_v3(cfg: ModelConfig) -> int:
    """Raise InteropError naming the first layer DeepseekV3 cannot express; return first_k_dense_replace."""
    for i, (attn, _) in enumerate(cfg.layer_kinds()):
        if attn != "mla":
            hint = ("; this all-GQA dense model exports as Llama: --arch llama"
                    if set(cfg.layer_kinds()) == {("gqa", "dense")} else "")
            raise InteropError(f"layer {i} uses {attn!r} attention: a DeepseekV3 export needs MLA on every layer "
                               f"(transformers' DeepseekV3 has no {attn} layers){hint}")
    if cfg.mla_use_nope:
        raise InteropError("this model's MLA applies no RoPE (mla_use_nope: true), which DeepseekV3 cannot express: "
                           "export it as KimiLinear (--arch kimi_linear)")
    ffn = [f for _, f in cfg.layer_kinds()]
    first_dense = next((i for i, f in enumerate(ffn) if f == "moe"), len(ffn))
    for i in range(first_dense, len(ffn)):
        if ffn[i] != "moe":
            raise InteropError(f"layer {i} is a dense FFN after MoE layer {first_dense}: DeepseekV3 can express "
                               "only dense layers first, then MoE layers (first_k_dense_replace)")
    if first_dense < len(ffn) and cfg.n_routed_experts // cfg.n_group < 2:
        raise InteropError("transformers' router scores each group by its top-2 experts: "
                           "n_routed_experts / n_group must be >= 2")
    return first_dense


def deepseek_v3_config_dict(cfg: ModelConfig, tokenizer: TextTokenizer | None = None,
                            dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of our MLA/MoE model as transformers' DeepseekV3 (4.57 and 5.x keys)."""
    first_dense = check_deepseek_v3(cfg)
    has_moe = first_dense < cfg.num_hidden_layers
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "hidden_act": "silu",
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank,  # null: no query compression (q_proj)
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_interleave": cfg.rope_interleave,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "n_routed_experts": cfg.n_routed_experts if has_moe else 0,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": cfg.norm_topk_prob,
        "first_k_dense_replace": first_dense,
        "num_nextn_predict_layers": 0,
        "use_cache": True,
        **_special_token_ids(tokenizer),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def to_deepseek_v3_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state_dict under HF DeepseekV3 names, experts split per expert (contiguous CPU copies)."""
    cfg = model.config
    check_deepseek_v3(cfg)
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        m = re.fullmatch(r"layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)", k)
        if m:
            for j in range(v.shape[0]):
                out[f"model.layers.{m.group(1)}.mlp.experts.{j}.{m.group(2)}.weight"] = v[j].clone()
        else:
            out[k if k.startswith("lm_head.") else f"model.{k}"] = v.contiguous()
    if cfg.n_shared_experts == 0:  # transformers always builds shared experts: give it zero-width ones
        D, dtype = cfg.hidden_size, model.embed_tokens.weight.dtype
        for i in cfg.moe_layers:
            p = f"model.layers.{i}.mlp.shared_experts"
            out[f"{p}.gate_proj.weight"] = torch.zeros(0, D, dtype=dtype)
            out[f"{p}.up_proj.weight"] = torch.zeros(0, D, dtype=dtype)
            out[f"{p}.down_proj.weight"] = torch.zeros(D, 0, dtype=dtype)
    return out


# ---------------------------------------------------------------------------------------- KimiLinear out
def check_kimi_linear(cfg: ModelConfig) -> None:
    """Raise InteropError naming what KimiLinear cannot express: attention other than KDA and MLA, MLA with
    RoPE (KimiLinear's has none), fewer than 2 experts a group (its router scores each group by its top 2)."""
    for i, (attn, _) in enumerate(cfg.layer_kinds()):
        if attn not in ("kda", "mla"):
            raise InteropError(f"layer {i} uses {attn!r} attention: a KimiLinear export needs KDA or MLA on every "
                               f"layer (transformers' KimiLinear has no {attn} layers)")
    if "mla" in cfg.attention_pattern and not cfg.mla_use_nope:
        raise InteropError("KimiLinear's MLA applies no RoPE and this model's does (mla_use_nope: false): "
                           "only a model trained with mla_use_nope: true exports as KimiLinear")
    if cfg.moe_layers and cfg.n_routed_experts // cfg.n_group < 2:
        raise InteropError("transformers' router scores each group by its top-2 experts: "
                           "n_routed_experts / n_group must be >= 2")


def kimi_linear_config_dict(cfg: ModelConfig, tokenizer: TextTokenizer | None = None,
                            dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of our KDA/MLA model as transformers' KimiLinear (the keys its save_pretrained writes;
    attention and FFN kinds per layer in layer_types / mlp_layer_types)."""
    check_kimi_linear(cfg)
    kinds = cfg.layer_kinds()
    return {
        "architectures": ["KimiLinearForCausalLM"],
        "model_type": "kimi_linear",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "model_max_length": cfg.max_position_embeddings,  # KimiLinear's name for max_position_embeddings
        "tie_word_embeddings": False,  # KimiLinear never ties: a tied model's head is written as lm_head
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "hidden_act": "silu",
        "layer_types": [{"kda": "linear_attention", "mla": "full_attention"}[a] for a, _ in kinds],
        "mlp_layer_types": [{"dense": "dense", "moe": "sparse"}[f] for _, f in kinds],
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "mla_use_nope": True,  # Moonshot's key; transformers' KimiLinear applies no RoPE in MLA
        "attention_bias": False,
        "attention_dropout": 0.0,
        "linear_num_heads": cfg.num_attention_heads,
        "linear_head_dim": cfg.linear_head_dim,
        "linear_conv_kernel_dim": cfg.linear_conv_kernel_dim,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.n_routed_experts,
        "num_shared_experts": cfg.n_shared_experts,
        "num_experts_per_token": cfg.num_experts_per_tok,
        "num_expert_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "moe_renormalize": cfg.norm_topk_prob,
        "use_cache": True,
        "pad_token_id": None,  # KimiLinear's defaults are Kimi's vocabulary's ids
        "bos_token_id": None,
        "eos_token_id": None,
        **_special_token_ids(tokenizer),
        "dtype": str(dtype).removeprefix("torch."),
    }


def to_kimi_linear_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state_dict in Moonshot's KimiLinear layout (the one its checkpoints and transformers' save_pretrained
    use): MoE layers under `block_sparse_moe` with per-expert w1 (gate) / w3 (up) / w2 (down), the KDA
    convolution as q/k/v_conv1d, the forget gate's weights flat in self_attn; an lm_head even when tied."""
    cfg = model.config
    check_kimi_linear(cfg)
    H, K = cfg.num_attention_heads, cfg.linear_head_dim
    moe_prefixes = tuple(f"layers.{i}.mlp." for i in cfg.moe_layers)
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if k.startswith(moe_prefixes):
            k = k.replace(".mlp.", ".block_sparse_moe.")
        k = k.replace(".self_attn.forget_gate.", ".self_attn.")
        m = re.fullmatch(r"(layers\.\d+\.block_sparse_moe\.experts)\.(gate_proj|up_proj|down_proj)", k)
        if m:
            name = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[m.group(2)]
            for j in range(v.shape[0]):
                out[f"model.{m.group(1)}.{j}.{name}.weight"] = v[j].clone()
        elif k.endswith(".self_attn.conv1d.weight"):
            for x, w in zip("qkv", v.split(H * K)):
                out[f"model.{k.replace('conv1d', f'{x}_conv1d')}"] = w.clone()
        else:
            out[k if k.startswith("lm_head.") else f"model.{k}"] = v.contiguous()
    if model.lm_head is None:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    if cfg.n_shared_experts == 0:  # transformers always builds shared experts: give it zero-width ones
        D, dtype = cfg.hidden_size, model.embed_tokens.weight.dtype
        for i in cfg.moe_layers:
            p = f"model.layers.{i}.block_sparse_moe.shared_experts"
            out[f"{p}.gate_proj.weight"] = torch.zeros(0, D, dtype=dtype)
            out[f"{p}.up_proj.weight"] = torch.zeros(0, D, dtype=dtype)
            out[f"{p}.down_proj.weight"] = torch.zeros(D, 0, dtype=dtype)
    return out


# -------------------------------------------------------------------------------------------- Llama out
def llama_config_dict(cfg: ModelConfig, tokenizer: TextTokenizer | None = None,
                      dtype: torch.dtype = torch.float32) -> dict:
    for i, kinds in enumerate(cfg.layer_kinds()):
        if kinds != ("gqa", "dense"):
            raise InteropError(f"layer {i} is {kinds[0]} attention + {kinds[1]} FFN: a Llama export needs "
                               "GQA attention and a dense FFN on every layer")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range, "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "mlp_bias": False, "use_cache": True, **_special_token_ids(tokenizer),
        "dtype": str(dtype).removeprefix("torch."), "torch_dtype": str(dtype).removeprefix("torch."),
    }


def to_llama_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our GQA state_dict under HF Llama names; interleaved rotary rows are reordered to Llama's half-split."""
    cfg = model.config
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if cfg.rope_interleave and k.endswith(("q_proj.weight", "k_proj.weight")):
            v = interleaved_to_half(v, cfg.num_attention_heads if "q_proj" in k else cfg.num_key_value_heads)
        out[k if k.startswith("lm_head.") else f"model.{k}"] = v.contiguous()
    return out


# ----------------------------------------------------------------------------------------------- export
def _special_token_ids(tok: TextTokenizer | None) -> dict:
    if tok is None:
        return {}
    ids = {"bos_token_id": tok.token_id(tok.bos_token), "eos_token_id": tok.token_id(tok.eos_token)}
    return {k: v for k, v in ids.items() if v is not None}


def export_arch(cfg: ModelConfig) -> str:
    """The architecture `export_hf(arch="auto")` writes: kimi_linear for a model with KDA layers or MLA without
    RoPE (only KimiLinear has them), else deepseek_v3."""
    return "kimi_linear" if "kda" in cfg.attention_pattern or cfg.mla_use_nope else "deepseek_v3"


def export_hf(model, out_dir: str | Path, tokenizer=None, arch: str = "auto", extra: dict | None = None) -> Path:
    """Write a HF directory (config.json, model.safetensors, tokenizer files, a README.md model card listing
    `extra`) that `transformers.AutoModelForCausalLM.from_pretrained` loads offline; atomic like
    `save_pretrained`. arch: deepseek_v3, kimi_linear, llama, or auto (`export_arch`)."""
    from safetensors.torch import save_file

    from smolds.interop.hub import model_card

    model = unwrap(model)
    tok = TextTokenizer.coerce(tokenizer)
    dtype = model.embed_tokens.weight.dtype
    if arch == "auto":
        arch = export_arch(model.config)
    if arch == "deepseek_v3":
        config, state = deepseek_v3_config_dict(model.config, tok, dtype), to_deepseek_v3_state_dict(model)
    elif arch == "kimi_linear":
        config, state = kimi_linear_config_dict(model.config, tok, dtype), to_kimi_linear_state_dict(model)
    elif arch == "llama":
        config, state = llama_config_dict(model.config, tok, dtype), to_llama_state_dict(model)
    else:
        raise InteropError(f"unknown export arch {arch!r} (auto, deepseek_v3, kimi_linear or llama)")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "README.md").write_text(model_card(model, arch, extra))
        if tok is not None:
            tok.save(tmp)
            gen = {k: v for k, v in _special_token_ids(tok).items()}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out_dir
