"""Model weights of a Megatron checkpoint across tensor/pipeline-parallel layouts.

A checkpoint directory holds one ``model_optim_rng.pt`` per (tensor, pipeline) rank; each
holds this rank's shards of its stage's parameters, with stage-local layer numbers. This module
merges every shard into the full model (``read_full_model_state``: flat parameter names, global
layer numbers, no pipeline copy of the tied embedding) and cuts the full model again for any
layout: a whole target layout (``split_model``, used by ``tools/checkpoint_util.py`` and
``tools/convert_hf.py``) or the one rank of a model being built (``model_state_for_rank``, used by
``megatron.checkpointing.load_pretrained_weights``).

How a parameter is partitioned is read from its Megatron name (``partition_dim``):

- ``query_key_value`` and ``dense_h_to_4h`` weights and biases: dim 0 (column parallel; the QKV
  rows are per head [q; k; v], so rank r holds the rows of heads r*np/tp .. (r+1)*np/tp - 1);
- ``self_attention.dense`` and ``dense_4h_to_h`` weights: dim 1 (row parallel; biases
  replicated);
- ``word_embeddings`` and ``output_layer`` weights, BERT's ``lm_head.bias``: dim 0 (vocabulary);
- everything else (layer norms, position and token-type embeddings, row-parallel biases, the
  pooler and the heads): replicated.

Layers are renumbered from each stage's local index to the global one and back; with tied
embeddings and PP > 1 the last stage holds a copy of the word embeddings
(``word_embeddings.weight``, Megatron's ``word_embeddings_for_head``), which is dropped on
merging (also from a PP = 1 checkpoint that carries one, as Megatron's loader ignores it there)
and recreated on splitting. Optimizer state is ``tools/checkpoint_util.py``'s business.
"""

import os
import re

import torch

from megatron.checkpoint_files import ReadOptions, read_checkpoint_file
from megatron.errors import UserError

LAYER = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")
HEAD_COPY = "word_embeddings.weight"  # last stage's copy of the tied embedding (PP > 1)
EMBEDDING = "language_model.embedding.word_embeddings.weight"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_VOCAB_ROWS = re.compile(r"((word_embeddings|output_layer)\.weight|(^|\.)lm_head\.bias)$")


def partition_dim(name):
    """0 or 1 for a tensor-parallel parameter, None for a replicated one."""
    if re.search(r"(query_key_value|dense_h_to_4h)\.(weight|bias)$", name):
        return 0
    if re.search(r"(self_attention\.dense|dense_4h_to_h)\.weight$", name):
        return 1
    if is_vocab_parameter(name):
        return 0
    return None


def is_vocab_parameter(name):
    """Whether dim 0 of the parameter runs over the (padded) vocabulary."""
    return _VOCAB_ROWS.search(name) is not None


def renumber_layer(name, new_index):
    """``...layers.<i>...`` with ``new_index`` in place of i."""
    m = LAYER.match(name)
    return f"{m.group(1)}{new_index}{m.group(3)}"


def layer_index(name):
    """The layer number in a ``...layers.<i>...`` name, None for a name outside the layers."""
    m = LAYER.match(name)
    return int(m.group(2)) if m else None


def is_embedding_stage_name(name):
    """Parameters held by the first pipeline stage (the input embeddings)."""
    return ".embedding." in name or name.startswith("embedding.")


# -- reading ---------------------------------------------------------------------------------------

def read_layout(root, iteration, release):
    """(tp_size, pp_size, whether the directories carry a pipeline rank) of one iteration."""
    from megatron.checkpointing import TRACKER_FILENAME, iteration_dir

    directory = iteration_dir(root, iteration, release)
    if not os.path.isdir(directory):
        raise UserError(f"{os.path.join(root, TRACKER_FILENAME)} names "
                        f"{os.path.basename(directory)} but {directory} does not exist")
    ranks = []
    for entry in os.listdir(directory):
        m = _RANK_DIR.match(entry)
        if m:
            ranks.append((int(m.group(1)), int(m.group(2)) if m.group(2) else None))
    if not ranks:
        raise UserError(f"{directory} holds no mp_rank_* directories")
    with_pp = {pp is not None for _, pp in ranks}
    if len(with_pp) != 1:
        raise UserError(f"{directory} mixes mp_rank_XX and mp_rank_XX_YYY directories")
    tp_size = max(t for t, _ in ranks) + 1
    pp_size = max(p for _, p in ranks) + 1 if with_pp == {True} else 1
    for t in range(tp_size):
        for p in range(pp_size):
            if ((t, p) if with_pp == {True} else (t, None)) not in ranks:
                raise UserError(f"{directory}: the shard of tensor rank {t}, pipeline rank {p} "
                                "is missing")
    return tp_size, pp_size, with_pp == {True}


