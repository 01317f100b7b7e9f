"""Conjugate autograd functions that move activations in and out of tensor-parallel regions.

Megatron-LM's pairs, each forward being the other's backward:

    copy_to_tp_region       forward identity          backward all-reduce
    reduce_from_tp_region   forward all-reduce        backward identity
    scatter_to_tp_region    forward split last dim    backward all-gather last dim
    gather_from_tp_region   forward all-gather last   backward split last dim

Each takes the ``ParallelState`` describing the tensor-parallel group. With ``tp_size == 1`` they
return their input unchanged (no autograd node, no copy).
"""

import torch
import torch.distributed as dist

from megatron.parallel.state import ParallelState


def _all_reduce(x, parallel):
    # Reduce into a fresh tensor: the input may be saved for backward by another node.
    out = x.contiguous().clone()
    dist.all_reduce(out, group=parallel.tp_group)
    return out


def _split_last_dim(x, parallel):
    if x.size(-1) % parallel.tp_size:
        raise RuntimeError(f"last dim {x.size(-1)} is not divisible by tp_size {parallel.tp_size}")
    chunk = x.size(-1) // parallel.tp_size
    return x.narrow(-1, parallel.tp_rank * chunk, chunk).contiguous()


def _gather_last_dim(x, parallel):
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(parallel.tp_size)]
    dist.all_gather(parts, x, group=parallel.tp_group)
    return torch.cat(parts, dim=-1)  # [..., tp_size * d]


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, parallel):
        ctx.parallel = parallel
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.parallel), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, parallel):
        return _all_reduce(x, parallel)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, parallel):
        ctx.parallel = parallel
        return _split_last_dim(x, parallel)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad, ctx.parallel), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, parallel):
        ctx.parallel = parallel
        return _gather_last_dim(x, parallel)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.parallel), None


def copy_to_tp_region(x: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward, all-reduce of the gradient."""
    if parallel.tp_size == 1:
        return x
    return _CopyToTP.apply(x, parallel)


def reduce_from_tp_region(x: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    """Leave a TP region by summing partial results: all-reduce forward, identity backward."""
    if parallel.tp_size == 1:
        return x
    return _ReduceFromTP.apply(x, parallel)


def scatter_to_tp_region(x: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; the gradient is all-gathered."""
    if parallel.tp_size == 1:
        return x
    return _ScatterToTP.apply(x, parallel)


def gather_from_tp_region(x: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    """All-gather the last dimension from every TP rank; the gradient is split back."""
    if parallel.tp_size == 1:
        return x
    return _GatherFromTP.apply(x, parallel)
