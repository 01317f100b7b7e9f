import pytest

from megatron.arguments import parse_args
from megatron.errors import UserError

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]


def parse(*extra, world_size=1):
    return parse_args(BASE + list(extra), world_size=world_size)


def test_derived_values_follow_megatron():
    args = parse("--global-batch-size", "8")
    assert args.ffn_hidden_size == 4 * 64
    assert args.kv_channels == 16
    assert args.max_position_embeddings == 32
    assert args.num_micro_batches == 4
    assert args.data_parallel_size == 1
    assert args.split == "969, 30, 1"  # Megatron's default
    assert parse().global_batch_size == 2  # micro x DP by default


@pytest.mark.parametrize("extra, flag", [
    (["--global-batch-size", "7"], "--global-batch-size"),
    (["--fp16", "--bf16"], "--fp16"),
    (["--train-samples", "100"], "--train-samples"),
    (["--hidden-size", "66"], "--hidden-size"),
    (["--max-position-embeddings", "16"], "--max-position-embeddings"),
    (["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"], "--lr-warmup-fraction"),
    (["--min-lr", "1.0"], "--min-lr"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--num-layers", "x"], "--num-layers"),
])
def test_bad_flag_combinations_name_the_flag(extra, flag):
    with pytest.raises(UserError, match=flag):
        parse(*extra)


def test_training_length_required():
    argv = [a for a in BASE if a not in ("--train-iters", "10")]
    with pytest.raises(UserError, match="--train-iters"):
        parse_args(argv, world_size=1)


def test_train_tokens_alone_bounds_the_iterations():
    from megatron.training import resolve_train_iters

    argv = [a for a in BASE if a not in ("--train-iters", "10")] + ["--train-tokens", "1000"]
    args = parse_args(argv, world_size=1)
    assert args.train_iters is None and args.train_samples is None
    assert resolve_train_iters(args) == 16  # ceil(1000 / (2 * 32))
    with pytest.raises(UserError, match="--lr-warmup-tokens"):
        parse_args(argv + ["--lr-warmup-iters", "2"], world_size=1)


def test_parallel_layouts():
    args = parse("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                 "--num-layers", "4", "--global-batch-size", "8", world_size=8)
    assert args.data_parallel_size == 2 and args.num_micro_batches == 2
    with pytest.raises(UserError, match="--num-layers 3 is not divisible"):
        parse("--pipeline-model-parallel-size", "2", "--num-layers", "3", world_size=2)
    args = parse("--pipeline-model-parallel-size", "2", "--num-layers", "3",
                 "--pipeline-layer-split", "1,2", world_size=2)
    assert args.pipeline_layer_split == [1, 2]
    with pytest.raises(UserError, match="--pipeline-layer-split"):
        parse("--pipeline-model-parallel-size", "2", "--pipeline-layer-split", "1,2",
              world_size=2)
    with pytest.raises(UserError, match="--num-layers-per-virtual-pipeline-stage"):
        parse("--num-layers-per-virtual-pipeline-stage", "1", world_size=1)
    with pytest.raises(UserError, match="--num-attention-heads 4 is not divisible"):
        parse("--tensor-model-parallel-size", "8", world_size=8)
    assert not parse("--sequence-parallel").sequence_parallel  # nothing to split at TP 1


def test_weight_decay_schedule_flags_as_megatron():
    args = parse("--weight-decay", "0.1")
    assert (args.start_weight_decay, args.end_weight_decay) == (0.1, 0.1)
    args = parse("--weight-decay-incr-style", "linear", "--start-weight-decay", "0.0",
                 "--end-weight-decay", "0.1")
    assert (args.start_weight_decay, args.end_weight_decay) == (0.0, 0.1)
    # A schedule style without its end points would silently run constant.
    with pytest.raises(UserError, match="--weight-decay-incr-style cosine needs "
                                        "--start-weight-decay and --end-weight-decay"):
        parse("--weight-decay-incr-style", "cosine")
    # End points with the constant style: ambiguous which value is meant.
    with pytest.raises(UserError, match="--start-weight-decay"):
        parse("--start-weight-decay", "0.05", "--end-weight-decay", "0.05")


def test_lr_warmup_init_starts_the_warmup():
    import torch

    from megatron.optim.lr_scheduler import scheduler_from_args

    assert parse().lr_warmup_init == 0.0  # Megatron's default
    args = parse("--lr-warmup-init", "1e-4", "--lr-warmup-iters", "2")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = scheduler_from_args(opt, args)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)  # step 0: the init value
    sched.step(increment=args.global_batch_size)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 + (1e-3 - 1e-4) / 2)


