"""``--deepspeed``: DeepSpeed's engine trains our model (megatron/ds), and the DeepSpeed JSON's
fp16/bf16/ZeRO settings map to native flags without it (issue 13, item 1).

The engine runs on CPU (DS_ACCELERATOR=cpu) in gloo processes spawned by the distributed
harness (the engine keeps module-wide group state; the pytest process stays clean). Equivalence
is against the native path in fp32 with dropout and random-LTD from the JSON's
``data_efficiency`` section: losses within 1e-5 over 10 iterations for ZeRO 1/2/3.
"""

import json
import os
import re

import pytest
import torch

from distributed_harness import run_distributed
from megatron.arguments import parse_args
from megatron.errors import UserError
from training_helpers import gpt_argv

os.environ.setdefault("DS_ACCELERATOR", "cpu")

ITERS = 10
RANDOM_LTD = {"data_efficiency": {"enabled": True, "data_routing": {"enabled": True, "random_ltd": {
    "enabled": True, "total_layer_num": 4, "random_ltd_layer_num": 2,
    "random_ltd_layer_id": [1, 2], "model_mask_name": "attention_mask", "model_type": "decoder",
    "hidden_state_order": "seq_batch_dim",
    "random_ltd_schedule": {"min_value": 8, "max_value": 32, "schedule_type": "fixed_linear",
                            "schedule_config": {"require_steps": 6, "seq_per_step": 4}}}}}}
FP16 = {"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2,
        "min_loss_scale": 1, "initial_scale_power": 11}


def write_json(tmp_path, name="ds.json", **sections):
    path = tmp_path / name
    path.write_text(json.dumps(sections))
    return str(path)


def args_with(tmp_path, *flags, world_size=1, **sections):
    argv = gpt_argv("/nowhere/data", "--deepspeed_config", write_json(tmp_path, **sections),
                    *flags)
    return parse_args(argv, world_size=world_size)


# -- the JSON without --deepspeed: native equivalents, or refused by name -------------------------

def test_fp16_section_sets_the_native_loss_scaler(tmp_path):
    args = args_with(tmp_path, fp16=FP16)
    assert args.fp16 and args.params_dtype == torch.float16
    assert (args.initial_loss_scale, args.loss_scale_window, args.hysteresis,
            args.min_loss_scale, args.loss_scale) == (2.0 ** 11, 500, 2, 1.0, None)
    # absent keys take DeepSpeed's defaults (2^16, window 1000), as the engine would
    args = args_with(tmp_path, fp16={"enabled": True})
    assert (args.initial_loss_scale, args.loss_scale_window) == (2.0 ** 16, 1000)
    assert args_with(tmp_path, fp16={"enabled": True, "loss_scale": 128}).loss_scale == 128.0
    assert not args_with(tmp_path, fp16={"enabled": False}).fp16


def test_bf16_zero_and_clipping_map_to_flags(tmp_path):
    args = args_with(tmp_path, bf16={"enabled": True}, zero_optimization={"stage": 1},
                     gradient_clipping=0.5, world_size=2)
    assert args.bf16 and args.use_distributed_optimizer and args.zero_stage == 1
    assert args.clip_grad == 0.5
    # --zero-stage overrides the JSON's stage, as Megatron-DeepSpeed's scripts pass both
    args = args_with(tmp_path, "--zero-stage", "0", zero_optimization={"stage": 1})
    assert args.zero_stage == 0 and not args.use_distributed_optimizer


