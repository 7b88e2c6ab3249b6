"""The tokenizer of a model directory: a Hugging Face `tokenizers` tokenizer plus its roles and chat template.

Files (beside a model's weights, or in a prepared data dir):
    tokenizer.json          the `tokenizers` tokenizer
    tokenizer_config.json   what tokenizer.json cannot say: eos/bos tokens, the chat template (optional)
    chat_template.jinja     the template in its own file, as transformers >= 4.50 writes it (optional)
A lone tokenizer.json (the one `smolds prep` trains) gets this project's roles: `<|endoftext|>` ends a
document and a generation, and ChatML (`<|im_start|>`, `<|im_end|>`) is the chat format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"


class CheckpointError(FileNotFoundError):
    """A model directory (smolds/pretrained.py) or its tokenizer is missing or incomplete; the message says
    which path and what was expected."""

# SmolLM2-Instruct's template without its default system prompt; used when a tokenizer has the ChatML
# tokens but no template of its own (this project's trained tokenizers reserve ids 0-2 for them).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


class TextTokenizer:
    """A `tokenizers.Tokenizer` together with what `tokenizer_config.json` knows about it.

    The Rust tokenizer cannot carry the special-token roles or the chat template, and cannot be subclassed,
    so this holds both: `tokenizer` (the backend) and `config` (the tokenizer_config.json dict).
    """

    def __init__(self, tokenizer, config: dict | None = None):
        self.tokenizer = tokenizer
        self.config = dict(config or {})

    # ------------------------------------------------------------ construct
    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """A directory holding tokenizer.json (+ tokenizer_config.json, chat_template.jinja) or a tokenizer.json."""
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"no tokenizer at {path}: expected {TOKENIZER_FILE}")
        tokenizer = Tokenizer.from_file(str(file))
        cfg_file = file.parent / TOKENIZER_CONFIG_FILE
        # a lone tokenizer.json (a prepared data dir's) gets this project's roles: eos <|endoftext|>, ChatML
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else default_tokenizer_config(tokenizer)
        jinja = file.parent / "chat_template.jinja"  # transformers >= 4.50 keeps the template in its own file
        if "chat_template" not in config and jinja.is_file():
            config["chat_template"] = jinja.read_text()
        return cls(tokenizer, config)

    @classmethod
    def coerce(cls, obj) -> TextTokenizer | None:
        """None, a TextTokenizer, a `tokenizers.Tokenizer`, or a path (directory or tokenizer.json)."""
        if obj is None or isinstance(obj, TextTokenizer):
            return obj
        if isinstance(obj, (str, os.PathLike)):
            return cls.load(obj)
        if hasattr(obj, "encode") and hasattr(obj, "token_to_id"):  # a tokenizers.Tokenizer
            return cls(obj, default_tokenizer_config(obj))
        raise TypeError(f"tokenizer must be None, a path, a tokenizers.Tokenizer or a TextTokenizer, got {type(obj)}")

    def save(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        self.tokenizer.save(str(out_dir / TOKENIZER_FILE))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of text; special tokens written in the text (`<|im_start|>`) become their ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # --------------------------------------------------------- special roles
    def _special(self, role: str) -> str | None:
        v = self.config.get(role)
        return v.get("content") if isinstance(v, dict) else v

    @property
    def eos_token(self) -> str | None:
        return self._special("eos_token")

    @property
    def bos_token(self) -> str | None:
        return self._special("bos_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end a generation: the configured eos token and `<|endoftext|>` (this project's EOS, id 0)."""
        ids = [self.token_id(t) for t in (self.eos_token, ENDOFTEXT)]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # ---------------------------------------------------------- chat template
    @property
    def chat_template(self) -> str | None:
        t = self.config.get("chat_template")
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            t = next((x["template"] for x in t if x.get("name") == "default"), None)
        if t is None and self.token_id(IM_START) is not None and self.token_id(IM_END) is not None:
            t = CHATML_TEMPLATE
        return t

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages [{"role", "content"}] with the chat template (jinja2, as transformers renders it)."""
        template = self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template and no <|im_start|>/<|im_end|> tokens for ChatML")
        return _compile_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def default_tokenizer_config(tokenizer) -> dict:
    """tokenizer_config.json for a bare tokenizer of this project (EOS `<|endoftext|>`, ChatML tokens)."""
    config = {}
    if tokenizer.token_to_id(ENDOFTEXT) is not None:
        config.update(bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT)
    if tokenizer.token_to_id(IM_START) is not None and tokenizer.token_to_id(IM_END) is not None:
        config["chat_template"] = CHATML_TEMPLATE
    return config


_TEMPLATES: dict[str, object] = {}


def _compile_template(template: str):
    """A sandboxed jinja2 template with the helpers Hugging Face chat templates expect."""
    if template not in _TEMPLATES:
        from datetime import datetime

        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[template] = env.from_string(template)
    return _TEMPLATES[template]
