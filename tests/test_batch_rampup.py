"""--rampup-batch-size (megatron/batch_rampup.py): Megatron-LM's growing global batch.

- the batch as a function of consumed samples and the --train-samples iteration count
  (Megatron's update_train_iters), worked by hand for a small ramp;
- flag checks name the flag and the value;
- --step-batch-size-schedule (newer Megatron-LM): parsing as there (tokens -> samples, K/M/B/T,
  sorted, final batch = --global-batch-size), its iteration count and refusals, a real run;
- a real run: each step runs batch / (micro x DP) micro-batches (its first loss is that of a
  run with the first step's batch), consumed samples, the LR (stepped in samples, as Megatron)
  and random-LTD's layer tokens follow the step's batch, the log prints it; resume continues the
  ramp; under PP 2 and DP 2 the losses are the one-process run's (slow).
"""

import re

import pytest
import torch

from megatron.arguments import parse_args
from megatron.batch_rampup import BatchSizeRampup
from distributed_harness import run_distributed
from megatron.errors import UserError
from training_helpers import gpt_argv, run

# start 2, +2 every 12 / ((8 - 2) / 2) = 4 samples, to 8 after 12 samples
RAMP = ["--global-batch-size", "8", "--rampup-batch-size", "2", "2", "12"]
BATCHES = [2, 2, 4, 6, 8, 8]  # consumed 0, 2, 4, 8, 14 (> 12), 22


def test_batch_follows_the_consumed_samples():
    ramp = BatchSizeRampup(start=2, increment=2, samples=12, final=8)
    consumed, seen = 0, []
    for _ in BATCHES:
        seen.append(ramp.batch_size(consumed))
        consumed += seen[-1]
    assert seen == BATCHES
    # ramp: 4 steps (while consumed <= 12: 0, 2, 4, 8 -> 14), then (46 - 14) // 8 = 4 steps
    assert ramp.iterations_for_samples(46) == 8
    assert ramp.iterations_for_samples(10) == 4  # the ramp's steps always run
    gpt3 = BatchSizeRampup(start=16, increment=16, samples=5859375, final=1536)
    assert [gpt3.batch_size(c) for c in (0, 61677, 61678, 5859375, 5859376)] == \
        [16, 16, 32, 1536, 1536]


@pytest.mark.parametrize("extra, message", [
    (["--rampup-batch-size", "2", "2"], "expects three integers START INCREMENT SAMPLES"),
    (["--rampup-batch-size", "3", "1", "12"], "START 3 is not a multiple of --micro-batch-size 2"),
    (["--rampup-batch-size", "2", "4", "12"], "INCREMENT 4 must be positive and divide"),
    (["--rampup-batch-size", "10", "2", "12"], "START 10 must be in 1 .. --global-batch-size 8"),
])
def test_bad_ramp_is_refused_naming_the_flag(extra, message):
    argv = gpt_argv("/nowhere/data", "--global-batch-size", "8", *extra)
    with pytest.raises(UserError, match="--rampup-batch-size.*" + re.escape(message)):
        parse_args(argv, world_size=1)


def test_ramp_needs_an_iteration_bound():
    argv = gpt_argv("/nowhere/data", *RAMP)
    for flag in ("--train-iters", "--lr-warmup-iters"):  # (iteration-based flags)
        del argv[argv.index(flag):argv.index(flag) + 2]
    with pytest.raises(UserError, match="--rampup-batch-size needs --train-iters or "
                                        "--train-samples"):
        parse_args(argv + ["--train-tokens", "100000", "--lr-warmup-tokens", "10"],
                   world_size=1)
    args = parse_args(argv + ["--train-samples", "46"], world_size=1)
    from megatron.training import resolve_train_iters

    assert resolve_train_iters(args) == 8 and args.rampup_batch_size == [2, 2, 12]


def _logged(logs, label):
    return [float(m.group(1)) for line in logs
            for m in [re.search(label + r": +([0-9.E+-]+)", line)] if m]


