"""Job launch: ``atpo train`` (``train_command``), SLURM batch scripts (``slurm``, ``nemo``), preemption (``preemption``)."""

from .preemption import PreemptionHandler
from .slurm import SlurmError, add_submit_arguments, render_sbatch, submit, submit_main

__all__ = ["PreemptionHandler", "SlurmError", "add_submit_arguments", "render_sbatch", "submit", "submit_main"]
