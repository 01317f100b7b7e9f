"""Convert a Megatron GPT or BERT checkpoint between tensor/pipeline-parallel layouts.

    python tools/checkpoint_util.py --load DIR --save DIR2 \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1

Reads every ``mp_rank_*`` file of the iteration named by ``latest_checkpointed_iteration.txt``,
merges the shards into full tensors and splits them again for the target layout. Model weights
AND optimizer state are converted: Adam's ``exp_avg``/``exp_avg_sq`` (SGD's momentum) and the
fp32 master weights of bf16/fp16 runs follow the partitioning of their parameter. The model
part -- how a parameter is partitioned (read from its Megatron name), layer renumbering, the
last stage's copy of the tied embedding (``word_embeddings_for_head``), dropped on merging and
recreated on splitting -- is ``megatron.checkpoint_reshard``'s, shared with
``megatron.checkpointing.load_pretrained_weights`` and ``tools/convert_hf.py``. Files hold
``model`` nested as Megatron-LM does (``megatron.checkpointing.megatron_model_state``); flat
``model`` dicts are read too.
``args`` gets the new sizes; iteration, counters, scheduler and loss-scaler state are kept.
RNG states do not map between layouts: each target file takes those of source rank
(``tp % source_tp``, ``pp % source_pp``), and a target rank that got a copy gets fresh streams
of its own (Megatron's seeds mixed with the iteration: the tracker's for a copied TP rank, the
default generators' too for a copied stage), so no two TP ranks or stages draw the same
dropout masks (a resumed run is not bit-identical in its dropout streams).
Files are written atomically and the tracker last; what an earlier conversion killed while
writing left in --save is removed first.

(Megatron-LM's tools/checkpoint_util.py converts the model only; a converted checkpoint there
must be loaded with --no-load-optim --no-load-rng.)
"""

import argparse
import copy
import os
import struct
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron.checkpoint_reshard import (check_divisible, chunk_keys,  # noqa: E402
                                         even_stage_names, load_shards, merge_model,
                                         merge_tensors, shard_tensor, virtual_stages)
from megatron.checkpoint_files import (ReadOptions, add_read_flags,  # noqa: E402
                                       remove_stale_temporaries)
from megatron.checkpointing import (TRACKER_FILENAME, atomic_torch_save,  # noqa: E402
                                    atomic_write_text, checkpoint_file, megatron_model_state)
from megatron.errors import UserError, run_main  # noqa: E402
from megatron.parallel.random import MODEL_PARALLEL_RNG, model_parallel_seed  # noqa: E402

_FLOAT16 = (torch.float16, torch.bfloat16)


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

def _merge_state(name, entries, shard_shape, where):
    merged = {}
    for key, value in entries[0].items():
        if torch.is_tensor(value) and tuple(value.shape) == tuple(shard_shape):
            merged[key] = merge_tensors(name, [e[key] for e in entries], where)
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
    """Full model (``megatron.checkpoint_reshard.merge_model``: global layer numbers, no head
    copy) and name-keyed optimizer state."""
    full = merge_model(shards, tp_size, pp_size)
    state, masters = {}, {}
    group_meta, group_key_of = {}, {}  # optimizer groups by key (stages may lack some)
    first_opt = None
    for p, pairs in enumerate(full["stages"]):
        where = f"pipeline stage {p}"
        stage = [shards[(t, p)] for t in range(tp_size)]
        opts = [named_optimizer(ckpt, f"{where}, tensor rank {t}")
                for t, ckpt in enumerate(stage)]
        if any((o is None) != (opts[0] is None) for o in opts) or \
                (p > 0 and (opts[0] is None) != (first_opt is None)):
            raise UserError(f"{where}: some ranks hold optimizer state and some not")
        if p == 0:
            first_opt = opts[0]
        if opts[0] is None:
            continue
        for name, full_name in pairs:
            shard_shape = stage[0]["model"][name].shape
            if name in opts[0]["state"]:
                state[full_name] = _merge_state(
                    name, [o["state"][name] for o in opts], shard_shape, where)
            if opts[0]["masters"] is not None and name in opts[0]["masters"]:
                masters[full_name] = merge_tensors(
                    name, [o["masters"][name] for o in opts], where)
            g = opts[0]["group_of"][name]
            key = _group_key(opts[0]["groups"][g], g)
            group_meta.setdefault(key, opts[0]["groups"][g])
            group_key_of[full_name] = key
    optimizer = None
    if first_opt is not None:
        keys = sorted(group_meta, key=_megatron_group_order)
        optimizer = {"state": state,
                     "masters": masters if first_opt["masters"] is not None else None,
                     "masters_key": first_opt["masters_key"], "rest": first_opt["rest"],
                     "groups": [group_meta[k] for k in keys],
                     "group_of": {n: keys.index(k) for n, k in group_key_of.items()}}
    return {**full, "optimizer": optimizer}


