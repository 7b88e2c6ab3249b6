"""A pretrained model directory: the consolidated checkpoint that generation, evaluation and export read.

(The trainer's resumable state, with optimizer shards and the data position, is another thing:
smolds/train/checkpoint.py. Every training checkpoint holds one of these in its `consolidated/`.)

Layout (written by `save_pretrained`, read by `load_pretrained`):

    config.yaml             ModelConfig.to_yaml (the whole model is rebuilt from it)
    model.safetensors       the model's state_dict under its own names (`embed_tokens.weight`,
                            `layers.3.mlp.gate.e_score_correction_bias`, ...); a tied lm_head is not stored
    tokenizer.json          a Hugging Face `tokenizers` tokenizer (optional)
    tokenizer_config.json   what the tokenizer file cannot say: eos/bos tokens, the chat template (optional)
    extra.json              whatever the writer passed as `extra` (training step, tokens seen, ...; optional)

Weights are safetensors only: nothing here ever unpickles. Writes are atomic: the directory is assembled
under a temporary name beside the target and renamed into place, so a crash leaves either the old
directory or the new one under the final name, never half of one.

`load_pretrained` also accepts what the trainer leaves behind: a step directory with a `consolidated/` (or
`export/`) subfolder, or a run directory whose `checkpoints/latest` file names the last step directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from data_prep.errors import first_line
from smolds.config import ConfigError, ModelConfig
from smolds.model.transformer import Transformer
from smolds.tokenizer import TOKENIZER_FILE, CheckpointError, TextTokenizer

CONFIG_FILE, WEIGHTS_FILE, EXTRA_FILE = "config.yaml", "model.safetensors", "extra.json"



# -------------------------------------------------------------------------------------------------- saving
def unwrap(model: nn.Module) -> Transformer:
    """The Transformer inside a DDP/DeepSpeed (`.module`) or torch.compile (`._orig_mod`) wrapper."""
    while not isinstance(model, Transformer):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a smolds Transformer (or a wrapper of one), got {type(model).__name__}")
        model = inner
    return model


def save_pretrained(model: nn.Module, out_dir: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write `model` (and `tokenizer`: None, a path, a `tokenizers.Tokenizer` or a TextTokenizer) to out_dir,
    atomically. Tensors are saved in the dtype they have; returns the final directory."""
    from safetensors.torch import save_file

    model = unwrap(model)
    tok = TextTokenizer.coerce(tokenizer)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.config.to_yaml(tmp / CONFIG_FILE)
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "producer": "smolds"})
        if tok is not None:
            tok.save(tmp)
        if extra is not None:
            (tmp / EXTRA_FILE).write_text(json.dumps(extra, indent=2, default=str) + "\n")
    return out_dir


@contextlib.contextmanager
def atomic_dir(out_dir: Path):
    """Yield a temp dir beside out_dir; on success fsync it and swap it in, on any error remove it."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _finish_dir(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish_dir(path: Path) -> None:
    """fsync every file, and give the directory the permissions a plain mkdir would have (mkdtemp's are 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        f.chmod(0o666 & ~umask)
    path.chmod(0o777 & ~umask)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst is moved aside first and removed only after the rename."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- loading
def resolve_checkpoint(path: str | Path) -> Path:
    """The consolidated directory that `path` designates (see the module docstring for what is accepted)."""
    start = p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {start} does not exist; check the path (a model directory, a training "
                              "checkpoint or a run directory)")
    if p.is_file():
        if p.name not in (CONFIG_FILE, WEIGHTS_FILE):
            raise CheckpointError(f"checkpoint {start} is a file; pass the directory that holds {CONFIG_FILE}")
        p = p.parent
    for _ in range(8):  # run dir -> checkpoints/latest -> step dir -> consolidated/
        if (p / CONFIG_FILE).is_file():
            if not (p / WEIGHTS_FILE).is_file():
                raise CheckpointError(f"checkpoint {p} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
            return p
        nxt = next((p / s for s in ("consolidated", "export") if (p / s).is_dir()), None)
        if nxt is None:
            latest = next((f for f in (p / "latest", p / "checkpoints" / "latest") if f.is_file()), None)
            if latest is not None:
                name = latest.read_text().strip()
                nxt = latest.parent / name
                if not name or not nxt.is_dir():
                    raise CheckpointError(f"{latest} names {name!r}, which is not a directory beside it")
        if nxt is None:
            what = f"no {CONFIG_FILE}" if (p / WEIGHTS_FILE).is_file() else f"no {CONFIG_FILE} / {WEIGHTS_FILE}"
            raise CheckpointError(
                f"checkpoint {start}: {what} in {p} (expected a consolidated checkpoint, a step directory with "
                f"consolidated/ or export/, or a run directory with checkpoints/latest)")
        p = nxt
    raise CheckpointError(f"checkpoint {start}: too many levels of consolidated/latest indirection")


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """-> (model in eval mode, TextTokenizer or None). dtype None keeps the saved dtype of the weights."""
    from safetensors import safe_open

    root = resolve_checkpoint(path)
    try:
        cfg = ModelConfig.from_yaml(root / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {root}: bad {CONFIG_FILE}: {e}") from None
    try:
        with safe_open(str(root / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError: truncated, or not a safetensors file
        raise CheckpointError(f"checkpoint {root}: {WEIGHTS_FILE} cannot be read ({first_line(e)}); "
                              "it may be truncated: copy or export it again") from None
    saved_dtype = next((v.dtype for k, v in state.items() if v.is_floating_point() and "e_score" not in k), None)
    with torch.device(device):
        model = Transformer(cfg)
    if dtype is None and saved_dtype is not None:
        dtype = saved_dtype
    if dtype is not None:
        model.to(dtype)  # routers keep their fp32 bias buffers
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise CheckpointError(f"checkpoint {root}: {WEIGHTS_FILE} does not match {CONFIG_FILE}: "
                              f"{str(e).strip().splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {root}: {WEIGHTS_FILE} does not match {CONFIG_FILE}: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.eval()
    tokenizer = TextTokenizer.load(root) if (root / TOKENIZER_FILE).is_file() else None
    return model, tokenizer


def read_extra(path: str | Path) -> dict:
    """The `extra` dict a checkpoint was saved with ({} if none)."""
    f = resolve_checkpoint(path) / EXTRA_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
