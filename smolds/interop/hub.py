"""The Hugging Face Hub: fetch a model directory by repo id, push an exported directory, and the model card.

Everything here goes through `huggingface_hub` (its cache, token, offline mode and retries), so the usual
environment applies: `HF_TOKEN` (or `huggingface-cli login`) for private repos and pushes, `HF_HUB_CACHE`
for where downloads live, `HF_HUB_OFFLINE=1` to use only what is already cached, `HF_ENDPOINT` for a mirror.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.errors import first_line

# What a causal LM directory needs; skips other formats' weights (pytorch_model.bin, onnx/, gguf).
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


class HubError(ValueError):
    """The Hub cannot give or take a model (offline, not logged in, no such repo); the message names the fix."""


def looks_like_repo_id(spec: str) -> bool:
    """org/name (one slash, no path-like start): what the Hub calls a repo id."""
    return spec.count("/") == 1 and not spec.startswith(("/", ".", "~")) and all(spec.split("/"))


def resolve_model_dir(spec: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; a repo id downloaded (or found in the cache) with `snapshot_download`."""
    path = Path(spec)
    if path.is_dir():
        return path
    spec = str(spec)
    if not looks_like_repo_id(spec):
        raise HubError(f"{spec} is not a directory and not a Hub repo id (org/name); check the path")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, revision=revision, allow_patterns=MODEL_FILES))
    except Exception as e:  # offline, unknown repo, gated, bad revision: one line, with the way out
        raise HubError(f"could not get {spec}{'@' + revision if revision else ''} from the Hugging Face Hub "
                           f"({type(e).__name__}: {first_line(e)}); download it where the Hub is reachable "
                           "and pass the directory (or set HF_TOKEN for a gated or private repo)") from None


def push_folder(folder: str | Path, repo_id: str, private: bool = False, message: str | None = None) -> str:
    """Create the model repo if needed and upload the folder as one commit; returns the repo URL."""
    if not looks_like_repo_id(repo_id):
        raise HubError(f"--push-to-hub {repo_id!r}: expected a repo id like your-name/model-name")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=message or f"Upload {Path(folder).name} with smolds")
    except Exception as e:
        raise HubError(f"could not push {folder} to {repo_id} on the Hugging Face Hub "
                           f"({type(e).__name__}: {first_line(e)}); log in with `huggingface-cli login` or set "
                           "HF_TOKEN, and check the network (the export itself is written)") from None
    return str(url)


def model_card(model, arch: str, extra: dict | None = None) -> str:
    """README.md for an exported directory: what the model is, its size, and how to load it."""
    cfg = model.config
    total, active = model.num_parameters(), model.num_parameters(active=True)
    kinds = sorted({f"{a} attention" for a, _ in cfg.layer_kinds()} | {f"{f} FFN" for _, f in cfg.layer_kinds()})
    moe = (f"- DeepSeekMoE: {cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}) + "
           f"{cfg.n_shared_experts} shared, sigmoid gating, balancing `{cfg.balance_mode}`\n"
           if cfg.moe_layers else "")
    trained = "".join(f"- {k}: {v}\n" for k, v in (extra or {}).items())
    auto = "AutoModelForCausalLM"
    return f"""---
library_name: transformers
tags: [smolds, {arch.replace('_', '-')}, text-generation]
---
# {arch} model exported by smolds

- {total:,} parameters ({active:,} active per token), {cfg.num_hidden_layers} layers, hidden size
  {cfg.hidden_size}, vocabulary {cfg.vocab_size}, context {cfg.max_position_embeddings}
- layers: {", ".join(kinds)}
{moe}{trained}
```python
from transformers import {auto}, AutoTokenizer
model = {auto}.from_pretrained("THIS_DIR_OR_REPO")
tokenizer = AutoTokenizer.from_pretrained("THIS_DIR_OR_REPO")
```

Back to smolds: `smolds import-hf THIS_DIR_OR_REPO OUT` (bit-equal weights).
"""
