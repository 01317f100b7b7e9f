"""The DeepSpeed JSON's training settings -> our flags, and the engine's config.

Megatron-DeepSpeed's launch scripts pass ``--deepspeed_config ds.json`` whose ``fp16``, ``bf16``,
``zero_optimization``, ``gradient_clipping`` and batch-size entries decide how DeepSpeed's
engine trains. Both paths read them, so no entry is silently dropped:

- ``fp16.enabled`` -> ``--fp16`` with DeepSpeed's loss scaler: ``loss_scale`` (0 = dynamic) ->
  ``--loss-scale``, ``2 ** initial_scale_power`` -> ``--initial-loss-scale``,
  ``loss_scale_window`` -> ``--loss-scale-window``, ``hysteresis``, ``min_loss_scale``; an absent
  key takes DeepSpeed's default (16, 1000, 2, 1), as the engine would;
- ``bf16.enabled`` -> ``--bf16``;
- ``gradient_clipping`` -> ``--clip-grad``;
- ``train_batch_size`` / ``train_micro_batch_size_per_gpu`` must agree with
  ``--global-batch-size`` / ``--micro-batch-size`` (a disagreement names both);
- ``zero_optimization.stage`` (``--zero-stage`` overrides it, as Megatron-DeepSpeed's scripts
  write the same value into both): natively 1 = ``--use-distributed-optimizer``; 2 and 3
  (gradients / parameters sharded) and CPU/NVMe offload exist only in the engine, so they are
  refused by name without ``--deepspeed``.

Under ``--deepspeed`` the JSON then goes to the engine (``engine_config``) with those entries
filled from the flags, so the flags and the engine cannot disagree. Its ``data_efficiency``
section is not given to the engine: random-LTD is ours (``megatron.ltd.config`` reads the same
section), the engine would otherwise try to apply its own.
"""

import copy
import math

from megatron.errors import UserError
from megatron.ltd.config import _Json, load_deepspeed_config, released_layout

# DeepSpeed's defaults for an fp16 section's keys (deepspeed/runtime/fp16 config)
FP16_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1}
FP16_NATIVE_KEYS = {"enabled", *FP16_DEFAULTS}
# Engine-only keys that change nothing when false (DeepSpeed's defaults).
FP16_FALSE_ONLY = ("consecutive_hysteresis", "auto_cast", "fp16_master_weights_and_grads")
BF16_FALSE_ONLY = ("bf16_master_weights_and_grads", "bf16_optimizer_states")
# Sections the engine must not see: ours (random-LTD), or refused elsewhere when enabled.
NOT_FOR_THE_ENGINE = ("data_efficiency", "dynamic_train", "curriculum_learning")


def read_json(args):
    """The run's DeepSpeed JSON as typed access (``_Json``), or None without one."""
    source = getattr(args, "deepspeed_config", None)
    if source is None:
        return None
    where = "<dict>" if isinstance(source, dict) else source
    return _Json(released_layout(load_deepspeed_config(source), where), where)


def apply_deepspeed_json(args):
    """Map the JSON's precision, clipping, batch and ZeRO settings onto ``args`` (both paths),
    and check what each path can run. Called from flag validation, before anything reads the
    precision flags. Raises UserError naming the JSON key or flag."""
    js = read_json(args)
    if js is not None:
        _check_batch_sizes(args, js)
        _apply_precision(args, js)
        clip = js.get("gradient_clipping", "number")
        if clip is not None:
            args.clip_grad = float(clip)
        curriculum = js.get("curriculum_learning.enabled", "bool")
        if curriculum:
            raise UserError(f"--deepspeed-config {js.where}: curriculum_learning.enabled is true;"
                            " DeepSpeed's curriculum learning is not implemented here")
    source = f"--zero-stage {args.zero_stage}" if args.zero_stage is not None or js is None \
        else f"--deepspeed-config {js.where}: zero_optimization.stage"
    stage = args.zero_stage = _zero_stage(args, js)
    if args.deepspeed:
        _check_engine_path(args)
    elif stage in (2, 3):
        raise UserError(f"{source}: ZeRO stage {stage} shards "
                        f"{'gradients' if stage == 2 else 'gradients and parameters'}, which "
                        "only DeepSpeed's engine does: add --deepspeed, or use stage 1 "
                        "(= --use-distributed-optimizer) or 0")
    else:
        _refuse_offload_natively(js)
        if stage == 1:
            args.use_distributed_optimizer = True


def _zero_stage(args, js):
    """--zero-stage, else the JSON's zero_optimization.stage, else 0."""
    if args.zero_stage is not None:
        return args.zero_stage
    stage = js.get("zero_optimization.stage", "int") if js is not None else None
    if stage is not None and stage not in (0, 1, 2, 3):
        raise js.err("zero_optimization.stage", f"must be 0, 1, 2 or 3, got {stage}")
    return stage or 0


def _check_batch_sizes(args, js):
    """The JSON's batch entries must agree with the flags (ours decide the batch)."""
    pairs = (("--micro-batch-size", args.micro_batch_size, "train_micro_batch_size_per_gpu"),
             ("--global-batch-size", args.global_batch_size, "train_batch_size"))
    for flag, given, key in pairs:
        value = js.get(key, "int")
        if value is not None and given is not None and value != given:
            raise UserError(f"{flag} {given} contradicts --deepspeed-config {js.where}: "
                            f"{key} = {value}")


