"""Convert a Megatron GPT checkpoint between tensor/pipeline-parallel layouts.

    python tools/checkpoint_util.py --load DIR --save DIR2 \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1

Reads every ``mp_rank_*`` file of the iteration named by ``latest_checkpointed_iteration.txt``,
merges the shards into full tensors and splits them again for the target layout. Model weights
AND optimizer state are converted: Adam's ``exp_avg``/``exp_avg_sq`` (SGD's momentum) and the
fp32 master weights of bf16/fp16 runs follow the partitioning of their parameter. How a
parameter is partitioned is read from its Megatron name:

- ``query_key_value`` and ``dense_h_to_4h`` weights and biases: dim 0 (column parallel; the QKV
  rows are per head [q; k; v], so rank r holds the rows of heads r*np/tp .. (r+1)*np/tp - 1);
- ``self_attention.dense`` and ``dense_4h_to_h`` weights: dim 1 (row parallel; biases
  replicated);
- ``word_embeddings`` and ``output_layer`` weights, BERT's ``lm_head.bias``: dim 0 (vocabulary);
- everything else (layer norms, position embeddings, row-parallel biases): replicated.

Layers are renumbered from each stage's local index to the global one and back; with tied
embeddings and PP > 1 the last stage holds a copy of the word embeddings
(``word_embeddings.weight``; Megatron's ``word_embeddings_for_head``), which is dropped on
merging and recreated on splitting. Files hold ``model`` nested as Megatron-LM does
(``megatron.checkpointing.megatron_model_state``); flat ``model`` dicts are read too.
``args`` gets the new sizes; iteration, counters, scheduler and loss-scaler state are kept.
RNG states do not map between layouts: each target file takes those of source rank
(``tp % source_tp``, ``pp % source_pp``), and a target rank that got a copy gets fresh streams
of its own (Megatron's seeds mixed with the iteration: the tracker's for a copied TP rank, the
default generators' too for a copied stage), so no two TP ranks or stages draw the same
dropout masks (a resumed run is not bit-identical in its dropout streams).
Files are written atomically and the tracker last.

(Megatron-LM's tools/checkpoint_util.py converts the model only; a converted checkpoint there
must be loaded with --no-load-optim --no-load-rng.)
"""

import argparse
import copy
import os
import re
import struct
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron.checkpointing import (TRACKER_FILENAME, atomic_torch_save,  # noqa: E402
                                    atomic_write_text, checkpoint_file, flat_model_state,
                                    iteration_dir, megatron_model_state, read_checkpoint_file,
                                    read_tracker)
from megatron.errors import UserError, run_main  # noqa: E402
from megatron.parallel.random import MODEL_PARALLEL_RNG, model_parallel_seed  # noqa: E402

_LAYER = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
HEAD_COPY = "word_embeddings.weight"  # last stage's copy of the tied embedding (PP > 1)
EMBEDDING = "language_model.embedding.word_embeddings.weight"
_FLOAT16 = (torch.float16, torch.bfloat16)


def partition_dim(name):
    """0 or 1 for a tensor-parallel parameter, None for a replicated one."""
    if re.search(r"(query_key_value|dense_h_to_4h)\.(weight|bias)$", name):
        return 0
    if re.search(r"(self_attention\.dense|dense_4h_to_h)\.weight$", name):
        return 1
    if re.search(r"(word_embeddings|output_layer)\.weight$", name) or \
            re.search(r"(^|\.)lm_head\.bias$", name):
        return 0
    return None


# -- reading ---------------------------------------------------------------------------------------

def _read_layout(root, iteration, release):
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


def _load(path):
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    ckpt = read_checkpoint_file(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path} is not a Megatron checkpoint (no 'model' entry)")
    ckpt["model"] = flat_model_state(ckpt["model"])  # Megatron's nesting -> parameter names
    return ckpt


