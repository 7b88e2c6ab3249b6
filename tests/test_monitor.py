"""Routing monitor: statistics on hand-built routing decisions, the live monitor's intervals and warnings,
the router's entropy accumulator, and the PNGs."""

import math

import numpy as np
import pytest
import torch

from smolds import ModelConfig
from smolds.model.moe import MoE
from smolds.model.router import Router, RoutingStats
from smolds.monitor.live import RoutingMonitor, window_for
from smolds.monitor.stats import max_violation, routing_stats


def counts_of(topk_idx, n_experts):
    return torch.bincount(torch.as_tensor(topk_idx).flatten(), minlength=n_experts).float()


def test_stats_of_hand_built_decisions():
    # 4 tokens, top-2 of 4 experts: expert 0 three times, 1 and 2 twice, 3 once.
    layer0 = counts_of([[0, 1], [0, 2], [0, 3], [1, 2]], 4)  # [3, 2, 2, 1]
    layer1 = counts_of([[0, 1], [0, 1], [0, 1], [0, 1]], 4)  # [4, 4, 0, 0]
    biases = torch.tensor([[0.1, -0.2, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0]])
    prev = torch.tensor([[0.0, -0.1, 0.0, 0.2], [0.0, 0.0, 0.0, 0.4]])
    s = routing_stats(torch.stack([layer0, layer1]), biases, prev, entropy=[0.9, 0.5], ep_size=2)
    assert s["load_share"] == [[3 / 8, 2 / 8, 2 / 8, 1 / 8], [0.5, 0.5, 0.0, 0.0]]
    assert s["maxvio_per_layer"] == [(3 - 2) / 2, (4 - 2) / 2] and s["maxvio"] == 0.75
    assert s["cv_per_layer"] == pytest.approx([math.sqrt(0.5) / 2, 2 / 2], abs=1e-12)
    assert s["load_share_min"] == [1 / 8, 0.0] and s["load_share_max"] == [3 / 8, 0.5]
    h0 = -(3 / 8 * math.log(3 / 8) + 2 * 2 / 8 * math.log(2 / 8) + 1 / 8 * math.log(1 / 8)) / math.log(4)
    assert s["load_entropy_per_layer"] == pytest.approx([h0, math.log(2) / math.log(4)], abs=1e-12)
    assert s["dead_experts_per_layer"] == [[], [2, 3]] and s["dead_experts"] == 2
    assert s["router_entropy_per_layer"] == [0.9, 0.5] and s["router_entropy"] == pytest.approx(0.7)
    assert s["bias_min"] == pytest.approx([-0.2, 0.0]) and s["bias_max"] == pytest.approx([0.3, 0.0])
    assert s["bias_mean"] == pytest.approx([0.05, 0.0])
    assert s["bias_change_per_layer"] == pytest.approx([0.3 / 4, 0.4 / 4]) and s["bias_change"] == pytest.approx(0.0875)
    # EP 2: rank 0 holds experts 0-1, rank 1 experts 2-3.
    assert s["tokens_per_ep_rank"] == [[5, 3], [8, 0]]
    assert s["ep_imbalance_per_layer"] == [5 / 4, 2.0] and s["ep_imbalance"] == 1.625
    # Same definition as the trainer's max_violation.
    assert s["maxvio_per_layer"] == pytest.approx(max_violation(torch.stack([layer0, layer1]))[0].tolist())


def test_balanced_load_gives_maxvio_zero():
    counts = torch.full((3, 8), 12.0)
    s = routing_stats(counts, ep_size=4)
    assert s["maxvio"] == 0.0 and s["cv"] == 0.0 and s["dead_experts"] == 0
    assert s["load_entropy"] == pytest.approx(1.0) and s["ep_imbalance"] == 1.0
    mon = RoutingMonitor(3, 8, ep_size=4)
    for _ in range(3):
        mon.update(counts)
    row = mon.report(3).row
    assert row["maxvio"] == 0.0 and row["maxvio_per_layer"] == [0.0] * 3 and row["ep_imbalance"] == 1.0


