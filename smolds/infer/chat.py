"""`smolds chat CKPT`: a terminal chat that keeps the conversation and renders it with the tokenizer's chat
template (SmolLM2-Instruct's ChatML, or ChatML when the tokenizer has the tokens but no template).

Each turn re-renders the whole history and generates until `<|im_end|>` or an eos token. When the history
no longer fits the context, the oldest turns are dropped (a system message is kept). `/reset` clears the
history, `/quit` (or end of input) leaves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from smolds.infer.generate import (
    add_sampling_args,
    check_sampling_args,
    fit_prompts,
    load_for_cli,
    sampling_kwargs,
    stream,
)
from smolds.tokenizer import IM_END, TextTokenizer


class ChatSession:
    """The conversation so far and how to continue it; the CLI is a loop around `reply`."""

    def __init__(self, model, tokenizer, system: str | None = None, **sampling):
        self.model, self.tokenizer = model, TextTokenizer.coerce(tokenizer)
        self.system, self.sampling = system, sampling
        self.eos = list(dict.fromkeys([*self.tokenizer.eos_token_ids,
                                       *[i for i in [self.tokenizer.token_id(IM_END)] if i is not None]]))
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []

    def prompt(self) -> str:
        """The rendered history, dropping the oldest turns until it fits before max_new_tokens."""
        context = self.model.config.max_position_embeddings
        new = self.sampling.get("max_new_tokens", 256)
        while True:
            text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
            turns = [i for i, m in enumerate(self.messages) if m["role"] != "system"]
            if len(self.tokenizer.encode(text)) + new <= context or len(turns) <= 1:
                return text
            first = turns[0]  # drop the oldest turn and its answer: the history starts with a user message
            del self.messages[first]
            while first < len(self.messages) - 1 and self.messages[first]["role"] != "user":
                del self.messages[first]

    def reply(self, user: str) -> Iterator[str]:
        """Stream the assistant's answer to `user`; the turn (question and answer) joins the history once the
        answer is complete. A turn that fails or is interrupted (Ctrl-C, the caller stops reading) leaves the
        history as it was, so the next turn does not follow an unanswered question."""
        before = list(self.messages)
        self.messages.append({"role": "user", "content": user})
        answer, complete = [], False
        try:
            text = self.prompt()
            # a message that cannot fit even alone changes nothing
            fit_prompts([self.tokenizer.encode(text)], self.sampling.get("max_new_tokens", 256),
                        self.model.config.max_position_embeddings, self.sampling.get("truncate"))
            for piece in stream(self.model, self.tokenizer, text, eos_token_ids=self.eos, **self.sampling):
                answer.append(piece)
                yield piece
            complete = True
        finally:
            if complete:
                self.messages.append({"role": "assistant", "content": "".join(answer).strip()})
            else:
                self.messages = before


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smolds chat", description="Chat with a checkpoint using its chat template. "
                                "Commands: /reset clears the history, /quit leaves.")
    p.add_argument("checkpoint", help="checkpoint directory (or a run/step directory of the trainer)")
    p.add_argument("--system", default=None, help="system message (default: the template's own, if any)")
    add_sampling_args(p, max_new_tokens=512)
    args = p.parse_args(argv)
    if not check_sampling_args("smolds chat", args):
        return 2
    loaded = load_for_cli("smolds chat", args.checkpoint, args)
    if loaded is None:
        return 1
    model, tok = loaded
    if tok.chat_template is None:
        print("smolds chat: error: the tokenizer has no chat template and no <|im_start|>/<|im_end|> tokens",
              file=sys.stderr)
        return 1
    session = ChatSession(model, tok, system=args.system, **sampling_kwargs(args))
    interactive = sys.stdin.isatty()
    while True:
        try:
            user = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        command = user.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            session.reset()
            print("(history cleared)")
            continue
        try:
            for piece in session.reply(user):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat; the turn is dropped
            print("\n(interrupted)")
        except ValueError as e:
            print(f"smolds chat: error: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
