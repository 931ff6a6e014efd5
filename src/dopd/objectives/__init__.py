"""Objectives: divergence kernels, top-K supports, routing, reduction, and the objective zoo."""
