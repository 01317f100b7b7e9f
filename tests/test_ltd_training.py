"""random-LTD through pretrain_gpt: kept length grows, layer tokens, budgets, LayerToken LR,
DeepSpeed configs, and exact resume in the middle of the schedule."""

import json

import pytest
import torch

from megatron.checkpointing import checkpoint_file
from training_helpers import gpt_argv, run

LTD = ["--num-layers", "4", "--random-ltd", "--random-ltd-start", "8", "--random-ltd-step", "4",
       "--random-ltd-schedule-steps", "6"]


def console_field(line, name):
    return line.split(f"{name}: ")[1].split(" |")[0].strip()


@pytest.mark.slow
def test_kept_length_grows_and_layer_tokens_are_counted(data_prefix, tmp_path):
    result, logs = run(gpt_argv(data_prefix, *LTD, "--log-interval", "1",
                                "--tensorboard-dir", str(tmp_path / "tb"), iters=8))
    lines = [l for l in logs if l.startswith(" iteration")]
    kept = [int(console_field(l, "random ltd reserved length")) for l in lines]
    # fixed_linear: floor(t/6*(32-8)+8) rounded down to a multiple of 4, t = 0..7
    assert kept == [8, 12, 16, 20, 24, 28, 32, 32]
    layer_tokens = [int(console_field(l, "consumed layer tokens")) for l in lines]
    per_step = [4 * (2 * 32 + 2 * k) for k in kept]  # GBS x (first+last full, 2 middle kept)
    assert layer_tokens == [sum(per_step[:i + 1]) for i in range(8)]
    # Megatron-DeepSpeed's "consumed tokens": layer-averaged sequence length per sample
    eff = [(32 * 2 + k * 2) // 4 for k in kept]
    assert result.state.consumed_train_tokens == 4 * sum(eff)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "seqlen/random_ltd_reserved_length" in tags
    assert "lm-loss-training/lm loss vs layer tokens" in tags
    assert [e.value for e in events.Scalars("seqlen/random_ltd_reserved_length")] == kept
    # what each layer processed: the first and last full, the middle two the kept length
    per_layer = {layer: [e.value for e in events.Scalars(f"random-ltd/kept-tokens/layer-0{layer}")]
                 for layer in range(4)}
    assert per_layer == {0: [32] * 8, 1: kept, 2: kept, 3: [32] * 8}
    assert "random-ltd/sctd-full-pass" not in tags


@pytest.mark.slow
def test_resume_in_the_middle_of_the_schedule_is_bitwise(data_prefix, tmp_path):
    full, _ = run(gpt_argv(data_prefix, *LTD, iters=8))
    ckpt = str(tmp_path / "ckpt")
    first, _ = run(gpt_argv(data_prefix, *LTD, "--save", ckpt, "--exit-interval", "3", iters=8))
    state = torch.load(checkpoint_file(ckpt, 3), weights_only=False)
    assert state["random_ltd_scheduler"]["consumed_layer_tokens"] == 4 * (80 + 88 + 96)
    second, _ = run(gpt_argv(data_prefix, *LTD, "--load", ckpt, iters=8))
    assert [d for _, d in first.train_losses + second.train_losses] == \
        [d for _, d in full.train_losses]
    for a, b in zip(full.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def test_a_random_ltd_checkpoint_continues_dense_and_not_the_reverse(data_prefix, tmp_path):
    from megatron.errors import UserError

    ckpt = str(tmp_path / "ckpt")
    run(gpt_argv(data_prefix, *LTD, "--save", ckpt, "--exit-interval", "3", iters=8))
    dense_args = ["--num-layers", "4", "--load", ckpt]
    resumed, logs = run(gpt_argv(data_prefix, *dense_args, "--log-interval", "1",
                                 "--exit-interval", "5", iters=8))
    assert resumed.state.iteration == 5
    lines = [l for l in logs if l.startswith(" iteration")]
    # layer tokens keep counting from the checkpoint's, now at full length in every layer
    saved = 4 * (80 + 88 + 96)
    assert [int(console_field(l, "consumed layer tokens")) for l in lines] == \
        [saved + 4 * 4 * 32, saved + 2 * 4 * 4 * 32]
    dense_ckpt = str(tmp_path / "dense")
    run(gpt_argv(data_prefix, "--num-layers", "4", "--save", dense_ckpt, iters=2))
    with pytest.raises(UserError, match="trained without random-LTD.*--finetune"):
        run(gpt_argv(data_prefix, *LTD, "--load", dense_ckpt, iters=2))
    finetuned, _ = run(gpt_argv(data_prefix, *LTD, "--load", dense_ckpt, "--finetune",
                                iters=2))
    assert finetuned.state.iteration == 2


def test_dropping_changes_training_and_eval_never_drops(data_prefix):
    dense, _ = run(gpt_argv(data_prefix, "--num-layers", "4", iters=2))
    ltd, _ = run(gpt_argv(data_prefix, *LTD, iters=2))
    assert dense.train_losses[0] != ltd.train_losses[0]
    # With every token kept (start = seq length) the run is bit-identical to the dense one.
    same, _ = run(gpt_argv(data_prefix, "--num-layers", "4", "--random-ltd",
                           "--random-ltd-start", "32", "--random-ltd-schedule", "constant",
                           iters=2))
    assert same.train_losses == dense.train_losses
    assert same.valid_losses == dense.valid_losses


def test_layer_token_budget_stops_baseline_and_ltd_at_equal_compute(data_prefix):
    budget = 4 * 32 * 4 * 5  # five dense iterations of 4 layers
    base, _ = run(gpt_argv(data_prefix, "--num-layers", "4", "--train-layer-tokens",
                           str(budget), iters=100))
    ltd, _ = run(gpt_argv(data_prefix, *LTD, "--train-layer-tokens", str(budget), iters=100))
    assert base.state.iteration == 5
    # per step 4 x (64 + 2 kept) = 320, 352, 384, 416, 448, 480, 512: the running sum first
    # reaches 2560 after step 7 (2912); step 6 ends at 2400.
    assert ltd.state.iteration == 7
    argv = gpt_argv(data_prefix, *LTD, "--train-layer-tokens", str(budget))
    i = argv.index("--train-iters")
    del argv[i:i + 2]
    no_iters, _ = run(argv)
    assert no_iters.state.iteration == 7


def test_layer_token_lr_without_dropping_equals_the_iteration_schedule(data_prefix):
    plain, _ = run(gpt_argv(data_prefix, "--num-layers", "4", "--lr-warmup-iters", "2",
                            "--log-interval", "1", iters=6))
    layer, logs = run(gpt_argv(data_prefix, "--num-layers", "4", "--lr-warmup-iters", "2",
                               "--layer-token-lr", "--log-interval", "1", iters=6))
    assert plain.train_losses == layer.train_losses
    assert any("LayerToken LR" in l for l in logs)


@pytest.mark.slow
def test_layer_token_lr_with_dropping_stretches_warmup(data_prefix):
    def lrs(*extra):
        _, logs = run(gpt_argv(data_prefix, *LTD, "--lr-warmup-iters", "2",
                               "--log-interval", "1", *extra, iters=6))
        return [float(console_field(l, "learning rate")) for l in logs
                if l.startswith(" iteration")]

    iteration_lr, layer_lr = lrs(), lrs("--layer-token-lr")
    # Warmup ends when the layer tokens equal 2 dense iterations (2 x 4 x 32 x 4 = 1024):
    # after 3 steps (320 + 352 + 384 = 1056). The iteration LR is at its peak after 2 steps.
    assert iteration_lr[1] == pytest.approx(3e-3)
    assert layer_lr[1] < 3e-3 and layer_lr[0] == pytest.approx(3e-3 * 320 / 1024, rel=1e-3)


@pytest.mark.slow
def test_deepspeed_config_drives_random_ltd(data_prefix, tmp_path):
    ds = {"train_batch_size": 4,
          "data_efficiency": {"enabled": True, "data_routing": {"enabled": True, "random_ltd": {
              "enabled": True, "total_layer_num": 4, "random_ltd_layer_num": 2,
              "random_ltd_layer_id": [1, 2], "model_mask_name": "attention_mask",
              "model_type": "decoder", "hidden_state_order": "seq_batch_dim",
              "random_ltd_schedule": {"min_value": 8, "max_value": 32,
                                      "schedule_type": "fixed_linear",
                                      "schedule_config": {"require_steps": 6,
                                                          "seq_per_step": 4}}}}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    argv = gpt_argv(data_prefix, "--num-layers", "4", "--deepspeed_config", str(path), iters=3)
    from_json, _ = run(argv)
    from_flags, _ = run(gpt_argv(data_prefix, *LTD, iters=3))
    assert from_json.train_losses == from_flags.train_losses
    from megatron.errors import UserError

    with pytest.raises(UserError, match="--random-ltd-start"):
        run(argv + ["--random-ltd-start", "16"])
