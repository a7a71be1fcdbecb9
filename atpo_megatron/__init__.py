"""atpo_megatron: AT²PO (turn-level tree rollouts + the ATPO loss) on a Megatron TP/PP actor."""

__version__ = "0.1.0"
