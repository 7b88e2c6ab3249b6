"""Training checkpoints: DeepSpeed's sharded engine state + trainer state, written so that nothing is lost.

Layout of `OUT_DIR/checkpoints/`:
    step_0000200/                 one complete checkpoint
        step_0000200/ ...         DeepSpeed's files (model states, ZeRO optimizer shards per rank)
        experts_ep{r}.safetensors this EP rank's routed experts (only with expert parallelism)
        trainer_state.json        step, data position, RNG states, router biases, counters
        consolidated/             config.yaml + model.safetensors + tokenizer.json: loads without DeepSpeed
    latest                        text: the name of the newest complete checkpoint

Atomicity: every rank writes into `step_N.tmp/`; after a barrier rank 0 renames it to `step_N/` and then
replaces `latest` (write temp + os.replace). A crash at any point leaves `latest` naming the previous
complete checkpoint, and a stale `.tmp` is removed by the next save. Older checkpoints beyond
`keep` are deleted only after the new `latest` is in place.

Expert parallelism: each rank holds different experts under the same parameter names, which DeepSpeed's
model-state file (written by rank 0) cannot represent, so each EP rank also writes its own experts.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from data_prep.errors import first_line
from data_prep.pack import write_atomic
from smolds.model.experts import RoutedExperts
from smolds.model.router import routers
from smolds.train.config import TrainError
from smolds.train.parallel import barrier

STATE_FILE = "trainer_state.json"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed (named by `latest` but missing, or damaged); the message names the fix."""


def _why(e: BaseException) -> str:
    """A library exception in a few words: its type and the start of its first line."""
    line = first_line(e)
    line = line if len(line) <= 100 else line[:100].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {line}" if line != type(e).__name__ else line


def _fix(ckpt_root: Path, bad: Path | None = None) -> str:
    """How to go on: the newest other complete checkpoint (to name in `latest`), else a new out_dir."""
    done = sorted(p for p in Path(ckpt_root).glob("step_*")
                  if p.is_dir() and not p.name.endswith(".tmp") and p != bad and (p / STATE_FILE).is_file())
    if done:
        return (f"write the name of an intact one into {Path(ckpt_root) / 'latest'} (e.g. `echo {done[-1].name} > "
                f"{Path(ckpt_root) / 'latest'}`), or start over in another --train.out_dir")
    return "start over in another --train.out_dir"


