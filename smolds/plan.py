"""Capacity planning: will a run fit, how fast will it go, how long will it take, before a GPU hour is spent.

    smolds plan --config configs/smollm2-deepseek-135m.yaml --gpus 64 [--gpu h100] [--tokens 1e12] [--json]

Pure arithmetic from the model config and the run config (the model is built on the `meta` device only to
count its parameters and to read its decode caches). For one rank it gives the memory (weights, gradients,
optimizer state by ZeRO stage, activations with and without activation checkpointing, DeepSpeed's buffers,
the peak), FLOPs per token (`Transformer.flops_per_token`), the step time and MFU from a stated efficiency,
the expert-parallel all-to-all and the gradient traffic of a step, the checkpoint bytes each rank writes,
and the wall time and GPU-hours of a token budget. A config that does not fit is flagged with the change
that makes it fit. `tests/test_plan.py` holds the estimates to real CPU runs of the trainer (the state
DeepSpeed holds, the tensors autograd saves, the allocator's peak, the checkpoint files on disk, the
all-to-all bytes); `docs/scaling.md` has the plans at 8-512 GPUs.

Memory model, per rank (Psi_d: parameters outside the routed experts; Psi_e: routed-expert parameters;
N ranks; P = ep_size; w = 2 bytes in bf16, 4 in fp32). As DeepSpeed 0.19 keeps them (measured):
  - weights w * (Psi_d + Psi_e/P): every rank holds the dense part and its P-th of the experts;
  - optimizer: fp32 master copy + Adam's two moments, 12 bytes a parameter (ZeRO paper's K = 12). ZeRO-1/2
    partition them: dense ones over the N data-parallel ranks, expert ones over the N/P ranks of the
    expert-data-parallel group, so a rank holds 12 * (Psi_d + Psi_e) / N. ZeRO-0 in fp32 keeps no master
    copy (8 bytes a parameter, unpartitioned);
  - gradients in the model dtype: ZeRO-0 and ZeRO-1 the whole local model while micro-batches accumulate,
    ZeRO-1 then its partition (with expert parallelism one rank keeps the whole dense gradients); ZeRO-2
    only its partition, reduced after every micro-batch into a partition buffer made anew each backward;
  - buffers: ZeRO-1/2's gradient bucket (`reduce_bucket_size` elements, 5e8 by default, whatever the model
    size), ZeRO-0's flattened all-reduce copy (up to 5e8 elements), the fp32 gradient copies of the step;
  - activations: the tensors autograd saves, counted op by op from this project's layers (`activations`),
    the per-layer form of Korthikanti et al. 2022's sbh(34 + 5as/h) for Megatron's GPT; with activation
    checkpointing each block keeps its input and one block is recomputed at a time.
The peak is the largest of: the end of a forward (activations + the fused loss's chunk buffers), the start
of a backward (+ the gradient bucket), the end of a backward (ZeRO-0's flattened all-reduce) and the
optimizer step (+ its fp32 gradient copies). Checkpoints hold every tensor whole whatever the layout
(smolds/train/checkpoint.py): the fp32 model from rank 0, Adam's moments spread over the ranks.

References: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"
(2 + 2 + 12 bytes a parameter, stages 1-3); DeepSpeed's `estimate_zero2_model_states_mem_needs`;
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (activation memory);
Chowdhery et al. 2022 (PaLM), appendix B (model FLOPs utilization).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from smolds.config import ConfigError, ModelConfig
from smolds.train.config import RunConfig

GIB = 2**30
DEFAULT_REDUCE_BUCKET = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size (elements)
ALLREDUCE_FLATTEN = 500_000_000  # DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE: ZeRO-0 flattens grads in buckets this big
HEADROOM = 0.10  # of HBM kept free: CUDA context, NCCL buffers, cuBLAS workspace, allocator fragmentation
COMM_EFFICIENCY = 0.7  # collectives reach this fraction of the nominal link bandwidth
TOKENIZER_BYTES_PER_ENTRY = 66  # tokenizer.json size per vocabulary entry when the data dir is not at hand


# ---------------------------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Hardware:
    """One GPU kind; bandwidths are nominal, per GPU and per direction."""

    name: str
    memory_gib: float  # HBM as the driver reports it
    tflops: float  # dense bf16 peak
    nvlink_gbs: float  # inside a node
    network_gbs: float  # between nodes (one NIC per GPU)
    gpus_per_node: int = 8
    write_gbs: float = 2.0  # checkpoint writes, per node, to a shared file system


HARDWARE = {
    # SXM parts in 8-GPU nodes (DGX/HGX); NVLink 4 at 900 GB/s both ways, NDR InfiniBand 400 Gb/s per GPU
    "h100": Hardware("H100 SXM 80GB", 79.6, 989.0, 450.0, 50.0),
    "h200": Hardware("H200 SXM 141GB", 140.4, 989.0, 450.0, 50.0),
    # NVLink 3 at 600 GB/s both ways, HDR InfiniBand 200 Gb/s per GPU
    "a100": Hardware("A100 SXM 80GB", 80.0, 312.0, 300.0, 25.0),
}
CUSTOM_KEYS = {"memory_gib": float, "tflops": float, "nvlink_gbs": float, "network_gbs": float,
               "gpus_per_node": int, "write_gbs": float}


def hardware(spec: str) -> Hardware:
    """A preset name (h100, h200, a100) or `memory_gib=80,tflops=989,nvlink_gbs=450,network_gbs=50`
    (gpus_per_node=8 and write_gbs=2 optional)."""
    if spec.lower() in HARDWARE:
        return HARDWARE[spec.lower()]
    if "=" not in spec:
        raise ConfigError(f"--gpu {spec!r}: unknown GPU; use one of {', '.join(HARDWARE)} or a custom spec "
                          "like memory_gib=80,tflops=989,nvlink_gbs=450,network_gbs=50")
    values = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in CUSTOM_KEYS:
            raise ConfigError(f"--gpu: unknown key {key!r}; keys: {', '.join(CUSTOM_KEYS)}")
        try:
            values[key] = CUSTOM_KEYS[key](value)
        except ValueError:
            raise ConfigError(f"--gpu: {key}={value!r} is not a number") from None
        if values[key] <= 0:
            raise ConfigError(f"--gpu: {key} must be > 0, got {value}")
    missing = [k for k in ("memory_gib", "tflops", "nvlink_gbs", "network_gbs") if k not in values]
    if missing:
        raise ConfigError(f"--gpu: the custom spec lacks {', '.join(missing)}; e.g. "
                          "memory_gib=80,tflops=989,nvlink_gbs=450,network_gbs=50")
    return Hardware("custom", **values)


# ------------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Counts:
    """Parameters (tied embedding once), FLOPs and what the decode caches hold, read off a meta-device model."""

    total: int
    active: int  # what one token uses (K of E routed experts)
    experts: int  # routed-expert parameters (split over the EP group)
    flops_per_token: float  # training, forward + backward
    cache_bytes_per_token: int  # MLA latent + rotary key (GQA: K and V), bf16, all layers
    cache_state_bytes: int  # linear-attention and KDA states per sequence, constant-size
    numels: tuple[tuple[str, int], ...]  # every parameter's size by name
    saved_numels: tuple[int, ...]  # what a state dict holds: the parameters and the router biases


def counts(model_cfg: ModelConfig, seq_len: int) -> Counts:
    return _counts(json.dumps(model_cfg.to_dict(), sort_keys=True), seq_len)


@functools.lru_cache(maxsize=64)
def _counts(config_json: str, seq_len: int) -> Counts:
    """One meta-device model per config (the advice re-plans the same model a dozen times)."""
    import torch

    from smolds.model.experts import RoutedExperts
    from smolds.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(ModelConfig.from_dict(json.loads(config_json)))
        cache = model.new_cache(1, 1, device="meta", dtype=torch.bfloat16)
    experts = sum(p.numel() for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters())
    state = sum(c.state_bytes() for c in cache.layers if hasattr(c, "state_bytes"))
    return Counts(model.num_parameters(), model.num_parameters(active=True), experts,
                  model.flops_per_token(seq_len), cache.bytes_per_token(), state,
                  tuple((name, p.numel()) for name, p in model.named_parameters()),
                  tuple(t.numel() for t in model.state_dict().values()))


def activations(cfg: ModelConfig, batch: int, seq_len: int, act_bytes: int, ep_size: int = 1,
                device: str = "cuda") -> dict[str, float]:
    """Bytes autograd keeps for backward on one rank for one micro-batch [batch, seq_len], counted op by op
    from smolds' layers (`a` the activation dtype's size; router math, rope, norms' rstd and softmax
    statistics are fp32): `saved` without checkpointing; `checkpointed`, what activation checkpointing keeps
    (each block's input and its routers' choice); `block`, the largest block's own, which checkpointing
    recomputes one block at a time; and the transients of the fused loss (`loss_forward`: one row chunk's
    logits and log-probabilities; `loss_backward`: the scaled gradients its backward returns).
    Routed experts are assumed balanced (the loss-free bias's aim): a rank runs N*K pairs whatever ep_size.
    Linear-attention layers are counted on PyTorch's chunked path (flash-linear-attention's kernels keep less).
    """
    import torch

    from smolds.model.loss import chunk_rows

    a, N, T = act_bytes, batch * seq_len, seq_len
    D, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    f32 = 4 if a != 4 else 0  # x.float() of a bf16 tensor is a new fp32 tensor; of an fp32 one, the same
    rope_once = set()  # half-split rope saves cos and sin, computed once per forward for every layer

    def rope(dim: int) -> float:  # per token per layer
        if cfg.rope_interleave:
            return 2 * 4 * dim  # the complex cos + i sin of q and of k, [.., dim/2] complex64 each
        rope_once.add(dim)
        return 0.0

    def attention(kind: str) -> float:  # per token
        if kind == "mla":
            qk, R, C = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
            q_lora = 0 if cfg.q_lora_rank is None else 2 * a * cfg.q_lora_rank + 4  # q_a out, normed, rstd
            padded = cfg.v_head_dim < qk  # values zero-padded to the key width for the flash kernels
            v = a * H * (qk if padded else cfg.qk_nope_head_dim + cfg.v_head_dim)  # padded copy, or kv's storage
            return (a * D + q_lora  # the normed input (query and latent projections)
                    + a * (C + R) + 4 + a * C  # kv_a's output and rstd, the normed latent (kv_b's input)
                    + rope(R)
                    + 2 * a * H * qk + v  # SDPA's q and k (concatenated nope + rope), v
                    + a * H * (qk if padded else cfg.v_head_dim) + 4 * H  # SDPA's output, log-sum-exp
                    + a * H * cfg.v_head_dim)  # o_proj's input
        if kind == "gqa":
            hd = cfg.head_dim
            return a * D + rope(hd) + 4 * a * H * hd + 4 * H + a * H * hd  # q, k, v, out, lse; o_proj's input
        if kind == "kda":
            return kda(cfg.linear_head_dim)
        K = cfg.linear_head_dim if cfg.linear_kv_rank is None else cfg.linear_kv_rank  # chunked, K = V
        Cc = min(cfg.linear_chunk_size, T)
        chunks = math.ceil(T / Cc)
        pad = chunks * Cc / T  # T padded to whole chunks: the per-chunk products hold the padding
        writes = 4 * 4 * H * K + 4 * H if chunks > 1 else 0  # the chunks' state writes (one chunk: unused)
        return (a * D + 2 * 4 * H  # the normed input; log-sigmoid's input and output
                + pad * 3 * 4 * H * Cc  # decay, q.k scores and their product, [C, C] a chunk
                + 4 * 4 * H * K + writes + 4 * H  # copies of q, k, v, the decayed q; its decay
                + pad * 4 * H * K * K * (2 * chunks - 1) / (chunks * Cc)  # states entering chunks, and stacked
                + a * H * K + 4 * H  # the head norm's input and rstd
                + 4 * a * H * K)  # the output gate's input and silu, the normed output, o_proj's input

    def kda(K: int) -> float:  # per token, smolds/model/kda.py's chunked path (K = V)
        from smolds.model.kda import SUB_CHUNK

        W, Cc = cfg.linear_conv_kernel_dim, cfg.linear_chunk_size
        c = math.gcd(Cc, SUB_CHUNK)
        M, pairs, pad = Cc // c, c * (c + 1) // 2, math.ceil(T / Cc) * Cc / T
        HK = H * K
        dots = 4 * HK * (5 * pairs / c + M / c + 5 + 4 * M)  # k.k and q.k: causal pairs, sub-chunk gaps, blocks
        one_hots = 4 * pairs * c * (3 + c) / N  # the gather/scatter matrices, per layer
        chunk = (dots + 2 * 4 * H * Cc + 4 * HK + 2 * 4 * 2 * HK  # A and P; A * beta, the solve and its rhs
                 + 2 * 4 * HK + 4 * HK / Cc  # decayed q and k, the chunk decay
                 + 4 * HK * K / Cc + 4 * H * Cc + 3 * 4 * HK)  # the loop: states, P and w, v_new slices
        return (a * D + a * 3 * HK * (2 + (W - 1) / T) + 4 * 3 * HK  # input; conv's input and output; fp32 q|k|v
                + a * K + 2 * 4 * HK + 4 * H + 2 * 4 * H  # forget gate's bottleneck, softplus in/out; beta; l2norms
                + pad * chunk + one_hots
                + a * K + 4 * HK + 4 * H + 2 * 4 * HK + a * HK)  # output gate, o_norm, sigmoid, product

    def ffn(kind: str) -> float:  # per token
        if kind == "dense":
            return a * D + 4 * a * cfg.intermediate_size  # input; gate, silu, up, product
        E, K, width = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        router = (f32 * D + (a * D if shared or not f32 else 0)  # its fp32 input; the input (shared experts)
                  + 4 * E + 8 * K + 4 * K + (4 if cfg.norm_topk_prob else 0))  # scores, ids, gates, their sum
        dispatch = 16 * K + (K * (8 + a * D) if ep_size > 1 else 0)  # sort order, source token (EP: the
        # regrouping order and the regrouped outputs)
        experts = K * (a * D + 4 * a * width)  # sorted inputs; gate, silu, up, product
        combine = K * (2 * a * D + a)  # outputs, weighted outputs, gate weights
        return router + dispatch + experts + combine + 4 * a * shared

    blocks = {}
    for kinds in set(cfg.layer_kinds()):
        per_token = 2 * (a * D + 4) + attention(kinds[0]) + ffn(kinds[1])  # + the two RMSNorms' x and rstd
        fixed = 4 * cfg.n_routed_experts * D if kinds[1] == "moe" and f32 else 0  # router's fp32 weight copy
        blocks[kinds] = per_token * N + fixed
    moe_layers = len(cfg.moe_layers)
    top = N * (8 + 2 * a * D + 4 + 4 * sum(rope_once)) + 4 * V * D  # ids, final norm, the loss's dh and dW
    rows = min(chunk_rows(V, torch.device(device)), N)
    return {"saved": sum(blocks[k] for k in cfg.layer_kinds()) + top,
            "checkpointed": cfg.num_hidden_layers * a * D * N + moe_layers * 8 * cfg.num_experts_per_tok * N + top,
            "block": max(blocks.values()),
            "loss_forward": rows * V * (a + 4 + (a if f32 else 0)),  # logits, fp32 log-probs (bf16: the grad)
            "loss_backward": a * N * D + (4 + (a if f32 else 0)) * V * D}


# --------------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Every number of the plan; bytes are per rank unless named otherwise."""

    model: str
    gpus: int
    hardware: Hardware
    zero_stage: int
    ep_size: int
    precision: str
    micro_batch: int
    grad_accum: int
    seq_len: int
    activation_checkpointing: bool
    efficiency: float
    # the model
    params: int
    active_params: int
    expert_params: int
    flops_per_token: float
    # memory per rank
    weights: float
    gradients: float  # held at the gradient-accumulation boundary
    optimizer: float
    activations: float  # saved for backward, one micro-batch, with the run's checkpointing setting
    recompute: float  # with checkpointing: the largest block's activations, rebuilt one block at a time
    activations_no_checkpointing: float
    activations_checkpointing: float  # the blocks' inputs + one block recomputed
    buffers: float  # at the peak: gradient bucket, flattened all-reduce, fp32 step copies, loss chunks
    peak: float
    peak_phase: str
    usable: float
    fits: bool
    fix: str | None
    # decode
    cache_bytes_per_token: int
    cache_state_bytes: int
    # time
    tokens_per_step: int
    step_compute_s: float
    all_to_all_bytes: float  # this rank sends, per optimizer step
    all_to_all_s: float
    grad_sync_bytes: float  # this rank sends, per optimizer step
    grad_sync_s: float
    step_s: float
    tokens_per_s: float
    mfu: float
    # checkpoints
    checkpoint_bytes: list[float]  # written by each rank
    checkpoint_s: float
    # the budget
    tokens: float
    steps: int
    checkpoints: int
    wall_s: float
    gpu_hours: float
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(model_cfg: ModelConfig, run: RunConfig, gpus: int, hw: Hardware, tokens: float | None = None,
             efficiency: float = 0.3, device: str = "cuda", tokenizer_bytes: int | None = None,
             advise: bool = True) -> Plan:
    """The plan of `run` on `gpus` GPUs of kind `hw`. `device` "cpu" plans a CPU run (train.dtype auto is
    fp32 there, and the fused loss takes 128-row chunks): what the tests measure."""
    t, ds = run.train, run.deepspeed
    check(model_cfg, run, gpus)
    n = counts(model_cfg, t.seq_len)
    precision = t.dtype if t.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    w = 2 if precision == "bf16" else 4
    N, P, S, GA = gpus, ds.ep_size, ds.zero_stage, t.grad_accum
    zero_cfg = ds.config.get("zero_optimization", {}) if isinstance(ds.config, dict) else {}
    bucket_elems = float(zero_cfg.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET))

    dense = n.total - n.experts
    local = dense + n.experts / P  # parameters on this rank
    part = (dense + n.experts) / N  # this rank's ZeRO partition (experts: their P-th over N/P ranks)
    weights = w * local
    # (gradients, buffers) held while later micro-batches run, at the end of the last backward, in the step
    if S == 0:
        optimizer = (8 if precision == "fp32" else 12) * local  # fp32 weights need no fp32 master copy
        grads, bucket = w * local, 0.0
        carried = (grads, 0.0)
        end = (grads, w * min(max(dense, n.experts / P), ALLREDUCE_FLATTEN))  # flattened for the all-reduce
        step_buffers = 0.0 if precision == "fp32" else 4 * local  # fp32 flat gradients
    else:
        optimizer = 12 * part
        grads, bucket = w * part, w * bucket_elems
        if S == 1:  # accumulates whole gradients, keeps the bucket until the boundary, then reduces
            if P > 1:  # with expert groups one rank keeps the whole dense gradients (DeepSpeed 0.19, measured)
                grads = w * (dense + n.experts / N)
            carried = (w * local, bucket)
            end = (w * local + grads, bucket)
        else:  # reduces into its partition after every micro-batch: a new partition buffer in each backward
            carried = (grads, 0.0)
            end = (grads, bucket)
            bucket += grads
        step_buffers = (4 if precision == "fp32" else 4 + w) * part  # fp32 gradient partition (+ flat copy)
    if GA == 1:
        carried = (0.0, 0.0)
    persistent = weights + optimizer

    act = activations(model_cfg, t.micro_batch, t.seq_len, w, P, device)
    acts = act["checkpointed"] if t.activation_checkpointing else act["saved"]
    recompute = act["block"] if t.activation_checkpointing else 0.0
    phases = {  # (gradients, activations, buffers) above the weights and optimizer state
        "forward": (carried[0], acts, carried[1] + act["loss_forward"]),
        "backward": (carried[0], acts + recompute, bucket + act["loss_backward"]),
        "backward end": (end[0], 0.0, end[1]),
        "optimizer step": (grads, 0.0, step_buffers),
    }
    peak_phase = max(phases, key=lambda k: sum(phases[k]))
    peak = persistent + sum(phases[peak_phase])
    usable = (1 - HEADROOM) * hw.memory_gib * GIB if device == "cuda" else math.inf

    # time: compute at the stated efficiency, then the exposed all-to-all and gradient traffic
    tokens_rank = t.micro_batch * t.seq_len * GA
    hardware_flops = n.flops_per_token * (4 / 3 if t.activation_checkpointing else 1)  # + one forward
    compute_s = tokens_rank * hardware_flops / (hw.tflops * 1e12 * efficiency)
    moe_layers = len(model_cfg.moe_layers)
    passes = 4 + (2 if t.activation_checkpointing else 0)  # dispatch + combine, forward and backward (+ recompute)
    a2a = GA * moe_layers * passes * t.micro_batch * t.seq_len * model_cfg.num_experts_per_tok * (P - 1) / P \
        * model_cfg.hidden_size * w if P > 1 else 0.0
    a2a_s = a2a / (_bandwidth(hw, P) * COMM_EFFICIENCY)
    E_dp = N // P  # ranks that hold the same experts
    grad_passes = GA + 1 if S == 2 else 2  # ZeRO-2 reduce-scatters every micro-batch; all-gather once
    sync_dense = grad_passes * (N - 1) / N * w * dense
    sync_expert = grad_passes * (E_dp - 1) / E_dp * w * n.experts / P if n.experts else 0.0
    sync_s = (sync_dense + sync_expert) / (_bandwidth(hw, N) * COMM_EFFICIENCY)  # both groups span the N ranks
    step_s = compute_s + a2a_s + sync_s
    global_tokens = tokens_rank * N
    tok_s = global_tokens / step_s

    # checkpoints: what each rank writes, and the slowest node's save
    if tokenizer_bytes is None:
        tok = Path(run.data.dir) / "tokenizer.json" if isinstance(run.data.dir, str) else None
        tokenizer_bytes = tok.stat().st_size if tok is not None and tok.is_file() else \
            TOKENIZER_BYTES_PER_ENTRY * model_cfg.vocab_size
    ckpt = checkpoint_bytes(n, N, tokenizer_bytes)
    ckpt_s = max(sum(ckpt[i:i + hw.gpus_per_node]) for i in range(0, N, hw.gpus_per_node)) / (hw.write_gbs * 1e9)

    tokens = float(tokens if tokens is not None else t.steps * global_tokens)
    steps = math.ceil(tokens / global_tokens)
    n_ckpt = steps // t.checkpoint_every + (1 if steps % t.checkpoint_every else 0)
    wall = steps * step_s + n_ckpt * ckpt_s
    plan = Plan(
        model=_model_name(run), gpus=N, hardware=hw, zero_stage=S, ep_size=P, precision=precision,
        micro_batch=t.micro_batch, grad_accum=GA, seq_len=t.seq_len,
        activation_checkpointing=t.activation_checkpointing, efficiency=efficiency,
        params=n.total, active_params=n.active, expert_params=n.experts, flops_per_token=n.flops_per_token,
        weights=weights, gradients=grads, optimizer=optimizer, activations=acts, recompute=recompute,
        activations_no_checkpointing=act["saved"], activations_checkpointing=act["checkpointed"] + act["block"],
        buffers=phases[peak_phase][2], peak=peak, peak_phase=peak_phase, usable=usable, fits=peak <= usable, fix=None,
        cache_bytes_per_token=n.cache_bytes_per_token, cache_state_bytes=n.cache_state_bytes,
        tokens_per_step=global_tokens, step_compute_s=compute_s, all_to_all_bytes=a2a, all_to_all_s=a2a_s,
        grad_sync_bytes=sync_dense + sync_expert, grad_sync_s=sync_s, step_s=step_s, tokens_per_s=tok_s,
        mfu=tok_s * n.flops_per_token / (N * hw.tflops * 1e12),
        checkpoint_bytes=ckpt, checkpoint_s=ckpt_s, tokens=tokens, steps=steps, checkpoints=n_ckpt,
        wall_s=wall, gpu_hours=wall * N / 3600, assumptions=assumptions(hw, efficiency, precision, device, model_cfg))
    if advise and not plan.fits:
        plan.fix = fix(model_cfg, run, gpus, hw, efficiency, device)
    return plan


