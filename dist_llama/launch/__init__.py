"""Launchers: torchrun on this machine or across nodes (local.py), Slurm sbatch (slurm.py), and the
per-node preflight check both run before training (preflight.py)."""
