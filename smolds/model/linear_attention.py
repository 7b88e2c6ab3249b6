"""Multi-head linear attention with a data-dependent per-head decay (gated retention): the whole math in one file.

Dimension legend: B batch, T new tokens, D model width, H heads, K key width and V value width per head
(both `linear_head_dim`, or both the latent rank R in the latent variant), C chunk length, N chunks.

Each head keeps a state S [K, V] instead of a KV cache. Per token, with a decay alpha_t in (0, 1):

    S_t = alpha_t * S_{t-1} + k_t v_t^T        o_t = scale * q_t^T S_t

Unrolled, o_t = sum_{s<=t} (prod_{s<r<=t} alpha_r) (q_t . k_s) v_s: causal attention without a softmax whose
weights fade with distance. Decode costs O(H*K*V) per token whatever the context; the state is constant-size.

Why a data-dependent *scalar* gate per head (Mamba-2, "simple GLA", gated RetNet) and not the alternatives:
- RetNet's fixed per-head decay gamma_h cannot choose what to keep: a head forgets a name as fast as a comma.
  A gate alpha_t = sigmoid(w_h . x_t + b_h) lets the content decide, and it costs H numbers per token.
  We keep RetNet's multi-scale idea in the *initialization*: b_h is set so that alpha starts at
  gamma_h = 1 - 2^(-5-h), the RetNet decays, so heads start out spanning windows of ~32 to ~2^(4+H) tokens.
- GLA's per-channel gates (alpha_t in (0,1)^K) are more expressive, but the chunked form then needs the
  decay inside the q.k product (exp(b_i - b_j) per channel), which is no longer a plain matmul: kernels either
  divide by cumulative products (underflow) or use a second level of chunking. A scalar decay factors out of
  the dot product, so every step of the chunked form below is a matmul times an elementwise mask.
Keys and queries use no feature map (GLA found identity as good as any), no rotary embedding (the decay already
encodes relative position), and the scale K^-0.5. The output is normalized per head (RMSNorm over V, as
GLA and RetNet's GroupNorm: without a softmax the output's scale drifts with the sum of decayed weights) and
gated by silu(g_proj(x)) before o_proj. Names follow flash-linear-attention's SimpleGatedLinearAttention
(q_proj, k_proj, v_proj, gk_proj the decay gate, g_proj the output gate, g_norm, o_proj).

Three forms compute the same o, in fp32 (decay products underflow in bf16):
- `linear_attention_chunked` (training, prefill): split T into chunks of C. Inside a chunk, quadratic masked
  attention; across chunks, pass the state. Cost O(T*C*K + T*K*V) time, O(T*C + T/C*K*V) memory.
- `linear_attention_step` (decode, T = 1): the recurrence above.
- `smolds.model.reference.linear_attention_reference`: the quadratic masked form over the whole sequence,
  for tests.
On CUDA, when flash-linear-attention is installed, its `chunk_simple_gla` / `fused_recurrent_simple_gla`
kernels compute the same math (same gate, scale and state layout [K, V]).

Latent variant (`linear_kv_rank` = R): keys and values come from one MLA-style latent c = norm(W_DKV x) of
width R shared by all heads. As in MLA's absorbed decode path, W_UK is folded into the query (q_proj maps
straight to the latent space) and W_UV into the output (g_norm, g_proj and o_proj act on the latent output),
so each head attends with k = v = c and its state is [R, R]: k/v parameters fall from 2*D*H*K to D*R and the
state from H*K*V to H*R*R numbers. Heads still differ by their queries, decays and output projections.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from smolds.config import ModelConfig
from smolds.model.attention import AttnContext
from smolds.model.layers import RMSNorm

# ------------------------------------------------------------------------- the math (fp32, head-first)


def linear_attention_step(q, k, v, log_decay, scale: float, state: torch.Tensor):
    """One token: S = alpha S + k v^T; o = scale q^T S. q, k [B,H,K], v [B,H,V], log_decay [B,H],
    state [B,H,K,V] -> (o [B,H,V], new state)."""
    state = state * log_decay.exp()[..., None, None] + k[..., :, None] * v[..., None, :]
    o = (q[..., None, :] @ state).squeeze(-2) * scale  # [B,H,V]
    return o, state


def linear_attention_chunked(q, k, v, log_decay, scale: float, chunk_size: int, state: torch.Tensor | None = None):
    """Chunkwise-parallel form (RetNet/GLA). q, k [B,H,T,K], v [B,H,T,V], log_decay [B,H,T],
    state [B,H,K,V] or None (empty) -> (o [B,H,T,V], final state [B,H,K,V]).

    With b_i the cumulative log decay from the start of a chunk to its position i (b <= 0, non-increasing):
      intra:  o_i += sum_{j<=i in chunk} exp(b_i - b_j) (q_i . k_j) v_j     (a masked C x C matmul)
      inter:  o_i += exp(b_i) q_i^T S_in                                 (S_in: the state entering the chunk)
      state:  S_out = exp(b_C) S_in + sum_j exp(b_C - b_j) k_j v_j^T
    Every exponent is a difference b_i - b_j <= 0 taken before exp, so nothing overflows or divides by an
    underflowed product. T is padded to a multiple of C with k = v = 0 and log_decay = 0 (identity steps)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        log_decay = F.pad(log_decay, (0, pad))
    N = (T + pad) // C
    q, k, v = q.reshape(B, H, N, C, K), k.reshape(B, H, N, C, K), v.reshape(B, H, N, C, V)
    b = log_decay.reshape(B, H, N, C).cumsum(-1)  # [B,H,N,C] cumulative log decay within each chunk
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [B,H,N,C,C]
    o = ((q @ k.transpose(-1, -2)) * decay) @ v  # [B,H,N,C,V] intra-chunk
    chunk_kv = (k * (b[..., -1:] - b).exp()[..., None]).transpose(-1, -2) @ v  # [B,H,N,K,V] each chunk's write
    chunk_decay = b[..., -1].exp()[..., None, None]  # [B,H,N,1,1] decay across a whole chunk
    S = q.new_zeros(B, H, K, V) if state is None else state
    states_in = []
    for n in range(N):  # the only sequential part: N = T/C steps of O(K*V)
        states_in.append(S)
        S = S * chunk_decay[:, :, n] + chunk_kv[:, :, n]
    states_in = torch.stack(states_in, dim=2)  # [B,H,N,K,V]
    o = o + (q * b.exp()[..., None]) @ states_in  # inter-chunk
    return o.view(B, H, N * C, V)[:, :, :T] * scale, S


