"""flash-linear-attention's kernels against our PyTorch chunked forms, through each kind's own argument mapping
(layout [B,H,T,*] -> [B,T,H,*], scale, log-decay g, state [B,H,K,V] in fp32): `linear_attention` against fla's
simple_gla kernels, `kda` against its KDA kernels. A script, run in a fresh process by
tests/test_linear_attention.py::test_fla_kernels_match_pytorch and tests/test_kda.py::test_fla_kernels_match_pytorch:

    TRITON_INTERPRET=1 python tests/fla_check.py [linear|kda]     # CPU: Triton's interpreter runs fla's kernels
    TRITON_F32_DEFAULT=ieee python tests/fla_check.py [linear|kda]  # CUDA: compiled kernels, fp32 dots (not tf32)

The interpreter executes the same kernel source as CUDA, one program at a time with numpy, so it checks
everything this file hands to fla; it says nothing about fla's GPU-specific compilation. Prints one JSON object,
per compared tensor {max_abs_diff, max_abs_ref, ok}; exits 1 when any is not ok. The kind defaults to linear.
"""

from __future__ import annotations

import ast
import json
import os
import sys

import torch
import torch.nn.functional as F

from smolds.model.kda import kda, kda_chunked, l2norm
from smolds.model.linear_attention import linear_attention, linear_attention_chunked

ATOL = RTOL = 1e-3  # linear: measured under 1e-5 of each tensor's largest value; a mapping mistake is O(1)
KDA_TOL = 1e-4  # kda: inputs of O(1) (L2-normalised q, k), measured differences below 1e-5


def _interpreter_shims():
    """Two gaps of Triton 3.9's interpreter that fla 0.6.0's kernels hit; both patched in this process only.
    1. Autotuning times each config through the active driver, and the interpreter has none ("0 active drivers",
       triton/runtime/autotuner.py `do_bench`): every config reports the same time, so the first one runs.
       Configs differ in speed only.
    2. A `for i in range(n)` index is a Python int in the interpreter but an int32 tensor when compiled, and
       fla/ops/common/chunk_h.py calls `i_t.to(tl.int64)` on it: wrap such indices as tensors, as compiled."""
    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interpreter

    autotuner.Autotuner.do_bench = lambda self, kernel_call, quantiles: [0.0, 0.0, 0.0]

    class LoopIndexAsTensor(interpreter.ASTTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            call = node.iter
            name = getattr(call.func, "id", getattr(call.func, "attr", None)) if isinstance(call, ast.Call) else None
            if name == "range" and isinstance(node.target, ast.Name):  # not static_range: that one unrolls
                to_tensor = ast.parse(f"{node.target.id} = interpreter_semantic.to_tensor({node.target.id}, False)")
                node.body.insert(0, to_tensor.body[0])
            return node

    interpreter.FunctionRewriter.ast_transformer = LoopIndexAsTensor()


def _recorder(results: dict, tol: float):
    def record(name, got, want):
        results[name] = {"max_abs_diff": (got - want).abs().max().item(), "max_abs_ref": want.abs().max().item(),
                         "ok": got.shape == want.shape and got.dtype == want.dtype
                         and torch.allclose(got, want, atol=tol, rtol=tol)}
    return record


def compare_linear(device: str) -> dict:
    """fla (use_fla=True) against PyTorch (linear_attention_chunked) on one set of inputs. K != V, H != B and a
    scale other than K^-0.5 (fla's default), so a swapped axis, a transposed state or a dropped scale shows."""
    torch.manual_seed(0)
    B, H, T, K, V, scale = 2, 3, 300, 32, 48, 0.3  # T = 4 chunks of 64 + 44: crosses and ends mid-chunk
    q, k = torch.randn(B, H, T, K, device=device), torch.randn(B, H, T, K, device=device)
    v = torch.randn(B, H, T, V, device=device)
    # per head, decays from strong (alpha ~ 0.88, forgets within a chunk) to weak (~0.9997, keeps the state)
    log_decay = F.logsigmoid(torch.randn(B, H, T, device=device) * 2 + torch.tensor([2.0, 5.0, 8.0], device=device)[:, None])
    state = torch.randn(B, H, K, V, device=device)
    results = {}
    record = _recorder(results, ATOL)

    # chunk kernel, prefill from an empty state
    o, s = linear_attention(q, k, v, log_decay, scale, 64, use_fla=True)
    o_ref, s_ref = linear_attention_chunked(q, k, v, log_decay, scale, 64)
    record("chunk_o", o, o_ref)
    record("chunk_state", s, s_ref)

    # chunk kernel from a state, forward and backward (to q, k, v, log_decay and the state)
    do, ds = torch.randn_like(o), torch.randn_like(s)
    grads = {}
    for use_fla in (True, False):
        inputs = [x.clone().requires_grad_() for x in (q, k, v, log_decay, state)]
        o, s = linear_attention(*inputs[:4], scale, 64, inputs[4], use_fla=use_fla)
        ((o * do).sum() + (s * ds).sum()).backward()
        grads[use_fla] = [o.detach(), s.detach()] + [x.grad for x in inputs]
    for name, got, want in zip(["o", "state", "dq", "dk", "dv", "dlog_decay", "dstate"], grads[True], grads[False]):
        record(f"chunk_from_state_{name}", got, want)

    # fused recurrent kernel: decode 3 tokens one at a time from a state (each call T = 1)
    outs, s = [], state
    for t in range(3):
        o, s = linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], log_decay[:, :, t:t + 1],
                                scale, 64, s, use_fla=True)
        outs.append(o)
    o_ref, s_ref = linear_attention_chunked(q[:, :, :3], k[:, :, :3], v[:, :, :3], log_decay[:, :, :3], scale, 64,
                                            state)
    record("decode_o", torch.cat(outs, 2), o_ref)
    record("decode_state", s, s_ref)
    return results


