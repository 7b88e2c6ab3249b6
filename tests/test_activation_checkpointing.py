"""Activation checkpointing changes memory, not results: losses, gradients, router counts and the loss-free
bias updates equal those of the same model without it, step after step."""

import pytest
import torch

from smolds import ModelConfig, Transformer
from smolds.model.moe import routers, update_router_biases


def _pair(**changes):
    cfg = ModelConfig.from_preset("tiny").replace(num_hidden_layers=3, vocab_size=512, **changes)
    models = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        models.append(Transformer(cfg).train().set_activation_checkpointing(ckpt))
    return cfg, models


def _router_state(m):
    return [torch.cat([r.tokens_per_expert, r.entropy_sum, r.last_counts, r.e_score_correction_bias]) for r in routers(m)]


@pytest.mark.parametrize("balance_mode", ["loss_free", "seq_aux"])
def test_checkpointed_training_equals_plain(balance_mode):
    cfg, (plain, ckpt) = _pair(balance_mode=balance_mode)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (plain, ckpt)]
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
            update_router_biases(m, cfg)
            results.append(([o.loss.detach() for o in outs], grads, counts, _router_state(m)))
        (loss_a, grads_a, counts_a, after_a), (loss_b, grads_b, counts_b, after_b) = results
        torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
        assert grads_a.keys() == grads_b.keys()
        for n in grads_a:
            torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-7, msg=f"step {step}: {n}")
        for a, b in zip(counts_a + after_a, counts_b + after_b):  # counted once, same bias update
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    if balance_mode == "loss_free":  # the bias did move, identically
        assert any(r.e_score_correction_bias.abs().sum() > 0 for r in routers(ckpt))


def test_checkpointing_saves_activation_memory():
    _, (plain, ckpt) = _pair()
    x = torch.randint(0, 512, (2, 64))

    def saved_bytes(m):
        """What autograd saves outside checkpointed blocks, plus the inputs those blocks keep for recompute."""
        seen = {}

        def keep(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        def keep_input(module, args):
            keep(args[0])

        hooks = [b.register_forward_pre_hook(keep_input) for b in m.layers if b.activation_checkpointing]
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = m(x, targets=x)
        out.loss.backward()
        for h in hooks:
            h.remove()
        return sum(seen.values())

    assert saved_bytes(ckpt) < 0.5 * saved_bytes(plain)
    with torch.no_grad():  # no recompute without a backward: the plain forward runs
        torch.testing.assert_close(ckpt(x, targets=x).loss, plain(x, targets=x).loss)


def test_run_config_switch():
    from smolds.config import ConfigError
    from smolds.run_config import RunConfig
    from smolds.train import build_model

    run = RunConfig.from_dict({"model": {"preset": "tiny", "num_hidden_layers": 2},
                               "train": {"activation_checkpointing": True}})
    model, _ = build_model(run, run.model_config(), env=None)
    assert all(b.activation_checkpointing for b in model.layers)
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        RunConfig.from_dict({"train": {"activation_checkpointing": "yes"}})