def _bandwidth(hw: Hardware, span: int) -> float:
    """Bytes/s per GPU for a collective among ranks spread over `span` consecutive ranks: NVLink while they
    are in one node, the network otherwise (an EP group spans ep_size ranks; the data-parallel and
    expert-data-parallel groups span them all)."""
    return (hw.nvlink_gbs if span <= hw.gpus_per_node else hw.network_gbs) * 1e9


def checkpoint_bytes(n: Counts, N: int, tokenizer_bytes: int) -> list[float]:
    """Bytes each rank writes into one checkpoint (smolds/train/checkpoint.py): every tensor whole, whatever
    the ZeRO stage or ep_size. Adam's two fp32 moments of each parameter go to the rank `shard_owners`
    assigns (largest tensor first to the least-loaded rank); rank 0 also writes the consolidated fp32 model
    (router biases included), the tokenizer and the trainer state (one RNG state per rank). One entry per
    rank."""
    from smolds.train.checkpoint import shard_owners

    numels = dict(n.numels)
    header = 128  # safetensors' JSON header, per tensor
    per_rank = [0.0] * N
    for name, rank in shard_owners(numels, N).items():
        per_rank[rank] += 2 * (4 * numels[name] + header)
    per_rank[0] += (sum(4 * k + header for k in n.saved_numels)
                    + tokenizer_bytes + 8_000 + 7_000 * N)  # configs; trainer state with N RNG states
    return per_rank


