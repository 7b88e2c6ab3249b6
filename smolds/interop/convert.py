"""SmolLM2 (GQA + dense SwiGLU) converted into the DeepSeek architecture from its pretrained weights: MLA
attention (MHA2MLA / TransMLA), DeepSeekMoE FFNs (MoEfication / virtual-group upcycling) and, for the hybrid,
linear attention initialised from the GQA projections. No training happens here: the result is the starting
point that `smolds train --train.init_from` heals.

Dimension legend: D model width, H query heads, G key/value heads (H/G queries share one), d source head
width, N/R/V MLA's nope/rope/value head widths, C kv_lora_rank, P rotary planes meeting in one shared
rotary frequency, F dense FFN width (neurons), S shared-expert width, I expert width, E routed experts,
K experts per token, T' calibration tokens kept as samples.

Attention, GQA -> MLA. Everything works in the space of n = h / rms(h), the residual stream normalized
without the norm's weight: the weight is folded into the projections (input_layernorm becomes 1), so keys,
values and queries are linear maps of n, and |n| = sqrt(D) on every token.
1. The shared rotary key. A rotary plane (two coordinates turned by one frequency) is a complex number z and
   RoPE multiplies it by e^{i theta}, so a complex combination of planes commutes with the rotation when
   they turn at one frequency (TransMLA's RoRoPE). MLA has one rotary key of R/2 frequencies shared by all
   heads, fixed by (qk_rope_head_dim, rope_theta); they must be source frequencies (R = 32 of SmolLM2's 64
   at the same theta: every second one, TransMLA's `collapse`). Every source plane joins the kept frequency
   at or just above its own (TransMLA's FreqFold; it then turns slightly too fast), and per kept frequency
   the planes of all G groups that meet there are compressed to one plane z' by a query-weighted complex
   PCA, minimising sum_p Q_p E|z_p - a_p z'|^2 with Q_p the query energy that meets plane p: MHA2MLA's
   2-norm criterion (a plane adds about |q_p| |k_p| to q.k) applied to the choice MLA leaves open, which
   mixture of groups and frequencies the one shared key carries. Each head's rotary query is the sum of
   conj(a_p) q_p over its planes. What z' misses, z_p - a_p z', stays in the head's position-free ("nope")
   key, met without rotation, so its query is scaled by gamma_p = the mean of cos(omega_p delta) over the
   attention the head pays at each distance delta on the calibration text (~1 for slow planes, ~0.1 for
   the fastest: the least-squares scalar for a dropped rotation). Measured on SmolLM2-135M at no training:
   folding beats MHA2MLA's partial RoPE (the unkept frequencies position-free) by 7x in perplexity.
   Layouts: planes are (x_j, x_{j+d/2}) in SmolLM2's half-split RoPE and (x_{2j}, x_{2j+1}) in DeepSeek's
   interleaved one; rows are placed per plane, so either maps to either.
2. The latent. Each group's nope key (its whole key minus what z' took) and value, stacked [2Gd, D], are
   compressed to C dimensions by a PCA of their outputs on the calibration text (MHA2MLA's joint SVD of k
   and v, made data-aware, keys and values balanced as TransMLA's BKV), and the latent basis is made
   orthonormal in n-space (a QR, its triangle folded into kv_b_proj). MLA normalises the latent
   (kv_a_layernorm), which divides each token's keys and values by its latent's norm; an orthonormal
   projection of n keeps that norm steady, except on the attention-sink tokens whose norm sits in a few
   massive dimensions outside it (first tokens: amplified up to 4.5x, perplexity 4e5). So a few latent
   dimensions (0-32, the count that best reproduces the calibration keys and values) carry no key or value,
   only the norm those tokens lack. With C = D the latent is an orthogonal transform of n and MLA equals
   GQA wherever every rotary dimension is kept (one KV group, R = d). Queries are scaled by
   sqrt((N + R) / d), MLA's softmax scale being (N + R)^-1/2; N >= d and V >= d, the extra dims zero.

FFN, SwiGLU -> DeepSeekMoE. A neuron's importance on a token is |silu(g.x) (u.x)| |its down column|.
- Shared expert (S = n_shared_experts * I wide): the neurons most often among a token's S most important.
- The rest are clustered by co-activation (cosine of their importance over the calibration tokens,
  balanced k-means as MoEfication / LLaMA-MoE) into clusters of I neurons. Two shapes fit:
  * partition (MoEfication): E * I = F - S, one cluster per expert; an expert's router row is the least-
    squares predictor of its output norm from x. With every expert at gate weight 1 the layer is the dense
    FFN; `smollm2-deepseek-moefied-135m` (16 x 64 top-4, shared 512) sets routed_scaling_factor = K so that
    the normalized gates of the K chosen start near 1.
  * virtual groups (He et al. 2024, "Upcycling Large Language Models into Mixture of Experts"): K * I = F - S
    and E = copies * K: the routed neurons are K shards (clusters) copied E / K times, and a copy's K shards
    share one router row, so their scores tie exactly and top-K takes one whole copy: the layer equals the
    dense FFN on every token until training breaks the ties (down_proj scaled by K / routed_scaling_factor,
    the normalized gates giving each shard routed_scaling_factor / K). A copy's row is the centroid of a
    k-means cluster of the calibration inputs, so each copy starts with tokens of its own to specialise on.
    This is how `smollm2-deepseek-135m` (shared 512 + 16 x 256 top-4 = 3 x 1536 neurons) takes SmolLM2.
  Router logits start small (std 0.1) and the loss-free biases at zero.

Linear attention (the hybrid's `linear` layers): q/k/v/o copied (k and v repeated over each group's heads),
no rotation (linear attention has none); the output gate silu(g_proj x) is made near-constant (g_proj: the
least-squares direction u with x.u = 1, times 4) and g_norm's weight is the source heads' output RMS over
silu(4); the decay gate keeps its multi-scale initialisation.

Papers: Ji et al. 2025, "Towards Economical Inference: Enabling DeepSeek's Multi-Head Latent Attention in
Any Transformer-based LLMs" (MHA2MLA); Meng et al. 2025, "TransMLA: Multi-Head Latent Attention Is All You
Need"; Zhang et al. 2022, "MoEfication"; Zhu et al. 2024, "LLaMA-MoE"; He et al. 2024 (above).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from smolds.config import ConfigError, ModelConfig
from smolds.model.mla import LATENT_NORM_EPS
from smolds.model.rope import apply_rope, inv_freq
from smolds.model.transformer import Transformer

NORM_CARRIERS = (0, 1, 2, 4, 8, 16, 32)  # latent dimensions tried for carrying the norm of n instead of kv
DISTANCE_ROWS = 4  # calibration rows whose attention maps give each head's attention-distance profile
GATE_GAIN = 4.0  # linear attention: g_proj x ~ 4 on every token; silu(4) = 3.93, nearly linear
ROUTER_LOGIT_STD = 0.1  # converted routers start with small logits: normalized gates near 1/K each


class ConvertError(ValueError):
    """A source or target cannot be converted; the message names the field and the fix."""


@dataclass
class ConvertOptions:
    method: str = "rorope"  # shared rotary key: "rorope" (query-weighted complex PCA) or "transmla" (real PCA)
    kv_balance: str = "bkv"  # latent PCA rows: "bkv" (keys, values at equal energy) or "attn" (by q and o_proj)
    nope_decay: bool = True  # scale what loses its rotation by gamma (see the module docstring)
    sample_tokens: int = 8192  # calibration tokens kept per layer as samples (FFN statistics, sinks)
    seed: int = 0


# ------------------------------------------------------------------------------------------------- checks
def check_source(cfg: ModelConfig) -> None:
    kinds = set(cfg.layer_kinds())
    if kinds != {("gqa", "dense")}:
        raise ConvertError(f"the source is not a Llama/SmolLM2 checkpoint (its layers are {sorted(kinds)}, "
                           "not all GQA + dense SwiGLU): convert what import-hf or import-gguf produce")


def check_target(src: ModelConfig, tgt: ModelConfig) -> None:
    """One line naming the first thing the target cannot take from the source."""
    for name in ("hidden_size", "vocab_size", "num_hidden_layers", "tie_word_embeddings", "num_attention_heads"):
        if getattr(src, name) != getattr(tgt, name):
            raise ConvertError(f"target {name} {getattr(tgt, name)} cannot take the source's weights "
                               f"({name} {getattr(src, name)}); use a target with {name}: {getattr(src, name)}")
    attn = {a for a, _ in tgt.layer_kinds()}
    d, D = src.head_dim, src.hidden_size
    if "kda" in attn:
        raise ConvertError("kda layers are not converted from GQA; use 'linear' (or mla, gqa) layers")
    if "gqa" in attn and (tgt.num_key_value_heads, tgt.head_dim) != (src.num_key_value_heads, d):
        raise ConvertError(f"target gqa layers must keep the source's num_key_value_heads {src.num_key_value_heads} "
                           f"and head_dim {d}")
    if "mla" in attn:
        if tgt.q_lora_rank is not None:
            raise ConvertError("q_lora_rank must be null: query compression is not converted (set q_lora_rank: null)")
        if tgt.qk_nope_head_dim < d or tgt.v_head_dim < d:
            raise ConvertError(f"qk_nope_head_dim ({tgt.qk_nope_head_dim}) and v_head_dim ({tgt.v_head_dim}) must be "
                               f">= the source head_dim {d}: each head's position-free key and value need d dims")
        if tgt.kv_lora_rank > D:
            raise ConvertError(f"kv_lora_rank {tgt.kv_lora_rank} > hidden_size {D}: the latent is a projection of "
                               f"the {D}-wide hidden state, so at most {D} of its dimensions can carry keys and "
                               f"values; choose kv_lora_rank <= {D}")
        if tgt.qk_rope_head_dim > d:
            raise ConvertError(f"qk_rope_head_dim {tgt.qk_rope_head_dim} > the source head_dim {d}: the shared rotary "
                               f"key has at most the source's {d // 2} frequencies; choose qk_rope_head_dim <= {d}")
        rope_slots(src, tgt)
    if "linear" in attn and (tgt.linear_head_dim != d or tgt.linear_kv_rank is not None):
        raise ConvertError(f"linear layers need linear_head_dim = the source head_dim {d} and linear_kv_rank: null "
                           "to take the GQA projections")
    if any(f == "dense" for _, f in tgt.layer_kinds()) and tgt.intermediate_size != src.intermediate_size:
        raise ConvertError(f"target intermediate_size {tgt.intermediate_size} != the source's "
                           f"{src.intermediate_size}: dense layers are copied; set intermediate_size: "
                           f"{src.intermediate_size}")
    if tgt.moe_layers:
        moe_shape(src, tgt)


def moe_shape(src: ModelConfig, tgt: ModelConfig) -> tuple[str, int]:
    """("partition", E) or ("virtual", K): how the routed experts take the F - S routed neurons."""
    n_ffn, width = src.intermediate_size, tgt.moe_intermediate_size
    E, K = tgt.n_routed_experts, tgt.num_experts_per_tok
    S = tgt.n_shared_experts * width
    routed = n_ffn - S
    if routed <= 0 or routed % width:
        raise ConvertError(f"the shared experts ({tgt.n_shared_experts} x {width} = {S}) must leave a positive "
                           f"multiple of moe_intermediate_size {width} of the source's {n_ffn} FFN neurons for the "
                           "routed experts")
    if E * width == routed:
        return "partition", E
    if K * width == routed and E % K == 0:
        if not tgt.norm_topk_prob or tgt.n_group != 1:
            raise ConvertError("virtual-group upcycling needs norm_topk_prob: true and n_group: 1 (the K shards of a "
                               "copy must be chosen together, at equal weights)")
        return "virtual", K
    raise ConvertError(f"the routed experts cannot take the {routed} routed neurons (F {n_ffn} - shared {S}): need "
                       f"n_routed_experts * moe_intermediate_size = {routed} (a partition) or num_experts_per_tok * "
                       f"moe_intermediate_size = {routed} with n_routed_experts a multiple of num_experts_per_tok "
                       f"(copies); e.g. n_routed_experts {routed // width} with top-k < {routed // width}")


# -------------------------------------------------------------------------------------------- calibration
@dataclass
class LayerStats:
    mean: torch.Tensor  # [D] E[n], n the attention input normalized without its norm weight (fp64)
    cov: torch.Tensor  # [D, D] E[n n^T] (fp64)
    head_ms: torch.Tensor  # [H*d] E[o^2] of the attention output before o_proj
    attn_dist: torch.Tensor  # [H, T] attention probability at each distance t - s, per head
    attn_n: torch.Tensor  # [T', D] samples of n, each row's first token (an attention sink) among them
    ffn_x: torch.Tensor  # [T', D] the FFN inputs (post_attention_layernorm output) of the same tokens


@torch.no_grad()
def calibrate(model: Transformer, ids: torch.Tensor, sample_tokens: int, seed: int = 0) -> list[LayerStats]:
    """Run the source over ids [B, T] (one row at a time) and gather each layer's statistics."""
    cfg = model.config
    L, D, H, G, d = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                     cfg.head_dim)
    B, T = ids.shape
    sums = [[torch.zeros(D, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64),
             torch.zeros(H * d, dtype=torch.float64), torch.zeros(H, T, dtype=torch.float64)] for _ in range(L)]
    samples: list[list[list[torch.Tensor]]] = [[[], []] for _ in range(L)]
    gen = torch.Generator().manual_seed(seed)
    per_row = min(-(-sample_tokens // B), T)
    pick: dict = {}
    delta = (torch.arange(T)[:, None] - torch.arange(T)[None]).clamp_min(0).flatten()  # [T*T] t - s
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def norm_hook(i, eps):
        def hook(mod, args):
            h = args[0].float().reshape(-1, D)
            n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # [T, D]
            sums[i][0] += n.sum(0).double()
            sums[i][1] += (n.T @ n).double()  # a row's sum in fp32, the total in fp64
            samples[i][0].append(n[pick["rows"]])
        return hook

    def attention_hook(i):
        def hook(mod, args, out):
            if not pick["maps"]:
                return
            x, ctx = args[0], args[1]
            cos, sin = ctx.rope(d, mod.rope_theta)
            q = apply_rope(mod.q_proj(x).view(1, T, H, d).transpose(1, 2), cos, sin, mod.rope_interleave)
            k = apply_rope(mod.k_proj(x).view(1, T, G, d).transpose(1, 2), cos, sin, mod.rope_interleave)
            scores = (q @ k.repeat_interleave(H // G, 1).transpose(-1, -2))[0] * d**-0.5  # [H, T, T]
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            sums[i][3] += torch.zeros(H, T).scatter_add_(1, delta.expand(H, -1), probs.reshape(H, -1)).double()
        return hook

    def out_hook(i):
        def hook(mod, args):
            sums[i][2] += args[0].float().reshape(-1, H * d).pow(2).sum(0).double()
        return hook

    def ffn_hook(i):
        def hook(mod, args):
            samples[i][1].append(args[0].reshape(-1, D)[pick["rows"]].float())
        return hook

    handles = []
    for i, blk in enumerate(model.layers):
        handles += [blk.input_layernorm.register_forward_pre_hook(norm_hook(i, blk.input_layernorm.eps)),
                    blk.self_attn.register_forward_hook(attention_hook(i)),
                    blk.self_attn.o_proj.register_forward_pre_hook(out_hook(i)),
                    blk.mlp.register_forward_pre_hook(ffn_hook(i))]
    try:
        model.eval()
        for b in range(B):
            rest = 1 + torch.randperm(T - 1, generator=gen)[: per_row - 1]
            pick.update(rows=torch.cat([torch.zeros(1, dtype=torch.long), rest]), maps=b < DISTANCE_ROWS)
            model(ids[b : b + 1], last_only=True)  # (the head on one position: its logits are not needed)
    finally:
        for h in handles:
            h.remove()
    N = B * T
    return [LayerStats(mean=s[0] / N, cov=s[1] / N, head_ms=s[2] / N, attn_dist=s[3], attn_n=torch.cat(a),
                       ffn_x=torch.cat(f)) for s, (a, f) in zip(sums, samples)]


def calibration_ids(tokenizer, specs: list[str], tokens: int, seq_len: int) -> torch.Tensor:
    """[B, seq_len] token ids of the documents of `specs` (what `smolds prep` reads: files, folders, globs,
    hf:NAME, pydoc:topics), joined and cut into rows; at most `tokens` in all."""
    from data_prep.sources import iter_documents, resolve_sources

    ids: list[int] = []
    for doc in iter_documents(resolve_sources(specs)):
        ids += tokenizer.encode(doc + "\n\n")
        if len(ids) >= tokens:
            break
    rows = min(len(ids), tokens) // seq_len
    if rows == 0:
        raise ConvertError(f"the calibration text ({' '.join(specs)}) has {len(ids)} tokens, fewer than one row of "
                           f"{seq_len}; give more text (--calib)")
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


# ---------------------------------------------------------------------------------------------- attention
def _planes(d: int, interleave: bool) -> torch.Tensor:
    """[d/2, 2] the rows of each rotary plane's two coordinates: (2j, 2j+1) interleaved, (j, j+d/2) half-split."""
    j = torch.arange(d // 2)
    return torch.stack([2 * j, 2 * j + 1], 1) if interleave else torch.stack([j, j + d // 2], 1)


def _to_complex(w: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """w [..., d, D] real rows -> [..., d/2, D] complex rows: plane j is row a_j + i row b_j."""
    return torch.complex(w[..., planes[:, 0], :], w[..., planes[:, 1], :])


def _to_real(z: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """The inverse of `_to_complex`: [..., d/2, D] complex -> [..., d, D] real rows."""
    out = z.real.new_zeros(*z.shape[:-2], 2 * z.shape[-2], z.shape[-1])
    out[..., planes[:, 0], :] = z.real
    out[..., planes[:, 1], :] = z.imag
    return out


def rope_slots(src: ModelConfig, tgt: ModelConfig) -> list[int]:
    """The source frequency index j (of d/2) of each of the target's R/2 shared rotary frequencies."""
    d, R = src.head_dim, tgt.qk_rope_head_dim
    f_src = inv_freq(d, src.rope_theta).double().log()
    f_tgt = inv_freq(R, tgt.rope_theta).double().log()
    j = (f_src[None] - f_tgt[:, None]).abs().argmin(1)
    if ((f_src[j] - f_tgt).abs() > 1e-4).any():
        stride = f"{src.rope_theta:g} (one source frequency in {d // R})" if d % R == 0 else None
        fastest = f"{src.rope_theta ** (R / d):.6g} (the {R // 2} fastest)"
        raise ConvertError(f"the target's rotary frequencies (qk_rope_head_dim {R}, rope_theta {tgt.rope_theta:g}) "
                           f"are not among the source's (head_dim {d}, rope_theta {src.rope_theta:g}); set "
                           f"rope_theta to {' or '.join(s for s in (stride, fastest) if s)}")
    return j.tolist()


def rotation_kept(stats: LayerStats, omega: torch.Tensor) -> torch.Tensor:
    """gamma [H, d/2]: the mean of cos(omega_j delta) over the attention each head pays at distance delta,
    how much of a plane's q.k survives when its rotation is dropped (1: slow planes; ~0: fast ones)."""
    prof = stats.attn_dist / stats.attn_dist.sum(1, keepdim=True)  # [H, T]
    return prof @ torch.cos(omega[None] * torch.arange(prof.shape[1], dtype=torch.float64)[:, None])


@torch.no_grad()
def mla_from_gqa(attn, norm_weight: torch.Tensor, stats: LayerStats, src: ModelConfig, tgt: ModelConfig,
                 opts: ConvertOptions) -> tuple[dict[str, torch.Tensor], dict]:
    """MLA weights (names of smolds.model.mla.MLA) from a GQA layer whose input norm weight they absorb
    (the block's input_layernorm becomes 1), and {rope_captured, kv_captured, norm_carriers}."""
    H, G, d, D = src.num_attention_heads, src.num_key_value_heads, src.head_dim, src.hidden_size
    N, R, V, C = tgt.qk_nope_head_dim, tgt.qk_rope_head_dim, tgt.v_head_dim, tgt.kv_lora_rank
    rep, w = H // G, norm_weight.double()
    wq = attn.q_proj.weight.double().mul(w).view(H, d, D)
    wk = attn.k_proj.weight.double().mul(w).view(G, d, D)
    wv = attn.v_proj.weight.double().mul(w).view(G, d, D)
    wo = attn.o_proj.weight.double().view(D, H, d)
    cov = stats.cov
    src_planes, tgt_planes = _planes(d, src.rope_interleave), _planes(R, tgt.rope_interleave)

    # 1. the shared rotary key: per kept frequency, a query-weighted complex PCA of the planes folded there
    zq, zk = _to_complex(wq, src_planes), _to_complex(wk, src_planes)  # [H, d/2, D], [G, d/2, D]
    covc = cov.to(torch.complex128)
    q_energy = torch.einsum("hjd,de,hje->hj", zq, covc, zq.conj()).real.view(G, rep, d // 2).sum(1)  # [G, d/2]
    k_rope = zk.new_zeros(R // 2, D)  # [R/2, D] complex rows of the shared key
    q_rope = zq.new_zeros(H, R // 2, D)
    residual = zk.clone()  # [G, d/2, D] what the shared key leaves to each group's nope key
    captured = []
    slots = rope_slots(src, tgt)
    for i, (j, j_next) in enumerate(zip(slots, [*slots[1:], d // 2])):
        z = zk[:, j:j_next].reshape(-1, D)  # [P, D], P = G * (j_next - j) planes, group-major
        sq = q_energy[:, j:j_next].reshape(-1).clamp_min(1e-30).sqrt()  # [P]
        if opts.method == "transmla":  # TransMLA's RoRoPE: real PCA of the keys alone
            sq = torch.ones_like(sq)
        m = sq[:, None] * (z @ covc @ z.conj().T) * sq[None]  # [P, P] Hermitian
        if opts.method == "transmla":
            m = m.real.to(m.dtype)
        evals, evecs = torch.linalg.eigh(m)
        v = evecs[:, -1]
        captured.append(float(evals[-1] / evals.sum().clamp_min(1e-30)))
        k_rope[i] = (v.conj() * sq) @ z  # z' = sum_p conj(v_p) sqrt(Q_p) z_p
        alpha = (v / sq).view(G, -1)  # z_p ~ alpha_p z'
        residual[:, j:j_next] -= alpha[..., None] * k_rope[i]
        q_rope[:, i] = torch.einsum("hf,hfd->hd", alpha.conj().repeat_interleave(rep, 0), zq[:, j:j_next])
    k_nope = _to_real(residual, src_planes)  # [G, d, D]

    # 2. the latent: a weighted PCA of [nope keys; values], orthonormal in n-space, plus norm carriers
    wy = torch.cat([k_nope.reshape(G * d, D), wv.reshape(G * d, D)])  # [2Gd, D]
    y_var = torch.einsum("rd,de,re->r", wy, cov, wy)  # [2Gd] E[y^2]
    if opts.kv_balance == "attn":  # a key row by the query energy that meets it, a value row by o_proj
        weight = torch.cat([torch.einsum("hid,de,hie->hi", wq, cov, wq).view(G, rep, d).sum(1).reshape(-1),
                            wo.pow(2).sum(0).view(G, rep, d).sum(1).reshape(-1)])
        weight = weight / weight.mean()
    else:
        weight = torch.ones(2 * G * d, dtype=torch.float64)
    k_energy, v_energy = (weight * y_var)[: G * d].sum(), (weight * y_var)[G * d :].sum()
    weight[: G * d] *= v_energy / k_energy.clamp_min(1e-30)  # TransMLA's BKV: keys and values at equal energy
    sw = weight.clamp_min(1e-30).sqrt()
    evals, u = torch.linalg.eigh(sw[:, None] * (wy @ cov @ wy.T) * sw[None])
    evals, u = evals.flip(0), u.flip(1)
    rank = int((evals > evals[0] * 1e-12).sum())
    n = stats.attn_n.double()  # [T', D] samples, to choose the carriers by what MLA's keys and values miss
    y = n @ wy.T
    best = None
    for carry in sorted({max(C - rank, 0)} | {k for k in NORM_CARRIERS if 0 < C - k <= rank}):
        r = C - carry
        basis, tri = torch.linalg.qr((u[:, :r].T @ (sw[:, None] * wy)).T)  # the PCA's down-projection = tri^T basis^T
        up = (u[:, :r] / sw[:, None]) @ tri.T  # [2Gd, r]: y ~ up (basis^T n)
        if carry:
            basis = torch.cat([basis, _norm_carriers(basis, n, cov, carry)], 1)
            up = torch.cat([up, up.new_zeros(2 * G * d, carry)], 1)
        c = n @ basis  # [T', C]
        z = (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + LATENT_NORM_EPS)) @ up.T  # [T', 2Gd]
        scale = float((y * z * weight).sum() / (z * z * weight).sum().clamp_min(1e-30))  # kv_a_layernorm's weight
        err = float(((y - scale * z).pow(2) * weight).sum(-1).mean())
        if best is None or err < best[0]:
            best = (err, basis, up, scale, carry, float(evals[:r].sum() / evals.sum().clamp_min(1e-30)))
    _, basis, up, scale, carry, kv_captured = best

    # 3. MLA's weights: per head [nope N | rope R] queries, per head [k_nope N | v V] up-projections
    q = wq.new_zeros(H, N + R, D)
    q[:, :d] = wq
    if opts.nope_decay:  # what meets keys unrotated, scaled by gamma
        gamma = rotation_kept(stats, inv_freq(d, src.rope_theta).double())  # [H, d/2]
        q[:, src_planes[:, 0]] *= gamma[..., None]
        q[:, src_planes[:, 1]] *= gamma[..., None]
    q[:, N:] = _to_real(q_rope, tgt_planes)
    kv_b = wq.new_zeros(H, N + V, C)
    kv_b[:, :d] = up[: G * d].view(G, d, C).repeat_interleave(rep, 0)
    kv_b[:, N : N + d] = up[G * d :].view(G, d, C).repeat_interleave(rep, 0)
    o = wo.new_zeros(D, H, V)
    o[:, :, :d] = wo
    state = {
        "q_proj.weight": (q * math.sqrt((N + R) / d)).reshape(H * (N + R), D),
        "kv_a_proj_with_mqa.weight": torch.cat([basis.T, _to_real(k_rope, tgt_planes)]),
        "kv_a_layernorm.weight": torch.full((C,), scale, dtype=torch.float64),
        "kv_b_proj.weight": kv_b.reshape(H * (N + V), C),
        "o_proj.weight": o.reshape(D, H * V),
    }
    return state, {"rope_captured": sum(captured) / len(captured), "kv_captured": kv_captured, "norm_carriers": carry}


def _norm_carriers(basis: torch.Tensor, n: torch.Tensor, cov: torch.Tensor, k: int) -> torch.Tensor:
    """k directions of n-space outside the latent basis [D, r] that carry most of the norm its tokens lack,
    each sample n_t [T', D] weighted by 1 / (its share of |n|^2 inside the basis) -> [D, k] orthonormal,
    orthogonal to basis."""
    r = basis.shape[1]
    outside = torch.linalg.qr(basis, mode="complete")[0][:, r:]  # [D, D-r] an orthonormal complement
    inside = (n @ basis).pow(2).sum(1) / n.pow(2).sum(1).clamp_min(1e-30)  # [T']
    weighted = (n @ outside) / inside.clamp_min(1e-3).sqrt()[:, None]  # [T', D-r]
    m = weighted.T @ weighted / len(n) + 1e-6 * outside.T @ cov @ outside  # + a full-rank term
    return outside @ torch.linalg.eigh(m)[1][:, -k:]


@torch.no_grad()
def linear_from_gqa(attn, norm_weight: torch.Tensor, stats: LayerStats, src: ModelConfig) -> dict[str, torch.Tensor]:
    """LinearAttention weights from a GQA layer: q/k/v/o copied (k, v repeated per head), the output gate
    near-constant and g_norm at the source heads' output scale."""
    H, G, d, D = src.num_attention_heads, src.num_key_value_heads, src.head_dim, src.hidden_size
    rep, w = H // G, norm_weight.double()
    mean_x, cov_x = stats.mean * w, stats.cov * w[:, None] * w[None]  # of x = w * n, the layer's input
    ridge = 1e-6 * cov_x.diagonal().mean() * torch.eye(D, dtype=torch.float64)
    u = torch.linalg.solve(cov_x + ridge, mean_x)  # least squares: x.u ~ 1
    out_rms = stats.head_ms.view(H, d).mean(0).sqrt()  # [d] per channel over heads (g_norm is shared)
    return {
        "q_proj.weight": attn.q_proj.weight,
        "k_proj.weight": attn.k_proj.weight.view(G, d, D).repeat_interleave(rep, 0).reshape(H * d, D),
        "v_proj.weight": attn.v_proj.weight.view(G, d, D).repeat_interleave(rep, 0).reshape(H * d, D),
        "o_proj.weight": attn.o_proj.weight,
        "g_proj.weight": (GATE_GAIN * u)[None].expand(H * d, D),
        "g_norm.weight": out_rms / F.silu(torch.tensor(GATE_GAIN, dtype=torch.float64)),
    }


# ---------------------------------------------------------------------------------------------------- FFN
def balanced_kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of x [n, f] by cosine into k clusters of n // k rows -> labels [n]."""
    n = x.shape[0]
    x = F.normalize(x, dim=1)
    centers = x[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]]
    for _ in range(iters):
        labels = balanced_assign(x @ centers.T, n // k)
        new = F.normalize(torch.stack([x[labels == c].sum(0) for c in range(k)]), dim=1)
        if torch.allclose(new, centers):
            break
        centers = new
    return labels


def balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """Labels [n] from similarities sim [n, k], at most `size` rows per cluster: in round j every row still
    free proposes to its j-th best cluster, which keeps the most similar proposers it has room for."""
    n, k = sim.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), size)
    prefs = sim.argsort(1, descending=True)  # [n, k]
    for j in range(k):
        for c in range(k):
            who = ((labels < 0) & (prefs[:, j] == c)).nonzero().flatten()
            keep = who[sim[who, c].argsort(descending=True)[: int(room[c])]]
            labels[keep] = c
            room[c] -= len(keep)
    return labels


@torch.no_grad()
def moe_from_swiglu(mlp, x: torch.Tensor, src: ModelConfig, tgt: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """MoE weights (names of smolds.model.moe.MoE) from a dense SwiGLU and samples x [T', D] of its inputs."""
    mode, n_clusters = moe_shape(src, tgt)
    E, K = tgt.n_routed_experts, tgt.num_experts_per_tok
    S = tgt.n_shared_experts * tgt.moe_intermediate_size
    wg, wu, wd = mlp.gate_proj.weight.float(), mlp.up_proj.weight.float(), mlp.down_proj.weight.float()
    act = F.silu(x @ wg.T) * (x @ wu.T)  # [T', F]
    imp = act.abs() * wd.norm(dim=0)  # [T', F] each neuron's share of each token's output

    shared = torch.zeros(0, dtype=torch.long)
    if S:  # the neurons most often among a token's S most important (ties: the larger mean importance)
        top = imp.topk(S, dim=1).indices
        freq = torch.zeros(imp.shape[1]).index_add_(0, top.flatten(), torch.ones(top.numel()))
        shared = (freq + imp.mean(0) / imp.mean(0).max()).argsort(descending=True)[:S].sort().values
    routed = torch.ones(imp.shape[1], dtype=torch.bool)
    routed[shared] = False
    routed = routed.nonzero().flatten()
    labels = balanced_kmeans(imp[:, routed].T, n_clusters, seed=seed)  # by co-activation
    clusters = [routed[labels == c] for c in range(n_clusters)]  # each [I] neuron ids

    if mode == "partition":
        experts, scale = clusters, 1.0
        norms = torch.stack([(act[:, c] @ wd[:, c].T).norm(dim=1) for c in clusters], 1)  # [T', E] output norms
        ridge = 1e-3 * x.pow(2).mean() * torch.eye(x.shape[1])
        router = torch.linalg.solve(x.T @ x / len(x) + ridge, x.T @ norms / len(x)).T  # [E, D] least squares
    else:
        copies = E // K
        experts = [clusters[e % K] for e in range(E)]  # expert e: shard e % K of copy e // K
        scale = K / tgt.routed_scaling_factor
        xs = x[:2048]
        tokens = balanced_kmeans(xs, copies, seed=seed)
        centers = torch.stack([xs[tokens == c].mean(0) for c in range(copies)])
        router = (centers - centers.mean(0)).repeat_interleave(K, 0)  # one row for a copy's K shards
    router = router * (ROUTER_LOGIT_STD / (x @ router.T).std().clamp_min(1e-12))
    state = {
        "experts.gate_proj": torch.stack([wg[c] for c in experts]),
        "experts.up_proj": torch.stack([wu[c] for c in experts]),
        "experts.down_proj": torch.stack([wd[:, c] * scale for c in experts]),
        "gate.weight": router,
        "gate.e_score_correction_bias": torch.zeros(E),
    }
    if S:
        state.update({"shared_experts.gate_proj.weight": wg[shared], "shared_experts.up_proj.weight": wu[shared],
                      "shared_experts.down_proj.weight": wd[:, shared]})
    return state


# ------------------------------------------------------------------------------------------------ convert
def convert(source: Transformer, target: str | dict | ModelConfig, calib_ids: torch.Tensor,
            opts: ConvertOptions | None = None, report: dict | None = None) -> Transformer:
    """The target model (fp32, eval mode) initialised from the GQA source, calibrated on calib_ids [B, T].
    `report`, if given, receives per-layer conversion statistics under "layers"."""
    opts = opts or ConvertOptions()
    src = source.config
    check_source(src)
    try:
        tgt = ModelConfig.load(target)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    check_target(src, tgt)
    source = source.float().eval()
    stats = calibrate(source, calib_ids, opts.sample_tokens, opts.seed)
    model = Transformer(tgt).eval()
    state = model.state_dict()  # what no source weight maps to (linear attention's decay gate) keeps its init
    own = source.state_dict()
    for name in ("embed_tokens.weight", "norm.weight", *(["lm_head.weight"] if not tgt.tie_word_embeddings else [])):
        state[name] = own[name]
    layers = []
    for i, (attn_kind, ffn_kind) in enumerate(tgt.layer_kinds()):
        blk, p = source.layers[i], f"layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            state[p + name] = own[p + name]
        info = {"attention": attn_kind, "ffn": ffn_kind}
        if attn_kind == "mla":
            attn_state, attn_info = mla_from_gqa(blk.self_attn, blk.input_layernorm.weight, stats[i], src, tgt, opts)
            state[p + "input_layernorm.weight"] = torch.ones_like(blk.input_layernorm.weight)  # absorbed
            info.update(attn_info)
        elif attn_kind == "linear":
            attn_state = linear_from_gqa(blk.self_attn, blk.input_layernorm.weight, stats[i], src)
        else:
            attn_state = dict(blk.self_attn.state_dict())
            if tgt.rope_interleave != src.rope_interleave:
                from smolds.interop.hf import half_to_interleaved, interleaved_to_half

                perm = half_to_interleaved if tgt.rope_interleave else interleaved_to_half
                attn_state["q_proj.weight"] = perm(attn_state["q_proj.weight"], src.num_attention_heads)
                attn_state["k_proj.weight"] = perm(attn_state["k_proj.weight"], src.num_key_value_heads)
        state.update({p + "self_attn." + k: v for k, v in attn_state.items()})
        ffn_state = (moe_from_swiglu(blk.mlp, stats[i].ffn_x, src, tgt, opts.seed + i) if ffn_kind == "moe"
                     else blk.mlp.state_dict())
        state.update({p + "mlp." + k: v for k, v in ffn_state.items()})
        layers.append(info)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    if report is not None:
        report["layers"] = layers
    return model


def convert_to(src: str | Path, out: str | Path, target: str, calib: list[str] | None = None,
               calib_tokens: int = 65536, seq_len: int = 1024, opts: ConvertOptions | None = None) -> Path:
    """`smolds convert SRC OUT --to TARGET`: load SRC, calibrate on `calib` (data specs as `smolds prep` takes;
    default: the pydoc topics), convert, save with the source's tokenizer and the conversion's report."""
    from data_prep.sources import DEFAULT_SOURCE
    from smolds.pretrained import load_pretrained, read_extra, save_pretrained

    model, tok = load_pretrained(src, dtype=torch.float32)
    if tok is None:
        raise ConvertError(f"{src} has no tokenizer, which calibration needs (import-hf and import-gguf keep it)")
    specs = calib or [DEFAULT_SOURCE]
    ids = calibration_ids(tok, specs, calib_tokens, min(seq_len, model.config.max_position_embeddings))
    report: dict = {}
    converted = convert(model, target, ids, opts, report)
    extra = {"converted_from": str(Path(src).resolve()), "source": read_extra(src), "target": str(target),
             "calibration": specs, "calibration_tokens": ids.numel(), "options": vars(opts or ConvertOptions()),
             "layers": report["layers"]}
    return save_pretrained(converted, out, tok, extra=extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smolds convert", description=(
        "Convert a Llama/SmolLM2 checkpoint (from import-hf or import-gguf) into the DeepSeek architecture: "
        "MLA attention, DeepSeekMoE FFNs, linear-attention layers, from its weights and calibration text; "
        "no training (heal it with smolds train --train.init_from OUT)."))
    p.add_argument("src", help="smolds checkpoint of a Llama/SmolLM2 model")
    p.add_argument("out", help="checkpoint directory to write")
    p.add_argument("--to", required=True, metavar="PRESET_OR_YAML", help="target model: a preset or a model YAML")
    p.add_argument("--calib", nargs="+", metavar="DATA", help="calibration text, as `smolds prep` takes it "
                   "(files, folders, globs, hf:NAME; default: pydoc:topics)")
    p.add_argument("--calib-tokens", type=int, default=65536, help="calibration tokens (default 65536)")
    p.add_argument("--method", choices=["rorope", "transmla"], default="rorope",
                   help="shared rotary key: query-weighted complex PCA (default) or TransMLA's real key PCA")
    args = p.parse_args(argv)
    from data_prep.errors import DataError
    from smolds.interop.cli import CHECKPOINT_FILES, check_out_dir
    from smolds.pretrained import CheckpointError

    try:
        check_out_dir(args.out, CHECKPOINT_FILES, args.src)
        out = convert_to(args.src, args.out, args.to, args.calib, args.calib_tokens,
                         opts=ConvertOptions(method=args.method))
    except (CheckpointError, DataError, ValueError, OSError) as e:  # ConvertError, ConfigError: ValueErrors
        print(f"smolds convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
