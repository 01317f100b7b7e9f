"""Tensor-parallel linear and embedding layers (Megatron-LM's ColumnParallelLinear,
RowParallelLinear and VocabParallelEmbedding).

Each layer holds only this rank's partition of its weight. Weights are initialised the Megatron
way: the full ("master") weight is drawn from the default generator and split, so the gathered
weight is the same for a given seed whatever tp_size. Partitioned parameters carry
``tensor_model_parallel = True`` and ``partition_dim`` (the dimension split across TP ranks) for
the checkpoint resharder; replicated ones carry ``tensor_model_parallel = False`` and
``partition_dim = -1``.

Sequence parallelism (``sequence_parallel=True``, Megatron's --sequence-parallel): outside the
TP regions activations are split along the sequence (``[b, s / tp, h]``, dim 1 of our
batch-first layout). A ColumnParallelLinear then all-gathers its input along the sequence
(backward: reduce-scatter) instead of copying it, and a RowParallelLinear reduce-scatters its
partial sums along the sequence (backward: all-gather) instead of all-reducing them. Parameters
that then see only this rank's tokens (the row-parallel bias, LayerNorms) are tagged
``sequence_parallel = True``; ``allreduce_sequence_parallel_grads`` sums their gradients over
the TP group before the optimizer step.
"""

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.parallel.mappings import (
    copy_to_tp_region, gather_from_sequence_parallel_region, gather_from_tp_region,
    reduce_from_tp_region, reduce_scatter_to_sequence_parallel_region, scatter_to_tp_region)
from megatron.parallel.data_parallel import grad_buffer
from megatron.parallel.state import ParallelState


def set_tensor_model_parallel_attributes(param: torch.Tensor, is_parallel: bool,
                                         partition_dim: int, stride: int = 1) -> None:
    """Tag ``param`` with how it is split across tensor-parallel ranks."""
    param.tensor_model_parallel = is_parallel
    param.partition_dim = partition_dim
    param.partition_stride = stride


def mark_sequence_parallel(param: torch.Tensor) -> None:
    """Tag a replicated parameter whose gradient, under sequence parallelism, covers only this
    rank's tokens (see ``allreduce_sequence_parallel_grads``)."""
    param.sequence_parallel = True


def allreduce_sequence_parallel_grads(model: nn.Module, parallel: ParallelState) -> None:
    """Sum over the TP group the gradients of parameters tagged ``sequence_parallel``.

    Under sequence parallelism each TP rank's LayerNorms and row-parallel biases see only its
    chunk of the sequence, so their ``.grad`` are partial sums; the training loop calls this
    after backward (after any gradient accumulation, before clipping and the optimizer step).
    Reduces ``param.main_grad`` where a data-parallel wrapper accumulates there, else
    ``param.grad``; one coalesced all-reduce per dtype; a no-op at tp_size 1.
    """
    if parallel.tp_size == 1:
        return
    by_dtype = {}
    for param in model.parameters():
        if not getattr(param, "sequence_parallel", False):
            continue
        grad = grad_buffer(param)
        if grad is not None:
            by_dtype.setdefault(grad.dtype, []).append(grad)
    for grads in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=parallel.tp_group)
        for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """Exact division; the error names what did not divide."""
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} is not divisible by {denominator}")
    return numerator // denominator


def _init_partition(shape, partition_dim, init_method, parallel, params_dtype):
    """Draw the full weight in fp32, keep this rank's slice along ``partition_dim``."""
    master = torch.empty(shape, dtype=torch.float32)
    init_method(master)
    part = divide(shape[partition_dim], parallel.tp_size, "partitioned dimension")
    local = master.narrow(partition_dim, parallel.tp_rank * part, part)
    return nn.Parameter(local.to(params_dtype).contiguous())