def _reference_lrs(argv, batches):
    """The LR after each step of an OptimizerParamScheduler stepped by ``batches`` samples."""
    from megatron.training import build_scheduler

    args = parse_args(argv, world_size=1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = build_scheduler(args, optimizer)
    lrs = []
    for batch in batches:
        scheduler.step(increment=batch, token_num=0)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.slow
def test_ramp_drives_micro_batches_samples_lr_and_layer_tokens(data_prefix):
    ltd = ["--num-layers", "4", "--random-ltd", "--random-ltd-start", "16",
           "--random-ltd-step", "8", "--random-ltd-schedule-steps", "4"]
    argv = gpt_argv(data_prefix, *RAMP, *ltd, iters=6)
    result, logs = run(argv)
    assert result.state.consumed_train_samples == sum(BATCHES)
    # one micro-batch of 2 samples in the first step: the loss of a run whose batch is 2 (over
    # the same 48 training samples, so the dataset's shuffle is the same)
    first, _ = run(gpt_argv(data_prefix, "--global-batch-size", "2", "--exit-interval", "1",
                            *ltd, iters=24))
    assert result.train_losses[0][1] == first.train_losses[0][1]
    # the log (every 2 iterations) shows the step's batch, consumed samples and LR
    assert _logged(logs, "global batch size") == [2, 6, 8]
    assert _logged(logs, "consumed samples") == [4, 14, 30]
    reference = _reference_lrs(argv, BATCHES)
    assert _logged(logs, "learning rate") == pytest.approx(reference[1::2], rel=1e-3)
    assert reference != _reference_lrs(argv, [8] * 6)  # (the ramp changes the schedule)
    # layer tokens: each step's batch x (2 full layers + 2 layers at the kept length)
    kept = [16, 16, 24, 24, 32, 32]  # 16 + 16 * it / 4 rounded down to a multiple of 8
    expected = [sum(b * (2 * 32 + 2 * k) for b, k in zip(BATCHES[:n], kept[:n]))
                for n in (2, 4, 6)]
    assert _logged(logs, "consumed layer tokens") == expected


@pytest.mark.slow
def test_resume_continues_the_ramp(data_prefix, tmp_path):
    argv = gpt_argv(data_prefix, *RAMP, iters=6)
    whole, _ = run(argv)
    ckpt = str(tmp_path / "ckpt")
    run(argv + ["--save", ckpt, "--save-interval", "3", "--exit-interval", "3"])
    resumed, logs = run(argv + ["--load", ckpt])
    assert resumed.state.consumed_train_samples == whole.state.consumed_train_samples
    assert [loss for _, loss in resumed.train_losses] == \
        [loss for _, loss in whole.train_losses][3:]
    assert _logged(logs, "global batch size") == [6, 8]  # iterations 4 and 6 of 2, 2, 4 | 6, 8, 8


def _losses(rank, world_size, argv):
    result, _ = run(argv)
    return [loss["lm loss"] for _, loss in result.train_losses], \
        result.state.consumed_train_samples


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--pipeline-model-parallel-size", "2"],
                                    ["--micro-batch-size", "1"]], ids=["pp2", "dp2"])
def test_ramp_under_pipeline_and_data_parallelism_matches_one_process(data_prefix, layout):
    """PP 2 (1, 1, 2, 3, 4, 4 micro-batches through the 1F1B schedule) and DP 2 (micro-batch 1:
    1, 1, 2, 3, 4, 4 per rank) give the one-process run's losses (no dropout: the layouts draw
    other masks) and consumed samples."""
    argv = gpt_argv(data_prefix, *RAMP, "--hidden-dropout", "0", "--attention-dropout", "0",
                    iters=6)
    single = _losses(0, 1, argv)
    for rank_losses, samples in run_distributed(_losses, world_size=2, args=(argv + layout,),
                                                timeout=300):
        assert samples == single[1] == sum(BATCHES)
        assert rank_losses == pytest.approx(single[0], rel=1e-5)


# --step-batch-size-schedule: batch 2 from 0 tokens, 4 from 128 tokens = 4 samples at seq 32
STEPS = ["--step-batch-size-schedule", "0:2 128:4"]


def _sample_based(*extra):
    """gpt_argv as a --train-samples run (the schedule is for sample-based runs)."""
    argv = gpt_argv("/nowhere/data", *extra)
    for flag in ("--train-iters", "--lr-warmup-iters"):
        del argv[argv.index(flag):argv.index(flag) + 2]
    return argv