def load_shards(root):
    """(iteration, release, {(tp, pp): checkpoint dict}, tp_size, pp_size)."""
    found = read_tracker(root)
    if found is None:
        raise UserError(f"--load {root}: no {TRACKER_FILENAME} found")
    iteration, release = found
    tp_size, pp_size, pp_dirs = _read_layout(root, iteration, release)
    shards = {}
    for p in range(pp_size):
        for t in range(tp_size):
            path = checkpoint_file(root, iteration, t, p, 2 if pp_dirs else 1, release)
            shards[(t, p)] = _load(path)
    args = shards[(0, 0)].get("args")
    for name, size in (("tensor_model_parallel_size", tp_size),
                       ("pipeline_model_parallel_size", pp_size)):
        saved = getattr(args, name, None)
        if saved is not None and saved != size:
            raise UserError(f"{iteration_dir(root, iteration, release)} holds {size} shards "
                            f"along {name} but its args say {saved}")
    return iteration, release, shards, tp_size, pp_size


# -- optimizer state by parameter name --------------------------------------------------------

def _split_optimizer_entry(opt):
    """(torch state dict, master key or None, the wrapper's other entries)."""
    if "fp32_from_fp16_params" in opt or "fp32_from_fp16" in opt:
        masters_key = "fp32_from_fp16_params" if "fp32_from_fp16_params" in opt \
            else "fp32_from_fp16"
        inner_key = "optimizer" if "optimizer" in opt else "optimizer_state_dict"
        rest = {k: v for k, v in opt.items() if k not in (masters_key, inner_key)}
        return opt[inner_key], masters_key, rest
    return opt, None, {}


def _reconstruct_names(groups, model, path):
    """Parameter names per optimizer group from Megatron's default grouping (no weight decay
    for biases and 1-D parameters), for checkpoints saved without ``optimizer_param_names``."""
    wd = [0.0 if n.endswith(".bias") or model[n].ndim == 1 else 1.0 for n in model]
    mults = [g.get("wd_mult") for g in groups]
    if None in mults or len(set(mults)) != len(mults):
        raise UserError(f"{path}: cannot tell which parameter each optimizer entry belongs to "
                        "(no 'optimizer_param_names' and a non-default grouping)")
    return [[n for n, w in zip(model, wd) if w == g["wd_mult"]] for g in groups]


def named_optimizer(ckpt, path):
    """The optimizer entry of one shard keyed by parameter name, or None without one."""
    opt = ckpt.get("optimizer")
    if opt is None:
        return None
    inner, masters_key, rest = _split_optimizer_entry(opt)
    if inner is None:
        raise UserError(f"{path}: the optimizer state is empty (saved by a data-parallel rank "
                        "other than 0?)")
    model = ckpt["model"]
    groups = inner["param_groups"]
    names = ckpt.get("optimizer_param_names") or _reconstruct_names(groups, model, path)
    if len(names) != len(groups) or any(len(n) != len(g["params"])
                                        for n, g in zip(names, groups)):
        raise UserError(f"{path}: the optimizer's parameter groups do not match the model")
    state, masters, group_of = {}, {}, {}
    for g, (group, group_names) in enumerate(zip(groups, names)):
        saved_masters = iter(opt[masters_key][g]) if masters_key else iter(())
        for index, name in zip(group["params"], group_names):
            if name not in model:
                raise UserError(f"{path}: optimizer entry for unknown parameter {name}")
            group_of[name] = g
            if index in inner["state"]:
                state[name] = inner["state"][index]
            if masters_key and model[name].dtype in _FLOAT16:
                try:
                    masters[name] = next(saved_masters)
                except StopIteration:
                    raise UserError(f"{path}: fewer fp32 master weights than float16 "
                                    "parameters") from None
    meta = [{k: v for k, v in group.items() if k != "params"} for group in groups]
    return {"state": state, "masters": masters if masters_key else None,
            "masters_key": masters_key, "rest": rest, "groups": meta, "group_of": group_of}


# -- merging ---------------------------------------------------------------------------------------

def _merge_tensors(name, tensors, where):
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


