"""Conjugate autograd functions that move activations in and out of tensor-parallel regions.

Megatron-LM's pairs, each forward being the other's backward:

    copy_to_tp_region       forward identity          backward all-reduce
    reduce_from_tp_region   forward all-reduce        backward identity
    scatter_to_tp_region    forward split last dim    backward all-gather last dim
    gather_from_tp_region   forward all-gather last   backward split last dim

and, for sequence parallelism, the pairs that move the sequence dimension instead:

    scatter_to_sequence_parallel_region         forward split seq       backward all-gather seq
    gather_from_sequence_parallel_region        forward all-gather seq  backward reduce-scatter seq
                                                                        (or split, see docstring)
    reduce_scatter_to_sequence_parallel_region  forward reduce-scatter  backward all-gather seq

Our activations are batch-first ``[b, s, h]`` (Megatron's are ``[s, b, h]``), so the sequence
dimension is dim 1. Megatron's dim-0 collectives work on contiguous memory; ours gather into a
list and concatenate along dim 1, and reduce-scatter contiguous copies of the dim-1 chunks (one
extra copy of an activation per collective, small next to the GEMMs it surrounds).

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


SEQ_DIM = 1
"""The sequence dimension of batch-first activations [b, s, h]."""


def _split_seq(x, parallel):
    s = x.size(SEQ_DIM)
    if s % parallel.tp_size:
        raise RuntimeError(f"sequence length {s} is not divisible by tp_size {parallel.tp_size}")
    chunk = s // parallel.tp_size
    return x.narrow(SEQ_DIM, parallel.tp_rank * chunk, chunk).contiguous()


def _gather_seq(x, parallel):
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(parallel.tp_size)]
    dist.all_gather(parts, x, group=parallel.tp_group)
    return torch.cat(parts, dim=SEQ_DIM)  # [b, tp_size * s_chunk, ...]


def _reduce_scatter_seq(x, parallel):
    s = x.size(SEQ_DIM)
    if s % parallel.tp_size:
        raise RuntimeError(f"sequence length {s} is not divisible by tp_size {parallel.tp_size}")
    chunks = [c.contiguous() for c in x.chunk(parallel.tp_size, dim=SEQ_DIM)]
    out = torch.empty_like(chunks[parallel.tp_rank])  # [b, s / tp, ...]
    dist.reduce_scatter(out, chunks, group=parallel.tp_group)
    return out


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


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, parallel):
        ctx.parallel = parallel
        return _split_seq(x, parallel)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.parallel), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, parallel, output_grad_is_partial):
        ctx.parallel = parallel
        ctx.output_grad_is_partial = output_grad_is_partial
        return _gather_seq(x, parallel)

    @staticmethod
    def backward(ctx, grad):
        if ctx.output_grad_is_partial:
            return _reduce_scatter_seq(grad, ctx.parallel), None, None
        return _split_seq(grad, ctx.parallel), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, parallel):
        ctx.parallel = parallel
        return _reduce_scatter_seq(x, parallel)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.parallel), None


def scatter_to_sequence_parallel_region(x: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    """Replicated ``[b, s, ...]`` -> this rank's sequence chunk ``[b, s / tp, ...]``; the
    gradient chunks are all-gathered back to the full sequence."""
    if parallel.tp_size == 1:
        return x
    return _ScatterToSP.apply(x, parallel)


def gather_from_sequence_parallel_region(x: torch.Tensor, parallel: ParallelState,
                                         output_grad_is_partial: bool = True) -> torch.Tensor:
    """Sequence chunks ``[b, s / tp, ...]`` -> the full sequence ``[b, s, ...]`` on every rank.

    ``output_grad_is_partial``: the consumer is a tensor-parallel layer (a column-parallel
    linear), so each rank's gradient of the gathered tensor is a partial sum: the backward
    reduce-scatters it. False: the consumer computes the same thing on every rank (the gradient
    is already complete and identical), so the backward just keeps this rank's chunk.
    """
    if parallel.tp_size == 1:
        return x
    return _GatherFromSP.apply(x, parallel, output_grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor,
                                               parallel: ParallelState) -> torch.Tensor:
    """Partial sums ``[b, s, ...]`` (a row-parallel linear's output) -> this rank's chunk of the
    total ``[b, s / tp, ...]``; the gradient chunks are all-gathered."""
    if parallel.tp_size == 1:
        return x
    return _ReduceScatterToSP.apply(x, parallel)