@pytest.mark.parametrize("extra, message", [
    (["--rampup-batch-size"], "expects three integers START INCREMENT SAMPLES, got nothing"),
    (["--rampup-batch-size", "16", "8", "300000"], "START 16 must be in 1 .. "
                                                   "--global-batch-size 2")])
def test_rampup_batch_size_values_are_checked(extra, message):
    """(The ramp itself: tests/test_batch_rampup.py.)"""
    with pytest.raises(UserError, match="--rampup-batch-size.*" + message):
        parse(*extra)


def test_recompute_flags_of_megatron_lm_scripts():
    from megatron.arguments import transformer_config_from_args

    args = parse("--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1")
    args.padded_vocab_size = 128
    assert transformer_config_from_args(args).recompute_granularity == "full"
    args = parse("--checkpoint-activations", "--checkpoint-num-layers", "1")  # DeepSpeed's names
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == \
        ("full", "uniform", 1)
    with pytest.raises(UserError, match="--recompute-method block"):
        parse("--recompute-granularity", "full", "--recompute-method", "block")
    with pytest.raises(UserError, match="--recompute-num-layers 2"):
        parse("--recompute-granularity", "full", "--recompute-num-layers", "2")
    assert parse().recompute_granularity is None


def test_disable_bias_linear_is_stored_under_megatrons_name():
    from megatron.arguments import transformer_config_from_args
    from tools.generate_text import config_from_args

    args = parse()
    assert args.add_bias_linear and not args.disable_bias_linear
    args = parse("--disable-bias-linear")
    args.padded_vocab_size = 128
    assert args.add_bias_linear is False and args.disable_bias_linear is True
    assert transformer_config_from_args(args).add_bias_linear is False
    # Tools read a checkpoint's args by Megatron's names.
    assert config_from_args(args).add_bias_linear is False


def test_norm_epsilon_is_megatron_lm_name_of_layernorm_epsilon():
    assert parse().layernorm_epsilon == 1e-5
    assert parse("--norm-epsilon", "1e-6").layernorm_epsilon == 1e-6


@pytest.mark.parametrize("precision, loss_scale, expected", [
    ("--bf16", "8", 8.0),       # static scale, as Megatron
    ("--bf16", None, 1.0),      # bf16 without --loss-scale: no scaling
    ("--fp16", None, 2.0 ** 32),  # fp16: dynamic, --initial-loss-scale
    ("--fp16", "8", 8.0),
])
def test_loss_scale_applies_to_fp16_and_bf16(precision, loss_scale, expected):
    import torch

    from megatron.optim import build_optimizer

    extra = [precision] + (["--loss-scale", loss_scale] if loss_scale else [])
    args = parse(*extra)
    model = torch.nn.Linear(4, 4).to(torch.bfloat16 if precision == "--bf16" else torch.half)
    opt = build_optimizer(model, args=args, log=lambda msg: None)
    assert float(opt.get_loss_scale()) == expected
    assert float(opt.scale_loss(torch.ones(())).float()) == expected


@pytest.mark.slow
def test_log_params_norm_and_num_zeros_reach_the_log(data_prefix):
    import math

    from training_helpers import gpt_argv, run

    result, logs = run(gpt_argv(data_prefix, "--log-params-norm", "--log-num-zeros-in-grad",
                                iters=4))
    last = [line for line in logs if line.startswith(" iteration")][-1]
    assert "num zeros:" in last
    logged = float(last.split("params norm: ")[1].split(" ")[0])
    expected = math.sqrt(sum(float(p.detach().float().norm()) ** 2
                             for p in result.model.parameters()))
    assert logged == pytest.approx(expected, abs=6e-4)  # printed with three decimals, as Megatron
    assert len(last.split("params norm: ")[1].split(" ")[0].split(".")[1]) == 3
    _, logs = run(gpt_argv(data_prefix, iters=2))
    assert not any("params norm" in line or "num zeros" in line for line in logs)


def test_rotary_base_reaches_the_model_config():
    from megatron.arguments import parse_args, transformer_config_from_args
    from megatron.errors import UserError

    base = ["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2",
            "--seq-length", "8", "--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "16", "--train-iters", "1", "--mock-data", "--lr", "1e-3",
            "--position-embedding-type", "rope"]
    args = parse_args(base, world_size=1)
    args.padded_vocab_size = 16
    assert transformer_config_from_args(args).rope_theta == 10000.0
    args = parse_args(base + ["--rotary-base", "500000"], world_size=1)
    args.padded_vocab_size = 16
    assert transformer_config_from_args(args).rope_theta == 500000.0
    with pytest.raises(UserError, match="--rotary-base"):
        parse_args(base + ["--rotary-base", "0"], world_size=1)
