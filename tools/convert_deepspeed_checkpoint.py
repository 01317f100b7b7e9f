"""Convert between DeepSpeed engine checkpoints (``--deepspeed``) and our native layout.

    python tools/convert_deepspeed_checkpoint.py to-native     --load DS_DIR  --save NATIVE_DIR
    python tools/convert_deepspeed_checkpoint.py to-deepspeed  --load NATIVE_DIR --save DS_DIR \
        [--zero-stage N]

Both directions keep what a resume needs: the weights (fp32), Adam's moments and step, the LR
scheduler, the loop's counters, the RNG states and the random-LTD scheduler; a converted
checkpoint resumes with the losses the original would have given. The conversion runs the
engine in the tool's process(es) and moves every tensor through DeepSpeed's own full-parameter API
(``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_set_full_optimizer_state`` ...), so it
does not depend on ZeRO's flat-buffer layout.

A checkpoint of several ranks (TP x DP) converts at its own layout, one process per rank as
the run that saved it (``torchrun --nproc-per-node TP*DP tools/convert_deepspeed_checkpoint.py
...``, or srun): each process converts its TP rank's weights and its ZeRO partitions (DeepSpeed
gathers a full value over the data-parallel ranks); to change the layout, reshard the native
checkpoint with tools/checkpoint_util.py. Refused in one line: PP > 1 (the engine path has no
pipeline), fp16 (an fp16 run's loss-scaler state has no converter yet; fp32 and bf16 convert),
a process count other than the checkpoint's. ``--model bert`` for BERT checkpoints.
"""

import argparse
import copy
import dataclasses
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron.checkpoint_files import ReadOptions, add_read_flags  # noqa: E402
from megatron.errors import USER_ERROR_STATUS, UserError, print_error  # noqa: E402


def _provider(family):
    if family == "bert":
        import pretrain_bert as entry
    else:
        import pretrain_gpt as entry
    return entry.PROVIDER


def _check_layout(args, where):
    """What the converter cannot carry: a pipeline (the engine path has none) and fp16."""
    if args.pipeline_model_parallel_size != 1:
        raise UserError(f"{where}: saved with PP {args.pipeline_model_parallel_size}; --deepspeed "
                        "runs without pipeline stages, so this converter handles PP 1 (reshard "
                        "with tools/checkpoint_util.py first)")
    if args.fp16:
        raise UserError(f"{where}: an fp16 run (its loss-scaler state has no converter yet); "
                        "fp32 and bf16 checkpoints convert")


def _parallel_state(args, where):
    """This process's ``ParallelState`` at the checkpoint's layout: the tool runs as many
    processes as the run that saved it (each converts its own TP rank's weights and its own
    share of ZeRO's partitions; the layout stays, so nothing is resharded)."""
    from megatron.parallel.initialize import build_parallel_state
    from megatron.parallel.random import build_rng_tracker

    _check_layout(args, where)
    tp, dp = args.tensor_model_parallel_size, args.data_parallel_size
    if dist.get_world_size() != tp * dp:
        raise UserError(f"{where}: saved by TP {tp} x DP {dp} = {tp * dp} ranks; run this tool "
                        f"with {tp * dp} processes (torchrun --nproc-per-node {tp * dp} "
                        f"tools/convert_deepspeed_checkpoint.py ...), not {dist.get_world_size()}")
    parallel = build_parallel_state(tp, 1)
    return dataclasses.replace(parallel, rng_tracker=build_rng_tracker(args.seed,
                                                                       parallel.tp_rank))


def _with_reading(args, reading):
    """``args`` (a copy) reading checkpoints as the tool's flags say, not as the saved run did."""
    args = copy.copy(args)
    args.unsafe_load_checkpoint, args.verify_checkpoint = reading.unsafe, reading.verify
    return args


def _engine_args(args, stage, reading, load=None, save=None):
    args = _with_reading(args, reading)
    args.deepspeed, args.zero_stage, args.use_distributed_optimizer = True, stage, False
    args.deepspeed_config = None  # the engine gets the flags' settings (engine_config)
    args.load, args.save, args.finetune = load, save, False
    args.no_load_optim = args.no_load_rng = args.no_save_rng = False
    return args


