"""Activation checkpointing changes memory, not results: losses, gradients, router counts and the loss-free
bias updates equal those of the same model without it, step after step, eager or with compiled blocks."""

import pytest
import torch

from smolds import ModelConfig, Transformer
from smolds.model.router import RoutingStats, routers


def _pair(compiled=False, **changes):
    """(plain eager model, checkpointed model, compiled if asked) with equal weights."""
    cfg = ModelConfig.from_preset("tiny").replace(num_hidden_layers=3, vocab_size=512, **changes)
    models = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        models.append(Transformer(cfg).train().set_activation_checkpointing(ckpt))
    models[1].compile_blocks(compiled)
    return cfg, models


def _router_state(m):
    return [torch.cat([r.tokens_per_expert, r.entropy_sum, r.e_score_correction_bias]) for r in routers(m)]


@pytest.mark.parametrize("balance_mode, compiled", [("loss_free", False), ("seq_aux", False), ("loss_free", True)])
def test_checkpointed_training_equals_plain(balance_mode, compiled):
    """Compiled, the checkpoint is traced into the block's graph and its backward recomputes the block with
    the forward's expert choice saved; the routers' counting is not replayed (dynamo's
    skip_fwd_side_effects_in_bwd_under_checkpoint). Compiled kernels only reorder float sums."""
    from torch._dynamo.utils import counters

    mixed = dict(attention_pattern=["mla", "linear"]) if compiled else {}  # MLA and linear-attention blocks
    cfg, (plain, ckpt) = _pair(compiled, balance_mode=balance_mode, n_group=2, topk_group=1, **mixed)
    tol = dict(rtol=1e-4, atol=1e-6) if compiled else dict(rtol=1e-5, atol=1e-7)
    captured, breaks = counters["stats"]["calls_captured"], sum(counters["graph_break"].values())
    # AdamW divides by the gradient's RMS, which turns reordering noise in near-zero gradients into whole
    # steps; compiled kernels reorder sums, so there plain SGD carries the steps
    opts = [torch.optim.SGD(m.parameters(), lr=0.3) if compiled else torch.optim.AdamW(m.parameters(), lr=3e-3)
            for m in (plain, ckpt)]
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        # two micro-batches before one backward: each checkpointed forward replays its own routing
        batches = [torch.randint(0, 512, (2, 32), generator=g) for _ in range(2)]
        results = []
        for m, opt in zip((plain, ckpt), opts):
            outs = [m(x[:, :-1], targets=x[:, 1:]) for x in batches]
            sum(o.loss for o in outs).backward()
            grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
            counts = _router_state(m)
            opt.step()
            opt.zero_grad(set_to_none=True)
            RoutingStats(m, cfg).end_step()
            results.append(([o.loss.detach() for o in outs], grads, counts, _router_state(m)))
        (loss_a, grads_a, counts_a, after_a), (loss_b, grads_b, counts_b, after_b) = results
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6 if compiled else 0, atol=0)
        assert grads_a.keys() == grads_b.keys()
        for n in grads_a:
            torch.testing.assert_close(grads_b[n], grads_a[n], **tol, msg=lambda m, s=step, n=n: f"step {s}: {n}: {m}")
        for a, b in zip(counts_a + after_a, counts_b + after_b):  # counted once, same bias update
            # (compiled, the entropy sums differ in the last bit; a count off by one token is 1e-2 relative)
            torch.testing.assert_close(b, a, rtol=1e-6 if compiled else 0, atol=0)
    if compiled:  # the blocks did run compiled, each as one graph (the CPU grouped products included)
        assert counters["stats"]["calls_captured"] > captured
        assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
        assert saved_bytes(ckpt, batches[0]) < 0.2 * saved_bytes(plain, batches[0])  # and kept little for backward
    if balance_mode == "loss_free":  # the bias did move, identically
        assert any(r.e_score_correction_bias.abs().sum() > 0 for r in routers(ckpt))


def saved_bytes(m, x) -> int:
    """What autograd saves in one forward + backward outside checkpointed blocks, plus the inputs those blocks
    keep for recompute; parameters (saved by reference) are not counted."""
    seen, params = {}, {p.untyped_storage().data_ptr() for p in m.parameters()}

    def keep(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def keep_input(module, args):
        keep(args[0])

    hooks = [b.register_forward_pre_hook(keep_input) for b in m.layers if b.activation_checkpointing]
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = m(x[:, :-1], targets=x[:, 1:])
    out.loss.backward()
    for h in hooks:
        h.remove()
    return sum(seen.values())


def test_checkpointing_saves_activation_memory():
    """(Compiled blocks: checked at the end of test_checkpointed_training_equals_plain, on its compiled model.)"""
    _, (plain, ckpt) = _pair()
    x = torch.randint(0, 512, (2, 65))
    assert saved_bytes(ckpt, x) < 0.2 * saved_bytes(plain, x)
    with torch.no_grad():  # no recompute without a backward: the plain forward runs
        torch.testing.assert_close(ckpt(x, targets=x).loss, plain(x, targets=x).loss)


def test_run_config_switch():
    from smolds.config import ConfigError
    from smolds.train.config import RunConfig
    from smolds.train.engine import build_model

    run = RunConfig.from_dict({"model": {"preset": "tiny", "num_hidden_layers": 2},
                               "train": {"activation_checkpointing": True}})
    model, _ = build_model(run, run.model_config())
    assert all(b.activation_checkpointing for b in model.layers)
    run = RunConfig.from_dict({"model": {"preset": "tiny", "num_hidden_layers": 2},
                               "train": {"activation_checkpointing": True, "compile": True}})
    model, _ = build_model(run, run.model_config())
    assert all(b.activation_checkpointing and b.compiled_checkpointed is not None for b in model.layers)
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        RunConfig.from_dict({"train": {"activation_checkpointing": "yes"}})


def test_compiled_checkpointing_refuses_expert_parallelism():
    """The all-to-all's split sizes would break the compiled checkpoint, whose eager fallback has no
    routing replay: refused in one line (the trainer refuses the config too, tests/test_train.py)."""
    _, (_, ckpt) = _pair(compiled=True, first_k_dense_replace=0)  # the first block is an MoE block: refused at once
    for b in ckpt.layers:
        if b.ffn_kind == "moe":
            b.mlp.ep_group = object()  # what the trainer sets for expert parallelism
    x = torch.randint(0, 512, (2, 16))
    with pytest.raises(ValueError, match="expert parallelism are not supported"):
        ckpt(x, targets=x)


def test_compiled_checkpointing_refuses_a_block_that_breaks(monkeypatch):
    """Where a block cannot compile as one graph (here the experts' products kept out of the graph, as the CPU
    grouped-mm call was before it became an op), dynamo would run the checkpoint eagerly without the routing
    replay and count the tokens twice: a one-line error instead."""
    from smolds.model import experts

    monkeypatch.setattr(experts, "_grouped_swiglu", torch.compiler.disable(experts._grouped_swiglu))
    _, (_, ckpt) = _pair(compiled=True, first_k_dense_replace=0)  # the MoE block first: no dense compile before
    x = torch.randint(0, 512, (2, 16))
    with pytest.raises(ValueError, match="compile as one graph, and this one breaks"):
        ckpt(x, targets=x)