def load_shard(path, reading=ReadOptions()):
    """One rank's checkpoint dict with its ``model`` entry flattened to parameter names;
    ``reading``: how the file is read (``megatron.checkpoint_files.ReadOptions``)."""
    from megatron.checkpointing import flat_model_state

    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    ckpt = read_checkpoint_file(path, reading)
    keys = (chunk_keys(ckpt) or ["model"]) if isinstance(ckpt, dict) else ["model"]
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), dict) for k in keys):
        raise UserError(f"{path} is not a Megatron checkpoint (no 'model' entry)")
    for key in keys:
        ckpt[key] = flat_model_state(ckpt[key])  # Megatron's nesting -> parameter names
        for name, value in ckpt[key].items():
            if not torch.is_tensor(value):
                raise UserError(f"{path}: {key} entry {name} is a {type(value).__name__}, "
                                "not a tensor")
    return ckpt


def chunk_keys(ckpt):
    """The per-chunk model keys (``model0``, ``model1``, ...) of an interleaved checkpoint
    (--num-layers-per-virtual-pipeline-stage, Megatron-LM's layout), in chunk order; [] for a
    plain one (``model``)."""
    keys = [k for k in ckpt if isinstance(k, str) and re.fullmatch(r"model\d+", k)]
    return sorted(keys, key=lambda k: int(k[len("model"):]))


def virtual_stages(shards, tp_size, pp_size):
    """(shards, stages): an interleaved checkpoint's shards as the plain pipeline of its
    virtual stages, so ``merge_model`` sees the layers in their global order. Chunk ``c`` of
    pipeline rank ``r`` is virtual stage ``c * pp_size + r`` (Megatron-LM's order; each
    virtual stage's dict is the rank's, with that chunk as ``model``). A plain checkpoint is
    returned as it is."""
    keys = chunk_keys(shards[(0, 0)])
    if not keys:
        return shards, pp_size
    out = {}
    for (t, r), ckpt in shards.items():
        if chunk_keys(ckpt) != keys:
            raise UserError(f"tensor rank {t}, pipeline rank {r} holds model chunks "
                            f"{chunk_keys(ckpt) or ['model']}, tensor rank 0, pipeline rank 0 "
                            f"holds {keys}")
        rest = {k: v for k, v in ckpt.items() if k not in keys}
        for c, key in enumerate(keys):
            out[(t, c * pp_size + r)] = {**rest, "model": ckpt[key]}
    return out, pp_size * len(keys)


def find_iteration(root, iteration=None, flag="--load"):
    """(iteration, release) of ``root``: the tracker's, or ``iteration`` when given."""
    from megatron.checkpointing import TRACKER_FILENAME, iteration_dir, read_tracker

    if not os.path.isdir(root):
        raise UserError(f"{flag} {root}: no {TRACKER_FILENAME} found ({root} is not a "
                        "directory)")
    if iteration is not None:
        if not os.path.isdir(iteration_dir(root, iteration)):
            raise UserError(f"{flag} {root}: no checkpoint of iteration {iteration} "
                            f"({iteration_dir(root, iteration)} does not exist)")
        return iteration, False
    found = read_tracker(root)
    if found is None:
        raise UserError(f"{flag} {root}: no {TRACKER_FILENAME} found")
    return found


def load_shards(root, iteration=None, flag="--load", reading=ReadOptions()):
    """(iteration, release, {(tp, pp): checkpoint dict}, tp_size, pp_size)."""
    from megatron.checkpointing import checkpoint_file, iteration_dir

    iteration, release = find_iteration(root, iteration, flag)
    tp_size, pp_size, pp_dirs = read_layout(root, iteration, release)
    shards = {}
    for p in range(pp_size):
        for t in range(tp_size):
            path = checkpoint_file(root, iteration, t, p, 2 if pp_dirs else 1, release)
            shards[(t, p)] = load_shard(path, reading)
    args = shards[(0, 0)].get("args")
    for name, size in (("tensor_model_parallel_size", tp_size),
                       ("pipeline_model_parallel_size", pp_size)):
        saved = getattr(args, name, None)
        if saved is not None and saved != size:
            raise UserError(f"{iteration_dir(root, iteration, release)} holds {size} shards "
                            f"along {name} but its args say {saved}")
    return iteration, release, shards, tp_size, pp_size


