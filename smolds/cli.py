"""The `smolds` command: a thin dispatcher. Each subcommand lives beside the API it calls.

Every subcommand module exposes `main(argv: list[str]) -> int | None` and parses its own flags,
so `smolds train --help` shows the trainer's flags and nothing here knows about them.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prep": ("data_prep.cli", "tokenize a corpus and pack it into memory-mapped shards"),
    "train": ("smolds.train.cli", "pretrain with the DeepSpeed engine (torchrun for many processes)"),
    "plan": ("smolds.plan", "memory, step time, traffic, checkpoint size and GPU-hours of a run, before it runs"),
    "eval": ("smolds.infer.evaluate", "validation loss / perplexity / MaxVio of a checkpoint"),
    "monitor": ("smolds.monitor.cli", "expert-load report of a run (logs) or a checkpoint (data)"),
    "curves": ("smolds.monitor.curves", "plot the training curves of one or more runs into a PNG"),
    "generate": ("smolds.infer.generate", "sample text from a checkpoint"),
    "chat": ("smolds.infer.chat", "chat with a checkpoint using its chat template"),
    "import-hf": ("smolds.interop.cli", "import a Hugging Face Llama/SmolLM2 directory"),
    "import-gguf": ("smolds.interop.cli", "import the SmolLM2-135M-Instruct GGUF"),
    "export-hf": ("smolds.interop.cli", "export a checkpoint as a Hugging Face DeepseekV3 directory"),
    "convert": ("smolds.interop.convert", "convert a SmolLM2/Llama checkpoint into MLA / DeepSeekMoE / hybrid layers"),
    "slurm-script": ("smolds.launch.slurm_script", "write the sbatch script for a Slurm cluster (pretrain.sbatch)"),
    "ckpt": ("smolds.train.ckpt_cli", "what a training checkpoint holds (`info`); it resumes at any shape as it is"),
}


def _usage() -> str:
    lines = ["usage: smolds COMMAND [ARGS...]    smolds --version", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "run `smolds COMMAND --help` for a command's flags"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from smolds import __version__

        print(f"smolds {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"smolds: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if name == "train":
        # First, before the trainer imports torch and DeepSpeed: a SIGTERM/SIGUSR1 from Slurm or torchrun
        # while a worker starts up must set the stop flag, not kill it (smolds/train/preemption.py).
        from smolds.train import preemption

        preemption.install()
        preemption.die_with_launcher()
    module = importlib.import_module(COMMANDS[name][0])
    if name in ("import-hf", "import-gguf", "export-hf"):
        rest = [name, *rest]
    code = module.main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
