"""Full (TP=1) state dicts from tensor-parallel partitions, and back.

``gather_full_state_dict(model, parallel)`` all-gathers every partitioned tensor of a TP model
and returns the state dict the same model would have at tensor-parallel size 1: tests compare TP
runs with single-process runs through it, and the checkpoint converter uses it to merge shards.
``split_full_state_dict(full_sd, parallel)`` is the inverse: this rank's partitions of a full
state dict.

How a tensor is split is read from the parameter attributes set by the TP layers
(``tensor_model_parallel``, ``partition_dim``, ``partition_stride``). Where no model is at hand
(a converter reading files) the same layout comes from the parameter names
(``partition_of``), which follow Megatron-LM's checkpoint names; a test checks that both agree
for every parameter of the GPT model.

Stride (Megatron's ``partition_stride``): the partitioned dimension of the full tensor is cut
into ``tp * stride`` equal blocks and rank r holds blocks r, r + tp, r + 2 tp, ... in that order
(Megatron's ``_initialize_affine_weight_cpu``). All our layers use stride 1 (contiguous slices;
the QKV rows are already ordered per head, [np, 3, hn]).
"""

from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from megatron.parallel.state import ParallelState

# Name suffix -> (partition_dim, stride) for Megatron-LM parameter names; others are replicated.
_PARTITIONED_SUFFIXES = (
    ("word_embeddings.weight", (0, 1)),            # VocabParallelEmbedding rows
    ("output_layer.weight", (0, 1)),               # untied LM head, ColumnParallelLinear
    ("query_key_value.weight", (0, 1)),            # rows [np, 3, hn] split by heads
    ("query_key_value.bias", (0, 1)),
    ("self_attention.dense.weight", (1, 1)),       # RowParallelLinear columns
    ("dense_h_to_4h.weight", (0, 1)),              # ColumnParallelLinear rows
    ("dense_h_to_4h.bias", (0, 1)),
    ("dense_4h_to_h.weight", (1, 1)),              # RowParallelLinear columns
    ("lm_head.bias", (0, 1)),                      # BERT's vocab-parallel output bias
)


def partition_of(name: str) -> Optional[Tuple[int, int]]:
    """``(partition_dim, stride)`` of the parameter called ``name`` (Megatron-LM checkpoint
    names), or None when it is replicated across tensor-parallel ranks."""
    for suffix, layout in _PARTITIONED_SUFFIXES:
        if name == suffix or name.endswith("." + suffix):
            return layout
    return None


def _param_partition(param: torch.Tensor) -> Optional[Tuple[int, int]]:
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return param.partition_dim, getattr(param, "partition_stride", 1)


def split_tensor(full: torch.Tensor, dim: int, stride: int, tp_size: int,
                 tp_rank: int) -> torch.Tensor:
    """Rank ``tp_rank``'s partition of ``full`` along ``dim`` (a contiguous copy)."""
    blocks = tp_size * stride
    if full.size(dim) % blocks:
        raise ValueError(f"dimension {dim} of size {full.size(dim)} does not split into "
                         f"{tp_size} ranks x stride {stride}")
    pieces = full.chunk(blocks, dim=dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=dim).contiguous()


def merge_partitions(parts, dim: int, stride: int) -> torch.Tensor:
    """Inverse of ``split_tensor``: the full tensor from every rank's partition (rank order)."""
    if stride == 1:
        return torch.cat(parts, dim=dim)
    per_rank = [p.chunk(stride, dim=dim) for p in parts]  # [tp][stride]
    return torch.cat([per_rank[r][j] for j in range(stride) for r in range(len(parts))], dim=dim)


def gather_tensor(local: torch.Tensor, dim: int, stride: int,
                  parallel: ParallelState) -> torch.Tensor:
    """All-gather this rank's partition ``local`` and reassemble the full tensor (every rank)."""
    if parallel.tp_size == 1:
        return local.detach().clone()
    local = local.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(parallel.tp_size)]
    dist.all_gather(parts, local, group=parallel.tp_group)
    return merge_partitions(parts, dim, stride)


def gather_full_state_dict(model: nn.Module, parallel: ParallelState,
                           grads: bool = False) -> "OrderedDict[str, torch.Tensor]":
    """The TP=1 state dict of ``model`` on every TP rank (detached copies; a collective, so
    every rank of the TP group must call it). ``grads=True`` gathers the parameters' ``.grad``
    instead (parameters without a gradient are left out), for comparing gradients with a
    single-process run."""
    params = dict(model.named_parameters())
    source = params if grads else model.state_dict(keep_vars=True)
    out = OrderedDict()
    for name, tensor in source.items():
        param = params.get(name, tensor)
        if grads:
            tensor = tensor.grad
            if tensor is None:
                continue
        layout = _param_partition(param)
        if layout is None:
            out[name] = tensor.detach().clone()
        else:
            out[name] = gather_tensor(tensor, layout[0], layout[1], parallel)
    return out


def split_full_state_dict(full_sd: Dict[str, torch.Tensor], parallel: ParallelState,
                          model: Optional[nn.Module] = None) -> "OrderedDict[str, torch.Tensor]":
    """This rank's partitions of a TP=1 state dict (no communication).

    The layout comes from ``model``'s parameter attributes when a model is given, else from the
    names (``partition_of``). Replicated tensors are copied unchanged.
    """
    layouts = {}
    if model is not None:
        layouts = {name: _param_partition(p) for name, p in model.named_parameters()}
    out = OrderedDict()
    for name, tensor in full_sd.items():
        layout = layouts[name] if name in layouts else partition_of(name)
        if layout is None or parallel.tp_size == 1:
            out[name] = tensor.detach().clone()
        else:
            out[name] = split_tensor(tensor, layout[0], layout[1], parallel.tp_size,
                                     parallel.tp_rank)
    return out