# -- merging ---------------------------------------------------------------------------------------

def merge_tensors(name, tensors, where):
    """The full tensor of parameter ``name`` from its tensor-parallel shards."""
    dim = partition_dim(name)
    if dim is None or len(tensors) == 1:
        first = tensors[0]
        for other in tensors[1:]:
            if other.shape != first.shape:
                raise UserError(f"{where}: replicated tensor {name} has shapes "
                                f"{tuple(first.shape)} and {tuple(other.shape)} on different "
                                "tensor ranks")
        return first
    return torch.cat(tensors, dim=dim)


def merge_model(shards, tp_size, pp_size):
    """The full model of ``{(tp, pp): checkpoint dict}`` (flat ``model`` entries).

    Returns {"order": full names in the model's order, "model": {full name: tensor},
    "num_layers": int, "stages": per stage the [(local name, full name)] merged from it}.
    """
    order, model, stages = [], {}, []
    offset = 0
    for p in range(pp_size):
        where = f"pipeline stage {p}"
        stage = [shards[(t, p)] for t in range(tp_size)]
        names = list(stage[0]["model"])
        for t, ckpt in enumerate(stage[1:], 1):
            if list(ckpt["model"]) != names:
                raise UserError(f"{where}: tensor ranks 0 and {t} hold different parameters")
        local_layers, pairs = set(), []
        for name in names:
            index = layer_index(name)
            if index is not None:
                local_layers.add(index)
            if name == HEAD_COPY:
                continue  # the tied embedding's copy (last stage; ignored at PP = 1 too)
            full_name = name if index is None else renumber_layer(name, index + offset)
            if full_name in model:
                raise UserError(f"{where}: parameter {full_name} is also on an earlier stage")
            order.append(full_name)
            model[full_name] = merge_tensors(name, [c["model"][name] for c in stage], where)
            pairs.append((name, full_name))
        if local_layers and sorted(local_layers) != list(range(len(local_layers))):
            raise UserError(f"{where}: layer numbers {sorted(local_layers)} are not 0..n-1")
        offset += len(local_layers)
        stages.append(pairs)
    return {"order": order, "model": model, "num_layers": offset, "stages": stages}


def read_full_model_state(root, iteration=None, flag="--load", reading=ReadOptions()):
    """(full model {name: tensor} with global layer numbers, the checkpoint's ``args``) of the
    Megatron checkpoint directory ``root`` (release or ``iter_*``; ``iteration``: that one
    instead of the tracker's), merged from every TP/PP shard and interleaved model chunk.
    One-line UserErrors for a missing directory, tracker or shard, an unreadable file, or
    shards that do not fit together."""
    _, _, shards, tp_size, pp_size = load_shards(root, iteration, flag, reading)
    shards, stages = virtual_stages(shards, tp_size, pp_size)
    full = merge_model(shards, tp_size, stages)
    return full["model"], shards[(0, 0)].get("args")


# -- splitting -------------------------------------------------------------------------------------

def check_divisible(full, num_heads, tp, pp):
    """One-line UserError when the full model cannot be cut into ``tp`` x ``pp`` shards."""
    if num_heads is not None and num_heads % tp:
        raise UserError(f"--target-tensor-parallel-size {tp} does not divide the "
                        f"{num_heads} attention heads")
    for name in full["order"]:
        dim = partition_dim(name)
        if dim is None:
            continue
        size = full["model"][name].shape[dim]
        if size % tp:
            what = ("the padded vocabulary" if is_vocab_parameter(name)
                    else "the MLP hidden size" if "dense_h_to_4h" in name or "4h_to_h" in name
                    else "the attention width")
            raise UserError(f"--target-tensor-parallel-size {tp} does not divide {what} "
                            f"({size}, parameter {name})")
    if full["num_layers"] % pp:
        raise UserError(f"--target-pipeline-parallel-size {pp} does not divide the "
                        f"{full['num_layers']} layers")


def shard_tensor(name, tensor, t, tp):
    """Tensor rank ``t`` of ``tp``'s part of the full ``tensor`` (a copy, not a view)."""
    dim = partition_dim(name)
    if dim is None or tp == 1:
        return tensor.clone()
    return tensor.chunk(tp, dim=dim)[t].clone()  # clone: save this slice, not the storage


