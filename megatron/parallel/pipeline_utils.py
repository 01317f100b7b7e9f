"""Pipeline-parallel helpers: which layers a stage holds, and the tied embedding of the first and
last stage.

Layer ids are GLOBAL (0..num_layers-1) everywhere: a stage builds
``GPTModel(config, parallel, pre_process=parallel.is_first_stage,
post_process=parallel.is_last_stage, layer_ids=stage_layer_ids(...))`` and random-LTD drops
tokens in a layer by its global id, whichever stage holds it.

Tied embeddings (Megatron's ``word_embeddings_for_head``): with pp_size > 1 the last stage keeps
its own copy of the word embeddings for the LM head. ``initialize_embedding_tie`` makes the copy
equal to the first stage's matrix once at start-up (the copy is zero-initialised, so an all-reduce
over the embedding group is a broadcast); after every backward ``allreduce_embedding_grads`` sums
the two gradients, so both copies receive the full gradient and, stepped by identical optimizers,
stay identical.
"""

from typing import List, Optional, Sequence, Union

import torch

from megatron.errors import UserError
from megatron.parallel.data_parallel import grad_buffer
from megatron.parallel.state import ParallelState


def parse_layer_split(text: str) -> List[int]:
    """``"3,5"`` -> ``[3, 5]`` (the value of --pipeline-layer-split)."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--pipeline-layer-split must be comma-separated integers (layers per "
                        f"pipeline stage), got {text!r}")
    return counts


def stage_layer_ids(num_layers: int, pp_size: int, pp_rank: int,
                    layers_per_stage: Optional[Sequence[int]] = None) -> List[int]:
    """Global ids of the layers held by pipeline stage ``pp_rank``.

    Default: an even split (``num_layers / pp_size`` consecutive layers per stage).
    ``layers_per_stage``: an explicit count per stage (--pipeline-layer-split), each >= 1,
    summing to ``num_layers``.
    """
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} outside 0..{pp_size - 1}")
    if layers_per_stage is None:
        if num_layers % pp_size:
            raise UserError(f"--num-layers ({num_layers}) must be divisible by "
                            f"--pipeline-model-parallel-size ({pp_size}) (or give "
                            f"--pipeline-layer-split)")
        per = num_layers // pp_size
        return list(range(pp_rank * per, (pp_rank + 1) * per))
    counts = [int(c) for c in layers_per_stage]
    if len(counts) != pp_size:
        raise UserError(f"--pipeline-layer-split has {len(counts)} entries, expected one per "
                        f"pipeline stage (--pipeline-model-parallel-size {pp_size})")
    if any(c < 1 for c in counts):
        raise UserError(f"--pipeline-layer-split entries must be >= 1, got {counts}")
    if sum(counts) != num_layers:
        raise UserError(f"--pipeline-layer-split {','.join(map(str, counts))} sums to "
                        f"{sum(counts)}, but --num-layers is {num_layers}")
    start = sum(counts[:pp_rank])
    return list(range(start, start + counts[pp_rank]))


def model_layer_ids(args, parallel: ParallelState) -> List[int]:
    """Global ids of the layers of the model part a model provider builds: its stage's
    (``stage_layer_ids``), or under --num-layers-per-virtual-pipeline-stage those of the chunk
    ``parallel.vp_rank`` (a view from ``build_model_chunks``)."""
    if parallel.vp_size > 1:
        return chunk_layer_ids(args.num_layers, parallel.pp_size, parallel.pp_rank,
                               args.num_layers_per_virtual_pipeline_stage, parallel.vp_rank)
    return stage_layer_ids(args.num_layers, parallel.pp_size, parallel.pp_rank,
                           getattr(args, "pipeline_layer_split", None))


def build_model_chunks(model_provider, args, parallel: ParallelState) -> torch.nn.Module:
    """This rank's model: ``model_provider(args, parallel)``, or under
    --num-layers-per-virtual-pipeline-stage a ``ModuleList`` of its chunks, chunk ``c`` built
    with a ``ParallelState`` view whose ``vp_rank`` is ``c`` (so only rank 0's chunk 0 is the
    first stage, only the last rank's last chunk the last one: ``model_layer_ids``). A
    ``ModuleList`` keeps ``.parameters()``, ``.train()`` and ``.to()`` working for the
    optimizer and the loop; the schedule runs it interleaved and checkpoints save one
    ``model{c}`` entry per chunk, as Megatron-LM."""
    per_chunk = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    if per_chunk is None:
        return model_provider(args, parallel)
    import dataclasses

    vp_size = virtual_pipeline_size(args.num_layers, parallel.pp_size, per_chunk)
    return torch.nn.ModuleList(
        model_provider(args, dataclasses.replace(parallel, vp_size=vp_size, vp_rank=c))
        for c in range(vp_size))


def chunk_layer_ids(num_layers: int, pp_size: int, pp_rank: int, layers_per_chunk: int,
                    chunk: int) -> List[int]:
    """Global ids of model chunk ``chunk`` of stage ``pp_rank`` under the interleaved schedule
    (--num-layers-per-virtual-pipeline-stage ``layers_per_chunk``): as Megatron-LM, it is
    virtual stage ``chunk * pp_size + pp_rank`` of ``num_layers / layers_per_chunk``, each
    ``layers_per_chunk`` consecutive layers, so stage 0 of 2 with 8 layers in chunks of 2 holds
    layers 0, 1 and 4, 5."""
    vp_size = virtual_pipeline_size(num_layers, pp_size, layers_per_chunk)
    if not 0 <= chunk < vp_size:
        raise ValueError(f"model chunk {chunk} outside 0..{vp_size - 1}")
    start = (chunk * pp_size + pp_rank) * layers_per_chunk
    return list(range(start, start + layers_per_chunk))


def virtual_pipeline_size(num_layers: int, pp_size: int, layers_per_chunk: int) -> int:
    """Model chunks per pipeline stage for --num-layers-per-virtual-pipeline-stage (one line
    naming the flags when the layers do not divide evenly)."""
    if layers_per_chunk < 1 or num_layers % (pp_size * layers_per_chunk):
        raise UserError(f"--num-layers ({num_layers}) must be a multiple of "
                        f"--pipeline-model-parallel-size ({pp_size}) times "
                        f"--num-layers-per-virtual-pipeline-stage ({layers_per_chunk})")
    return num_layers // (pp_size * layers_per_chunk)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model under wrappers such as DistributedDataParallel (``.module``)."""
    while not hasattr(model, "set_input_tensor") and hasattr(model, "module"):
        model = model.module
    return model


def model_chunks(model: Union[torch.nn.Module, Sequence[torch.nn.Module]]
                 ) -> List[torch.nn.Module]:
    """The model chunks of this stage, unwrapped: the interleaved schedule's list (or
    ``ModuleList``) of them, else ``[model]``."""
    chunks = list(model) if isinstance(model, (list, tuple, torch.nn.ModuleList)) else [model]
    return [unwrap_model(m) for m in chunks]


def tied_embedding_weight(model, parallel: ParallelState) -> Optional[torch.nn.Parameter]:
    """This rank's half of the tied embedding pair (the model's ``tied_embedding_weight``, a
    ``megatron.model.module.LanguageModule`` method): the word embeddings on the first stage,
    the LM head's copy on the last stage; None when there is no pair here (pp_size 1, untied
    output layer, or a middle stage)."""
    if parallel.pp_size == 1:
        return None
    for chunk in model_chunks(model):
        weight = chunk.tied_embedding_weight() if hasattr(chunk, "tied_embedding_weight") \
            else None
        if weight is not None:
            return weight
    return None


def initialize_embedding_tie(model, parallel: ParallelState) -> None:
    """Make the last stage's LM-head copy equal to the first stage's word embeddings.

    Call once after building (or loading) the model, on every rank. The copy is zeros (GPTModel
    zero-initialises it), so the sum over the embedding group is the first stage's matrix.
    """
    weight = tied_embedding_weight(model, parallel)
    if weight is None:
        return
    if parallel.is_last_stage:
        weight.data.zero_()
    torch.distributed.all_reduce(weight.data, group=parallel.embedding_group)


def allreduce_embedding_grads(model, parallel: ParallelState) -> None:
    """Sum the tied embedding's gradient over the first and last stage (in place).

    Call on every rank after the step's backward passes and before the optimizer step; a no-op
    where ``tied_embedding_weight`` is None. Uses ``main_grad`` when the parameter has one.
    """
    weight = tied_embedding_weight(model, parallel)
    if weight is None:
        return
    grad = grad_buffer(weight, zeros_if_missing=True)
    torch.distributed.all_reduce(grad, group=parallel.embedding_group)