def _merge_state(name, entries, shard_shape, where):
    merged = {}
    for key, value in entries[0].items():
        if torch.is_tensor(value) and tuple(value.shape) == tuple(shard_shape):
            merged[key] = _merge_tensors(name, [e[key] for e in entries], where)
        else:
            merged[key] = value  # step counters, hyper-parameters
    return merged


def _group_key(meta, index):
    if "wd_mult" in meta and "lr_mult" in meta:
        return ("megatron", meta["wd_mult"], meta["lr_mult"])
    return ("index", index)


def _megatron_group_order(key):
    if key[0] == "megatron":  # get_param_groups: decayed first, unscaled before scaled
        return (0, -key[1], key[2] != 1.0)
    return (1, key[1])


def merge(shards, tp_size, pp_size):
    """Full model (global layer numbers, no head copy) and name-keyed optimizer state."""
    order, model, state, masters = [], {}, {}, {}
    group_meta, group_key_of = {}, {}  # optimizer groups by key (stages may lack some)
    first_opt = None
    offset = 0
    for p in range(pp_size):
        where = f"pipeline stage {p}"
        stage = [shards[(t, p)] for t in range(tp_size)]
        names = list(stage[0]["model"])
        for t, ckpt in enumerate(stage[1:], 1):
            if list(ckpt["model"]) != names:
                raise UserError(f"{where}: tensor ranks 0 and {t} hold different parameters")
        opts = [named_optimizer(ckpt, f"{where}, tensor rank {t}")
                for t, ckpt in enumerate(stage)]
        if any((o is None) != (opts[0] is None) for o in opts) or \
                (p > 0 and (opts[0] is None) != (first_opt is None)):
            raise UserError(f"{where}: some ranks hold optimizer state and some not")
        if p == 0:
            first_opt = opts[0]
        local_layers = set()
        for name in names:
            m = _LAYER.match(name)
            if m:
                local_layers.add(int(m.group(2)))
                full_name = f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}"
            else:
                full_name = name
            if name == HEAD_COPY:
                continue  # the tied embedding's copy on the last stage
            if full_name in model:
                raise UserError(f"{where}: parameter {full_name} is also on an earlier stage")
            shard_shape = stage[0]["model"][name].shape
            order.append(full_name)
            model[full_name] = _merge_tensors(name, [c["model"][name] for c in stage], where)
            if opts[0] is not None:
                if name in opts[0]["state"]:
                    state[full_name] = _merge_state(
                        name, [o["state"][name] for o in opts], shard_shape, where)
                if opts[0]["masters"] is not None and name in opts[0]["masters"]:
                    masters[full_name] = _merge_tensors(
                        name, [o["masters"][name] for o in opts], where)
                g = opts[0]["group_of"][name]
                key = _group_key(opts[0]["groups"][g], g)
                group_meta.setdefault(key, opts[0]["groups"][g])
                group_key_of[full_name] = key
        if local_layers and sorted(local_layers) != list(range(len(local_layers))):
            raise UserError(f"{where}: layer numbers {sorted(local_layers)} are not 0..n-1")
        offset += len(local_layers)
    optimizer = None
    if first_opt is not None:
        keys = sorted(group_meta, key=_megatron_group_order)
        optimizer = {"state": state,
                     "masters": masters if first_opt["masters"] is not None else None,
                     "masters_key": first_opt["masters_key"], "rest": first_opt["rest"],
                     "groups": [group_meta[k] for k in keys],
                     "group_of": {n: keys.index(k) for n, k in group_key_of.items()}}
    return {"order": order, "model": model, "num_layers": offset, "optimizer": optimizer}


# -- splitting -------------------------------------------------------------------------------------

