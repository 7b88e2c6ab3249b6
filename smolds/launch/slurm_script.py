"""`smolds slurm-script [OUT]`: write the sbatch script that pretrains on a Slurm cluster (pretrain.sbatch).

For a user who installed smolds rather than cloned it: the script runs `python -m smolds.launch` on every
node, so it needs only the environment smolds is installed in, not a checkout.

    smolds slurm-script                      # writes ./pretrain.sbatch
    sbatch --nodes 4 pretrain.sbatch --config run.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

SBATCH = Path(__file__).with_name("pretrain.sbatch")


def write_slurm_script(out: str | Path, overwrite: bool = False) -> Path:
    """Copy pretrain.sbatch to `out` (a file, or a directory to put pretrain.sbatch in), executable."""
    out = Path(out)
    if out.is_dir():
        out = out / SBATCH.name
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or another path")
    out.write_text(SBATCH.read_text())
    out.chmod(0o755)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smolds slurm-script", description="Write the sbatch script that pretrains on a Slurm cluster.")
    p.add_argument("out", nargs="?", default=SBATCH.name, help="file or directory to write (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    args = p.parse_args(argv)
    try:
        out = write_slurm_script(args.out, args.overwrite)
    except FileExistsError as e:
        p.exit(1, f"smolds slurm-script: {e}\n")
    print(f"wrote {out}; submit from the directory your run config's paths start from:\n"
          f"  sbatch --nodes N {out} --config run.yaml")
    return 0
