"""Logit distillation (--train.distill_from): the chunked KL of two LM heads (smolds/model/loss.py) against the
unfused KL, the teacher's KL on a student's forward (smolds/train/distill.py) against full logits, a run that
brings the student towards its teacher, and the refusals."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import byte_tokenizer

from smolds import ModelConfig, Transformer
from smolds.config import ConfigError
from smolds.model.loss import linear_distill
from smolds.pretrained import save_pretrained
from smolds.train import TrainError, train
from smolds.train.config import RunConfig
from smolds.train.distill import Teacher


def _reference(h, w, y, ht, wt, kl_weight):
    """(1 - w) CE + w KL(p_t || p_s), means over the counted tokens, from the whole [N, V] logits of both."""
    logits = F.linear(h, w).float()
    keep = y != -100
    logp, logp_t = F.log_softmax(logits[keep], -1), F.log_softmax(F.linear(ht, wt).float()[keep], -1)
    ce = F.cross_entropy(logits, y, ignore_index=-100)
    kl = F.kl_div(logp, logp_t, log_target=True, reduction="batchmean")
    return (1 - kl_weight) * ce + kl_weight * kl, ce, kl


def _value_and_grads(fn, h, w, *rest):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss, ce, kl = fn(h, w, *rest)
    (loss * 3.0).backward()  # a non-unit upstream gradient
    return loss.detach(), ce.detach(), kl.detach(), h.grad, w.grad


@pytest.mark.parametrize("kl_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("rows", [7, 64, 1000])  # chunks that do not divide N, several chunks, one chunk
def test_fused_distillation_matches_the_unfused_losses(rows, kl_weight):
    N, D, Dt, V = 100, 16, 24, 50  # the teacher may be wider than the student
    h, w, ht, wt = torch.randn(N, D), torch.randn(V, D) * 0.3, torch.randn(N, Dt), torch.randn(V, Dt) * 0.3
    y = torch.randint(0, V, (N,))
    y[::5] = -100  # ignored targets count in neither term nor in the means
    ref = _value_and_grads(_reference, h, w, y, ht, wt, kl_weight)
    ours = _value_and_grads(lambda *a: linear_distill(*a, rows=rows), h, w, y, ht, wt, kl_weight)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert float(ref[2]) > 0.1
    with torch.no_grad():  # the loss-only path
        for a, b in zip(linear_distill(h, w, y, ht, wt, kl_weight, rows=rows), ref[:3]):
            torch.testing.assert_close(a, b)
    # a student equal to its teacher: KL 0, and at weight 1 no gradient
    _, _, kl, gh, gw = _value_and_grads(lambda *a: linear_distill(*a, rows=rows), h, w, y, h, w, 1.0)
    assert abs(float(kl)) < 1e-6 and gh.abs().max() < 1e-6 and gw.abs().max() < 1e-6


def test_bf16_inputs_accumulate_in_fp32():
    N, D, V = 64, 32, 300
    h, w, ht, wt = torch.randn(N, D), torch.randn(V, D) * 0.1, torch.randn(N, D), torch.randn(V, D) * 0.1
    y = torch.randint(0, V, (N,))
    args = [t.bfloat16() for t in (h, w)] + [y] + [t.bfloat16() for t in (ht, wt)] + [0.5]
    ours = _value_and_grads(lambda *a: linear_distill(*a, rows=16), *args)
    ref = _value_and_grads(_reference, *args)
    assert ours[0].dtype == torch.float32 and ours[3].dtype == ours[4].dtype == torch.bfloat16
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def tiny(**kw) -> ModelConfig:
    return ModelConfig.from_preset("tiny").replace(num_hidden_layers=2, **kw)


def test_teacher_loss_on_a_student_forward_equals_the_losses_of_their_logits(tmp_path):
    """The hook takes the student's last hidden states from its training forward (head on the last position
    only); the teacher (another shape, untied head) scores the same tokens; loss, LM loss, KL and the
    student's gradients match full logits."""
    torch.manual_seed(0)
    student = Transformer(tiny())
    save_pretrained(Transformer(tiny(hidden_size=96, tie_word_embeddings=False)).eval(), tmp_path / "t")
    teacher = Teacher(str(tmp_path / "t"), student, torch.device("cpu"), torch.float32)
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    x = torch.randint(0, student.config.vocab_size, (2, 24))
    y = torch.roll(x, -1, 1)
    student(x, last_only=True)
    loss, ce, kl = teacher.loss(x, y, 0.25)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    with torch.no_grad():
        t_logits = teacher.model(x).logits
    logits = student(x).logits.flatten(0, 1)
    ref_ce = F.cross_entropy(logits, y.flatten())
    ref_kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1).flatten(0, 1), log_target=True,
                      reduction="batchmean")
    (0.75 * ref_ce + 0.25 * ref_kl).backward()
    for a, b in [(loss, 0.75 * ref_ce + 0.25 * ref_kl), (ce, ref_ce), (kl, ref_kl)]:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for n, p in student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    teacher._hidden.clear()  # (the reference's forward above left its state)
    with torch.no_grad():  # an evaluation forward leaves nothing behind for the next training step
        student(x, targets=y)
    assert "student" not in teacher._hidden


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_prep import prepare_default

    d = tmp_path_factory.mktemp("data") / "pydoc"
    prepare_default(d)
    return d


