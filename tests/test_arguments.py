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