def assumptions(hw: Hardware, efficiency: float, precision: str, device: str, cfg: ModelConfig) -> list[str]:
    mixed = ("bf16 weights and gradients, fp32 master weights and Adam moments (12 bytes a parameter), as "
             "DeepSpeed keeps them" if precision == "bf16" else "fp32 weights, gradients and Adam moments")
    return [
        mixed,
        "ZeRO-1/2 partition the optimizer state over the data-parallel ranks; expert parameters over the "
        "expert-data-parallel group (ranks / ep_size), not the whole data-parallel group",
        f"compute at {efficiency:.0%} of the {hw.tflops:g} TFLOP/s dense bf16 peak (activation checkpointing "
        "adds one forward: 4/3 the FLOPs)",
        f"collectives at {COMM_EFFICIENCY:.0%} of nominal bandwidth ({hw.nvlink_gbs:g} GB/s NVLink inside a "
        f"node of {hw.gpus_per_node}, {hw.network_gbs:g} GB/s network per GPU), not overlapped with compute",
        "routed tokens balanced over the experts (the loss-free bias's aim); all-to-all sends (P-1)/P of them "
        "(at initialization a rank can run 20% more pairs: measured 1,240 for 1,024 on tiny)",
        f"checkpoints written at {hw.write_gbs:g} GB/s per node, training paused while saving",
        f"usable memory: {1 - HEADROOM:.0%} of HBM" if device == "cuda" else "CPU run: no memory limit applied",
    ] + (["MLA values wider than its keys: SDPA falls back to its math kernel, whose [T, T] scores are not counted"]
         if "mla" in cfg.attention_pattern and cfg.v_head_dim > cfg.qk_nope_head_dim + cfg.qk_rope_head_dim else [])