def test_monitor_interval_is_the_sum_of_its_steps_and_maxvio_the_mean_of_batches():
    steps = [torch.tensor([[4.0, 0, 2, 2]]), torch.tensor([[2.0, 2, 2, 2]]), torch.tensor([[1.0, 1, 5, 1]])]
    mon = RoutingMonitor(1, 4, ep_size=2, window=10)
    for c in steps[:2]:
        mon.update(c)
    r = mon.report(2)
    assert r.row["routing_steps"] == 2 and r.row["expert_counts"] == [[6, 2, 4, 4]]
    assert r.row["maxvio"] == pytest.approx((1.0 + 0.0) / 2)  # mean of MaxVio_batch, not MaxVio of the sum
    assert r.row["ep_imbalance"] == pytest.approx((4 / 4 + 4 / 4) / 2)
    assert r.row["cv"] == pytest.approx(routing_stats(torch.tensor([[6.0, 2, 4, 4]]))["cv"], rel=1e-5)
    mon.update(steps[2])
    r = mon.report(3)
    assert r.row["routing_steps"] == 1 and r.row["expert_counts"] == [[1, 1, 5, 1]]
    assert r.row["maxvio"] == pytest.approx(1.5) and r.row["ep_imbalance"] == pytest.approx(6 / 4)
    assert mon.report(4) is None  # nothing since the last report


def test_dead_expert_and_maxvio_warnings_fire_once_per_episode():
    mon = RoutingMonitor(2, 4, window=3, maxvio_threshold=0.5, layer_ids=[1, 3])
    dead = torch.tensor([[4.0, 4, 4, 0], [4.0, 4, 2, 2]])  # layer 1: expert 3 idle; MaxVio 1/3, 1/3
    skew = torch.tensor([[10.0, 2, 2, 2], [4.0, 4, 4, 4]])  # MaxVio 1.5, 0 -> mean 0.75 > 0.5
    for _ in range(2):
        mon.update(dead)
    r = mon.report(2)
    assert r.warnings == [] and r.row["dead_experts"] == 0  # 2 idle steps < window
    mon.update(dead)
    r = mon.report(3)
    assert r.row["dead_experts_per_layer"] == [[3], []] and r.row["dead_experts"] == 1
    assert len(r.warnings) == 1 and "layer 1" in r.warnings[0] and "expert 3" in r.warnings[0] and "dead" in r.warnings[0]
    mon.update(dead)
    assert mon.report(4).warnings == []  # still dead: no repeat
    for _ in range(3):
        mon.update(skew)  # expert 3 revives; MaxVio above threshold for 3 steps
    r = mon.report(7)
    assert r.row["dead_experts"] == 0 and len(r.warnings) == 1 and "MaxVio" in r.warnings[0]
    mon.update(skew)
    assert mon.report(8).warnings == []
    for _ in range(3):
        mon.update(dead)  # dead again for a full window: a new episode warns again
    assert any("expert 3" in w for w in mon.report(11).warnings)


def test_update_needs_no_host_sync(monkeypatch):
    """Per step the monitor must only queue device work: every way to read a tensor on the host raises."""
    mon = RoutingMonitor(2, 4, ep_size=2, window=1)
    mon.update(torch.ones(2, 4))  # first call allocates the accumulators

    def host_read(*args, **kwargs):
        raise AssertionError("host sync in RoutingMonitor.update")

    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for _ in range(3):
        mon.update(torch.tensor([[0.0, 2, 3, 4], [1.0, 1, 1, 1]]))
    monkeypatch.undo()
    assert mon.report(4).row["dead_experts_per_layer"] == [[0], []]


def _cfg():
    return ModelConfig.from_preset("tiny").replace(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2,
                                                   moe_intermediate_size=16, n_group=1, topk_group=1)


def test_router_entropy_and_bias_through_a_real_router():
    c = _cfg()
    model = torch.nn.Module()
    model.moe = MoE(c).train()
    gate = model.moe.gate
    torch.nn.init.zeros_(gate.weight)  # every affinity is sigmoid(0) = 0.5: normalized, exactly uniform
    gate.e_score_correction_bias.copy_(torch.tensor([0.3, 0.2, 0, 0, 0, 0, 0, 0]))  # everyone picks 0 and 1
    mon = RoutingMonitor.for_model(model, ep_size=2, window=1)
    with torch.no_grad():
        model.moe(torch.randn(2, 5, 32))
        model.moe(torch.randn(1, 6, 32))
    assert gate.entropy_sum.tolist() == pytest.approx([16 * math.log(8), 16], rel=1e-6)
    routed = RoutingStats(model, c).end_step()
    assert routed.counts.tolist() == [[16, 16, 0, 0, 0, 0, 0, 0]]
    assert gate.entropy_sum.tolist() == [0.0, 0.0]  # read and zeroed
    mon.update(routed)
    row = mon.report(1).row
    assert row["router_entropy"] == pytest.approx(1.0, rel=1e-6)
    assert row["maxvio"] == pytest.approx(8 / 2 - 1) and row["dead_experts_per_layer"] == [[2, 3, 4, 5, 6, 7]]
    assert row["tokens_per_ep_rank"] == [[32, 0]] and row["ep_imbalance"] == pytest.approx(2.0)
    u = c.bias_update_rate  # overloaded 0 and 1 went down by u, the idle ones up by u
    assert row["router_bias"] == [pytest.approx([0.3 - u, 0.2 - u] + [u] * 6)]
    assert row["bias_change"] == pytest.approx(u, rel=1e-5) and row["bias_max"] == [pytest.approx(0.3 - u)]
    # Eval-mode forwards move neither counts nor entropy.
    model.moe.eval()
    with torch.no_grad():
        model.moe(torch.randn(1, 4, 32))
    assert gate.entropy_sum.tolist() == [0.0, 0.0] and gate.tokens_per_expert.sum() == 0