@pytest.mark.parametrize("sections, flags, message", [
    (dict(zero_optimization={"stage": 2}), (),
     r"zero_optimization.stage: ZeRO stage 2 shards gradients, which only DeepSpeed's engine"),
    (dict(zero_optimization={"stage": 3}), ("--zero-stage", "3"),
     r"--zero-stage 3: ZeRO stage 3 shards gradients and parameters"),
    (dict(zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu"}}), (),
     r"zero_optimization.offload_optimizer offloads to 'cpu', which only DeepSpeed's engine"),
    (dict(fp16={**FP16, "consecutive_hysteresis": True}), (),
     r"fp16.consecutive_hysteresis has no equivalent without DeepSpeed's engine"),
    (dict(fp16=FP16), ("--bf16",), r"--bf16 contradicts --deepspeed-config .*fp16.enabled"),
    (dict(bf16={"enabled": True}), ("--fp16",), r"--fp16 contradicts .*bf16.enabled"),
    (dict(train_micro_batch_size_per_gpu=8), (),
     r"--micro-batch-size 2 contradicts --deepspeed-config .*train_micro_batch_size_per_gpu = 8"),
    (dict(curriculum_learning={"enabled": True}), (),
     r"curriculum_learning.enabled is true"),
])
def test_settings_without_a_native_equivalent_are_refused_by_name(tmp_path, sections, flags,
                                                                  message):
    with pytest.raises(UserError, match=message):
        args_with(tmp_path, *flags, world_size=2, **sections)


def test_engine_path_refusals(tmp_path):
    with pytest.raises(UserError, match="--deepspeed with --pipeline-model-parallel-size 2"):
        args_with(tmp_path, "--deepspeed", "--pipeline-model-parallel-size", "2", world_size=2)
    with pytest.raises(UserError, match="--use-distributed-optimizer with --deepspeed"):
        args_with(tmp_path, "--deepspeed", "--use-distributed-optimizer", world_size=2)
    # ZeRO 2/3 and offload parse with the engine
    args = args_with(tmp_path, "--deepspeed", zero_optimization={"stage": 3}, world_size=2)
    assert args.zero_stage == 3 and not args.use_distributed_optimizer


def test_engine_config_follows_the_flags(tmp_path):
    from megatron.ds.config import engine_config

    args = args_with(tmp_path, "--deepspeed", "--zero-stage", "2", "--global-batch-size", "8",
                     "--num-layers", "4",
                     world_size=2, fp16=FP16, zero_optimization={"stage": 1,
                                                                 "overlap_comm": True},
                     **RANDOM_LTD)
    cfg = engine_config(args, dp_size=2)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"],
            cfg["gradient_accumulation_steps"]) == (8, 2, 2)
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert cfg["fp16"] == {**FP16, "loss_scale": 0.0, "min_loss_scale": 1.0}
    assert cfg["bf16"] == {"enabled": False} and cfg["gradient_clipping"] == 1.0
    assert "data_efficiency" not in cfg  # random-LTD is ours, not the engine's


def test_zero_offload_needs_adam(tmp_path):
    pytest.importorskip("deepspeed")
    from megatron.ds.engine import _cpu_adam, offloaded_optimizer

    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert offloaded_optimizer(config) == "cpu"
    assert offloaded_optimizer({"zero_optimization": {"offload_optimizer": {"device": "none"}}}) \
        is None
    args = args_with(tmp_path, "--deepspeed", "--optimizer", "sgd", **config)
    with pytest.raises(UserError, match=r"--optimizer sgd with --deepspeed-config zero_optimiz"
                                        r"ation.offload_optimizer on 'cpu': ZeRO-Offload steps"):
        _cpu_adam(args, torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0), "cpu")


# -- the engine: same losses as the native path, exact resume ----------------------------------

def _losses(result):
    return [entry["lm loss"] for _, entry in result.train_losses]


def _train(argv):
    from training_helpers import run

    result, logs = run(argv)
    return _losses(result), logs


def _grad_norms(logs):
    """The gradient norms the iteration log lines report (3 decimals)."""
    return [float(norm) for line in logs for norm in re.findall(r"grad norm: ([\d.]+)", line)]


