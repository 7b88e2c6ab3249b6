"""Starting training processes: torchrun on one node (`launch.py`, run as `python -m smolds.launch`), the
all-reduce smoke test it can run instead (`check_dist.py`), and the sbatch script that runs it on every node
of a Slurm job (`pretrain.sbatch`, written out by `smolds slurm-script`).

These ship inside the package so an installed smolds can launch without a checkout; in a checkout,
launch/launch.py, launch/check_dist.py and slurm/pretrain.sbatch are links to these files.
"""