def test_the_warning_window_scales_with_a_short_run():
    assert window_for(60) == 6 and window_for(20) == 5 and window_for(400) == 40 and window_for(10**6) == 100
    mon = RoutingMonitor(1, 4, window=window_for(60))
    for _ in range(6):
        mon.update(torch.tensor([[12.0, 0, 0, 0]]))  # one expert takes every token (MaxVio 3)
    warnings = mon.report(6).warnings
    assert any("expert 1, 2, 3" in w or "experts 1, 2, 3" in w for w in warnings)
    assert any("not balancing" in w for w in warnings)


def test_entropy_buffer_stays_fp32_and_unsaved():
    r = Router(_cfg()).to(torch.bfloat16)
    assert r.entropy_sum.dtype == torch.float32 and "entropy_sum" not in r.state_dict()


def test_images_have_the_documented_size(tmp_path):
    from PIL import Image

    from smolds.monitor import plots as mp

    mon = RoutingMonitor(3, 8, log_images_every=2, out_dir=tmp_path, layer_ids=[1, 2, 3])
    torch.manual_seed(0)
    paths = {}
    for step in range(1, 5):
        mon.update(torch.randint(0, 20, (3, 8)).float())
        r = mon.report(step)
        if r.images:
            paths[step] = r.images
    assert sorted(paths) == [1, 3]  # the first report, then every 2 steps
    mon.update(torch.ones(3, 8))
    assert mon.report(5, draw=True).images  # asked for (the trainer does at every eval and the last step)
    sizes = {"load_heatmap": mp.pixels(mp.HEATMAP_SIZE), "maxvio": mp.pixels(mp.CURVE_SIZE)}
    assert sizes == {"load_heatmap": (900, 500), "maxvio": (900, 450)}
    for name, path in paths[3].items():
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == sizes[name], (name, im.size)
    bias = mp.bias_panels([1, 2, 3], np.random.randn(3, 5, 8), [1, 2, 3, 4, 5], tmp_path / "b.png")
    with Image.open(bias) as im:
        assert im.size == (1200, 500) == mp.pixels(mp.panel_figsize(5))  # 4 panels a row, 2 rows, title band


def test_log_wandb_sends_per_layer_scalars_and_histograms(tmp_path):
    class Run:
        def __init__(self):
            self.calls = []

        def log(self, data, step):
            self.calls.append((step, data))

    mon = RoutingMonitor(2, 4, ep_size=2, log_images_every=10, out_dir=tmp_path, layer_ids=[1, 2])
    run = Run()
    for step in (1, 2):
        mon.update(torch.tensor([[4.0, 4, 4, 0], [1.0, 2, 3, 4]]))
        mon.log_wandb(run, step, mon.report(step))
    mon.log_wandb(None, 3, None)
    (s1, d1), (s2, d2) = run.calls
    assert s1 == 1 and d1["routing/maxvio/layer_01"] == pytest.approx(1 / 3)
    assert "routing/load_share/layer_02" in d1 and "routing/load_heatmap" in d1  # images on the first report
    assert "routing/ep_imbalance/layer_02" in d2 and "routing/load_heatmap" not in d2


def test_a_failing_plot_becomes_a_warning_not_a_crash(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    mon = RoutingMonitor(1, 4, log_images_every=1, out_dir=blocker)  # a file where the folder should be
    mon.update(torch.tensor([[1.0, 2, 3, 4]]))
    r = mon.report(1)
    assert r.images == {} and any("images not written" in w for w in r.warnings)
