"""Kimi Delta Attention (KDA): a gated delta rule with one decay per key channel, as Kimi Linear defines it.

Paper: "Kimi Linear: An Expressive, Efficient Attention Architecture" (Moonshot AI, 2025), which stacks 3 KDA
layers to 1 MLA layer in a DeepSeek-V3-style MoE. Parameter names follow transformers'
`KimiLinearDeltaAttention` (q_proj, k_proj, v_proj, conv1d, forget_gate.{f_a_proj, f_b_proj, dt_bias, A_log},
b_proj, g_a_proj, g_b_proj, o_norm, o_proj) with the same shapes, so a KimiLinear checkpoint maps by name.

Dimension legend: B batch, T new tokens, D model width, H heads, K key width and V value width per head
(both `linear_head_dim`), W convolution width, C chunk length, N chunks, c sub-chunk length, M sub-chunks.

Each head keeps a state S [K, V]. Per token, with a per-channel decay alpha_t in (0, 1)^K and beta_t in (0, 1):

    S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T        o_t = scale * S_t^T q_t

The state first forgets channel by channel, then the delta rule replaces what it recalls for k_t
(k_t^T S, a value) by v_t, at rate beta_t: with L2-normalised keys, S_t^T k_t = (1 - beta_t) recall + beta_t v_t.
Why over our scalar-decay linear attention (linear_attention.py): the delta rule overwrites instead of adding,
so a key can be rebound without the state filling with stale sums (the associative-recall gains of DeltaNet),
and per-channel decay (GLA's) lets each key channel keep its own memory span; Kimi Linear reports the 3:1
hybrid beating full MLA at equal training, with up to 75% less KV cache. Decode is O(H*K*V) a token.

The layer, per token x [D]:
- q, k, v = silu(causal depthwise conv of width W over (q_proj x, k_proj x, v_proj x)); q, k L2-normalised
  per head (x / sqrt(|x|^2 + 1e-6), fla's form) and scale = K^-0.5: the short convolution gives each token
  its neighbours (an induction-head shortcut), the normalisation keeps the delta rule's I - beta k k^T
  a contraction.
- log alpha = -exp(A_log) * softplus(f_b_proj(f_a_proj x) + dt_bias) per channel (Mamba's dt
  parameterisation through a rank-K bottleneck), beta = sigmoid(b_proj x) per head.
- o = o_proj(RMSNorm(o_head) * sigmoid(g_b_proj(g_a_proj x))): a gated RMSNorm per head with a low-rank
  output gate (rank K, as both gates in Kimi Linear).

Three forms of the core compute the same o and final state, in fp32 (the decays underflow in bf16):
- `kda_chunked` (training, prefill), the WY / UT-transform chunkwise algorithm of DeltaNet and fla's
  chunk_kda. In a chunk, with g_i the cumulative log decay from the chunk's start through token i and
  Gamma_ij = exp(g_i - g_j) per channel, the delta rule's writes u_i (what token i adds, net of what the
  state already recalls for k_i) satisfy a unit lower-triangular system
      (I + A) [w | u] = beta [exp(g) k | v],     A_ij = beta_i (k_i . Gamma_ij k_j) for j < i,
  solved at once for the chunk; then, from the state S entering the chunk,
      v_new = u - w S;   o = scale ((q exp(g)) S + P v_new),   P_ij = q_i . Gamma_ij k_j for j <= i;
      S_out = Diag(exp(g_C)) S + (k exp(g_C - g))^T v_new.
  Cost O(T*C*(K+V) + T*K*V) time, O(T*(c/2 + M)*K) memory: linear in T.
- `kda_step` (decode, T = 1) and `kda_recurrent` (the step over every token): the rank-1 form.
- `smolds.model.reference.kda_reference`: the recurrence above written with the K x K transition matrix, token
  by token (tests).
Numerics: Gamma_ij is never formed as exp(g_i) * exp(-g_j) (the second overflows once a chunk decays by
e^-88), nor as exp(g_i - g_j) of prefix sums (in fp32, a channel that kept its memory since j loses its small
decays against the large sum of its earlier forgetting: 1e-4 errors). Every exponent is instead the sum of
the per-token log decays of its own span: `_decayed_dots` splits a chunk into sub-chunks of c = 16 tokens
(fla's BC), sums each causal pair's span inside a sub-chunk and uses three factors across sub-chunks. The chunked
form then matches the recurrence to fp32 rounding for any gates. With g of last dim 1 (one decay per head)
the same code is the gated delta rule of Gated DeltaNet (Qwen3-Next); tests hold it to fla's reference too.

On CUDA, when flash-linear-attention is installed, its `chunk_kda` / `fused_recurrent_kda` kernels compute
the same math (same gate, scale and state layout [K, V]).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from smolds.config import ModelConfig
from smolds.model.attention import AttnContext
from smolds.model.layers import RMSNorm

SUB_CHUNK = 16  # c: tokens per sub-chunk of the intra-chunk products (fla's BC)

# ------------------------------------------------------------------------- the math (fp32, head-first)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dim: fla's and transformers' form (eps inside the root)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def kda_step(q, k, v, g, beta, scale: float, state: torch.Tensor):
    """One token. q, k [B,H,K], v [B,H,V], g [B,H,K] log decay per channel (or [B,H,1], one per head),
    beta [B,H], state [B,H,K,V] -> (o [B,H,V], new state)."""
    state = state * g.exp()[..., None]  # forget, channel by channel
    recalled = (k[..., None, :] @ state).squeeze(-2)  # [B,H,V] what the state holds for k
    state = state + k[..., :, None] * (beta[..., None] * (v - recalled))[..., None, :]  # move it toward v
    return (q[..., None, :] @ state).squeeze(-2) * scale, state


def kda_recurrent(q, k, v, g, beta, scale: float, state: torch.Tensor | None = None):
    """`kda_step` over every token (what decoding does one token at a time); shapes as `kda_chunked`."""
    B, H, T, K = q.shape
    if state is None:
        state = q.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for t in range(T):
        o, state = kda_step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t], scale, state)
        outs.append(o)
    return torch.stack(outs, dim=2), state


def _later(n: int, like: torch.Tensor) -> torch.Tensor:
    """[n, n] 0/1 with [i, t] = 1 for t > i: `_later(n, g) @ g` sums the entries after each one along dim -2
    (a suffix sum as a matmul: never a difference of prefix sums)."""
    return torch.ones(n, n, dtype=like.dtype, device=like.device).triu(1)


def _decayed_dots(lefts: tuple[torch.Tensor, ...], b: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """For each a in lefts: P_ij = sum_d a_i[d] b_j[d] exp(sum_{j<t<=i} g_t[d]) for j <= i, else 0, per chunk.
    a, b [..., C, K], g [..., C, K or 1] per-token log decays (<= 0) -> [..., C, C] each. The decays and the
    decayed b are computed once for all lefts (the chunked form needs k.k and q.k).

    Sub-chunks of c tokens: for i in sub-chunk m and j in an earlier sub-chunk n, the decay from j to i is
    three factors: from j to the end of n, across the sub-chunks strictly between, from the start of m to i.
    Within a sub-chunk, the [K] decays of each causal pair. Every exponent is the sum of the log decays of its
    own span (a cumsum, or a product with a 0/1 matrix), never a difference of prefix sums, so nothing
    overflows (each is <= 0) and nothing cancels (a keeping channel's small decays are not lost against a
    forgetting channel's large ones). Elementwise work and memory ~(c/2 + M)*K per token."""
    *lead, C, K = b.shape
    c = math.gcd(C, SUB_CHUNK)
    M = C // c
    b, g = b.reshape(*lead, M, c, K), g.reshape(*lead, M, c, g.shape[-1])
    # within a sub-chunk, over its P causal pairs (i, j) only: span = sum_{j<t<=i} g_t. Gathers and the scatter
    # back are products with one-hot matrices (CPU indexing, and its backward, is several times slower)
    i, j = torch.tril_indices(c, c, device=b.device)  # [P] each
    t = torch.arange(c, device=b.device)
    span = ((j[:, None] < t) & (t <= i[:, None])).to(b.dtype) @ g  # [..., M, P, K]
    eye = torch.eye(c, dtype=b.dtype, device=b.device)
    pick_i, place = eye[i], torch.eye(c * c, dtype=b.dtype, device=b.device)[i * c + j]  # [P, c], [P, c*c]
    b_pairs = (eye[j] @ b) * span.exp()  # [..., M, P, K]
    # across sub-chunks: b decayed from after j to the end of its sub-chunk n, then over the sub-chunks n < l < m
    ones = torch.ones(M, M, dtype=torch.bool, device=b.device)
    between = (ones.tril(-1)[:, None, :] & ones.triu(1)[None]).to(b.dtype)  # [M(m), M(n), M(l)]
    gap = torch.einsum("mnl,...lk->...mnk", between, g.sum(-2)).exp()  # [..., M, M, K]
    b_far = gap[..., None, :] * (b * (_later(c, g) @ g).exp())[..., None, :, :, :]  # [..., M(m), M(n), c, K]
    decay_in = g.cumsum(-2).exp()  # [..., M, c, K] from the sub-chunk's start through i
    earlier = ones.tril(-1)[:, :, None, None]  # n < m
    same = torch.eye(M, dtype=b.dtype, device=b.device)[:, :, None, None]
    out = []
    for a in lefts:
        a = a.reshape(*lead, M, c, K)
        diag = (((pick_i @ a) * b_pairs).sum(-1) @ place).view(*lead, M, c, c)  # [..., M, P] placed in [c, c]
        off = (a * decay_in)[..., :, None, :, :] @ b_far.transpose(-1, -2)  # [..., M, M, c, c]
        blocks = torch.where(earlier, off, 0) + same * diag[..., :, None, :, :]  # [..., M, M, c, c]
        out.append(blocks.transpose(-3, -2).reshape(*lead, C, C))
    return out


def kda_chunked(q, k, v, g, beta, scale: float, chunk_size: int, state: torch.Tensor | None = None):
    """Chunkwise-parallel form (module docstring). q, k [B,H,T,K] (L2-normalised), v [B,H,T,V],
    g [B,H,T,K] log decay per channel <= 0 (or [B,H,T,1], one per head), beta [B,H,T],
    state [B,H,K,V] or None (empty) -> (o [B,H,T,V], final state [B,H,K,V]).
    T is padded to a multiple of C with k = v = 0, g = 0 and beta = 0: identity steps."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if pad:
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
        beta = F.pad(beta, (0, pad))
    N = (T + pad) // C
    q, k, v, g = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v, g))
    beta = beta.reshape(B, H, N, C, 1)
    g_in = g.cumsum(-2)  # [B,H,N,C,K] log decay from the chunk's start through each token
    A, P = _decayed_dots((k, q), k, g)  # [B,H,N,C,C] each, j <= i (unitriangular: the solve reads A's j < i)
    wu = torch.linalg.solve_triangular(A * beta, beta * torch.cat([k * g_in.exp(), v], -1), upper=False,
                                       unitriangular=True)  # [B,H,N,C,K+V] (I + A)^-1 beta [exp(g) k | v]
    w, u = wu.split([K, V], dim=-1)
    q_in = q * g_in.exp()  # [B,H,N,C,K] decayed from the chunk's start
    k_out = k * (_later(C, g) @ g).exp()  # [B,H,N,C,K] decayed from after each token to the chunk's end
    chunk_decay = g_in[..., -1, :].exp()[..., None]  # [B,H,N,K,1] (or [B,H,N,1,1])
    S = q.new_zeros(B, H, K, V) if state is None else state
    outs = []
    # the only sequential part: N = T/C steps of O(C*K*V). unbind, not x[:, :, n]: the backward of an index
    # writes into a zero tensor of the whole input, N times over (quadratic in T); unbind's stacks once
    for u_n, w_n, q_n, P_n, k_n, decay_n in zip(*(x.unbind(2) for x in (u, w, q_in, P, k_out, chunk_decay))):
        v_new = u_n - w_n @ S  # [B,H,C,V] what each token writes, net of what S recalls
        outs.append(q_n @ S + P_n @ v_new)
        S = decay_n * S + k_n.transpose(-1, -2) @ v_new
    o = torch.stack(outs, dim=2).reshape(B, H, N * C, V)[:, :, :T]
    return o * scale, S


@functools.cache
def _fla_ops():
    """flash-linear-attention's KDA kernels (Triton), or None when not installed."""
    try:
        from fla.ops.kda import chunk_kda, fused_recurrent_kda
    except ImportError:
        return None
    return chunk_kda, fused_recurrent_kda


def kda(q, k, v, g, beta, scale: float, chunk_size: int, state: torch.Tensor | None = None,
        use_fla: bool | None = None):
    """Dispatch: fla's kernels on CUDA when installed, else the step for one token, else chunked. Shapes and
    result as `kda_chunked` (fp32 in, fp32 out). use_fla None decides as above; True forces fla's kernels on
    any device (the tests run them on CPU under Triton's interpreter), False PyTorch."""
    if use_fla is None:
        use_fla = q.is_cuda and _fla_ops() is not None
    if use_fla:
        if _fla_ops() is None:
            raise ImportError("use_fla=True needs flash-linear-attention: pip install fla-core")
        chunk_kda, fused_recurrent_kda = _fla_ops()
        kernel = fused_recurrent_kda if q.shape[2] == 1 else chunk_kda  # chunk_kda's own chunk: 64
        o, state = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          g=g.expand_as(k).transpose(1, 2), beta=beta.transpose(1, 2), scale=scale,
                          initial_state=state, output_final_state=True)  # fla is [B,T,H,*]
        return o.transpose(1, 2), state
    if q.shape[2] == 1:
        if state is None:
            state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
        o, state = kda_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0], scale, state)
        return o[:, :, None], state
    return kda_chunked(q, k, v, g, beta, scale, chunk_size, state)