# -- splitting -------------------------------------------------------------------------------------

def _split_state(full_name, entry, full_shape, t, tp):
    out = {}
    for key, value in entry.items():
        if torch.is_tensor(value) and tuple(value.shape) == tuple(full_shape):
            out[key] = shard_tensor(full_name, value, t, tp)
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
                group_masters.append(shard_tensor(name, opt["masters"][name], t, tp))
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
    check_divisible(full, getattr(args, "num_attention_heads", None), tp, pp)
    src_pp = 1 + max(stage for _, stage in shards)
    out = {}
    for p in range(pp):
        names = even_stage_names(full, p, pp)
        for t in range(tp):
            ckpt = {k: v for k, v in base.items()
                    if k not in ("model", "optimizer", "optimizer_param_names", "rng_state",
                                 "args")}
            ckpt = copy.deepcopy(ckpt)
            if args is not None:
                new_args = copy.deepcopy(args)
                new_args.tensor_model_parallel_size = tp
                new_args.pipeline_model_parallel_size = pp
                new_args.num_layers_per_virtual_pipeline_stage = None  # the plain layout
                new_args.virtual_pipeline_model_parallel_size = None
                ckpt["args"] = new_args
            ckpt["model"] = {local: shard_tensor(name, full["model"][name], t, tp)
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

def convert(load, save, target_tp, target_pp, log=print, reading=ReadOptions()):
    if target_tp < 1 or target_pp < 1:
        raise UserError("--target-tensor-parallel-size and --target-pipeline-parallel-size "
                        "must be >= 1")
    if os.path.abspath(load) == os.path.abspath(save):
        raise UserError("--save must differ from --load")
    iteration, release, shards, src_tp, src_pp = load_shards(load, reading=reading)
    log(f"loaded iteration {iteration if not release else 'release'} from {load} "
        f"(TP {src_tp} x PP {src_pp})")
    chunks = len(chunk_keys(shards[(0, 0)]))
    if chunks:  # --num-layers-per-virtual-pipeline-stage: model0, model1, ... per stage
        shards, src_pp = virtual_stages(shards, src_tp, src_pp)
        for ckpt in shards.values():
            ckpt.pop("optimizer", None)
            ckpt.pop("optimizer_param_names", None)
        log(f"warning: {load} is interleaved ({chunks} model chunks per pipeline stage): its "
            "model is converted to the plain layout, its optimizer state is not (continue "
            "from the result with --no-load-optim)")
    full = merge(shards, src_tp, src_pp)
    targets = split(full, shards, src_tp, target_tp, target_pp)
    remove_stale_temporaries(save, log)  # of an earlier conversion killed while writing
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
    add_read_flags(parser)
    args = parser.parse_args(argv)
    convert(args.load, args.save, args.target_tensor_parallel_size,
            args.target_pipeline_parallel_size, reading=ReadOptions.from_args(args))


if __name__ == "__main__":
    run_main(main)
