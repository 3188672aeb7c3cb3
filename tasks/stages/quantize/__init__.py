"""Quantizers: one module per algorithm, registered in tasks.stages.REGISTRY."""
