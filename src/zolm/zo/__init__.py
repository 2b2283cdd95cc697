"""Zeroth-order (ZO) optimisation: the counter-based perturbation generator, SPSA and the ZO optimisers."""