def _model_name(run: RunConfig) -> str:
    m = run.model
    if isinstance(m, dict):
        return str(m.get("preset", "custom")) + (" (+ overrides)" if len(m) > 1 else "")
    return str(m)


# ---------------------------------------------------------------------------------------------- checks
def check(model_cfg: ModelConfig, run: RunConfig, gpus: int) -> None:
    """The trainer's own checks of a layout (the batch against the ranks, the context, expert parallelism),
    as one-line errors that name the fix."""
    import torch

    from smolds.train import TrainError
    from smolds.train.loop import check_run
    from smolds.train.parallel import Env

    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus <= 0:
        raise ConfigError(f"--gpus must be a positive integer, got {gpus!r}")
    try:
        check_run(run, Env(rank=0, world=gpus, local_rank=0, device=torch.device("cpu"), backend="none"), model_cfg)
    except TrainError as e:
        msg = str(e).replace("the number of ranks", "--gpus").replace("x ranks", "x --gpus")
        raise ConfigError(msg if ";" in msg else f"{msg}; change one of them") from None
    if run.deepspeed.zero_stage == 3:
        raise ConfigError("plan: deepspeed.zero_stage 3 is not estimated (dense models only in this trainer); "
                          "plan with --deepspeed.zero_stage 2")


# ------------------------------------------------------------------------------------------ the advice
def fix(model_cfg: ModelConfig, run: RunConfig, gpus: int, hw: Hardware, efficiency: float, device: str) -> str:
    """The first change that makes the run fit, as flags: a higher ZeRO stage, more expert parallelism,
    activation checkpointing, a smaller micro-batch (grad_accum raised to keep the global batch); one at a
    time in that order, then all of them together."""
    t, ds = run.train, run.deepspeed
    changes = [{"deepspeed.zero_stage": s} for s in range(ds.zero_stage + 1, 3)]
    if model_cfg.moe_layers:
        changes += [{"deepspeed.ep_size": p} for p in range(ds.ep_size + 1, gpus + 1)
                    if model_cfg.n_routed_experts % p == 0 and gpus % p == 0]
    if not t.activation_checkpointing:
        changes.append({"train.activation_checkpointing": True})
    mb = t.micro_batch
    while mb > 1:
        mb //= 2
        changes.append({"train.micro_batch": mb, "train.grad_accum": t.grad_accum * t.micro_batch // mb})

    def fits(change: dict) -> Plan | None:
        candidate = _with(run, change)
        plan = estimate(model_cfg, candidate, gpus, hw, efficiency=efficiency, device=device, advise=False)
        return plan if plan.fits else None

    for change in changes:
        if (plan := fits(change)) is not None:
            return f"{_flags(change)} ({plan.peak / GIB:.1f} GiB)"
    combined = {}
    for change in changes:
        combined.update(change)
        if (plan := fits(combined)) is not None:
            return f"{_flags(combined)} ({plan.peak / GIB:.1f} GiB)"
    return "nothing fits on these GPUs: use more GPUs (more ZeRO and EP partitions) or a smaller model"


def _with(run: RunConfig, change: dict) -> RunConfig:
    sections = {"train": run.train, "deepspeed": run.deepspeed}
    for key, value in change.items():
        section, name = key.split(".")
        sections[section] = replace(sections[section], **{name: value})
    return replace(run, train=sections["train"], deepspeed=sections["deepspeed"])


def _flags(change: dict) -> str:
    return " ".join(f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items())


# --------------------------------------------------------------------------------------------- the table
def _gib(x: float) -> str:
    return f"{x / GIB:,.2f} GiB"


def _duration(s: float) -> str:
    return f"{s / 86400:,.1f} days" if s >= 2 * 86400 else f"{s / 3600:,.1f} h" if s >= 3600 else f"{s:,.1f} s"


def table(p: Plan) -> str:
    rows = [
        (f"smolds plan: {p.model} on {p.gpus} x {p.hardware.name}", ""),
        ("layout", f"ZeRO-{p.zero_stage}, ep_size {p.ep_size}, {p.precision}, micro-batch {p.micro_batch} x "
                   f"{p.seq_len}, grad_accum {p.grad_accum}, activation checkpointing "
                   f"{'on' if p.activation_checkpointing else 'off'}"),
        ("parameters", f"{p.params / 1e6:,.1f}M total, {p.active_params / 1e6:,.1f}M active, "
                       f"{p.expert_params / 1e6:,.1f}M in routed experts"),
        ("FLOPs per token", f"{p.flops_per_token / 1e9:,.3f} GFLOP (training, seq {p.seq_len})"),
        ("", ""),
        ("memory per rank", ""),
        ("  weights", _gib(p.weights)),
        ("  gradients", _gib(p.gradients)),
        ("  optimizer state", _gib(p.optimizer)),
        ("  activations", f"{_gib(p.activations + p.recompute)} (without checkpointing "
                          f"{_gib(p.activations_no_checkpointing)}, with {_gib(p.activations_checkpointing)})"),
        ("  buffers", f"{_gib(p.buffers)} (DeepSpeed's gradient bucket and copies, the loss's row chunks)"),
        ("  peak", f"{_gib(p.peak)} at the {p.peak_phase}"
                   + (f" of {_gib(p.usable)} usable: {'fits' if p.fits else 'DOES NOT FIT'}"
                      if math.isfinite(p.usable) else "")),
    ]
    if p.fix:
        rows.append(("  to fit", p.fix))
    rows += [
        ("decode cache", f"{p.cache_bytes_per_token:,} B/token (bf16)"
                         + (f" + {p.cache_state_bytes / 2**20:,.2f} MiB/sequence of linear-attention state"
                            if p.cache_state_bytes else "")),
        ("", ""),
        ("step", f"{p.tokens_per_step:,} tokens: {p.step_s * 1e3:,.1f} ms (compute {p.step_compute_s * 1e3:,.1f}, "
                 f"all-to-all {p.all_to_all_s * 1e3:,.1f}, gradient sync {p.grad_sync_s * 1e3:,.1f})"),
        ("all-to-all per step", f"{p.all_to_all_bytes / 1e9:,.3f} GB sent per rank"),
        ("gradient sync per step", f"{p.grad_sync_bytes / 1e9:,.3f} GB sent per rank"),
        ("throughput", f"{p.tokens_per_s:,.0f} tokens/s, MFU {p.mfu:.1%} (at {p.efficiency:.0%} efficiency)"),
        ("checkpoint", f"rank 0 writes {p.checkpoint_bytes[0] / 1e9:,.2f} GB"
                       + (f", the others at most {max(p.checkpoint_bytes[1:]) / 1e9:,.2f} GB"
                          if len(p.checkpoint_bytes) > 1 else "") + f"; {_duration(p.checkpoint_s)} a save"),
        ("budget", f"{p.tokens:.3g} tokens = {p.steps:,} steps, {p.checkpoints:,} checkpoints: "
                   f"{_duration(p.wall_s)}, {p.gpu_hours:,.0f} GPU-hours"),
        ("limits", (f"memory {p.peak / p.usable:.0%} of usable; " if math.isfinite(p.usable) else "")
                   + f"all-to-all {p.all_to_all_s / p.step_s:.0%} and gradient sync {p.grad_sync_s / p.step_s:.0%}"
                   f" of a step; saving checkpoints {p.checkpoints * p.checkpoint_s / p.wall_s:.1%} of the time"),
        ("", ""),
        ("assumptions", ""),
    ]
    width = max(len(k) for k, v in rows[1:] if v)
    lines = [f"{k:<{width}}  {v}" if v else k for k, v in rows]
    return "\n".join(lines + [f"  - {a}" for a in p.assumptions])


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smolds plan", description=__doc__.split("\n\n")[0],
                                epilog="Any run-config field can be overridden as for `smolds train`: "
                                       "--deepspeed.zero_stage 2 --deepspeed.ep_size 8 --train.micro_batch 4. "
                                       "Exit status 1 when the run does not fit, 2 on bad input.")
    p.add_argument("--config", help="run config YAML (default: the tiny preset's run)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--gpu", default="h100", help="h100, h200, a100, or memory_gib=..,tflops=..,nvlink_gbs=..,"
                                                 "network_gbs=.. (default h100)")
    p.add_argument("--tokens", type=float, help="token budget (default: the run's steps x tokens per step)")
    p.add_argument("--efficiency", type=float, default=0.3,
                   help="fraction of the peak bf16 FLOP/s the compute reaches (default 0.3)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, overrides = p.parse_known_args(argv)
    try:
        if not 0 < args.efficiency <= 1:
            raise ConfigError(f"--efficiency must be in (0, 1], got {args.efficiency}")
        if args.tokens is not None and not (args.tokens > 0 and math.isfinite(args.tokens)):
            raise ConfigError(f"--tokens must be a positive number, got {args.tokens}")
        run = RunConfig.load(args.config, overrides)
        plan = estimate(run.model_config(), run, args.gpus, hardware(args.gpu), args.tokens, args.efficiency)
    except ConfigError as e:
        print(f"smolds plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1) if args.json else table(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
