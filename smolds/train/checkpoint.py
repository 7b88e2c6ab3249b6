"""Training checkpoints: the whole training state as whole tensors, so any cluster shape resumes any other.

Layout of `OUT_DIR/checkpoints/`:
    step_0000200/                          one complete checkpoint
        consolidated/                      config.yaml + model.safetensors + tokenizer.json (smolds/pretrained.py):
                                           the fp32 master weights, whole (every EP rank's experts) under the
                                           model's own names, router biases included; loads without DeepSpeed
        optimizer-00000-of-00002.safetensors   Adam's moments, whole fp32 tensors named `<parameter>.exp_avg`
        optimizer-00001-of-00002.safetensors   and `<parameter>.exp_avg_sq`; rank r of the writing run wrote shard r
        trainer_state.json                 step, Adam's step count, the shard names, data position, each rank's
                                           RNG state, tokens seen, counters, the shape that wrote it
    latest                                 text: the name of the newest complete checkpoint

Shape-independent: every tensor is stored whole, as one process holding the whole model would hold it, so
the files do not depend on the rank count, the ZeRO stage or ep_size. Saving assembles each parameter
(ZeRO partitions through DeepSpeed's per-parameter accessors, smolds/train/engine.py; routed experts by an
all-gather over the EP group); loading sets each rank's part (its ZeRO partition, the rows of its experts).
So `--resume` continues at any (ranks, ZeRO 0-3, ep_size) a checkpoint of any other, and there is nothing to
convert offline (`smolds ckpt info CKPT` prints what one holds). What cannot carry over to another rank
count is named in one line at startup (`carry_note`): the RNG streams of the ranks.

Who writes what: rank 0 writes `consolidated/` (it holds the whole model for it anyway) and the trainer
state; the moments are split over the ranks by size (`shard_owners`: largest tensor first to the rank with
the fewest bytes, ties by name), so each rank writes about 1/world of them. Loading opens every shard's
header and reads only the tensors, and of expert tensors only the rows, its rank needs.

No pickles: everything here is safetensors or JSON. DeepSpeed's own checkpoint files (torch.save pickles,
which it loads with weights_only=False, so a planted one runs code) are neither written nor read; a
checkpoint of the older format that had them is refused in one line naming --train.init_from.

Atomicity: every rank writes into `step_N.tmp/`; after a barrier rank 0 renames it to `step_N/` and then
replaces `latest` (write temp + os.replace). A crash at any point leaves `latest` naming the previous
complete checkpoint, and a stale `.tmp` is removed by the next save. Older checkpoints beyond
`keep` are deleted only after the new `latest` is in place.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data_prep.errors import first_line
from data_prep.pack import write_atomic
from smolds.model.transformer import Transformer
from smolds.pretrained import WEIGHTS_FILE, save_pretrained
from smolds.train.engine import MOMENTS
from smolds.train.parallel import barrier

STATE_FILE = "trainer_state.json"
FORMAT = 2  # 1 (no "format" key): DeepSpeed's pickled files + experts_ep{r}.safetensors


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


# --------------------------------------------------------------------------------------------- the ranks
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `t` (same shape everywhere), on the device `t` is on (NCCL gathers CUDA tensors only)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _is_expert(p) -> bool:
    return getattr(p, "allreduce", True) is False  # DeepSpeed's expert-parameter mark (smolds/train/engine.py)


def rng_state() -> torch.Tensor:
    """This process's RNG states (CPU, and CUDA when present) as one uint8 tensor."""
    states = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])
    return torch.cat(states)