@functools.cache
def _fla_ops():
    """flash-linear-attention's simple-GLA kernels (Triton), or None when not installed."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except ImportError:
        return None
    return chunk_simple_gla, fused_recurrent_simple_gla


def linear_attention(q, k, v, log_decay, scale: float, chunk_size: int, state: torch.Tensor | None = None,
                     use_fla: bool | None = None):
    """Dispatch: fla's kernels on CUDA when installed, else the recurrence for one token, else chunked.
    Shapes and result as `linear_attention_chunked` (fp32 in, fp32 out). use_fla None decides as above; True
    forces fla's kernels on any device (the tests run them on CPU under Triton's interpreter), False PyTorch."""
    if use_fla is None:
        use_fla = q.is_cuda and _fla_ops() is not None
    if use_fla:
        if _fla_ops() is None:
            raise ImportError("use_fla=True needs flash-linear-attention: pip install fla-core")
        chunk_simple_gla, fused_recurrent_simple_gla = _fla_ops()
        kernel = fused_recurrent_simple_gla if q.shape[2] == 1 else chunk_simple_gla
        o, state = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g=log_decay.transpose(1, 2),
                          scale=scale, initial_state=state, output_final_state=True)  # fla is [B,T,H,*]
        return o.transpose(1, 2), state
    if q.shape[2] == 1:
        if state is None:
            state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
        o, state = linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], log_decay[:, :, 0], scale, state)
        return o[:, :, None], state
    return linear_attention_chunked(q, k, v, log_decay, scale, chunk_size, state)


# ------------------------------------------------------------------------------------------ the layer


class LinearAttentionCache:
    """Per-layer decode state: one [K, V] matrix per head, fp32 whatever the model dtype (it accumulates
    decayed sums), and the same size at any context length: nothing is stored per token."""

    def __init__(self, batch: int, n_heads: int, k_dim: int, v_dim: int, device):
        self.state = torch.zeros(batch, n_heads, k_dim, v_dim, device=device, dtype=torch.float32)  # [B,H,K,V]

    def tensors(self) -> list[torch.Tensor]:
        return [self.state]

    def bytes_per_token(self) -> int:
        return 0

    def state_bytes(self) -> int:
        return self.state.numel() * self.state.element_size()


class LinearAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = H = cfg.num_attention_heads
        self.kv_rank = cfg.linear_kv_rank
        self.head_dim = cfg.linear_head_dim if self.kv_rank is None else self.kv_rank  # K = V
        self.chunk_size = cfg.linear_chunk_size
        self.scale = self.head_dim**-0.5
        D, inner = cfg.hidden_size, H * self.head_dim
        self.q_proj = nn.Linear(D, inner, bias=False)
        if self.kv_rank is None:
            self.k_proj = nn.Linear(D, inner, bias=False)
            self.v_proj = nn.Linear(D, inner, bias=False)
        else:  # MLA's W_DKV and latent norm; keys and values are the latent itself (see module docstring)
            self.kv_a_proj = nn.Linear(D, self.kv_rank, bias=False)
            self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.rms_norm_eps)
        self.gk_proj = nn.Linear(D, H, bias=True)  # decay gate logits; the bias sets each head's base decay
        self.g_proj = nn.Linear(D, inner, bias=False)  # output gate
        self.g_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)  # per head, weight shared by heads
        self.o_proj = nn.Linear(inner, D, bias=False)
        self.init_weights(cfg.initializer_range, cfg.initializer_range)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float):
        """The gate bias b_h = logit(gamma_h), gamma_h = 1 - 2^(-5-h): RetNet's multi-scale decays at init.
        (Linear weights and norms are initialized by the Transformer; std and out_std are not needed here.)"""
        gamma = 1 - 2.0 ** (-5.0 - torch.arange(self.n_heads, dtype=torch.float32))
        self.gk_proj.bias.copy_(torch.log(gamma) - torch.log1p(-gamma))

    def new_cache(self, batch: int, max_len: int, device, dtype) -> LinearAttentionCache:
        """A constant-size state: max_len and dtype do not matter (the state is fp32)."""
        return LinearAttentionCache(batch, self.n_heads, self.head_dim, self.head_dim, device)

    def project(self, x: torch.Tensor, valid: torch.Tensor | None):
        """x [B,T,D] -> q, k [B,H,T,K], v [B,H,T,V], log_decay [B,H,T], all fp32. Tokens with valid False
        (left padding) get k = v = 0 and log_decay = 0: an identity step that leaves the state untouched."""
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, d).transpose(1, 2).float()
        if self.kv_rank is None:
            k = self.k_proj(x).view(B, T, H, d).transpose(1, 2).float()
            v = self.v_proj(x).view(B, T, H, d).transpose(1, 2).float()
        else:
            c = self.kv_a_layernorm(self.kv_a_proj(x)).float()  # [B,T,R]
            k = v = c[:, None].expand(B, H, T, d)  # shared by all heads (a view, no copy)
        log_decay = F.logsigmoid(self.gk_proj(x).float()).transpose(1, 2)  # [B,H,T] log alpha, <= 0
        if valid is not None:
            keep = valid[:, None, :]  # [B,1,T]
            k, v = k * keep[..., None], v * keep[..., None]
            log_decay = log_decay * keep
        return q, k, v, log_decay

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o [B,H,T,V] fp32 -> per-head RMSNorm, silu output gate, o_proj -> [B,T,D] in x's dtype."""
        B, _, T, _ = o.shape
        o = self.g_norm(o.transpose(1, 2).to(x.dtype))  # [B,T,H,V]
        o = o.reshape(B, T, -1) * F.silu(self.g_proj(x))
        return self.o_proj(o)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: LinearAttentionCache | None = None) -> torch.Tensor:
        q, k, v, log_decay = self.project(x, ctx.valid)
        if cache is None:
            o, _ = linear_attention(q, k, v, log_decay, self.scale, self.chunk_size)
        else:
            prefill = ctx.start == 0 and ctx.slot is None
            state = None if prefill else cache.state  # prefill starts from an empty state
            o, state = linear_attention(q, k, v, log_decay, self.scale, self.chunk_size, state)
            cache.state.copy_(state)
        return self.output(o, x)

    def mixing_macs(self, seq_len: int) -> float:
        """Forward multiply-adds per token of the chunked mixing (projections excluded): q.k and the weighted
        sum over the chunk, C*(K+V), plus writing to and reading from the state, 2*K*V; per head. Like
        softmax attention's, the causal half is not discounted."""
        C = min(self.chunk_size, seq_len)
        K = V = self.head_dim
        return float(self.n_heads * (C * (K + V) + 2 * K * V))
