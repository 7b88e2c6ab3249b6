"""DeepSeekMoE: routing semantics, grouped experts vs the naive reference, loss-free balancing."""

import pytest
import torch

from smolds import ModelConfig, Transformer
from smolds.model import experts as experts_module
from smolds.model import moe as moe_module
from smolds.model.moe import MoE
from smolds.model.reference import naive_moe_reference
from smolds.model.router import Router, RoutingStats
from smolds.monitor.stats import max_violation


def cfg(**changes) -> ModelConfig:
    base = dict(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    base.update(changes)
    return ModelConfig.from_preset("tiny").replace(**base)


def _moe(c):
    torch.manual_seed(0)
    m = MoE(c)
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    return m


@pytest.mark.parametrize("path", ["grouped_mm", "loop"])
@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_grouped_experts_equal_reference_outputs_and_grads(groups, path, monkeypatch):
    if path == "loop":  # the per-expert loop that older torch (no CPU torch._grouped_mm) runs
        monkeypatch.setattr(experts_module, "_CPU_GROUPED_MM", False)
    m = _moe(cfg(n_group=groups[0], topk_group=groups[1]))
    m.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    x = torch.randn(2, 13, 32, requires_grad=True)
    fast, _ = m(x)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, [x, *m.parameters()], g)
    ref = naive_moe_reference(m, x)
    grads_ref = torch.autograd.grad(ref, [x, *m.parameters()], g)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_experts_under_autocast_run_in_its_dtype_on_both_paths(monkeypatch):
    m = _moe(cfg())
    x = torch.randn(2, 13, 32, requires_grad=True)
    outs = []
    for grouped in (True, False):
        monkeypatch.setattr(experts_module, "_CPU_GROUPED_MM", grouped)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = m(x)
        (gx,) = torch.autograd.grad(y.float().sum(), [x])
        outs.append((y.float(), gx))
    assert y.dtype == x.dtype and torch.isfinite(outs[0][1]).all()
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("form", ["loop", "gathered", "dense"])
@pytest.mark.parametrize("n_tokens", [1, 3, 8])  # N*K = 2, 6 (<= E = 8) and 16 (> E)
def test_decode_forms_equal_reference(form, n_tokens):
    """Each few-token form of `MoE.dispatch_decode` (plus the shared expert) equals the naive loop."""
    m = _moe(cfg()).eval()
    m.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    x = torch.randn(1, n_tokens, 32)
    with torch.no_grad():
        flat = x.view(-1, 32)
        topk_idx, topk_weight, _ = m.gate(flat)
        e = m.experts
        routed = getattr(moe_module, f"experts_{form}")(flat, topk_idx, topk_weight, e.gate_proj, e.up_proj,
                                                        e.down_proj)
        torch.testing.assert_close((routed + m.shared_experts(flat)).view_as(x), naive_moe_reference(m, x),
                                   rtol=1e-5, atol=1e-5)


def test_decode_forms_under_autocast_run_in_its_dtype():
    m = _moe(cfg()).eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        topk_idx, topk_weight, _ = m.gate(x)
        e = m.experts
        ref = moe_module.experts_gathered(x, topk_idx, topk_weight, e.gate_proj, e.up_proj, e.down_proj)
        for fn in (moe_module.experts_loop, moe_module.experts_dense):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = fn(x, topk_idx, topk_weight, e.gate_proj, e.up_proj, e.down_proj)
            assert y.dtype == x.dtype
            torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("n_tokens", [1, 8])
def test_moe_without_grad_takes_the_decode_path_eager_and_traced(n_tokens, grouped, monkeypatch):
    """Few tokens without grad: eagerly the host-synced loop, never the sort/grouped dispatch. Traced by
    torch.compile (backend "eager": fast), without a graph break, the gathered form at N*K <= E and the sorted
    grouped dispatch above (N*K = 16 > E = 8), or where grouped_mm cannot run (old torch), the loop as one
    opaque op. With grad: the training dispatch."""
    if not grouped:
        monkeypatch.setattr(experts_module, "_CPU_GROUPED_MM", False)
    m = _moe(cfg()).eval()
    x = torch.randn(1, n_tokens, 32)
    ref = naive_moe_reference(m, x)
    calls, local = [], m.dispatch_local

    def counted(*args):
        calls.append("traced" if torch.compiler.is_compiling() else "eager")
        return local(*args)

    monkeypatch.setattr(m, "dispatch_local", counted)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], ref, rtol=1e-5, atol=1e-5)
        assert calls == []
        traced = torch.compile(m, backend="eager", fullgraph=True, dynamic=False)
        torch.testing.assert_close(traced(x)[0], ref, rtol=1e-5, atol=1e-5)
        assert calls == (["traced"] if n_tokens == 8 and grouped else [])
    m(x)  # with grad: the training path
    assert calls[-1] == "eager"