def is_tied(full_names):
    """Whether the LM head uses the word embeddings (no untied ``output_layer``)."""
    return EMBEDDING in full_names and not any("output_layer" in n for n in full_names)


def stage_names(full_names, layer_ids, pre_process, post_process, head_copy):
    """[(local name, full name)] held by a stage with global layers ``layer_ids``, in the full
    model's order; ``head_copy``: append the last stage's copy of the tied embedding."""
    local_of = {layer: i for i, layer in enumerate(layer_ids)}
    out = []
    for name in full_names:
        index = layer_index(name)
        if index is not None:
            if index in local_of:
                out.append((renumber_layer(name, local_of[index]), name))
        elif is_embedding_stage_name(name):
            if pre_process:
                out.append((name, name))
        elif post_process:
            out.append((name, name))
    if head_copy and EMBEDDING in full_names:
        out.append((HEAD_COPY, EMBEDDING))
    return out


def even_stage_names(full, p, pp):
    """``stage_names`` of stage p when the layers are split evenly over ``pp`` stages."""
    per_stage = full["num_layers"] // pp
    tied = is_tied(full["order"])
    return stage_names(full["order"], range(p * per_stage, (p + 1) * per_stage), p == 0,
                       p == pp - 1, head_copy=pp > 1 and p == pp - 1 and tied)


def split_model(full, t, p, tp, pp):
    """{local name: tensor} of rank (t, p) of a ``tp`` x ``pp`` layout (layers split evenly)."""
    return {local: shard_tensor(name, full["model"][name], t, tp)
            for local, name in even_stage_names(full, p, pp)}


def full_model(flat):
    """The ``merge_model`` description of a flat full state (layers numbered 0..n-1)."""
    layers = {layer_index(n) for n in flat if layer_index(n) is not None}
    return {"order": list(flat), "model": dict(flat), "num_layers": len(layers)}


# -- one rank of a model being built ---------------------------------------------------------------

def model_state_for_rank(full_flat, model, parallel):
    """This rank's part of the full model ``full_flat`` (``read_full_model_state``): the
    parameters of the pipeline stage ``model`` is (its global ``layer_ids``, embeddings on the
    first stage, final norm and heads on the last, the tied embedding's copy where the model
    holds one), cut to tensor rank ``parallel.tp_rank`` of ``parallel.tp_size``, with the
    stage-local layer names this codebase uses. Entries the model has no parameter for (the
    heads of another model) are kept: the loader's ``LoadPolicy`` decides about them.

    A full tensor whose partitioned dimension ``parallel.tp_size`` does not divide is a
    one-line UserError."""
    encoder = getattr(getattr(model, "language_model", None), "encoder", None)
    layers = {layer_index(n) for n in full_flat if layer_index(n) is not None}
    layer_ids = list(encoder.layer_ids) if encoder is not None else sorted(layers)
    pre = getattr(model, "pre_process", True)
    post = getattr(model, "post_process", True)
    own = set(model.state_dict())
    head_copy = HEAD_COPY in own and is_tied(full_flat)
    tp, t = parallel.tp_size, parallel.tp_rank
    out = {}
    for local, name in stage_names(list(full_flat), layer_ids, pre, post, head_copy):
        tensor = full_flat[name]
        dim = partition_dim(name)
        if dim is not None and tensor.shape[dim] % tp:
            raise UserError(f"parameter {name} has {tensor.shape[dim]} rows/columns along its "
                            f"tensor-parallel dimension, not divisible by "
                            f"--tensor-model-parallel-size {tp}")
        out[local] = shard_tensor(name, tensor, t, tp)
    return out


def resize_vocab(full_flat, padded_vocab_size):
    """A copy of ``full_flat`` whose vocabulary rows (word embeddings, untied output layer,
    BERT's LM-head bias) number ``padded_vocab_size``: padding rows dropped from the end or
    zero rows appended. Only padding may change: the caller checks that both sizes pad the
    same vocabulary. Returns (state, the checkpoint's row count or None when unchanged)."""
    out, saved = {}, None
    for name, tensor in full_flat.items():
        if is_vocab_parameter(name) and tensor.shape[0] != padded_vocab_size:
            saved = tensor.shape[0]
            if saved > padded_vocab_size:
                tensor = tensor[:padded_vocab_size]
            else:
                extra = tensor.new_zeros((padded_vocab_size - saved, *tensor.shape[1:]))
                tensor = torch.cat([tensor, extra])
        out[name] = tensor
    return out, saved
