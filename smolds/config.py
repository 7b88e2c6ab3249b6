"""Model configuration: one flat dataclass, loaded from and saved to YAML, validated on construction.

Field names follow DeepSeek-V3 / Hugging Face wherever a field means the same thing (kv_lora_rank,
n_routed_experts, num_experts_per_tok, ...), so a user can read an HF config.json next to ours.

The layer plan is per layer: `attention_pattern` and `ffn_pattern` are repeated cyclically to the depth,
so ["mla"] means MLA everywhere and ["linear", "linear", "linear", "mla"] means three linear-attention
layers to one MLA layer. `layer_kinds()` resolves the plan to one (attention, ffn) pair per layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

ATTENTION_KINDS = ("mla", "gqa", "linear", "kda")
FFN_KINDS = ("dense", "moe")
BALANCE_MODES = ("loss_free", "aux_loss", "seq_aux", "loss_free+seq_aux", "none")
PRESET_DIR = Path(__file__).resolve().parent / "presets"  # shipped in the wheel (pyproject: package-data)


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and what is allowed."""


class YamlDataclass:
    """to_dict / to_yaml for the config dataclasses (model and run)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


@dataclass
class ModelConfig(YamlDataclass):
    # embedding and depth
    vocab_size: int = 49152
    hidden_size: int = 576
    num_hidden_layers: int = 30
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02  # std of every weight; output projections are scaled by 1/sqrt(2*layers)

    # layer plan (cyclic patterns, see module docstring)
    attention_pattern: list[str] = field(default_factory=lambda: ["mla"])
    ffn_pattern: list[str] | None = None  # None: dense for the first `first_k_dense_replace` layers, moe after

    # rotary embeddings (both MLA's decoupled key and GQA)
    rope_theta: float = 100000.0
    rope_interleave: bool = True  # True: DeepSeek/HF pairs (x0,x1),(x2,x3)..; False: Llama half-split

    # GQA (SmolLM2's attention)
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64

    # MLA (heads = num_attention_heads)
    q_lora_rank: int | None = None  # None: no query compression
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    mla_use_nope: bool = False  # True: MLA rotates nothing, its rope slice is plain (Kimi Linear; its name)

    # multi-head linear attention (kinds "linear" and "kda"; heads = num_attention_heads)
    linear_head_dim: int = 64  # K = V per head (KimiLinear's name)
    linear_chunk_size: int = 64
    linear_kv_rank: int | None = None  # "linear" only. None: full-rank k/v projections; int: MLA-style latent
    linear_conv_kernel_dim: int = 4  # "kda": width of the short causal convolution on q, k, v (KimiLinear's name)

    # dense FFN (SwiGLU)
    intermediate_size: int = 1536

    # DeepSeekMoE
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 256
    num_experts_per_tok: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0

    # load balancing
    balance_mode: str = "loss_free"
    bias_update_rate: float = 1e-3  # u in b_i += u * sign(mean(c) - c_i)
    bias_update_center: bool = False  # subtract the mean of the update (torchtitan), keeping sum(b) fixed
    aux_loss_alpha: float = 1e-3
    seq_aux_alpha: float = 1e-4

    # Fields that steer training, not the weights: a run started from a checkpoint (train.init_from) may change
    # them, e.g. a converted model healed at a faster bias update rate than its preset's.
    TRAINING_ONLY = ("initializer_range", "bias_update_rate", "bias_update_center", "aux_loss_alpha", "seq_aux_alpha")

    def __post_init__(self):
        if isinstance(self.attention_pattern, str):
            self.attention_pattern = [self.attention_pattern]
        if isinstance(self.ffn_pattern, str):
            self.ffn_pattern = [self.ffn_pattern]
        self.validate()

    # ------------------------------------------------------------------ derived
    def attention_kind(self, layer: int) -> str:
        return self.attention_pattern[layer % len(self.attention_pattern)]

    def ffn_kind(self, layer: int) -> str:
        if self.ffn_pattern is not None:
            return self.ffn_pattern[layer % len(self.ffn_pattern)]
        if self.n_routed_experts == 0 or layer < self.first_k_dense_replace:
            return "dense"
        return "moe"

    def layer_kinds(self) -> list[tuple[str, str]]:
        return [(self.attention_kind(i), self.ffn_kind(i)) for i in range(self.num_hidden_layers)]

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.ffn_kind(i) == "moe"]

    @property
    def uses_loss_free(self) -> bool:
        return self.balance_mode in ("loss_free", "loss_free+seq_aux")

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(ok: bool, name: str, msg: str):
            if not ok:
                raise ConfigError(f"model.{name}: {msg}")

        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
                    "moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group",
                    "linear_head_dim", "linear_chunk_size", "linear_conv_kernel_dim"]
        for name in positive:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, f"must be a positive integer, got {v!r}")
        for name in ("q_lora_rank", "linear_kv_rank"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and v > 0), name, f"must be null or a positive integer, got {v!r}")
        need(self.n_routed_experts >= 0, "n_routed_experts", f"must be >= 0, got {self.n_routed_experts}")
        need(self.n_shared_experts >= 0, "n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        need(self.first_k_dense_replace >= 0, "first_k_dense_replace", "must be >= 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        for name, pattern, allowed in (("attention_pattern", self.attention_pattern, ATTENTION_KINDS),
                                       ("ffn_pattern", self.ffn_pattern, FFN_KINDS)):
            if pattern is None:
                continue
            need(isinstance(pattern, list) and len(pattern) > 0, name, f"must be a non-empty list of {allowed}")
            for kind in pattern:
                need(kind in allowed, name, f"unknown kind {kind!r}; allowed: {', '.join(allowed)}")
        if "gqa" in self.attention_pattern:
            need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 f"must divide num_attention_heads ({self.num_attention_heads}), got {self.num_key_value_heads}")
            need(self.num_attention_heads * self.head_dim == self.hidden_size, "num_attention_heads",
                 f"num_attention_heads * head_dim ({self.num_attention_heads}*{self.head_dim}) must equal "
                 f"hidden_size ({self.hidden_size}) for gqa layers")
        if "kda" in self.attention_pattern:
            need(self.linear_head_dim <= 256, "linear_head_dim",
                 f"kda layers take head dims up to 256 (fla's KDA kernels), got {self.linear_head_dim}")
            need(self.linear_kv_rank is None or "linear" in self.attention_pattern, "linear_kv_rank",
                 "the latent variant is for 'linear' layers only (kda keys and values are full rank); set it to null")
        need(isinstance(self.mla_use_nope, bool), "mla_use_nope", f"must be true or false, got {self.mla_use_nope!r}")
        for name in ("qk_rope_head_dim", "head_dim"):
            need(getattr(self, name) % 2 == 0, name, "must be even (rotary pairs)")
        if self.moe_layers:
            E = self.n_routed_experts
            need(E > 0, "n_routed_experts", "must be > 0 when some layer is 'moe'")
            need(self.num_experts_per_tok <= E, "num_experts_per_tok",
                 f"top-k ({self.num_experts_per_tok}) must be <= n_routed_experts ({E})")
            need(E % self.n_group == 0, "n_group", f"n_routed_experts ({E}) must be divisible by n_group ({self.n_group})")
            need(self.topk_group <= self.n_group, "topk_group", f"must be <= n_group ({self.n_group})")
            per_group = E // self.n_group
            if self.n_group > 1:
                need(per_group >= 2, "n_group", "each group needs >= 2 experts (group score = sum of its top-2)")
                need(self.topk_group * per_group >= self.num_experts_per_tok, "topk_group",
                     f"topk_group*experts_per_group ({self.topk_group}*{per_group}) must be >= num_experts_per_tok")
        need(self.balance_mode in BALANCE_MODES, "balance_mode",
             f"unknown {self.balance_mode!r}; allowed: {', '.join(BALANCE_MODES)}")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
        for name in ("bias_update_rate", "aux_loss_alpha", "seq_aux_alpha"):
            need(getattr(self, name) >= 0, name, "must be >= 0")

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        if "preset" in d:  # a preset plus overrides
            base = cls.from_preset(d.pop("preset")).to_dict()
            base.update(d)
            d = base
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**coerce_numbers(cls, d, "model"))

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model config {path} does not exist; pass a YAML file or a preset name ({', '.join(presets())})")
        d = yaml.safe_load(path.read_text()) or {}
        if "model" in d and isinstance(d["model"], dict):  # a run config: take its model section
            d = d["model"]
        return cls.from_dict(d)

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(presets())}")
        return cls.from_yaml(path)

    @classmethod
    def load(cls, spec: str | dict | ModelConfig) -> ModelConfig:
        """A preset name, a YAML path, a dict (optionally with `preset:` plus overrides) or a config."""
        if isinstance(spec, ModelConfig):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if str(spec).endswith((".yaml", ".yml")):
            return cls.from_yaml(spec)
        return cls.from_preset(str(spec))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def coerce_numbers(cls, d: dict, section: str) -> dict:
    """YAML 1.1 reads `3e-3` (no dot) as a string: turn strings and ints into the float a field declares."""
    out = dict(d)
    for f in fields(cls):
        v = out.get(f.name)
        if f.name not in out or v is None or isinstance(v, bool):
            continue
        kind = str(f.type).split("|")[0].strip()
        try:
            if kind == "float" and isinstance(v, (str, int)):
                out[f.name] = float(v)
            elif kind == "int" and isinstance(v, str):
                out[f.name] = int(v)
        except ValueError:
            raise ConfigError(f"{section}.{f.name}: expected a number, got {v!r}") from None
    return out


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))