def _native_and_engine(rank, world_size, data_prefix, ds_json, stages, tp=1, extra=(),
                       engine_json=None):
    """(losses, grad norms) natively, then {stage: (losses, grad norms)} through the engine
    for each ZeRO stage (its JSON ``engine_json``, default the same), at the same layout (TP
    ``tp``, DP the remaining ranks)."""
    def train(json_path, *flags):
        losses, logs = _train(gpt_argv(
            data_prefix, "--num-layers", "4", "--deepspeed_config", json_path,
            "--global-batch-size", str(4 * world_size // tp), "--tensor-model-parallel-size",
            str(tp), "--log-interval", "1", *extra, *flags, iters=ITERS))
        return losses, _grad_norms(logs)

    native = train(ds_json)
    engine = {stage: train(engine_json or ds_json, "--deepspeed", "--zero-stage", str(stage))
              for stage in stages}
    return native, engine


def _assert_close(native, engine):
    """Losses within 1e-5 over ``ITERS`` iterations; grad norms equal to the 3 decimals logged
    (with clipping at 1.0 active: the norms are above it)."""
    (native_losses, native_norms) = native
    assert len(native_norms) == ITERS and max(native_norms) > 1.0
    for stage, (losses, norms) in engine.items():
        assert len(losses) == len(native_losses) == ITERS
        worst = max(abs(a - b) for a, b in zip(native_losses, losses))
        assert worst <= 1e-5, f"ZeRO {stage}: max |loss difference| {worst}"
        assert max(abs(a - b) for a, b in zip(native_norms, norms)) <= 1.5e-3, (stage, norms)


@pytest.mark.slow
def test_zero_1_2_3_match_the_native_path(data_prefix, tmp_path):
    pytest.importorskip("deepspeed")
    ds_json = write_json(tmp_path, **RANDOM_LTD)
    [(native, engine)] = run_distributed(_native_and_engine, 1,
                                         args=(data_prefix, ds_json, (1, 2, 3)), timeout=300)
    _assert_close(native, engine)
    assert native[0][0] > native[0][-1]  # it learns


@pytest.mark.slow
def test_data_parallel_zero_2_matches_the_native_path(data_prefix, tmp_path):
    pytest.importorskip("deepspeed")
    ds_json = write_json(tmp_path, **RANDOM_LTD)
    results = run_distributed(_native_and_engine, 2, args=(data_prefix, ds_json, (1, 2)),
                              timeout=300)
    for native, engine in results:
        _assert_close(native, engine)
    assert results[0] == results[1]  # every rank reports the same reduced losses


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_tensor_parallel_zero_1_2_3_match_the_native_path(data_prefix, tmp_path, world_size):
    """TP 2 (x DP 2 on 4 ranks): DeepSpeed's grad norm and clipping count each TP-duplicated
    parameter once (it reads ``tensor_model_parallel``, which our layers set), as ours. With
    that attribute cleared, ZeRO 2's losses move 3.6e-4 away from the native path's."""
    pytest.importorskip("deepspeed")
    ds_json = write_json(tmp_path, **RANDOM_LTD)
    results = run_distributed(_native_and_engine, world_size,
                              args=(data_prefix, ds_json, (1, 2, 3), 2), timeout=600)
    for native, engine in results:
        _assert_close(native, engine)
    assert all(result == results[0] for result in results)


@pytest.mark.slow
def test_batch_rampup_through_the_engine(data_prefix, tmp_path):
    """--rampup-batch-size 4 2 24 to 8 (Megatron-LM's GPT-3 scripts): the engine's batch and
    gradient accumulation follow ours (2, 3, then 4 micro-batches), losses within 1e-5."""
    pytest.importorskip("deepspeed")
    ds_json = write_json(tmp_path, **RANDOM_LTD)
    ramp = ("--global-batch-size", "8", "--rampup-batch-size", "4", "2", "24")
    [(native, engine)] = run_distributed(_native_and_engine, 1,
                                         args=(data_prefix, ds_json, (1, 2), 1, ramp))
    _assert_close(native, engine)


@pytest.mark.slow
def test_zero_offload_steps_deepspeeds_cpu_adam(data_prefix, tmp_path):
    """offload_optimizer to the CPU (Megatron-DeepSpeed's ZeRO-Offload JSONs): the engine
    refuses a torch optimizer there, so DeepSpeed's CPU AdamW steps the same groups; its
    losses stay within 1e-5 of our AdamW's."""
    pytest.importorskip("deepspeed")
    ds_json = write_json(tmp_path, **RANDOM_LTD)
    offload_json = write_json(tmp_path, "offload.json", **RANDOM_LTD,
                              zero_optimization={"offload_optimizer": {"device": "cpu"}})
    [(native, engine)] = run_distributed(
        _native_and_engine, 1, args=(data_prefix, ds_json, (1, 2), 1, (), offload_json))
    _assert_close(native, engine)


@pytest.mark.slow
def test_bf16_zero_1_2_follow_the_native_bf16_path(data_prefix, tmp_path):
    """bf16 from the JSON's bf16 section: the engine's ZeRO 1 (its BF16_Optimizer) and 2 keep
    fp32 master weights and accumulate gradients in fp32, as our bf16 path; the roundings fall
    elsewhere, so the losses agree to 2.5e-4 over 10 iterations (1.5e-4 measured), where the
    bf16 and fp32 runs are 6.5e-4 apart. (DeepSpeed's ZeRO 0 accumulates bf16 gradients in
    bf16: not compared.)"""
    pytest.importorskip("deepspeed")
    fp32_json = write_json(tmp_path, **RANDOM_LTD)
    [((fp32, _), _)] = run_distributed(_native_and_engine, 1, args=(data_prefix, fp32_json, ()))
    bf16_json = write_json(tmp_path, "bf16.json", bf16={"enabled": True}, **RANDOM_LTD)
    [((native, _), engine)] = run_distributed(_native_and_engine, 1,
                                              args=(data_prefix, bf16_json, (1, 2)), timeout=300)
    assert max(abs(a - b) for a, b in zip(native, fp32)) > 5e-4  # bf16 is on
    for stage, (losses, _) in engine.items():
        assert len(losses) == ITERS
        assert max(abs(a - b) for a, b in zip(native, losses)) <= 2.5e-4, stage


def _bert_native_and_engine(rank, world_size, tp):
    """BERT (MLM + SOP losses, random-LTD on the encoder) natively, then through ZeRO 2."""
    import pretrain_bert
    from training_helpers import tiny_bert_argv

    ltd = ["--random-ltd", "--random-ltd-start", "8", "--random-ltd-step", "8",
           "--random-ltd-schedule-steps", "3"]
    runs = []
    for flags in ([], ["--deepspeed", "--zero-stage", "2"]):
        argv = tiny_bert_argv(*ltd, "--tensor-model-parallel-size", str(tp),
                              "--global-batch-size", str(4 * world_size // tp), *flags, iters=6)
        result = pretrain_bert.pretrain(pretrain_bert.PROVIDER, argv=argv, log=lambda *_: None)
        runs.append([loss for _, entry in result.train_losses
                     for loss in (entry["lm loss"], entry["sop loss"])])
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("world_size, tp", [(1, 1), (2, 2)])
def test_bert_through_the_engine_matches_the_native_path(world_size, tp):
    """Megatron-DeepSpeed's BERT-large scripts pass --deepspeed too: same losses (one process,
    TP 2), within 1e-5 over 6 iterations."""
    pytest.importorskip("deepspeed")
    for native, engine in run_distributed(_bert_native_and_engine, world_size, args=(tp,),
                                          timeout=300):
        assert len(native) == len(engine) == 12
        assert max(abs(a - b) for a, b in zip(native, engine)) <= 1e-5


def _resume(rank, world_size, data_prefix, ds_json, save, stage, tp=1):
    flags = ["--num-layers", "4", "--deepspeed_config", ds_json, "--deepspeed",
             "--zero-stage", str(stage), "--tensor-model-parallel-size", str(tp),
             "--global-batch-size", str(4 * world_size // tp)]
    straight, _ = _train(gpt_argv(data_prefix, *flags, iters=ITERS))
    first, _ = _train(gpt_argv(data_prefix, *flags, "--save", save, "--save-interval", "5",
                               "--exit-interval", "5", iters=ITERS))
    second, logs = _train(gpt_argv(data_prefix, *flags, "--load", save, "--save", save,
                                   iters=ITERS))
    return straight, first, second, logs


@pytest.mark.slow
@pytest.mark.parametrize("stage, world_size, tp", [(1, 1, 1), (3, 1, 1), (2, 4, 2)])
def test_engine_checkpoint_resumes_bitwise(data_prefix, tmp_path, stage, world_size, tp):
    """One process (ZeRO 1, 3), and TP 2 x DP 2 with ZeRO 2 (each TP rank's model states, each
    rank's optimizer partition, the DP ranks' RNG states)."""
    pytest.importorskip("deepspeed")
    ds_json = write_json(tmp_path, **RANDOM_LTD)
    save = str(tmp_path / "ckpt")
    results = run_distributed(_resume, world_size,
                              args=(data_prefix, ds_json, save, stage, tp), timeout=300)
    straight, first, second, logs = results[0]
    assert first + second == straight  # bitwise: every loss equal
    assert all(result[:3] == results[0][:3] for result in results)
    assert any("successfully loaded DeepSpeed checkpoint" in line and "iteration 5" in line
               for line in logs)
    assert open(os.path.join(save, "latest")).read() == "global_step10"
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "10"
    assert not [n for n in os.listdir(save) if n.endswith(".tmp")]


def _corrupt_then_load(rank, world_size, data_prefix, ds_json, save):
    """An engine checkpoint with one flipped byte in a tensor: refused on --load in one line
    naming the file, loaded anyway with --no-verify-checkpoint."""
    from test_checkpoint_safety import _flip_tensor_byte

    flags = ["--num-layers", "4", "--deepspeed_config", ds_json, "--deepspeed",
             "--zero-stage", "1", "--save", save]
    _train(gpt_argv(data_prefix, *flags, "--save-interval", "2", "--exit-interval", "2",
                    iters=4))
    path = os.path.join(save, "global_step2", "mp_rank_00_model_states.pt")
    _flip_tensor_byte(path)
    try:
        _train(gpt_argv(data_prefix, *flags, "--load", save, iters=4))
        refusal = None
    except UserError as err:
        refusal = str(err)
    from tools.convert_deepspeed_checkpoint import main as convert

    converted = [convert(["to-native", "--load", save, "--save", f"{save}-native{i}", *flag])
                 for i, flag in enumerate(([], ["--no-verify-checkpoint"]))]
    _, logs = _train(gpt_argv(data_prefix, *flags, "--load", save, "--no-verify-checkpoint",
                              iters=4))
    return path, refusal, logs, converted


@pytest.mark.slow
def test_engine_checkpoint_files_are_verified(data_prefix, tmp_path):
    """By training's --load and by the converter (exit 2; 0 with --no-verify-checkpoint)."""
    pytest.importorskip("deepspeed")
    ds_json = write_json(tmp_path, **RANDOM_LTD)
    [(path, refusal, logs, converted)] = run_distributed(
        _corrupt_then_load, 1, args=(data_prefix, ds_json, str(tmp_path / "ckpt")), timeout=300)
    assert converted == [2, 0]
    assert refusal is not None and refusal.startswith(f"cannot read checkpoint {path}: it does "
                                                      "not match the sizes and CRC-32s")
    assert "\n" not in refusal and "--no-verify-checkpoint" in refusal
    assert any("successfully loaded DeepSpeed checkpoint" in line and "iteration 2" in line
               for line in logs)


# -- fp16 through the engine ---------------------------------------------------------------------

def _fp16_engine(rank, world_size, tmp_path, supported, stage):
    """The engine built for our model with the JSON's fp16 section, on a CPU accelerator that
    says it does (``supported``) or does not support fp16; -> the engine's loss scaler's
    settings, or the refusal."""
    from deepspeed.accelerator import get_accelerator

    import pretrain_gpt
    from megatron.ds.engine import build_engine
    from megatron.parallel.state import ParallelState
    from megatron.training import build_tokenizer_from_args

    type(get_accelerator()).is_fp16_supported = lambda self: supported
    args = args_with(tmp_path, "--deepspeed", "--zero-stage", str(stage), fp16=FP16)
    build_tokenizer_from_args(args, log=lambda *_: None)
    model = pretrain_gpt.PROVIDER.model(args, ParallelState())
    try:
        optimizer = build_engine(args, model, ParallelState(), log=lambda *_: None)
    except UserError as err:
        return str(err)
    scaler = optimizer.engine.optimizer.loss_scaler
    return (float(optimizer.get_loss_scale()), scaler.dynamic, scaler.scale_window,
            scaler.delayed_shift, scaler.min_scale)


@pytest.mark.parametrize("stage", [1, 2])
def test_fp16_loss_scale_settings_reach_the_engine(tmp_path, stage):
    """initial_scale_power 11, window 500, hysteresis 2, min 1 (DeepSpeed's scripts) instead
    of the 2^16/1000 defaults. DeepSpeed's CPU accelerator reports fp16 only with oneDNN fp16
    kernels, so it is told it has them: the engine's own fp16 path then builds on CPU."""
    pytest.importorskip("deepspeed")
    [settings] = run_distributed(_fp16_engine, 1, args=(tmp_path, True, stage))
    assert settings == (2.0 ** 11, True, 500, 2, 1.0)


def test_fp16_refused_in_one_line_where_the_accelerator_lacks_it(tmp_path):
    pytest.importorskip("deepspeed")
    [refusal] = run_distributed(_fp16_engine, 1, args=(tmp_path, False, 1))
    assert refusal.startswith("--fp16 (or the DeepSpeed JSON's fp16.enabled) with --deepspeed: "
                              "DeepSpeed's cpu accelerator does not support fp16")


# -- tools/convert_deepspeed_checkpoint.py -----------------------------------------------------

def _convert_and_continue(rank, world_size, data_prefix, ds_json, root, stage, tp=1):
    from tools.convert_deepspeed_checkpoint import main as convert

    flags = ["--num-layers", "4", "--deepspeed_config", ds_json,
             "--tensor-model-parallel-size", str(tp), "--global-batch-size",
             str(4 * world_size // tp)]
    engine = flags + ["--deepspeed", "--zero-stage", str(stage)]
    straight, _ = _train(gpt_argv(data_prefix, *engine, iters=ITERS))
    half = ["--save-interval", "5", "--exit-interval", "5"]
    # engine checkpoint at 5 -> native -> continue natively
    _train(gpt_argv(data_prefix, *engine, "--save", f"{root}/ds", *half, iters=ITERS))
    assert convert(["to-native", "--load", f"{root}/ds", "--save", f"{root}/native"]) == 0
    native_rest, _ = _train(gpt_argv(data_prefix, *flags, "--load", f"{root}/native",
                                     iters=ITERS))
    # native checkpoint at 5 -> engine -> continue through the engine
    _train(gpt_argv(data_prefix, *flags, "--save", f"{root}/native2", *half, iters=ITERS))
    assert convert(["to-deepspeed", "--load", f"{root}/native2", "--save", f"{root}/ds2",
                    "--zero-stage", str(stage)]) == 0
    engine_rest, _ = _train(gpt_argv(data_prefix, *engine, "--load", f"{root}/ds2",
                                     iters=ITERS))
    return straight, native_rest, engine_rest


@pytest.mark.slow
@pytest.mark.parametrize("stage, world_size, tp", [(2, 1, 1), (3, 1, 1), (3, 2, 1), (2, 4, 2)])
def test_converted_checkpoints_continue_with_the_same_losses(data_prefix, tmp_path, stage,
                                                             world_size, tp):
    """One process (ZeRO 2, 3), DP 2 with ZeRO 3, and TP 2 x DP 2 with ZeRO 2 converted by 4
    processes (each its TP rank's weights, DeepSpeed gathering the ZeRO partitions over the DP
    ranks)."""
    pytest.importorskip("deepspeed")
    ds_json = write_json(tmp_path, **RANDOM_LTD)
    results = run_distributed(_convert_and_continue, world_size,
                              args=(data_prefix, ds_json, str(tmp_path), stage, tp), timeout=300)
    straight, native_rest, engine_rest = results[0]
    assert all(result == results[0] for result in results)
    for rest in (native_rest, engine_rest):
        assert len(rest) == ITERS - 5
        assert max(abs(a - b) for a, b in zip(straight[5:], rest)) <= 1e-5


def _layout_refusal(rank, world_size):
    import argparse

    from tools.convert_deepspeed_checkpoint import _parallel_state

    saved = argparse.Namespace(tensor_model_parallel_size=2, data_parallel_size=2,
                               pipeline_model_parallel_size=1, fp16=False, seed=7)
    try:
        _parallel_state(saved, "ckpt/global_step5")
    except UserError as err:
        return str(err)


def test_converter_needs_the_checkpoints_process_count():
    [refusal] = run_distributed(_layout_refusal, 1)
    assert refusal == ("ckpt/global_step5: saved by TP 2 x DP 2 = 4 ranks; run this tool with "
                       "4 processes (torchrun --nproc-per-node 4 "
                       "tools/convert_deepspeed_checkpoint.py ...), not 1")


def _groups_handed_to_the_watch(rank, world_size, data_prefix, ds_json):
    """Every process group torch has on record once training runs (DeepSpeed's engine makes
    its own beside ours) went to the NCCL failure watch; gloo's are then dropped by the watch
    itself (nothing to poll), so the hand-over is what can be checked on CPU."""
    import torch.distributed as dist

    from megatron.parallel import initialize
    from training_helpers import run

    handed, at_training = [], []
    add = initialize.BackendFailureWatch.add

    def recording_add(self, groups):
        groups = list(groups)
        handed.extend(groups)
        return add(self, groups)

    def recording_train(*args, **kwargs):
        at_training.extend(initialize.known_process_groups())
        return train(*args, **kwargs)

    import megatron.training as training

    train = training.train
    initialize.BackendFailureWatch.add = recording_add
    training.train = recording_train
    try:
        run(gpt_argv(data_prefix, "--deepspeed_config", ds_json, "--deepspeed", "--zero-stage",
                     "2", "--global-batch-size", str(4 * world_size), iters=2))
    finally:
        initialize.BackendFailureWatch.add, training.train = add, train
    missing = [dist.get_process_group_ranks(g) for g in at_training
               if all(g is not h for h in handed)]
    return len(at_training), missing


@pytest.mark.slow
def test_deepspeeds_own_process_groups_are_watched_too(data_prefix, tmp_path):
    pytest.importorskip("deepspeed")
    results = run_distributed(_groups_handed_to_the_watch, 2,
                              args=(data_prefix, write_json(tmp_path)), timeout=300)
    for known, missing in results:
        assert known > 2 and missing == []  # beyond WORLD and the data-parallel group