def set_rng_state(s: dict):
    def dec(v):
        import numpy as np

        return torch.from_numpy(np.frombuffer(base64.b64decode(v), dtype=np.uint8).copy())

    torch.set_rng_state(dec(s["torch"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(dec(s["cuda"]))


def _rng_states(device) -> list[dict]:
    """Every rank's RNG states, base64 (a collective)."""
    mine = rng_state()
    parts = [p.cpu() for p in _all_gather(mine.to(device))] if _rank_world()[1] > 1 else [mine]
    n_cpu = torch.get_rng_state().numel()
    enc = lambda t: base64.b64encode(t.numpy().tobytes()).decode()
    return [{"torch": enc(p[:n_cpu]), **({"cuda": enc(p[n_cpu:])} if p.numel() > n_cpu else {})} for p in parts]


# ------------------------------------------------------------------------------------------------ naming
def step_name(step: int) -> str:
    return f"step_{step:07d}"


def shard_name(rank: int, world: int) -> str:
    return f"optimizer-{rank:05d}-of-{world:05d}.safetensors"


def layout(world: int, zero_stage: int, ep_size: int) -> dict:
    """The cluster shape a checkpoint was written at (for the startup line; it does not bind the resume)."""
    return {"ranks": world, "zero_stage": zero_stage, "ep_size": ep_size}


def shard_owners(numels: dict[str, int], world: int) -> dict[str, int]:
    """Which rank writes each parameter's moments: largest first to the least-loaded rank, ties by name."""
    load, owner = [0] * world, {}
    for name in sorted(numels, key=lambda n: (-numels[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += numels[name]
    return owner


def whole_shapes(config) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The whole model's (every EP rank's experts, no ZeRO partitions) parameter shapes and persistent
    buffer (router bias) shapes by name, for a ModelConfig: built on the meta device, no memory."""
    with torch.device("meta"):
        whole = Transformer(config)
    params = {n: list(p.shape) for n, p in whole.named_parameters()}
    return params, {k: list(v.shape) for k, v in whole.state_dict().items() if k not in params}


# -------------------------------------------------------------------------------------------------- save
def gather_state(engine) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """The whole fp32 weights and router biases (on rank 0; None elsewhere) and this rank's share of the
    whole Adam moments (`shard_owners`). A collective: every rank calls it."""
    model, ep_group = engine.model, engine.ep_group
    rank, world = _rank_world()
    shapes, buffers = whole_shapes(model.config)
    owners = shard_owners({n: torch.Size(s).numel() for n, s in shapes.items()}, world)
    engine.ensure_optimizer_state()
    weights, moments = ({} if rank == 0 else None), {}
    for name, p in model.named_parameters():
        full = engine.fp32_state(p)  # collective at ZeRO 1-3
        if ep_group is not None and _is_expert(p):  # [L, ...] each -> [E, ...], EP rank order = expert order
            full = {k: torch.cat(_all_gather(v, ep_group)) for k, v in full.items()}
        if weights is not None:
            weights[name] = full["fp32"].detach().float().cpu().reshape(shapes[name])
        if owners[name] == rank:
            moments.update({f"{name}.{k}": full[k].detach().float().cpu().reshape(shapes[name]) for k in MOMENTS})
    if weights is not None:
        state = model.state_dict()
        weights.update({k: state[k].detach().float().cpu() for k in buffers})
    return weights, moments


def save(engine, ckpt_root: Path, step: int, trainer_state: dict, *, is_main: bool, keep: int = 2,
         tokenizer=None, extra: dict | None = None):
    """Save `engine` (smolds.train.engine.Engine) and `trainer_state` as checkpoint `step` (every rank calls
    it); `tokenizer` and `extra` go into `consolidated/` (smolds.pretrained.save_pretrained)."""
    model = engine.model
    ckpt_root = Path(ckpt_root)
    tag = step_name(step)
    tmp = ckpt_root / f"{tag}.tmp"
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ckpt_root / tag, ignore_errors=True)
        tmp.mkdir()
    barrier()
    weights, moments = gather_state(engine)
    rank, world = _rank_world()
    save_file(moments, str(tmp / shard_name(rank, world)), metadata={"format": "pt", "producer": "smolds"})
    rng = _rng_states(engine.device)
    if is_main:
        whole = Transformer(model.config)
        whole.load_state_dict(weights, strict=True)
        save_pretrained(whole, tmp / "consolidated", tokenizer=tokenizer, extra=extra)
        trainer_state = {**trainer_state, "format": FORMAT, "step": step, "rng": rng,
                         "optimizer": {"step": engine.optimizer_step(),
                                       "shards": [shard_name(r, world) for r in range(world)]}}
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


# -------------------------------------------------------------------------------------------------- load
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


def read_trainer_state(path: Path) -> dict:
    """The trainer state of checkpoint `path`, refused in one line when damaged or of the older format (whose
    DeepSpeed files are pickles: they are never handed to a loader)."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ResumeError(f"{path / STATE_FILE} cannot be read ({first_line(e)}); the checkpoint is damaged: "
                          + _fix(path.parent, path)) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "rng" not in state:
        raise ResumeError(f"{path / STATE_FILE} lacks the step or RNG state; the checkpoint is damaged: "
                          + _fix(path.parent, path))
    if state.get("format") != FORMAT:
        raise ResumeError(f"checkpoint {path} is of an older smolds format (DeepSpeed's pickled files, which are "
                          "not loaded: a pickle can run code); start a new run from its weights with "
                          f"--train.init_from {path} (the optimizer state and data position start over)")
    opt = state.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("step"), int) or not isinstance(opt.get("shards"), list):
        raise ResumeError(f"{path / STATE_FILE} lacks the optimizer's step or shards; the checkpoint is damaged: "
                          + _fix(path.parent, path))
    return state


class _Files:
    """The checkpoint's tensors by name across its files, headers read, nothing loaded yet."""

    def __init__(self, path: Path, state: dict):
        self.handles, self.where = [], {}
        for name in [f"consolidated/{WEIGHTS_FILE}", *state["optimizer"]["shards"]]:
            h = safe_open(str(path / name), framework="pt")
            self.handles.append(h)
            self.where.update({k: h for k in h.keys()})

    def shape(self, key: str) -> list[int] | None:
        h = self.where.get(key)
        return None if h is None else h.get_slice(key).get_shape()

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor `key`, or only `rows` of its first dimension (an EP rank's experts)."""
        h = self.where[key]
        return h.get_tensor(key) if rows is None else h.get_slice(key)[rows]


def open_files(path: Path, state: dict, config) -> _Files:
    """Every file's header, checked against the model (a ModelConfig) before any tensor is read (all ranks
    read the same files, so all refuse together and none waits in a collective)."""
    try:
        files = _Files(path, state)
    except (OSError, SafetensorError) as e:  # missing, truncated or not safetensors
        raise ResumeError(f"checkpoint {path} cannot be loaded ({_why(e)}); it is damaged or not this model's: "
                          + _fix(path.parent, path)) from None
    params, buffers = whole_shapes(config)
    wanted = {**params, **buffers, **{f"{n}.{k}": s for n, s in params.items() for k in MOMENTS}}
    wrong = [k for k, s in wanted.items() if files.shape(k) != s]
    if wrong:
        got = files.shape(wrong[0])
        raise ResumeError(f"checkpoint {path} does not fit this model ({wrong[0]}: "
                          f"{'missing' if got is None else f'shape {got}, expected {wanted[wrong[0]]}'}"
                          f"{f' and {len(wrong) - 1} more' if len(wrong) > 1 else ''}); it is damaged or another "
                          "model's: " + _fix(path.parent, path))
    return files


def load(engine, path: Path) -> dict:
    """Restore `engine` at its own shape from checkpoint `path` (of any shape): weights, Adam's moments and
    step, router biases, this rank's RNG; returns the trainer state."""
    path = Path(path)
    model, ep_group = engine.model, engine.ep_group
    state = read_trainer_state(path)  # first: a damaged or old one is refused before anything is read
    files = open_files(path, state, model.config)
    engine.ensure_optimizer_state()
    for name, p in model.named_parameters():
        rows = None
        if ep_group is not None and _is_expert(p):  # EP rank q holds experts [q*L, (q+1)*L)
            L = p.shape[0]
            rows = slice(dist.get_rank(ep_group) * L, (dist.get_rank(ep_group) + 1) * L)
        engine.set_fp32_state(p, {"fp32": files.read(name, rows), **{k: files.read(f"{name}.{k}", rows) for k in MOMENTS}})
    engine.set_optimizer_step(state["optimizer"]["step"])
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name in whole_shapes(model.config)[1]:  # router biases, the same on every rank
            buffers[name].copy_(files.read(name))
    rank, world = _rank_world()
    rngs = state["rng"]
    set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    return state


def carry_note(saved: dict | None, now: dict) -> str | None:
    """One line for a resume at another shape, naming what does not carry over exactly (None: same shape)."""
    if not saved or saved == now:
        return None
    shape = lambda d: f"{d['ranks']} rank(s), ZeRO-{d['zero_stage']}, ep_size {d['ep_size']}"
    rng = ("each rank continues its own RNG stream" if saved["ranks"] == now["ranks"] else
           f"the RNG streams of {saved['ranks']} rank(s) do not map onto {now['ranks']}: every rank continues "
           "from rank 0's")
    return (f"resumed at another shape ({shape(saved)} -> {shape(now)}): weights, Adam's moments and step, "
            f"experts, router biases, data position and LR schedule carry over exactly; {rng}")
