"""--use-checkpoint-args (Megatron-LM): the model's shape and tokenizer from the checkpoint."""


import pytest
import torch

from megatron.arguments import parse_args
from megatron.errors import UserError
from training_helpers import gpt_argv, run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_prefix):
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "gpt")
    run(gpt_argv(data_prefix, "--save", ckpt, "--untie-embeddings-and-output-weights",
                 "--num-layers", "3", "--max-position-embeddings", "48", iters=2))
    return ckpt


def _short(data_prefix, *extra):
    """Training flags only: no model shape, no tokenizer."""
    return ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
            "--lr", "1e-3", "--data-path", data_prefix, "--device", "cpu", *extra]


def test_model_shape_and_tokenizer_come_from_the_checkpoint(checkpoint, data_prefix):
    args = parse_args(_short(data_prefix, "--load", checkpoint, "--finetune",
                             "--use-checkpoint-args"))
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (3, 32, 4)
    assert (args.seq_length, args.max_position_embeddings) == (32, 48)
    assert args.untie_embeddings_and_output_weights and args.tokenizer_type == "GPT2BPETokenizer"
    assert args.vocab_file.endswith("vocab.json") and args.make_vocab_size_divisible_by == 64


@pytest.mark.slow
def test_the_command_line_wins_and_the_run_loads(checkpoint, data_prefix):
    argv = _short(data_prefix, "--load", checkpoint, "--finetune", "--use-checkpoint-args",
                  "--seq-length", "16", "--log-interval", "1", "--eval-iters", "0")
    assert parse_args(argv).seq_length == 16
    result, logs = run(argv)  # the model built from the checkpoint's args loads its weights
    assert any("loaded model weights" in line for line in logs)
    assert len(result.train_losses) == 2


def test_seq_length_falls_back_to_max_position_embeddings(checkpoint, data_prefix, tmp_path):
    import shutil

    from megatron.checkpointing import checkpoint_file

    copy = str(tmp_path / "copy")
    shutil.copytree(checkpoint, copy)
    path = checkpoint_file(copy, 2)
    ckpt = torch.load(path, weights_only=False)
    del ckpt["args"].seq_length  # as checkpoints written by some Megatron converters
    torch.save(ckpt, path)
    args = parse_args(_short(data_prefix, "--load", copy, "--use-checkpoint-args"))
    assert args.seq_length == 48


def test_errors_name_the_problem(data_prefix, tmp_path):
    with pytest.raises(UserError, match="needs --load"):
        parse_args(_short(data_prefix, "--use-checkpoint-args"))
    with pytest.raises(UserError, match="not a Megatron checkpoint directory"):
        parse_args(_short(data_prefix, "--load", str(tmp_path), "--use-checkpoint-args"))
    bad = tmp_path / "bad"
    (bad / "iter_0000001" / "mp_rank_00").mkdir(parents=True)
    (bad / "latest_checkpointed_iteration.txt").write_text("1")
    (bad / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="model_optim_rng.pt"):
        parse_args(_short(data_prefix, "--load", str(bad), "--use-checkpoint-args"))


def test_a_finetunes_own_empty_load_falls_back_to_the_pretrained_checkpoint(checkpoint,
                                                                            data_prefix,
                                                                            tmp_path):
    """tasks/main.py --save D --load D --pretrained-checkpoint P --use-checkpoint-args (what a
    preemptible finetune runs): before D holds a checkpoint the shape comes from P."""
    from tasks.main import parse_task_args

    own = str(tmp_path / "own")
    argv = ["--task", "MNLI", "--micro-batch-size", "2", "--epochs", "1", "--lr", "1e-3",
            "--device", "cpu", "--use-checkpoint-args", "--pretrained-checkpoint", checkpoint,
            "--save", own, "--load", own]
    args = parse_task_args(argv, world_size=1)
    assert (args.num_layers, args.max_position_embeddings) == (3, 48)
    alone = [a for a in argv if a not in ("--pretrained-checkpoint", checkpoint)]
    with pytest.raises(UserError, match=f"{own} holds no latest_checkpointed_iteration.txt"):
        parse_task_args(alone, world_size=1)  # no pretrained checkpoint to fall back to