RUN = ["--model.num_hidden_layers", "2", "--train.seq_len", "32", "--train.micro_batch", "4", "--train.steps", "20",
       "--train.warmup_steps", "2", "--train.eval_every", "20", "--train.eval_batches", "1", "--logging.wandb",
       "disabled", "--eval.sample_tokens", "0", "--train.lr", "3e-3"]


def test_distilled_run_moves_the_student_towards_its_teacher(data_dir, tmp_path):
    """A student from scratch, distilled from a random, peaked teacher (which the data alone would not teach):
    its KL to the teacher on validation text falls by a third in 20 steps (6.0 -> 3.4 measured), and the
    logged loss stays the LM loss."""
    from data_prep import TokenWindows
    from smolds.pretrained import load_pretrained

    torch.manual_seed(1)
    teacher = Transformer(tiny()).eval()
    with torch.no_grad():
        teacher.embed_tokens.weight.mul_(20.0)
    save_pretrained(teacher, tmp_path / "teacher", str(data_dir / "tokenizer.json"))
    x = torch.cat([x for x, _ in TokenWindows(data_dir, "val", 32).iter_eval(8, max_batches=2)])  # [16, 32]

    def kl_to_teacher(student: Transformer) -> float:
        t = Teacher(str(tmp_path / "teacher"), student.train(), torch.device("cpu"), torch.float32)
        student(x, last_only=True)
        return float(t.loss(x, x, 1.0)[2])

    out = tmp_path / "run"
    train(RunConfig.load(None, [*RUN, "--data.dir", str(data_dir), "--train.out_dir", str(out),
                                "--train.distill_from", str(tmp_path / "teacher")]))
    torch.manual_seed(0)  # the trainer's seed: the student it started from
    before, after = kl_to_teacher(Transformer(tiny())), kl_to_teacher(load_pretrained(out)[0])
    assert after < 0.67 * before, (before, after)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    lm = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(lm) >= 2 and all(v > 2 * after for v in lm)  # the LM loss (~ln 4096 at the start), not the KL


def test_bad_distillation_settings_are_one_line(data_dir, tmp_path):
    base = [*RUN, "--data.dir", str(data_dir), "--train.out_dir", str(tmp_path / "run")]
    with pytest.raises(ConfigError, match=r"train.distill_weight: must be a number in \[0, 1\], got 1.5"):
        RunConfig.load(None, [*base, "--train.distill_weight", "1.5"])
    with pytest.raises(ConfigError, match="train.distill_from with deepspeed.zero_stage 3 is not supported"):
        RunConfig.load(None, [*base, "--train.distill_from", "x", "--deepspeed.zero_stage", "3"])
    save_pretrained(Transformer(tiny()), tmp_path / "bytes", byte_tokenizer())
    save_pretrained(Transformer(tiny(vocab_size=300)), tmp_path / "wide", str(data_dir / "tokenizer.json"))
    for teacher, message in [(tmp_path / "missing", "train.distill_from: checkpoint .* does not exist"),
                             (tmp_path / "bytes", "its tokenizer is not the data's .* prepare the data with "
                                                  "`smolds prep ... --tokenizer"),
                             (tmp_path / "wide", r"its vocabulary \(300\) is not the student's \(4096\)")]:
        with pytest.raises(TrainError, match=message) as e:
            train(RunConfig.load(None, [*base, "--train.distill_from", str(teacher)]))
        assert "\n" not in str(e.value)
