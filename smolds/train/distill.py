"""Logit distillation (`--train.distill_from TEACHER`): the student learns the teacher's next-token distribution.

What it is for: healing a converted model (`smolds convert`) back towards the model it came from. The
original gives a whole distribution per token where the text gives one token, so the student recovers with
far fewer tokens than from the LM loss alone (Minitron, Muralidharan et al. 2024, heal pruned models with
the logit KL only; `distill_weight` 1, the default). The loss of a micro-batch is

    (1 - distill_weight) x LM loss + distill_weight x KL(p_teacher || p_student) + balance loss,

both means over the tokens, computed in one pass over row chunks with both LM heads (smolds/model/loss.py:
`linear_distill`), so neither model's [tokens, vocab] logits exist and the student's head costs one product
more than the plain LM loss. The student runs its forward without targets and with its head on the last
position only (`last_only`); a forward hook on its final norm takes the hidden states of every position, so
the model's forward is unchanged. The teacher is frozen in eval mode on every rank (whole, in the student's
working dtype) and scores the same micro-batch the same way. The logged `loss` stays the LM loss,
comparable with runs without a teacher.
"""

from __future__ import annotations

import torch

from smolds.model.loss import linear_distill
from smolds.model.transformer import Transformer
from smolds.train.config import TrainError


def _head(model: Transformer) -> torch.Tensor:
    return model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight


class Teacher:
    """The frozen teacher, and the KL of a student's last forward to it."""

    def __init__(self, path: str, student: Transformer, device: torch.device, dtype: torch.dtype):
        from smolds.pretrained import CheckpointError, load_pretrained

        try:
            model, _ = load_pretrained(path, dtype=dtype)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            raise TrainError(f"train.distill_from: {e}") from None
        if model.config.vocab_size != student.config.vocab_size:
            raise TrainError(f"train.distill_from {path}: its vocabulary ({model.config.vocab_size}) is not the "
                             f"student's ({student.config.vocab_size}); distill from a model with the data's tokenizer")
        self.model = model.to(device).eval().requires_grad_(False)
        self.student = student
        self._hidden: dict[str, torch.Tensor] = {}
        self._hooks = [self._keep(student.norm, "student"), self._keep(self.model.norm, "teacher")]

    def _keep(self, norm: torch.nn.Module, name: str):
        def hook(module, args, out):
            if torch.is_grad_enabled() or name == "teacher":  # the student's training forward, not its evals
                self._hidden[name] = out
        return norm.register_forward_hook(hook)

    def loss(self, x: torch.Tensor, y: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, ...]:
        """(loss, LM loss, KL) of the student's forward on x [B, T] that just ran, against targets y [B, T]:
        loss = (1 - kl_weight) LM loss + kl_weight KL(teacher || student); the last two detached."""
        student_h = self._hidden.pop("student")  # [B, T, D]
        with torch.no_grad():
            self.model(x, last_only=True)  # the head runs on one position; the hook keeps every one's state
        teacher_h = self._hidden.pop("teacher")  # [B, T, D_t]
        return linear_distill(student_h.flatten(0, 1), _head(self.student), y.flatten(), teacher_h.flatten(0, 1),
                              _head(self.model), kl_weight)


def check_tokenizer(teacher: str, data_tokenizer: str | None) -> None:
    """The teacher must read the data as the student does: the same vocabulary (token -> id)."""
    from tokenizers import Tokenizer

    from smolds.pretrained import CheckpointError, resolve_checkpoint

    try:
        own = resolve_checkpoint(teacher) / "tokenizer.json"
    except CheckpointError as e:
        raise TrainError(f"train.distill_from: {e}") from None
    if data_tokenizer is None or not own.is_file():
        raise TrainError(f"train.distill_from {teacher}: it or the data has no tokenizer.json to compare; distill "
                         "from a checkpoint with a tokenizer (import-gguf/import-hf keep it) on data prepared with it")
    vocab = [Tokenizer.from_file(str(f)).get_vocab(with_added_tokens=True) for f in (own, data_tokenizer)]
    if vocab[0] != vocab[1]:
        raise TrainError(f"train.distill_from {teacher}: its tokenizer is not the data's ({data_tokenizer}); prepare "
                         f"the data with `smolds prep ... --tokenizer {own.parent}`")
