"""End-to-end pretraining on a tiny GPT: losses fall, checkpoints resume bitwise, bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.checkpointing import TRACKER_FILENAME, checkpoint_file
from megatron.errors import UserError

from training_helpers import ROOT, gpt_argv, run


def test_loss_falls_and_logs(data_prefix, tmp_path):
    result, logs = run(gpt_argv(data_prefix, "--tensorboard-dir", str(tmp_path / "tb"),
                                iters=30))
    losses = [d["lm loss"] for _, d in result.train_losses]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    lines = [l for l in logs if l.startswith(" iteration")]
    assert len(lines) == 15
    for field in ("consumed samples:", "consumed tokens:", "lm loss:", "learning rate:",
                  "grad norm:", "loss scale:", "elapsed time per iteration (ms):",
                  "tokens per second:", "TFLOPs:"):
        assert field in lines[-1]
    assert "| actual seqlen:    32 |" in lines[-1]  # Megatron-DeepSpeed prints it in every run
    assert any("validation loss at iteration" in l for l in logs)
    assert os.listdir(tmp_path / "tb")


def test_resume_is_bitwise_identical(data_prefix, tmp_path):
    full, _ = run(gpt_argv(data_prefix, iters=8))
    ckpt = str(tmp_path / "ckpt")
    first, _ = run(gpt_argv(data_prefix, "--save", ckpt, "--exit-interval", "4", iters=8))
    assert first.state.iteration == 4
    with open(os.path.join(ckpt, TRACKER_FILENAME)) as f:
        assert f.read() == "4"
    assert os.path.isfile(checkpoint_file(ckpt, 4))
    second, _ = run(gpt_argv(data_prefix, "--load", ckpt, "--save", ckpt, iters=8))
    resumed = first.train_losses + second.train_losses
    assert [i for i, _ in resumed] == list(range(1, 9))
    assert [d["lm loss"] for _, d in resumed] == [d["lm loss"] for _, d in full.train_losses]
    for (name, a), b in zip(full.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert full.valid_losses[-1] == second.valid_losses[-1]


def test_checkpoint_contents_follow_megatron(data_prefix, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run(gpt_argv(data_prefix, "--save", ckpt, iters=2))
    state = torch.load(checkpoint_file(ckpt, 2), weights_only=False)
    for key in ("args", "checkpoint_version", "iteration", "tokens", "model", "optimizer",
                "opt_param_scheduler", "rng_state"):
        assert key in state
    assert state["iteration"] == 2 and state["tokens"] == 2 * 4 * 32
    assert state["args"].consumed_train_samples == 8
    # 'model' nested as Megatron-LM's state_dict_for_save_checkpoint, so Megatron-LM loads it
    assert set(state["model"]) == {"language_model"}
    assert set(state["model"]["language_model"]) == {"embedding", "encoder"}
    assert set(state["model"]["language_model"]["embedding"]) == {"word_embeddings",
                                                                   "position_embeddings"}
    assert "weight" in state["model"]["language_model"]["embedding"]["word_embeddings"]
    assert "layers.0.self_attention.query_key_value.weight" in \
        state["model"]["language_model"]["encoder"]
    assert state["checkpoint_version"] == 3.0
    assert not [n for n in os.listdir(os.path.dirname(checkpoint_file(ckpt, 2))) if ".tmp" in n]


def test_load_with_other_model_size_names_the_flag(data_prefix, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run(gpt_argv(data_prefix, "--save", ckpt, iters=3))
    argv = gpt_argv(data_prefix, "--load", ckpt, iters=4)
    argv[argv.index("--hidden-size") + 1] = "64"
    with pytest.raises(UserError, match="--hidden-size 32 but --hidden-size 64"):
        run(argv)


def test_finetune_loads_weights_and_restarts_counters(data_prefix, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    first, _ = run(gpt_argv(data_prefix, "--save", ckpt, iters=2))
    second, logs = run(gpt_argv(data_prefix, "--load", ckpt, "--finetune", iters=3))
    assert second.state.iteration == 3
    assert [i for i, _ in second.train_losses] == [1, 2, 3]
    assert any("finetune" in l for l in logs)


def _cli(*argv):
    return subprocess.run([sys.executable, "pretrain_gpt.py", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_bad_inputs_end_in_one_line(data_prefix, tmp_path):
    cases = [
        (gpt_argv(data_prefix, "--data-path", "x", data_prefix), "--data-path"),
        (gpt_argv(data_prefix, "--global-batch-size", "3"), "--global-batch-size"),
        (gpt_argv(str(tmp_path / "missing_prefix")), "missing_prefix"),
    ]
    for argv, needle in cases:
        proc = _cli(*argv)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_crash_while_saving_keeps_latest_on_a_complete_checkpoint(data_prefix, tmp_path,
                                                                    monkeypatch):
    import megatron.checkpointing as checkpointing

    ckpt = str(tmp_path / "ckpt")
    run(gpt_argv(data_prefix, "--save", ckpt, "--save-interval", "2", "--exit-interval", "2",
                 iters=4))
    real_save = torch.save

    def crash_half_way(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(checkpointing.torch, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        run(gpt_argv(data_prefix, "--load", ckpt, "--save", ckpt, "--save-interval", "2",
                     iters=4))
    with open(os.path.join(ckpt, TRACKER_FILENAME)) as f:
        assert f.read() == "2"
    assert not os.path.exists(checkpoint_file(ckpt, 4))
    leftovers = [n for _, _, files in os.walk(ckpt) for n in files if ".tmp" in n]
    assert leftovers == []
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    resumed, _ = run(gpt_argv(data_prefix, "--load", ckpt, iters=4))
    assert [i for i, _ in resumed.train_losses] == [3, 4]


def test_fp16_dynamic_loss_scale_logs_skipped_iterations(data_prefix):
    result, logs = run(gpt_argv(data_prefix, "--fp16", "--initial-loss-scale", "1e30",
                                "--log-interval", "4", iters=8))
    lines = [l for l in logs if l.startswith(" iteration")]
    # A scale of 1e30 overflows fp16 at once: the first steps are skipped and the scale backs
    # off until updates go through.
    assert "number of skipped iterations:   4" in lines[0]
    assert result.state.skipped_iters >= 4
    scale = float(lines[-1].split("loss scale: ")[1].split(" ")[0])
    assert scale < 1e30


def test_bf16_training_runs(data_prefix):
    result, _ = run(gpt_argv(data_prefix, "--bf16", iters=4))
    losses = [d["lm loss"] for _, d in result.train_losses]
    assert all(np.isfinite(losses))
    assert result.model.language_model.embedding.word_embeddings.weight.dtype == torch.bfloat16


def test_exit_duration_and_train_tokens_stop_training(data_prefix, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    result, logs = run(gpt_argv(data_prefix, "--exit-duration-in-mins", "0", "--save", ckpt,
                                iters=8))
    assert result.state.iteration == 1
    assert any("--exit-duration-in-mins" in l for l in logs)
    assert os.path.isfile(checkpoint_file(ckpt, 1))  # saved before exiting
    argv = [a for a in gpt_argv(data_prefix, iters=8)]
    i = argv.index("--train-iters")
    del argv[i:i + 2]
    i = argv.index("--lr-warmup-iters")
    del argv[i:i + 2]
    result, _ = run(argv + ["--train-tokens", str(3 * 4 * 32), "--lr-warmup-tokens", "128"])
    assert result.state.iteration == 3 and result.state.consumed_train_tokens == 3 * 4 * 32


def test_resume_after_the_token_budget_trains_no_further(data_prefix, tmp_path):
    """--train-tokens / --train-layer-tokens are checked before each iteration (Megatron-
    DeepSpeed's loop condition): resuming a finished run must not add an iteration."""
    ltd = ["--num-layers", "4", "--random-ltd", "--random-ltd-start", "8", "--random-ltd-step",
           "4", "--random-ltd-schedule-steps", "6", "--train-layer-tokens", str(4 * 32 * 4 * 5)]
    for name, flags, stop in (("tokens", ["--train-tokens", str(3 * 4 * 32)], 3),
                              ("layer", ltd, 7)):
        ckpt = str(tmp_path / name)
        argv = gpt_argv(data_prefix, *flags, "--eval-iters", "0", iters=100)
        first, _ = run(argv + ["--save", ckpt])
        assert first.state.iteration == stop
        second, logs = run(argv + ["--load", ckpt, "--save", ckpt])
        assert second.state.iteration == stop and second.train_losses == []
        assert second.state.consumed_train_tokens == first.state.consumed_train_tokens
        assert any("training budget reached" in line for line in logs)
        with open(os.path.join(ckpt, TRACKER_FILENAME)) as f:
            assert f.read() == str(stop)


def test_exit_interval_skips_the_end_of_training_evaluation(data_prefix, tmp_path):
    """As Megatron (save, then sys.exit()): --exit-interval / --exit-duration-in-mins stop
    without the final validation and test passes; reaching --train-iters runs them."""
    test_split = ["--split", "80,10,10"]
    done, logs = run(gpt_argv(data_prefix, *test_split, iters=2))
    assert [i for i, _ in done.valid_losses] == [2]  # final validation
    assert [i for i, _ in done.test_losses] == [2]  # then test
    assert any("validation loss at the end of training for test data" in line for line in logs)
    ckpt = str(tmp_path / "ckpt")
    for stop in (["--exit-interval", "2"], ["--exit-duration-in-mins", "0"]):
        stopped, logs = run(gpt_argv(data_prefix, *test_split, *stop, "--save", ckpt, iters=8))
        assert stopped.valid_losses == [] and stopped.test_losses == []
        assert not any("validation loss" in line for line in logs)
        assert stopped.state.consumed_valid_samples == 0


def test_nan_iterations_are_counted_once_skipped_or_not():
    """Megatron counts an inf/nan loss of a skipped (fp16 overflow) iteration as a nan
    iteration; we also count non-skipped ones (bf16/fp32), once per iteration whatever the
    number of loss keys."""
    import argparse

    from megatron.checkpointing import TrainState
    from megatron.training_log import TrainingLogger

    args = argparse.Namespace(tensorboard_dir=None, log_interval=3, train_iters=3,
                              global_batch_size=4, seq_length=8, world_size=1)
    lines = []
    logger = TrainingLogger(args, log=lines.append)
    nan = float("nan")
    for it, (losses, skipped) in enumerate([({"lm loss": nan, "aux": nan}, True),
                                            ({"lm loss": 2.0, "aux": 1.0}, False),
                                            ({"lm loss": 4.0, "aux": float("inf")}, False)], 1):
        logger.training_step(TrainState(iteration=it), losses, 1e-3, None, 1.0, skipped)
    assert len(lines) == 1
    assert "number of skipped iterations:   1" in lines[0]
    assert "number of nan iterations:   2" in lines[0]
    assert "lm loss: 3.000000E+00" in lines[0]  # the skipped iteration is not averaged


def test_loss_history_reads_like_a_list_of_pairs_and_stays_small():
    import sys

    from megatron.training_log import LossHistory

    history = LossHistory()
    assert history == [] and len(history) == 0
    history.append(1, {"lm loss": torch.tensor(2.5)})
    history.append(2, {"lm loss": 2.0, "aux": 0.5})  # key sets may change
    history.append(3, {"lm loss": 1.5})
    pairs = [(1, {"lm loss": 2.5}), (2, {"lm loss": 2.0, "aux": 0.5}), (3, {"lm loss": 1.5})]
    assert list(history) == pairs and history == pairs
    assert history[-1] == (3, {"lm loss": 1.5}) and history[1:] == pairs[1:]
    assert history + [(4, {})] == pairs + [(4, {})]
    with pytest.raises(IndexError):
        history[3]
    big = LossHistory()
    for i in range(100_000):
        big.append(i, {"lm loss": 1.0})
    size = sum(sys.getsizeof(a) for a in (big._iterations, big._offsets, big._keyset_of,
                                          big._values))
    assert size < 40 * 100_000  # bytes; a list of (int, dict) pairs takes ~300 per entry


def _events(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return events


def test_tensorboard_validation_and_test_tags_follow_megatron_deepspeed(data_prefix, tmp_path):
    """Validation is 'lm-loss-validation/lm loss validation', the end-of-training test-set
    evaluation 'lm-loss-validation/lm loss test' (Megatron-DeepSpeed's evaluate_and_print_results),
    each with ppl and vs samples / vs tokens twins; test losses are not validation losses."""
    tb = tmp_path / "tb"
    result, _ = run(gpt_argv(data_prefix, "--split", "80,10,10", "--tensorboard-dir", str(tb),
                             "--log-validation-ppl-to-tensorboard", iters=4))
    assert [i for i, _ in result.valid_losses] == [4, 4]  # at eval interval 4, and at the end
    assert [i for i, _ in result.test_losses] == [4]
    events = _events(tb)
    tags = set(events.Tags()["scalars"])
    for data_type in ("validation", "test"):
        for suffix in ("", " vs samples", " vs tokens", " ppl", " ppl vs samples",
                       " ppl vs tokens"):
            assert f"lm-loss-validation/lm loss {data_type}{suffix}" in tags
    valid = events.Scalars("lm-loss-validation/lm loss validation")
    assert [e.value for e in valid] == pytest.approx([d["lm loss"] for _, d in
                                                      result.valid_losses])
    test = events.Scalars("lm-loss-validation/lm loss test")
    assert [(e.step, e.value) for e in test] == [(4, pytest.approx(result.test_losses[0][1]
                                                                   ["lm loss"]))]
    assert [e.step for e in events.Scalars("lm-loss-validation/lm loss test vs samples")] == [16]


def _tensorboard_rank(rank, world_size, data_prefix, tb_dir):
    run(gpt_argv(data_prefix, "--tensorboard-dir", tb_dir, iters=2))
    return os.getpid()


def test_tensorboard_is_written_by_the_last_rank_only(data_prefix, tmp_path):
    """Megatron creates the SummaryWriter on rank world_size - 1 only."""
    from distributed_harness import run_distributed

    tb = tmp_path / "tb"
    pids = run_distributed(_tensorboard_rank, world_size=2, args=(data_prefix, str(tb)),
                           timeout=300)
    files = os.listdir(tb)
    assert len(files) == 1 and files[0].startswith("events.out.tfevents.")
    assert files[0].split(".")[-2] == str(pids[1]), (files, pids)
    assert [e.step for e in _events(tb).Scalars("lm-loss-training/lm loss")] == [1, 2]
