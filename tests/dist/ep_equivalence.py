"""Run under torchrun with 2 ranks: expert-parallel MoE == the single-process MoE, outputs and gradients."""

import os
import sys

import torch
import torch.distributed as dist

from smolds import ModelConfig
from smolds.model.expert_parallel import shard_experts
from smolds.model.moe import MoE


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig.from_preset("tiny").replace(hidden_size=32, moe_intermediate_size=16)
    torch.manual_seed(0)
    ref = MoE(cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    ep = MoE(cfg)
    ep.load_state_dict(ref.state_dict())
    shard_experts(ep, dist.group.WORLD)
    # Every rank routes different tokens (skewed so ranks send unequal amounts to each other).
    torch.manual_seed(1)
    xs = [torch.randn(2, 7 + 3 * r, 32) + r for r in range(world)]
    x = xs[rank].clone().requires_grad_(True)
    y, _ = ep(x)
    y.pow(2).sum().backward()
    # Reference: one process sees all ranks' tokens.
    outs, grads = [], []
    for r in range(world):
        xr = xs[r].clone().requires_grad_(True)
        yr, _ = ref(xr)
        yr.pow(2).sum().backward()
        outs.append(yr)
        grads.append(xr.grad)
    torch.testing.assert_close(y, outs[rank], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, grads[rank], rtol=1e-5, atol=1e-5)
    # Expert gradients: every rank's tokens reach the owner through the all-to-all backward, so the
    # owner's gradient is its slice of the reference's (which saw all ranks' tokens).
    L = cfg.n_routed_experts // world
    for name in ("gate_proj", "up_proj", "down_proj"):
        torch.testing.assert_close(getattr(ep.experts, name).grad,
                                   getattr(ref.experts, name).grad[rank * L:(rank + 1) * L], rtol=1e-4, atol=1e-5)
    print(f"rank {rank}: ep equivalence ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