def test_step_schedule_parses_as_megatron_lm():
    from megatron.batch_rampup import StepBatchSchedule, parse_step_schedule

    assert parse_step_schedule("0:768 250B:1536, 500B:3072", 2048).steps == \
        ((0, 768), (122070312, 1536), (244140625, 3072))
    assert parse_step_schedule("2.5K:8 0:4", 1).steps == ((0, 4), (2500, 8))  # sorted
    schedule = StepBatchSchedule(((0, 4), (31, 8)))
    assert [schedule.batch_size(c) for c in (0, 30, 31, 99)] == [4, 4, 8, 8]
    # 8 steps of 4 reach 32 >= 31, then (100 - 32) // 8 = 8 steps of 8
    assert schedule.iterations_for_samples(100) == 16
    assert schedule.iterations_for_samples(20) == 5  # ends inside the first segment
    args = parse_args(_sample_based(*STEPS, "--train-samples", "30"), world_size=1)
    assert args.global_batch_size == 4 and args.num_micro_batches == 2
    from megatron.training import resolve_train_iters

    assert resolve_train_iters(args) == 2 + 6  # 2, 2 (4 samples), then 4 x 6 = 24 of 26 left


@pytest.mark.parametrize("extra, message", [
    (["--train-samples", "30", "--global-batch-size", "8"],
     "--global-batch-size 8 contradicts --step-batch-size-schedule '0:2 128:4', whose final "
     "batch is 4"),
    (["--train-iters", "5"], "--step-batch-size-schedule is for sample-based runs"),
    (["--train-samples", "30", "--rampup-batch-size", "2", "2", "8"], "mutually exclusive"),
])
def test_bad_step_schedule_is_refused_naming_the_flag(extra, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_args(_sample_based(*STEPS, *extra), world_size=1)
    for bad, why in (("64:2 128:4", "the first threshold must be 0"),
                     ("0:2 8:4", "strictly increasing"), ("0:2 x", "is not THRESHOLD:BATCH"),
                     ("0:2 1Q:4", "is not THRESHOLD:BATCH")):
        with pytest.raises(UserError, match=why):
            parse_args(_sample_based("--step-batch-size-schedule", bad, "--train-samples",
                                     "30"), world_size=1)


def test_step_schedule_batch_must_split_into_micro_batches():
    from megatron.batch_rampup import current_global_batch_size

    args = parse_args(_sample_based("--step-batch-size-schedule", "0:3 128:4",
                                    "--train-samples", "30"), world_size=1)
    with pytest.raises(UserError, match="the batch 3 reached after 0 samples is not a multiple "
                                        "of --micro-batch-size 2"):
        current_global_batch_size(args, 0)
    assert current_global_batch_size(args, 4) == 4


@pytest.mark.slow
def test_step_schedule_run(data_prefix):
    argv = _sample_based(*STEPS, "--train-samples", "20")
    argv[argv.index("/nowhere/data")] = data_prefix
    result, logs = run(argv)
    # 2, 2 (4 samples: the threshold), then (20 - 4) // 4 = 4 steps of 4
    assert result.state.iteration == 6 and result.state.consumed_train_samples == 20
    assert _logged(logs, "global batch size") == [2, 4, 4]  # iterations 2, 4 and 6


@pytest.mark.slow
def test_token_based_random_ltd_schedule_follows_the_ramp(data_prefix):
    """A kept-length schedule in consumed tokens (--random-ltd-schedule-tokens 640, seq 32)
    sees the ramp's tokens: before iterations 1..6 the run has consumed 0, 64, 128, 256, 448
    and 704 tokens, so the kept length is 16, 16, 16, 16, 24 (27 rounded down to 8) and 32;
    with a constant batch of 8 it would be full from iteration 4 on."""
    ltd = ["--num-layers", "4", "--random-ltd", "--random-ltd-start", "16",
           "--random-ltd-step", "8", "--random-ltd-schedule-tokens", "640"]
    _, logs = run(gpt_argv(data_prefix, *RAMP, *ltd, iters=6))
    assert _logged(logs, "random ltd reserved length") == [16, 16, 32]  # iterations 2, 4, 6
    _, logs = run(gpt_argv(data_prefix, "--global-batch-size", "8", *ltd, iters=6))
    assert _logged(logs, "random ltd reserved length") == [16, 32, 32]
