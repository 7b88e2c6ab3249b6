"""Run configuration: one YAML with sections model / data / train / eval / deepspeed / logging.

Every field can be overridden on the command line as `--section.field value` (values are parsed as YAML,
so `--train.lr 3e-3`, `--model.attention_pattern [linear,mla]` and `--logging.wandb online` all work).
`model` is a preset name, a path to a model YAML, or a mapping (optionally `preset: NAME` plus overrides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from smolds.config import ConfigError, ModelConfig, YamlDataclass, coerce_numbers

DEFAULT_DATA_DIR = "data/pydoc-bpe4096"  # where the embedded default corpus is prepared


class TrainError(RuntimeError):
    """A run that cannot start or go on as configured (data, checkpoint, weights); the message names the fix."""


@dataclass
class DataConfig:
    # shards from `smolds prep` (the default dir is prepared on first use), or a weighted mixture of such
    # dirs, {path: weight, ...} (data_prep.mixture; weights are normalized to sum 1)
    dir: str | dict[str, float] = DEFAULT_DATA_DIR


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"
    steps: int = 400
    seq_len: int = 128
    micro_batch: int = 16  # sequences per rank per micro-step
    grad_accum: int = 1
    global_batch: int | None = None  # if set, must equal micro_batch * grad_accum * ranks
    lr: float = 2e-3
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio
    schedule: str = "wsd"  # wsd (warmup-stable-decay, SmolLM2) or cosine
    warmup_steps: int = 40
    decay_fraction: float = 0.2  # WSD: linear decay over the last 20% of steps
    weight_decay: float = 0.01  # on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    # seconds a rank waits for another process before it fails: a peer at the rendezvous or in a collective
    # (one that died or hangs), a lock of torch's extension builder held by a live process
    wait_timeout: float = 1800
    # recompute each block in backward instead of keeping its activations (memory for ~1/3 more compute)
    activation_checkpointing: bool = False
    # torch.compile each block (Transformer.compile_blocks): the first steps compile (tens of seconds)
    compile: bool = False
    init_from: str | None = None  # fresh start from these weights (consolidated/training checkpoint or run dir)
    # logit distillation (smolds/train/distill.py): a frozen teacher checkpoint with the data's tokenizer, and the
    # loss (1 - distill_weight) x LM loss + distill_weight x KL(teacher || student)
    distill_from: str | None = None
    distill_weight: float = 1.0


@dataclass
class EvalConfig:
    prompts: list[str] = field(default_factory=lambda: ["The ", "def ", "In Python, "])
    sample_tokens: int = 32


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0  # 0, 1, 2 (3 is refused with MoE, as by DeepSpeed)
    ep_size: int = 1  # routed experts split across this many ranks
    config: dict = field(default_factory=dict)  # extra raw DeepSpeed config, merged last


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # offline | online | disabled
    project: str = "smolds"
    run_name: str | None = None


SECTIONS = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "deepspeed": DeepSpeedSection,
            "logging": LoggingConfig}


@dataclass
class RunConfig(YamlDataclass):
    model: str | dict = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        self.validate()

    def model_config(self) -> ModelConfig:
        return ModelConfig.load(self.model)

    def validate(self):
        t, d = self.train, self.deepspeed
        for section, name in (("data", "dir"), ("train", "out_dir"), ("train", "init_from"), ("train", "distill_from")):
            v = getattr(getattr(self, section), name)
            if isinstance(v, int) and not isinstance(v, bool):  # YAML reads a path like 2024 as a number
                setattr(getattr(self, section), name, str(v))
        if not isinstance(t.out_dir, str) or not t.out_dir:
            raise ConfigError(f"train.out_dir: must be a directory path, got {t.out_dir!r}")
        for name in ("steps", "seq_len", "micro_batch", "grad_accum", "log_every", "eval_every",
                     "checkpoint_every", "keep_checkpoints", "eval_batches", "max_nonfinite_steps"):
            if not isinstance(getattr(t, name), int) or getattr(t, name) <= 0:
                raise ConfigError(f"train.{name}: must be a positive integer, got {getattr(t, name)!r}")
        for name in ("activation_checkpointing", "compile"):
            if not isinstance(getattr(t, name), bool):
                raise ConfigError(f"train.{name}: must be true or false, got {getattr(t, name)!r}")
        if t.compile and d.zero_stage == 3:
            raise ConfigError("train.compile with deepspeed.zero_stage 3 is not supported (not tested with "
                              "ZeRO-3's parameter gathering); use zero_stage 0-2 or turn compile off")
        if t.distill_from and d.zero_stage == 3:
            raise ConfigError("train.distill_from with deepspeed.zero_stage 3 is not supported (the student's LM head "
                              "is partitioned outside its forward); use zero_stage 0-2")
        if t.schedule not in ("wsd", "cosine"):
            raise ConfigError(f"train.schedule: unknown {t.schedule!r}; allowed: wsd, cosine")
        if t.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device: unknown {t.device!r}; allowed: auto, cpu, cuda")
        if t.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.dtype: unknown {t.dtype!r}; allowed: auto, bf16, fp32")
        if not 0 <= t.decay_fraction <= 1:
            raise ConfigError("train.decay_fraction: must be in [0, 1]")
        for name, lo, hi, rule in (("lr", 0, math.inf, ">= 0"), ("min_lr_ratio", 0, 1, "in [0, 1]"),
                                   ("weight_decay", 0, math.inf, ">= 0"), ("grad_clip", 0, math.inf, ">= 0"),
                                   ("beta1", 0, 1, "in [0, 1)"), ("beta2", 0, 1, "in [0, 1)"),
                                   ("distill_weight", 0, 1, "in [0, 1]"),
                                   ("eps", 0, math.inf, "> 0")):
            v = getattr(t, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi and math.isfinite(v)
            if not ok or (name in ("beta1", "beta2") and v == 1) or (name == "eps" and v == 0):
                raise ConfigError(f"train.{name}: must be a number {rule}, got {v!r}")
        if isinstance(t.wait_timeout, bool) or not isinstance(t.wait_timeout, (int, float)) \
                or not 0 < t.wait_timeout < math.inf:
            raise ConfigError(f"train.wait_timeout: must be a number of seconds > 0, got {t.wait_timeout!r}")
        for name in ("warmup_steps", "seed"):
            if isinstance(getattr(t, name), bool) or not isinstance(getattr(t, name), int) or getattr(t, name) < 0:
                raise ConfigError(f"train.{name}: must be an integer >= 0, got {getattr(t, name)!r}")
        if not isinstance(self.eval.prompts, list) or not all(isinstance(x, str) for x in self.eval.prompts):
            raise ConfigError(f"eval.prompts: must be a list of strings, got {self.eval.prompts!r}; "
                              "e.g. --eval.prompts '[\"The \", \"def \"]'")
        if isinstance(self.eval.sample_tokens, bool) or not isinstance(self.eval.sample_tokens, int) \
                or self.eval.sample_tokens < 0:
            raise ConfigError(f"eval.sample_tokens: must be an integer >= 0, got {self.eval.sample_tokens!r}")
        if not isinstance(d.config, dict):
            raise ConfigError(f"deepspeed.config: must be a mapping of raw DeepSpeed settings, got {d.config!r}; "
                              "e.g. --deepspeed.config '{zero_optimization: {overlap_comm: true}}'")
        if not isinstance(self.data.dir, (str, dict)):
            raise ConfigError(f"data.dir: must be a directory or a {{directory: weight}} mapping, got "
                              f"{self.data.dir!r}; e.g. --data.dir data/mine or --data.dir '{{data/a: 0.7, data/b: 0.3}}'")
        if d.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {d.zero_stage!r}")
        if not isinstance(d.ep_size, int) or d.ep_size <= 0:
            raise ConfigError(f"deepspeed.ep_size: must be a positive integer, got {d.ep_size!r}")
        if t.compile and t.activation_checkpointing and d.ep_size > 1:
            raise ConfigError("train.compile with train.activation_checkpointing and deepspeed.ep_size > 1 is not "
                              "supported (the all-to-all splits the compiled checkpoint); turn one of them off")
        if isinstance(self.data.dir, dict):
            from data_prep.errors import DataError
            from data_prep.mixture import normalized_weights

            try:
                normalized_weights(self.data.dir)
            except DataError as e:
                raise ConfigError(f"data.dir: {e}") from None
        if self.logging.wandb not in ("offline", "online", "disabled"):
            raise ConfigError(f"logging.wandb: unknown {self.logging.wandb!r}; allowed: offline, online, disabled")

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        if not isinstance(d, (dict, type(None))):
            raise ConfigError(f"a run config is a mapping of sections (model, {', '.join(SECTIONS)}), "
                              f"got a {type(d).__name__}; see configs/*.yaml for examples")
        d = dict(d or {})
        unknown = sorted(set(d) - {"model", *SECTIONS})
        if unknown:
            raise ConfigError(f"unknown section(s) {', '.join(unknown)}; allowed: model, {', '.join(SECTIONS)}")
        kwargs = {}
        if "model" in d:
            kwargs["model"] = d["model"]
        for name, section_cls in SECTIONS.items():
            values = d.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{name}: must be a mapping of fields, got {values!r}; "
                                  f"e.g. {name}: {{field: value}} in YAML, or --{name}.FIELD VALUE")
            known = {f.name for f in fields(section_cls)}
            bad = sorted(set(values) - known)
            if bad:
                raise ConfigError(f"{name}: unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
            kwargs[name] = section_cls(**coerce_numbers(section_cls, values, name))
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
        d = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"run config {path} does not exist; see configs/*.yaml for examples")
            try:
                d = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                where = getattr(e, "problem_mark", None)
                at = f" at line {where.line + 1}" if where is not None else ""
                raise ConfigError(f"run config {path} is not valid YAML{at} ({getattr(e, 'problem', None) or e}); "
                                  "fix the file") from None
            if not isinstance(d, dict):
                raise ConfigError(f"run config {path} holds a {type(d).__name__}, not a mapping of sections "
                                  f"(model, {', '.join(SECTIONS)}); see configs/*.yaml for examples")
        return cls.from_dict(apply_overrides(d, overrides or []))


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ['--train.lr', '3e-3', '--model.num_hidden_layers=2', ...] to a nested dict."""
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if arg == "--model" or arg.startswith("--model="):  # the whole model: a preset or a YAML
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(overrides):
                    raise ConfigError("override --model needs a value: a preset name or a model YAML, e.g. --model tiny")
                value = overrides[i + 1]
                i += 1
            i += 1
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = None
            d["model"] = parsed if isinstance(parsed, dict) else value  # {preset: tiny, ...} or a name/path
            continue
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --train.lr 3e-3")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(overrides):
                raise ConfigError(f"override {arg} needs a value, e.g. {arg} 3e-3")
            value = overrides[i + 1]
            i += 1
        i += 1
        section, _, name = key.partition(".")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override --{key}: {value!r} is not a valid YAML value "
                              f"({getattr(e, 'problem', None) or 'parse error'}); quote it or fix the brackets") from None
        if section == "model":
            model = d.get("model", "tiny")
            if not isinstance(model, dict):
                model = {"preset": model} if not str(model).endswith((".yaml", ".yml")) else dict(
                    ModelConfig.from_yaml(model).to_dict())
            model[name] = parsed
            d["model"] = model
        else:
            target = d.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"cannot override {key}: section {section!r} is not a mapping")
            target[name] = parsed
    return d
