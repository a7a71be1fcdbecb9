"""Job launch: SLURM batch scripts (``slurm``) and preemption handling (``preemption``)."""

from .preemption import PreemptionHandler
from .slurm import SlurmError, add_submit_arguments, render_sbatch, submit, submit_main

__all__ = ["PreemptionHandler", "SlurmError", "add_submit_arguments", "render_sbatch", "submit", "submit_main"]