def test_gate_weights_are_unbiased_normalized_affinities():
    c = cfg(n_group=1, topk_group=1)
    r = Router(c)
    torch.nn.init.normal_(r.weight, 0, 0.5)
    x = torch.randn(64, 32)
    idx, w, scores = r(x)
    expected = scores.gather(1, idx)
    expected = expected / expected.sum(-1, keepdim=True) * c.routed_scaling_factor
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(-1), torch.full((64,), 2.5))


def test_bias_changes_choice_but_not_weights_and_gets_no_gradient():
    r = Router(cfg(n_group=1, topk_group=1))
    torch.nn.init.normal_(r.weight, 0, 0.5)
    x = torch.randn(256, 32)
    idx0, w0, scores = r(x)
    r.e_score_correction_bias[3] = 10.0  # expert 3 now always wins a slot
    idx1, w1, _ = r(x)
    assert (idx1 == 3).any(-1).all() and not (idx0 == 3).any(-1).all()
    # Weights are still the plain affinities of whichever experts were chosen.
    expected = scores.gather(1, idx1)
    torch.testing.assert_close(w1, expected / expected.sum(-1, keepdim=True) * 2.5)
    w1.sum().backward()
    assert "e_score_correction_bias" not in dict(r.named_parameters())
    assert r.e_score_correction_bias.grad is None and r.weight.grad is not None


def test_group_limited_routing_only_picks_from_top_groups():
    c = cfg(n_group=4, topk_group=1, num_experts_per_tok=2)
    r = Router(c)
    torch.nn.init.normal_(r.weight, 0, 1.0)
    idx, _, _ = r(torch.randn(128, 32))
    groups = idx // 2  # 2 experts per group
    assert (groups[:, 0] == groups[:, 1]).all()  # one group allowed -> both experts from it


def test_bias_stays_fp32_under_bf16_cast():
    m = Transformer(cfg()).to(torch.bfloat16)
    r = next(mod for mod in m.modules() if isinstance(mod, Router))
    assert r.e_score_correction_bias.dtype == torch.float32 and r.weight.dtype == torch.bfloat16
    r.update_bias(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]), rate=1e-3)
    r.update_bias(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]), rate=1e-3)
    assert r.e_score_correction_bias[0] == pytest.approx(-2e-3)  # not rounded away


def test_loss_free_updates_drive_maxvio_down_on_skewed_inputs():
    c = cfg(n_group=1, topk_group=1, bias_update_rate=1e-2)
    model = torch.nn.Module()
    model.moe = _moe(c)
    model.train()
    torch.nn.init.normal_(model.moe.gate.weight, 0, 0.3)
    skew = torch.randn(32) * 2.0  # every token shares a strong direction: a few experts dominate
    history = []
    for _ in range(150):
        x = torch.randn(4, 64, 32) * 0.5 + skew
        with torch.no_grad():
            model.moe(x)
        counts = RoutingStats(model, c).end_step().counts
        history.append(max_violation(counts)[1])
    first, last = sum(history[:5]) / 5, sum(history[-10:]) / 10
    assert first > 1.0, f"input was not skewed enough to test anything (MaxVio {first:.2f})"
    assert last < 0.35 * first, f"MaxVio {first:.2f} -> {last:.2f}"
    assert model.moe.gate.tokens_per_expert.sum() == 0  # counts reset after each update


def test_counts_accumulate_over_micro_batches_until_update():
    c = cfg()
    model = torch.nn.Module()
    model.moe = _moe(c).train()
    for _ in range(3):
        model.moe(torch.randn(2, 5, 32))
    counts = model.moe.gate.tokens_per_expert.clone()
    assert counts.sum() == 3 * 2 * 5 * c.num_experts_per_tok
    assert torch.equal(RoutingStats(model, c).end_step().counts[0], counts)