def short_conv(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor | None = None):
    """silu(causal depthwise conv): x [B,CH,T] (CH channels), weight [CH,1,W], conv_state [B,CH,W-1] (the
    previous W-1 inputs; None: zeros, a sequence start) -> (out [B,CH,T], the last W-1 inputs [B,CH,W-1])."""
    B, CH, T = x.shape
    W = weight.shape[-1]
    past = x.new_zeros(B, CH, W - 1) if conv_state is None else conv_state.to(x.dtype)
    x = torch.cat([past, x], dim=-1)  # [B, CH, W-1+T]
    return F.silu(F.conv1d(x, weight, groups=CH)), x[..., T:]


# ------------------------------------------------------------------------------------------ the layer


class KDACache:
    """Per-layer decode state, the same size at any context length: one [K, V] matrix per head in fp32 (it
    accumulates), and the convolution's last W-1 inputs of q, k and v in the model dtype."""

    def __init__(self, batch: int, n_heads: int, head_dim: int, conv_width: int, device, dtype):
        self.state = torch.zeros(batch, n_heads, head_dim, head_dim, device=device, dtype=torch.float32)  # [B,H,K,V]
        self.conv_state = torch.zeros(batch, 3 * n_heads * head_dim, conv_width - 1, device=device,
                                      dtype=dtype)  # [B, 3*H*K, W-1]

    def tensors(self) -> list[torch.Tensor]:
        return [self.state, self.conv_state]

    def bytes_per_token(self) -> int:
        return 0

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class KDAForgetGate(nn.Module):
    """log alpha [B,T,H,K] = -exp(A_log_h) * softplus(f_b_proj(f_a_proj x) + dt_bias), in fp32.
    Names and shapes as transformers' KimiLinearForgetGate (A_log [1,1,H,1] broadcasts over [B,T,H,K])."""

    def __init__(self, hidden_size: int, n_heads: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.f_a_proj = nn.Linear(hidden_size, head_dim, bias=False)
        self.f_b_proj = nn.Linear(head_dim, n_heads * head_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(n_heads * head_dim))
        self.A_log = nn.Parameter(torch.zeros(1, 1, n_heads, 1))
        self.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()  # [B,T,H*K]
        f = f.view(*x.shape[:2], -1, self.head_dim)  # [B,T,H,K]
        return -self.A_log.float().exp() * F.softplus(f)

    @torch.no_grad()
    def init_weights(self, std: float | None = None, out_std: float | None = None):
        """fla's (and transformers') init: decay rates A ~ U(1, 16); dt = softplus(dt_bias) ~ logU(1e-3, 1e-1),
        so each channel starts keeping exp(-A*dt) of its memory per token, from 0.2 to 0.999. (The Transformer
        calls this as it does every layer's init_weights; std and out_std are not needed here.)"""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp_min(1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


class KDA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = H = cfg.num_attention_heads
        self.head_dim = K = cfg.linear_head_dim  # K = V
        self.chunk_size = cfg.linear_chunk_size
        self.scale = K**-0.5
        D, inner = cfg.hidden_size, H * K
        self.q_proj = nn.Linear(D, inner, bias=False)
        self.k_proj = nn.Linear(D, inner, bias=False)
        self.v_proj = nn.Linear(D, inner, bias=False)
        W = cfg.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(3 * inner, 3 * inner, W, groups=3 * inner, bias=False)  # over [q | k | v]
        self.forget_gate = KDAForgetGate(D, H, K)
        self.b_proj = nn.Linear(D, H, bias=False)  # beta logits
        self.g_a_proj = nn.Linear(D, K, bias=False)  # output gate, rank K
        self.g_b_proj = nn.Linear(K, inner, bias=False)
        self.o_norm = RMSNorm(K, cfg.rms_norm_eps)  # per head, weight shared by heads
        self.o_proj = nn.Linear(inner, D, bias=False)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float):
        """The convolution's PyTorch default (what fla's ShortConvolution and Kimi Linear train from); the forget
        gate inits itself (KDAForgetGate.init_weights), and the Transformer the Linear weights and norms."""
        self.conv1d.reset_parameters()

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KDACache:
        """A constant-size state: max_len does not matter."""
        return KDACache(batch, self.n_heads, self.head_dim, self.conv1d.kernel_size[0], device, dtype)

    def project(self, x: torch.Tensor, conv_state: torch.Tensor | None = None):
        """x [B,T,D] -> q, k [B,H,T,K] (L2-normalised), v [B,H,T,V], g [B,H,T,K], beta [B,H,T], all fp32, and
        the convolution's new state [B,3*H*K,W-1]. conv_state None: the sequence starts here."""
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1).transpose(1, 2)  # [B,3*H*K,T]
        qkv, conv_state = short_conv(qkv, self.conv1d.weight, conv_state)
        q, k, v = qkv.float().view(B, 3, H, d, T).permute(1, 0, 2, 4, 3)  # each [B,H,T,K]
        g = self.forget_gate(x).transpose(1, 2)  # [B,H,T,K]
        beta = torch.sigmoid(self.b_proj(x).float()).transpose(1, 2)  # [B,H,T]
        return l2norm(q), l2norm(k), v, g, beta, conv_state

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o [B,H,T,V] fp32 -> per-head RMSNorm (fp32) times sigmoid(output gate), o_proj -> [B,T,D] in x's dtype."""
        B, _, T, _ = o.shape
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, self.n_heads, self.head_dim)  # [B,T,H,V]
        o = self.o_norm(o.transpose(1, 2)) * torch.sigmoid(gate.float())  # [B,T,H,V]
        return self.o_proj(o.to(x.dtype).reshape(B, T, -1))

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KDACache | None = None) -> torch.Tensor:
        if ctx.valid is not None:  # left padding: x = 0 gives q = k = v = 0 there, as before a sequence start,
            x = x * ctx.valid[..., None].to(x.dtype)  # so a padding step only decays the still-empty state
        prefill = cache is None or (ctx.start == 0 and ctx.slot is None)  # a prefill starts from empty states
        q, k, v, g, beta, conv_state = self.project(x, None if prefill else cache.conv_state)
        o, state = kda(q, k, v, g, beta, self.scale, self.chunk_size, None if prefill else cache.state)
        if cache is not None:
            cache.state.copy_(state)
            cache.conv_state.copy_(conv_state)
        return self.output(o, x)

    def mixing_macs(self, seq_len: int) -> float:
        """Forward multiply-adds per token of the chunked form (projections and convolution excluded), per head:
        the two intra-chunk products k.k and q.k, 2*C*K; the triangular solve for [w | u], C*(K+V); the
        intra-chunk weighted sum, C*V; and w S, q S and the state write, 3*K*V. The causal half not discounted."""
        C = min(self.chunk_size, seq_len)
        K = V = self.head_dim
        return float(self.n_heads * (C * (3 * K + 2 * V) + 3 * K * V))