def compare_kda(device: str) -> dict:
    """fla (kda(use_fla=True)) against kda_chunked on one set of inputs. K != V, H != B, T crossing fla's
    64-token chunks and ending mid-chunk, and a scale other than K^-0.5 (fla's default), so a swapped axis,
    a transposed state or a dropped scale shows; per-channel decays from keeping (~0) to forgetting."""
    torch.manual_seed(0)
    B, H, T, K, V, scale = 1, 2, 100, 32, 16, 0.3
    q, k = (l2norm(torch.randn(B, H, T, K, device=device)) for _ in range(2))
    v = torch.randn(B, H, T, V, device=device)
    g = F.logsigmoid(torch.randn(B, H, T, K, device=device) * 3 + 2)  # [B,H,T,K] log decay per channel
    beta = torch.rand(B, H, T, device=device)
    state = torch.randn(B, H, K, V, device=device)
    results = {}
    record = _recorder(results, KDA_TOL)

    o, s = kda(q, k, v, g, beta, scale, 64, use_fla=True)  # chunk kernel, from an empty state
    o_ref, s_ref = kda_chunked(q, k, v, g, beta, scale, 64)
    record("chunk_o", o, o_ref)
    record("chunk_state", s, s_ref)

    do, ds = torch.randn_like(o), torch.randn_like(s)  # chunk kernel from a state, forward and backward
    grads = {}
    for use_fla in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta, state)]
        o, s = kda(*leaves[:5], scale, 64, leaves[5], use_fla=use_fla)
        ((o * do).sum() + (s * ds).sum()).backward()
        grads[use_fla] = [o.detach(), s.detach()] + [x.grad for x in leaves]
    for name, got, want in zip(["o", "state", "dq", "dk", "dv", "dg", "dbeta", "dstate"], grads[True], grads[False]):
        record(f"chunk_from_state_{name}", got, want)

    outs, s = [], state  # fused recurrent kernel: 3 decode steps from a state
    for t in range(3):
        o, s = kda(*(x[:, :, t:t + 1] for x in (q, k, v, g, beta)), scale, 64, s, use_fla=True)
        outs.append(o)
    o_ref, s_ref = kda_chunked(*(x[:, :, :3] for x in (q, k, v, g, beta)), scale, 64, state)
    record("decode_o", torch.cat(outs, 2), o_ref)
    record("decode_state", s, s_ref)
    return results


CHECKS = {"linear": compare_linear, "kda": compare_kda}

if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else "linear"
    if kind not in CHECKS:
        sys.exit(f"usage: fla_check.py [{'|'.join(CHECKS)}]")
    if os.environ.get("TRITON_INTERPRET") == "1":
        _interpreter_shims()
        device = "cpu"
    else:
        device = "cuda"
    results = CHECKS[kind](device)
    print(json.dumps(results))
    sys.exit(0 if all(r["ok"] for r in results.values()) else 1)
