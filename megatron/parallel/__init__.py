"""Tensor/pipeline/data parallel building blocks: layout, TP layers, mappings, loss, RNG."""

from megatron.parallel.state import ParallelState

__all__ = ["ParallelState"]