def _check_divisible(full, args, tp, pp):
    heads = getattr(args, "num_attention_heads", None)
    if heads is not None and heads % tp:
        raise UserError(f"--target-tensor-parallel-size {tp} does not divide the "
                        f"{heads} attention heads")
    for name in full["order"]:
        dim = partition_dim(name)
        if dim is None:
            continue
        size = full["model"][name].shape[dim]
        if size % tp:
            what = ("the padded vocabulary" if "embeddings" in name or "output_layer" in name
                    else "the MLP hidden size" if "dense_h_to_4h" in name or "4h_to_h" in name
                    else "the attention width")
            raise UserError(f"--target-tensor-parallel-size {tp} does not divide {what} "
                            f"({size}, parameter {name})")
    if full["num_layers"] % pp:
        raise UserError(f"--target-pipeline-parallel-size {pp} does not divide the "
                        f"{full['num_layers']} layers")


def _shard(name, tensor, t, tp):
    dim = partition_dim(name)
    if dim is None or tp == 1:
        return tensor.clone()
    return tensor.chunk(tp, dim=dim)[t].clone()  # clone: save this slice, not the storage


def _stage_names(full, p, pp):
    """[(local name, full name)] of stage p, in the model's parameter order."""
    per_stage = full["num_layers"] // pp
    lo, hi = p * per_stage, (p + 1) * per_stage
    out = []
    for name in full["order"]:
        m = _LAYER.match(name)
        if m:
            i = int(m.group(2))
            if lo <= i < hi:
                out.append((f"{m.group(1)}{i - lo}{m.group(3)}", name))
        elif ".embedding." in name or name.startswith("embedding."):
            if p == 0:
                out.append((name, name))
        elif p == pp - 1:
            out.append((name, name))
    tied = EMBEDDING in full["model"] and not any("output_layer" in n for n in full["order"])
    if pp > 1 and p == pp - 1 and tied:
        out.append((HEAD_COPY, EMBEDDING))
    return out


def _split_state(full_name, entry, full_shape, t, tp):
    out = {}
    for key, value in entry.items():
        if torch.is_tensor(value) and tuple(value.shape) == tuple(full_shape):
            out[key] = _shard(full_name, value, t, tp)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _shard_optimizer(full, names, t, tp):
    opt = full["optimizer"]
    groups, params = [], []
    for g, meta in enumerate(opt["groups"]):
        members = [(local, name) for local, name in names if opt["group_of"].get(name) == g]
        if members:  # get_param_groups drops empty groups
            groups.append((meta, members))
    state, param_groups, masters, param_names = {}, [], [], []
    index = 0
    for meta, members in groups:
        indices, group_masters = [], []
        for local, name in members:
            if name in opt["state"]:
                state[index] = _split_state(name, opt["state"][name], full["model"][name].shape,
                                            t, tp)
            if opt["masters"] is not None and name in opt["masters"]:
                group_masters.append(_shard(name, opt["masters"][name], t, tp))
            indices.append(index)
            index += 1
        param_groups.append({**copy.deepcopy(meta), "params": indices})
        masters.append(group_masters)
        param_names.append([local for local, _ in members])
        params.extend(members)
    inner = {"state": state, "param_groups": param_groups}
    if opt["masters_key"] is None:
        entry = inner
    else:
        entry = {"optimizer": inner, **copy.deepcopy(opt["rest"]), opt["masters_key"]: masters}
    return entry, param_names


def split(full, shards, src_tp, tp, pp):
    """{(tp, pp): checkpoint dict} of the target layout."""
    base = shards[(0, 0)]
    args = base.get("args")
    _check_divisible(full, args, tp, pp)
    src_pp = 1 + max(stage for _, stage in shards)
    out = {}
    for p in range(pp):
        names = _stage_names(full, p, pp)
        for t in range(tp):
            ckpt = {k: v for k, v in base.items()
                    if k not in ("model", "optimizer", "optimizer_param_names", "rng_state",
                                 "args")}
            ckpt = copy.deepcopy(ckpt)
            if args is not None:
                new_args = copy.deepcopy(args)
                new_args.tensor_model_parallel_size = tp
                new_args.pipeline_model_parallel_size = pp
                ckpt["args"] = new_args
            ckpt["model"] = {local: _shard(name, full["model"][name], t, tp)
                             for local, name in names}
            if full["optimizer"] is not None:
                ckpt["optimizer"], ckpt["optimizer_param_names"] = \
                    _shard_optimizer(full, names, t, tp)
            if "rng_state" in base:
                source = shards.get((t % src_tp, p % src_pp), base)
                ckpt["rng_state"] = copy.deepcopy(source["rng_state"])
                if t >= src_tp or p >= src_pp:  # a copy of another rank's states
                    _reseed_copied_rng(ckpt["rng_state"], args, t, p, base.get("iteration", 0),
                                       stage_copy=p >= src_pp)
            out[(t, p)] = ckpt
    return out