def test_no_bias_update_when_balancing_is_off():
    c = cfg(balance_mode="aux_loss")
    model = torch.nn.Module()
    model.moe = _moe(c).train()
    _, aux = model.moe(torch.randn(2, 5, 32))
    assert aux is not None and aux > 0
    RoutingStats(model, c).end_step()
    assert model.moe.gate.e_score_correction_bias.abs().sum() == 0


def test_routing_stats_is_the_one_writer_of_the_counters():
    """Training forwards count; eval forwards do not, except inside `measure()`, which leaves the training
    interval as it was; `discard()` drops an interval without a bias update, `end_step()` applies one."""
    c = cfg(n_group=1, topk_group=1, bias_update_rate=1e-2)
    model = torch.nn.Module()
    model.moe = _moe(c).train()
    gate, stats = model.moe.gate, RoutingStats(model, c)
    model.moe(torch.randn(2, 5, 32))
    training = (gate.tokens_per_expert.clone(), gate.entropy_sum.clone())
    assert training[0].sum() == 2 * 5 * c.num_experts_per_tok and training[1][1] == 10
    model.moe.eval()
    with torch.no_grad():
        model.moe(torch.randn(1, 3, 32))  # not counted
        with stats.measure() as routed:
            model.moe(torch.randn(1, 7, 32))
    assert routed.counts.sum() == 7 * c.num_experts_per_tok and routed.entropy[0, 1] == 7
    assert torch.equal(gate.tokens_per_expert, training[0]) and torch.equal(gate.entropy_sum, training[1])
    assert not gate.count_in_eval
    stats.discard()
    assert gate.tokens_per_expert.sum() == 0 and gate.e_score_correction_bias.abs().sum() == 0
    model.moe.train()
    model.moe(torch.randn(2, 5, 32))
    got = stats.end_step()
    assert got.counts.sum() == 10 * c.num_experts_per_tok and got.entropy[0, 1] == 10
    assert gate.e_score_correction_bias.abs().sum() > 0 and gate.tokens_per_expert.sum() == 0


def test_maxvio_values():
    per_layer, mean = max_violation(torch.tensor([[4.0, 4, 4, 4], [8, 0, 4, 4]]))
    assert per_layer.tolist() == [0.0, 1.0] and mean == 0.5


def test_aux_loss_is_minimal_when_balanced():
    c = cfg(balance_mode="aux_loss", n_group=1, topk_group=1, num_experts_per_tok=1, n_routed_experts=4)
    moe = _moe(c).train()
    # Perfectly balanced hard choice and uniform affinities: f_i = 1 and P_i = 1/E -> sum = 1.
    idx = torch.arange(8).remainder(4)[:, None]
    scores = torch.full((8, 4), 0.5)
    loss = moe.balance_loss(idx, scores, 1, 8)
    assert loss.item() == pytest.approx(c.aux_loss_alpha)


@pytest.mark.skipif(not experts_module.cpu_grouped_mm_works(), reason="this torch has no CPU kernel for torch._grouped_mm")
def test_cpu_grouped_mm_op_gradients_with_empty_experts():
    """`grouped_mm_cpu` (the CPU grouped products as one opaque op, so compiled MoE blocks have no graph
    break): forward and both gradients equal per-expert matmuls, empty experts included (zero weight
    gradient), and torch.library's own checks of the op's fake (shape) rule and autograd pass."""
    torch.manual_seed(0)
    counts = torch.tensor([0, 5, 0, 7, 3, 0])  # the first and the last expert get no token
    offs = counts.cumsum(0).to(torch.int32)
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    w = torch.randn(6, 8, 16, requires_grad=True)  # [E, out, in], used transposed as the experts do
    y = experts_module.grouped_mm_cpu(x, w.transpose(1, 2), offs)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, [x, w], g)
    ref = torch.cat([xe @ w[e].t() for e, xe in enumerate(x.split(counts.tolist()))])
    rx, rw = torch.autograd.grad(ref, [x, w], g)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    assert gw[0].abs().sum() == 0 and gw[5].abs().sum() == 0
    torch.library.opcheck(experts_module.grouped_mm_cpu, (x, w.transpose(1, 2), offs))