def _zero_bias(size, params_dtype):
    return nn.Parameter(torch.zeros(size, dtype=params_dtype))


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split by rows (output features) across TP ranks.

    weight: [output_size / tp, input_size]; bias: [output_size / tp]. The output is this rank's
    slice of the features ([..., output_size / tp]) unless ``gather_output``. With
    ``skip_bias_add`` the bias is not added and ``(output, bias)`` is returned for a later fusion.
    ``sequence_parallel``: the input is this rank's sequence chunk [b, s / tp, input_size],
    all-gathered to [b, s, input_size] before the product.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True,
                 gather_output: bool = False, init_method: Callable[[torch.Tensor], None],
                 parallel: ParallelState = ParallelState(),
                 params_dtype: torch.dtype = torch.float32, skip_bias_add: bool = False,
                 sequence_parallel: bool = False):
        super().__init__()
        if sequence_parallel and gather_output:
            raise ValueError("a sequence-parallel ColumnParallelLinear cannot gather_output")
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel = sequence_parallel
        self.parallel = parallel
        self.output_size_per_partition = divide(output_size, parallel.tp_size, "output size")
        self.weight = _init_partition((output_size, input_size), 0, init_method, parallel,
                                      params_dtype)
        set_tensor_model_parallel_attributes(self.weight, True, 0)
        if bias:
            self.bias = _zero_bias(self.output_size_per_partition, params_dtype)
            set_tensor_model_parallel_attributes(self.bias, True, 0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor):
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.parallel)  # [b, s, input_size]
        else:
            x = copy_to_tp_region(x, self.parallel)
        bias = None if self.skip_bias_add else self.bias
        out = F.linear(x, self.weight, bias)  # [..., output_size / tp]
        if self.gather_output:
            out = gather_from_tp_region(out, self.parallel)  # [..., output_size]
        if self.skip_bias_add:
            return out, self.bias
        return out

    def extra_repr(self):
        return (f"in={self.input_size}, out={self.output_size}, tp={self.parallel.tp_size}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split by columns (input features) across TP ranks.

    weight: [output_size, input_size / tp]; bias: [output_size], replicated and added after the
    all-reduce of the partial products. The input is this rank's slice of the features when
    ``input_is_parallel`` (the output of a ColumnParallelLinear), else it is split here.
    ``sequence_parallel``: the partial sums are reduce-scattered along the sequence, giving this
    rank's chunk [b, s / tp, output_size]; the bias (added to the chunk) is tagged
    ``sequence_parallel``.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True,
                 input_is_parallel: bool = True, init_method: Callable[[torch.Tensor], None],
                 parallel: ParallelState = ParallelState(),
                 params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("a sequence-parallel RowParallelLinear needs input_is_parallel")
        self.input_size = input_size
        self.output_size = output_size
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.parallel = parallel
        self.input_size_per_partition = divide(input_size, parallel.tp_size, "input size")
        self.weight = _init_partition((output_size, input_size), 1, init_method, parallel,
                                      params_dtype)
        set_tensor_model_parallel_attributes(self.weight, True, 1)
        if bias:
            self.bias = _zero_bias(output_size, params_dtype)
            set_tensor_model_parallel_attributes(self.bias, False, -1)
            if sequence_parallel:
                mark_sequence_parallel(self.bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.parallel)  # [..., input_size / tp]
        out = F.linear(x, self.weight)  # partial sums, [..., output_size]
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(out, self.parallel)  # [b, s/tp, o]
        else:
            out = reduce_from_tp_region(out, self.parallel)
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self):
        return (f"in={self.input_size}, out={self.output_size}, tp={self.parallel.tp_size}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows across TP ranks: weight [num_embeddings / tp, dim].

    Each rank looks up the ids in its vocabulary range, zeroes the others, and the partial
    results are summed across ranks.

    Where the weight has an fp32 ``main_grad`` (bf16/fp16 training:
    ``megatron.parallel.data_parallel.attach_main_grads``) the lookup's gradient is sparse, the
    looked-up rows only, and the main-grad hook adds those rows into ``main_grad`` in fp32. A
    dense gradient would be a [V / tp, h] half-precision tensor allocated, zeroed, converted and
    added every micro-batch (about 0.1 s of a BERT-base bf16 step on CPU, vocabulary 30592) to
    carry a few hundred rows; duplicate ids are also summed in fp32 instead of half precision.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 init_method: Callable[[torch.Tensor], None],
                 parallel: ParallelState = ParallelState(),
                 params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.parallel = parallel
        self.num_embeddings_per_partition = divide(num_embeddings, parallel.tp_size,
                                                   "vocabulary size")
        self.vocab_start_index = parallel.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = _init_partition((num_embeddings, embedding_dim), 0, init_method, parallel,
                                      params_dtype)
        set_tensor_model_parallel_attributes(self.weight, True, 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        sparse = getattr(self.weight, "main_grad", None) is not None
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight, sparse=sparse)  # [..., dim]
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight, sparse=sparse)  # [..., dim]
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(out, self.parallel)

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, tp={self.parallel.tp_size}")
