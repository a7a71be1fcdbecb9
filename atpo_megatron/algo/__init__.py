"""The AT²PO algorithm as pure torch/python: losses, turn-wise credit, tree expansion, the turn tree.

No distributed code and no megatron here: every function takes plain lists or tensors.
"""
