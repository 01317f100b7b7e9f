"""Convert between DeepSpeed engine checkpoints (``--deepspeed``) and our native layout.

    python tools/convert_deepspeed_checkpoint.py to-native     --load DS_DIR  --save NATIVE_DIR
    python tools/convert_deepspeed_checkpoint.py to-deepspeed  --load NATIVE_DIR --save DS_DIR \
        [--zero-stage N]

Both directions keep what a resume needs: the weights (fp32), Adam's moments and step, the LR
scheduler, the loop's counters, the RNG states and the random-LTD scheduler; a converted
checkpoint resumes with the losses the original would have given. The conversion runs the
engine in this one process and moves every tensor through DeepSpeed's own full-parameter API
(``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_set_full_optimizer_state`` ...), so it
does not depend on ZeRO's flat-buffer layout.

Limits (each refused in one line): one model-parallel rank and one data-parallel rank (a ZeRO
checkpoint of several data-parallel ranks: resume it with --deepspeed and save from one rank, or
use DeepSpeed's ds_to_universal), fp32 or bf16 (an fp16 run's loss-scaler state has no
converter yet). ``--model bert`` for BERT checkpoints.
"""

import argparse
import copy
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron.errors import UserError  # noqa: E402


def _provider(family):
    if family == "bert":
        import pretrain_bert as entry
    else:
        import pretrain_gpt as entry
    return entry.PROVIDER


def _check_layout(args, where):
    if args.tensor_model_parallel_size != 1 or args.pipeline_model_parallel_size != 1 \
            or args.data_parallel_size != 1:
        raise UserError(f"{where}: saved with TP {args.tensor_model_parallel_size} x PP "
                        f"{args.pipeline_model_parallel_size} x DP {args.data_parallel_size}; "
                        "this converter handles one rank (resume with that layout and save "
                        "from one rank, or reshard with tools/checkpoint_util.py first)")
    if args.fp16:
        raise UserError(f"{where}: an fp16 run (its loss-scaler state has no converter yet); "
                        "fp32 and bf16 checkpoints convert")


def _engine_args(args, stage, load=None, save=None):
    args = copy.copy(args)
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


def to_native(load, save, family="gpt", log=print):
    """An engine checkpoint (one rank) -> our native layout."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from megatron.checkpointing import TrainState, save_checkpoint
    from megatron.ds.engine import build_engine, start_single_process_group
    from megatron.parallel.state import ParallelState

    start_single_process_group()
    client = _read_client_state(load)
    args = client["args"]
    _check_layout(args, load)
    model = _provider(family).model(args, ParallelState())
    engine = build_engine(_engine_args(args, args.zero_stage), model, ParallelState(),
                          log).engine
    engine.load_checkpoint(load, load_lr_scheduler_states=False)
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
                    log=log, extra_state=extra)


def to_deepspeed(load, save, zero_stage=None, family="gpt", log=print):
    """A native checkpoint (one rank) -> an engine checkpoint (ZeRO ``zero_stage``, default
    the run's --zero-stage or 0)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from megatron.checkpointing import (checkpoint_file, load_checkpoint, read_checkpoint_file,
                                        read_tracker)
    from megatron.ds.engine import build_engine, save_engine_checkpoint, \
        start_single_process_group
    from megatron.parallel.state import ParallelState

    start_single_process_group()
    found = read_tracker(load)
    if found is None:
        raise UserError(f"--load {load}: no latest_checkpointed_iteration.txt (not a native "
                        "checkpoint)")
    path = checkpoint_file(load, found[0], release=found[1])
    args = read_checkpoint_file(path)["args"]
    _check_layout(args, path)
    stage = zero_stage if zero_stage is not None else (args.zero_stage or 0)
    model = _provider(family).model(args, ParallelState())
    native = _native_optimizer(args, model)
    loaded = copy.copy(args)
    loaded.load, loaded.finetune, loaded.deepspeed = load, False, False
    loaded.no_load_optim = loaded.no_load_rng = True
    state, ckpt = load_checkpoint(loaded, model, native, None, log=log)
    native.load_state_dict(ckpt["optimizer"])
    masters = _masters(native)
    # copies taken before the engine partitions the parameters (ZeRO 3 empties them)
    values = [(param, masters[param].detach().float().clone(),
               {key: native.optimizer.state[masters[param]][key].clone() for key in ADAM_STATES})
              for param in model.parameters()]
    opt = _engine_args(args, stage, save=save)
    runner = build_engine(opt, model, ParallelState(), log)
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
    parallel = ParallelState()
    extra = {k: ckpt[k] for k in ("random_ltd_scheduler",) if k in ckpt}
    opt.no_save_rng = True  # the checkpoint's own RNG states, not this process's
    extra["rng_state"] = ckpt["rng_state"]
    save_engine_checkpoint(opt, state, engine, scheduler, parallel, log, extra)


def _read_client_state(load):
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
        return read_checkpoint_file(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("direction", choices=["to-native", "to-deepspeed"])
    parser.add_argument("--load", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                        help="to-deepspeed: the engine's ZeRO stage (default: the run's).")
    parser.add_argument("--model", choices=["gpt", "bert"], default="gpt")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        if args.direction == "to-native":
            to_native(args.load, args.save, args.model)
        else:
            to_deepspeed(args.load, args.save, args.zero_stage, args.model)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