def rng_state() -> dict:
    s = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        s["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return s


def set_rng_state(s: dict):
    def dec(v):
        import numpy as np

        return torch.from_numpy(np.frombuffer(base64.b64decode(v), dtype=np.uint8).copy())

    torch.set_rng_state(dec(s["torch"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(dec(s["cuda"]))


def router_biases(model) -> dict[str, list[float]]:
    return {name: m.e_score_correction_bias.tolist() for name, m in model.named_modules() if m in routers(model)}


def _expert_modules(model) -> list[tuple[str, RoutedExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedExperts)]


def local_expert_state(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{w}": getattr(m, w).detach().float().cpu().contiguous()
            for n, m in _expert_modules(model) for w in ("gate_proj", "up_proj", "down_proj")}


def full_state_dict(model, ep_group) -> dict[str, torch.Tensor]:
    """The whole model's state dict on every rank, with routed experts gathered across the EP group
    and, under ZeRO-3, every parameter gathered from its partitions (a collective: all ranks call it)."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]  # ZeRO-3 marks its parameters
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if ep_group is None:
        return state
    P = dist.get_world_size(ep_group)
    for key, local in local_expert_state(model).items():
        parts = [torch.empty_like(local) for _ in range(P)]
        dist.all_gather(parts, local, group=ep_group)
        state[key] = torch.cat(parts).to(state[key].dtype)
    return state


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    f = Path(ckpt_root) / "latest"
    if not f.is_file():
        return None
    name = f.read_text().strip()
    path = Path(ckpt_root) / name
    if not name or not (path / STATE_FILE).is_file():
        # `latest` is written only after its checkpoint is complete: a missing one was removed or damaged
        # by hand. Starting afresh would silently overwrite the run, so refuse.
        raise ResumeError(f"{f} names {name!r}, which is not a complete checkpoint (no {path / STATE_FILE}); "
                          + _fix(ckpt_root, path))
    return path


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def layout(world: int, zero_stage: int, ep_size: int) -> dict:
    """What DeepSpeed's checkpoint files depend on: ZeRO shards per data-parallel rank, experts per EP rank."""
    return {"ranks": world, "zero_stage": zero_stage, "ep_size": ep_size}


def check_layout(saved: dict | None, now: dict, path: Path):
    """Resuming needs the checkpoint's layout (ZeRO-0 tolerates another rank count). Every rank reads the
    same file, so all raise together."""
    if not saved or saved == now:
        return
    if saved["zero_stage"] == now["zero_stage"] == 0 and saved["ep_size"] == now["ep_size"]:
        return  # ZeRO-0 keeps the whole optimizer state in one file
    shape = lambda d: f"{d['ranks']} rank(s), ZeRO-{d['zero_stage']}, ep_size {d['ep_size']}"
    raise TrainError(f"checkpoint {path} was written by {shape(saved)} but this run has {shape(now)}; resume with "
                     f"the same layout, or start a new run from its weights with --train.init_from {path} "
                     "(optimizer state and data position start over)")


def save(engine, ckpt_root: Path, step: int, trainer_state: dict, *, is_main: bool, keep: int = 2, export=None):
    """Save every rank's share of `engine` (smolds.train.engine.Engine); `export(state_dict, out_dir)` writes
    the consolidated copy on rank 0."""
    model, ep_group = engine.model, engine.ep_group
    ckpt_root = Path(ckpt_root)
    tag = step_name(step)
    tmp = ckpt_root / f"{tag}.tmp"
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ckpt_root / tag, ignore_errors=True)
    barrier()
    engine.save_files(tmp, tag, step)
    if ep_group is not None:
        ep_rank = dist.get_rank(ep_group)
        if dist.get_rank() < dist.get_world_size(ep_group):  # the first EP group holds every expert once
            save_file(local_expert_state(model), str(tmp / f"experts_ep{ep_rank}.safetensors"))
    state = full_state_dict(model, ep_group) if export is not None else None
    if is_main:
        if export is not None:
            export(state, tmp / "consolidated")
        trainer_state = {**trainer_state, "step": step, "rng": rng_state(), "router_biases": router_biases(model)}
        write_atomic(tmp / STATE_FILE, json.dumps(trainer_state, indent=1).encode())
    barrier()
    if is_main:
        os.replace(tmp, ckpt_root / tag)
        write_atomic(ckpt_root / "latest", tag.encode())
        done = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return ckpt_root / tag


def read_trainer_state(path: Path) -> dict:
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ResumeError(f"{Path(path) / STATE_FILE} cannot be read ({first_line(e)}); the checkpoint is damaged: "
                          + _fix(Path(path).parent, Path(path))) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "rng" not in state:
        raise ResumeError(f"{Path(path) / STATE_FILE} lacks the step or RNG state; the checkpoint is damaged: "
                          + _fix(Path(path).parent, Path(path)))
    return state


def load(engine, path: Path) -> dict:
    """Restore `engine` (weights, optimizer shards) and return the trainer state; biases and RNG restored."""
    path = Path(path)
    model, ep_group = engine.model, engine.ep_group
    tag = path.name
    state = read_trainer_state(path)  # first: a damaged one is refused before DeepSpeed reads anything
    try:
        found = engine.load_files(path, tag)
    except Exception as e:  # a truncated or missing file surfaces as assorted torch/DeepSpeed errors
        raise ResumeError(f"checkpoint {path} cannot be loaded ({_why(e)}); it is damaged or not this model's: "
                          + _fix(path.parent, path)) from None
    if not found:
        raise ResumeError(f"DeepSpeed could not load the checkpoint in {path}; it may be incomplete or from "
                          "another run: " + _fix(path.parent, path))
    if ep_group is not None:
        ep_rank = dist.get_rank(ep_group)
        try:
            shard = load_file(str(path / f"experts_ep{ep_rank}.safetensors"))
        except Exception as e:  # missing (OSError) or truncated (SafetensorError)
            raise ResumeError(f"checkpoint {path}: experts_ep{ep_rank}.safetensors cannot be read "
                              f"({_why(e)}); it is damaged: " + _fix(path.parent, path)) from None
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in shard.items():
                params[key].copy_(value)
    named = dict(model.named_modules())
    with torch.no_grad():
        for name, values in state.get("router_biases", {}).items():
            named[name].e_score_correction_bias.copy_(torch.tensor(values))
    set_rng_state(state["rng"])
    return state