def _reseed_copied_rng(rng_states, args, tp_rank, pp_rank, iteration, stage_copy):
    """Fresh RNG streams for a target rank that took a copy of another rank's states (every DP
    entry): its tracker's tensor-parallel-region state (attention dropout) and, when the whole
    stage is a copy, the default generators too -- else two TP ranks or two pipeline stages
    would draw the same dropout masks. Seeds follow Megatron's (seed + 100 * pp for a stage's
    default generators, + 2718 + tp for the tracker), mixed with the iteration so the streams
    are not replays of those the run began with; every TP rank of a stage gets the same
    default state, as Megatron's replicated regions need. CUDA states are Philox (seed,
    offset) pairs."""
    stage_seed = getattr(args, "seed", 1234) + 100 * pp_rank

    def states(seed):
        seed = (seed * 1_000_003 + iteration) % 2 ** 63
        return (torch.Generator().manual_seed(seed).get_state(),
                torch.tensor(list(struct.pack("<QQ", seed, 0)), dtype=torch.uint8))

    tracker_cpu, tracker_cuda = states(model_parallel_seed(stage_seed, tp_rank))
    default_cpu, default_cuda = states(stage_seed)
    for entry in rng_states:
        if not entry:
            continue
        if stage_copy:
            entry["torch_rng_state"] = default_cpu.clone()
            if entry.get("cuda_rng_state") is not None:
                entry["cuda_rng_state"] = default_cuda.clone()
        tracker = entry.get("rng_tracker_states") or {}
        if MODEL_PARALLEL_RNG in tracker:
            fresh = {"cpu": tracker_cpu.clone()}
            if "cuda" in tracker[MODEL_PARALLEL_RNG]:
                fresh["cuda"] = tracker_cuda.clone()
            tracker[MODEL_PARALLEL_RNG] = fresh


# -- driver ----------------------------------------------------------------------------------------

def convert(load, save, target_tp, target_pp, log=print):
    if target_tp < 1 or target_pp < 1:
        raise UserError("--target-tensor-parallel-size and --target-pipeline-parallel-size "
                        "must be >= 1")
    if os.path.abspath(load) == os.path.abspath(save):
        raise UserError("--save must differ from --load")
    iteration, release, shards, src_tp, src_pp = load_shards(load)
    log(f"loaded iteration {iteration if not release else 'release'} from {load} "
        f"(TP {src_tp} x PP {src_pp})")
    full = merge(shards, src_tp, src_pp)
    targets = split(full, shards, src_tp, target_tp, target_pp)
    for (t, p), ckpt in sorted(targets.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ckpt = {**ckpt, "model": megatron_model_state(ckpt["model"])}
        atomic_torch_save(ckpt, checkpoint_file(save, iteration, t, p, target_pp, release))
    atomic_write_text(os.path.join(save, TRACKER_FILENAME),
                      "release" if release else str(iteration))
    log(f"saved TP {target_tp} x PP {target_pp} to {save} "
        f"({'with' if full['optimizer'] is not None else 'without'} optimizer state)")
    return targets


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint directory to read")
    parser.add_argument("--save", required=True, help="directory for the converted checkpoint")
    parser.add_argument("--target-tensor-parallel-size", type=int, required=True)
    parser.add_argument("--target-pipeline-parallel-size", type=int, required=True)
    args = parser.parse_args(argv)
    convert(args.load, args.save, args.target_tensor_parallel_size,
            args.target_pipeline_parallel_size)


if __name__ == "__main__":
    run_main(main)