def _masters(optimizer):
    """{model parameter: the tensor the native optimizer updates} (fp32 masters for bf16)."""
    pairs = {}
    for model_group, master_group in zip(getattr(optimizer, "float16_groups", []),
                                         getattr(optimizer, "fp32_from_float16_groups", [])):
        pairs.update({p: m for p, m in zip(model_group, master_group)})
    for p in optimizer.get_parameters():
        pairs.setdefault(p, p)
    return pairs


def _native_optimizer(args, model):
    from megatron.optim import build_optimizer

    native = copy.copy(args)
    native.deepspeed, native.use_distributed_optimizer = False, False
    return build_optimizer(model, args=native, log=lambda *_: None)


ADAM_STATES = ("exp_avg", "exp_avg_sq")


def _engine_value(engine, param, key, getter):
    """DeepSpeed's full value of ``param`` (key None) or of its optimizer state ``key``; without
    ZeRO (stage 0, fp32) the engine's optimizer holds the parameter itself."""
    value = getter(param) if key is None else getter(param, key)
    if value is None:
        value = param.detach() if key is None else engine.optimizer.state[param][key]
    return value.float()


def _create_optimizer_states(engine):
    """A fresh engine's torch AdamW has no state yet (torch creates it at the first step):
    create it, in AdamW's layout, for each flat fp32 partition the engine steps (ZeRO 3 keeps
    them in ``fp32_partitioned_groups_flat``), to be overwritten with the checkpoint's."""
    torch_opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or \
        [p for group in torch_opt.param_groups for p in group["params"]]
    for flat in flats:
        torch_opt.state[flat] = {"step": torch.zeros((), dtype=torch.float32),
                                 "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}


def _link_optimizer_states(engine):
    """ZeRO 1/2 links each parameter to its slice of the flat optimizer states only after a
    step; a loaded or fresh engine has taken none, so link them now."""
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def _engine_step_count(engine):
    states = [s for s in engine.optimizer.optimizer.state.values() if "step" in s]
    return states[0]["step"] if states else None


def to_native(load, save, family="gpt", log=print, reading=ReadOptions()):
    """An engine checkpoint -> our native layout (``reading``: how its files are read)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from megatron.checkpointing import TrainState, save_checkpoint
    from megatron.ds.engine import build_engine, start_single_process_group

    start_single_process_group()
    args = _read_client_state(load, reading)["args"]
    parallel = _parallel_state(args, load)
    model = _provider(family).model(args, parallel)
    engine = build_engine(_engine_args(args, args.zero_stage, reading), model, parallel, log).engine
    _, client = engine.load_checkpoint(load, load_lr_scheduler_states=False)  # this TP rank's
    _link_optimizer_states(engine)
    native = _native_optimizer(args, model)
    step = _engine_step_count(engine)
    masters = _masters(native)
    for param in model.parameters():
        full = _engine_value(engine, param, None, safe_get_full_fp32_param)
        param.data.copy_(full)
        master = masters[param]
        master.data.copy_(full)
        state = native.optimizer.state[master]
        for key in ADAM_STATES:
            state[key] = _engine_value(engine, param, key, safe_get_full_optimizer_state).clone()
        if step is not None:
            state["step"] = step.clone()
    out = copy.copy(args)
    out.deepspeed, out.save = False, save
    out.zero_stage, out.use_distributed_optimizer = 0, False
    scheduler = types.SimpleNamespace(state_dict=lambda: client["opt_param_scheduler"])
    extra = {k: client[k] for k in ("rng_state", "random_ltd_scheduler") if k in client}
    save_checkpoint(out, TrainState(**client["train_state"]), model, native, scheduler,
                    log=log, extra_state=extra, parallel=parallel)


def to_deepspeed(load, save, zero_stage=None, family="gpt", log=print, reading=ReadOptions()):
    """A native checkpoint -> an engine checkpoint (ZeRO ``zero_stage``, default the run's
    --zero-stage or 0; ``reading``: how its files are read)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from megatron.checkpointing import (checkpoint_file, load_checkpoint, read_checkpoint_file,
                                        read_tracker)
    from megatron.ds.engine import build_engine, save_engine_checkpoint, \
        start_single_process_group

    start_single_process_group()
    found = read_tracker(load)
    if found is None:
        raise UserError(f"--load {load}: no latest_checkpointed_iteration.txt (not a native "
                        "checkpoint)")
    path = checkpoint_file(load, found[0], release=found[1])
    args = read_checkpoint_file(path, reading)["args"]
    parallel = _parallel_state(args, path)
    stage = zero_stage if zero_stage is not None else (args.zero_stage or 0)
    model = _provider(family).model(args, parallel)
    native = _native_optimizer(args, model)
    loaded = _with_reading(args, reading)
    loaded.load, loaded.finetune, loaded.deepspeed = load, False, False
    loaded.no_load_optim = loaded.no_load_rng = True
    state, ckpt = load_checkpoint(loaded, model, native, None, log=log, parallel=parallel)
    native.load_state_dict(ckpt["optimizer"])
    masters = _masters(native)
    # copies taken before the engine partitions the parameters (ZeRO 3 empties them)
    values = [(param, masters[param].detach().float().clone(),
               {key: native.optimizer.state[masters[param]][key].clone() for key in ADAM_STATES})
              for param in model.parameters()]
    opt = _engine_args(args, stage, reading, save=save)
    runner = build_engine(opt, model, parallel, log)
    engine = runner.engine
    _create_optimizer_states(engine)
    _link_optimizer_states(engine)
    for param, full, states in values:
        safe_set_full_fp32_param(param, full)
        for key, value in states.items():
            safe_set_full_optimizer_state(param, value, key)
    step = next(iter(native.optimizer.state.values()))["step"]
    for flat_state in engine.optimizer.optimizer.state.values():
        flat_state["step"] = step.clone()
    engine.global_steps, engine.global_samples = state.iteration, state.consumed_train_samples
    scheduler = types.SimpleNamespace(state_dict=lambda: ckpt["opt_param_scheduler"])
    extra = {k: ckpt[k] for k in ("random_ltd_scheduler",) if k in ckpt}
    opt.no_save_rng = True  # the checkpoint's own RNG states, not this process's
    extra["rng_state"] = ckpt["rng_state"]
    save_engine_checkpoint(opt, state, engine, scheduler, parallel, log, extra)


def _read_client_state(load, reading):
    """The client state in the engine checkpoint ``latest`` names (mp rank 0's model states)."""
    from megatron.checkpointing import read_checkpoint_file
    from megatron.ds.engine import _safe_globals

    latest = os.path.join(load, "latest")
    if not os.path.isfile(latest):
        raise UserError(f"--load {load}: no 'latest' file (not a DeepSpeed checkpoint)")
    with open(latest) as f:
        tag = f.read().strip()
    # ZeRO 3 names the model states of each data-parallel rank
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    paths = [os.path.join(load, tag, name) for name in names]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise UserError(f"--load {load}: 'latest' names {tag} but {paths[0]} does not exist")
    with torch.serialization.safe_globals(_safe_globals()):
        return read_checkpoint_file(path, reading)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("direction", choices=["to-native", "to-deepspeed"])
    parser.add_argument("--load", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                        help="to-deepspeed: the engine's ZeRO stage (default: the run's).")
    parser.add_argument("--model", choices=["gpt", "bert"], default="gpt")
    add_read_flags(parser)
    args = parser.parse_args(argv)
    reading = ReadOptions.from_args(args)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    started = False
    try:
        started = _start_processes()
        if args.direction == "to-native":
            to_native(args.load, args.save, args.model, reading=reading)
        else:
            to_deepspeed(args.load, args.save, args.zero_stage, args.model, reading=reading)
    except UserError as err:
        print_error(err)
        return USER_ERROR_STATUS
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def _start_processes():
    """Under torchrun or srun (several processes): their gloo group (the engine runs on CPU
    here); one process starts its own in ``to_native`` / ``to_deepspeed``. -> whether this
    started a group (to end it)."""
    from megatron.parallel.initialize import init_process_group, read_distributed_env

    env = read_distributed_env()
    if env.world_size == 1 or dist.is_initialized():
        return False
    init_process_group(env, "gloo")
    return True


if __name__ == "__main__":
    sys.exit(main())
