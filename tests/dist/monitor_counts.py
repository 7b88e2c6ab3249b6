"""Run under torchrun with 2 ranks (gloo): the counts the routing monitor gets are the global batch's.

Both ranks build the same two-layer MoE stack (same seed) and a reference copy. Each rank routes its half of
a fixed global batch through the distributed copy; the reference routes the whole batch in this one
process. `RoutingStats.end_step` must return the same [L, E] counts on every rank as the reference's
(all-reduced over a one-rank group, i.e. not at all), leave identical biases, and give the monitor identical
rows (router entropy included: summed over the ranks' tokens with the counts). Then again with the routed
experts sharded by expert parallelism, where the assignments each rank actually received must equal the monitor's tokens_per_ep_rank.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from smolds import ModelConfig
from smolds.model.expert_parallel import shard_experts
from smolds.model.moe import MoE
from smolds.model.router import RoutingStats, routers
from smolds.monitor.live import RoutingMonitor
from smolds.monitor.stats import routing_stats


def stack(cfg, seed=0):
    torch.manual_seed(seed)
    m = nn.ModuleList([MoE(cfg), MoE(cfg)])
    for p in m.parameters():
        nn.init.normal_(p, 0, 0.2)
    for r in routers(m):
        r.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.05)
    return m.train()


@torch.no_grad()
def route(model, x):
    for moe in model:
        moe(x)


def check(ep: bool, rank: int, world: int, solo_group):
    cfg = ModelConfig.from_preset("tiny").replace(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8,
                                                  num_experts_per_tok=2, n_group=4, topk_group=2)
    ref, dist_model = stack(cfg), stack(cfg)
    received = torch.zeros(world)
    if ep:
        for moe in dist_model:
            shard_experts(moe, dist.group.WORLD)
            inner = moe.experts.forward

            def counting(x, counts, inner=inner):
                received[rank] += x.shape[0]  # (token, expert) pairs this rank's experts got
                return inner(x, counts)

            moe.experts.forward = counting
    torch.manual_seed(1)
    batch = torch.randn(2 * world, 9, 32) + torch.randn(32)  # one shared direction: an uneven load
    mon_ref = RoutingMonitor.for_model(ref, ep_size=world)
    mon = RoutingMonitor.for_model(dist_model, ep_size=world)
    stats_ref, stats = RoutingStats(ref, cfg, group=solo_group), RoutingStats(dist_model, cfg)
    for step in range(3):  # the bias moves between steps: later routing depends on the all-reduced counts
        x = batch + 0.1 * step
        route(ref, x)
        route(dist_model, x.chunk(world)[rank])
        expect = stats_ref.end_step()
        got = stats.end_step()
        assert torch.equal(got.counts, expect.counts), (ep, step, got.counts, expect.counts)
        assert got.counts.sum() == x.shape[0] * x.shape[1] * cfg.num_experts_per_tok * 2  # 2 layers
        for a, b in zip(routers(ref), routers(dist_model)):
            assert torch.equal(a.e_score_correction_bias, b.e_score_correction_bias)
        mon_ref.update(expect)
        mon.update(got)
    a, b = mon_ref.report(3).row, mon.report(3).row
    for k in ("expert_counts", "maxvio_per_layer", "cv_per_layer", "router_bias", "tokens_per_ep_rank",
              "ep_imbalance_per_layer", "dead_experts_per_layer"):
        assert a[k] == b[k], (ep, k, a[k], b[k])
    # Router entropy is summed over the ranks' tokens with the counts: the whole batch's, as one process's.
    assert torch.allclose(torch.tensor(a["router_entropy_per_layer"]), torch.tensor(b["router_entropy_per_layer"]),
                          rtol=1e-5), (ep, a["router_entropy_per_layer"], b["router_entropy_per_layer"])
    if ep:
        dist.all_reduce(received)
        per_rank = torch.tensor(b["tokens_per_ep_rank"]).sum(0)  # summed over the 2 layers and 3 steps
        assert torch.equal(received, per_rank.float()), (received, per_rank)
        assert routing_stats(torch.tensor(b["expert_counts"]), ep_size=world)["tokens_per_ep_rank"] == b[
            "tokens_per_ep_rank"]
    print(f"rank {rank}: monitor counts ok (ep={ep})", flush=True)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    solo = [dist.new_group([r]) for r in range(world)][rank]  # every rank takes part in creating each group
    check(False, rank, world, solo)
    check(True, rank, world, solo)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