def _apply_precision(args, js):
    fp16 = bool(js.get("fp16.enabled", "bool"))
    bf16 = bool(js.get("bf16.enabled", "bool"))
    if fp16 and bf16:
        raise js.err("fp16.enabled", "and bf16.enabled are both true")
    if fp16 and args.bf16:
        raise UserError(f"--bf16 contradicts --deepspeed-config {js.where}: fp16.enabled = true")
    if bf16 and args.fp16:
        raise UserError(f"--fp16 contradicts --deepspeed-config {js.where}: bf16.enabled = true")
    native = not args.deepspeed
    if fp16:
        args.fp16 = True
        section = js.get("fp16", "dict")
        values = {key: js.get(f"fp16.{key}", "number") for key in FP16_DEFAULTS}
        values = {k: FP16_DEFAULTS[k] if v is None else v for k, v in values.items()}
        args.loss_scale = float(values["loss_scale"]) or None  # 0: dynamic
        args.initial_loss_scale = 2.0 ** values["initial_scale_power"]
        args.loss_scale_window = values["loss_scale_window"]
        args.hysteresis = int(values["hysteresis"])
        args.min_loss_scale = float(values["min_loss_scale"])
        if native:
            _refuse_engine_only_keys(js, "fp16", section, FP16_NATIVE_KEYS, FP16_FALSE_ONLY)
    if bf16:
        args.bf16 = True
        if native:
            _refuse_engine_only_keys(js, "bf16", js.get("bf16", "dict"), {"enabled"},
                                     BF16_FALSE_ONLY)


def _refuse_engine_only_keys(js, name, section, native_keys, false_only):
    """Without the engine, a key we have no equivalent for is refused by name (unless it is
    one that changes nothing when false)."""
    for key, value in section.items():
        if key in native_keys or (key in false_only and value is False):
            continue
        raise js.err(f"{name}.{key}", "has no equivalent without DeepSpeed's engine: add "
                                      "--deepspeed, or remove the key")


def _refuse_offload_natively(js):
    if js is None:
        return
    for key in ("offload_optimizer", "offload_param"):
        section = js.node(f"zero_optimization.{key}")
        if isinstance(section, dict) and section.get("device", "none") != "none":
            raise js.err(f"zero_optimization.{key}", "offloads to "
                         f"{section.get('device')!r}, which only DeepSpeed's engine does: add "
                         "--deepspeed, or remove it")


def _check_engine_path(args):
    """What --deepspeed does not run here, each refused in one line."""
    if args.pipeline_model_parallel_size != 1:
        raise UserError(f"--deepspeed with --pipeline-model-parallel-size "
                        f"{args.pipeline_model_parallel_size}: DeepSpeed's pipeline engine is not "
                        "used here; pass --no-pipeline-parallel with size 1, or leave "
                        "--deepspeed out for our 1F1B pipeline")
    if args.use_distributed_optimizer:
        raise UserError("--use-distributed-optimizer with --deepspeed: the engine shards the "
                        "optimizer itself (--zero-stage 1); leave the flag out")
    if getattr(args, "sequence_parallel", False):
        raise UserError("--sequence-parallel with --deepspeed is not supported (its layer-norm "
                        "gradients would need a tensor-parallel all-reduce inside the engine's "
                        "step); leave one out")
    if getattr(args, "pretrained_checkpoint", None) is not None:
        raise UserError("--pretrained-checkpoint with --deepspeed is not supported: finetune "
                        "without --deepspeed, or convert the checkpoint with "
                        "tools/convert_deepspeed_checkpoint.py and --load it")


def engine_config(args, dp_size):
    """The config dict for ``deepspeed.initialize``: the JSON (if any) with the batch sizes,
    precision, loss scaling, clipping and ZeRO stage taken from the (already merged) flags."""
    js = read_json(args)
    cfg = copy.deepcopy(js.data) if js is not None else {}
    for key in NOT_FOR_THE_ENGINE:
        cfg.pop(key, None)
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    cfg["gradient_accumulation_steps"] = args.global_batch_size // (args.micro_batch_size
                                                                     * dp_size)
    cfg["train_batch_size"] = args.global_batch_size
    cfg["gradient_clipping"] = float(args.clip_grad)
    fp16 = cfg.setdefault("fp16", {})
    fp16["enabled"] = bool(args.fp16)
    if args.fp16:
        fp16.update(loss_scale=float(args.loss_scale or 0),
                    initial_scale_power=int(round(math.log2(args.initial_loss_scale))),
                    loss_scale_window=int(args.loss_scale_window),
                    hysteresis=int(args.hysteresis), min_loss_scale=float(args.min_loss_scale))
    cfg.setdefault("bf16", {})["enabled"] = bool(args.bf16)
    cfg.setdefault("zero_optimization", {})["stage"] = int(args.zero_stage)
    cfg.setdefault("steps_per_print", 2 ** 31 - 1)  # our logger reports every step
    return cfg
