"""The seam every model family shares: the LanguageModule base (checkpoint layout, load policy,
tying), the flags -> config mapping, the Provider, the random-LTD hook and the paper's presets."""

import argparse

import pytest
import torch

from megatron.arguments import flag_defaults, parse_args, transformer_config_from_args
from megatron.checkpointing import check_shapes
from megatron.errors import UserError
from megatron.ltd.config import PRESETS, random_ltd_config_from_args
from megatron.ltd.driver import TokenDroppingDriver, token_drop_for_batch
from megatron.ltd.dropping import TokenDropState
from megatron.model import BertModel, GPTModel, LoadPolicy, TransformerConfig
from megatron.model.module import flat_model_state, load_flat_state, megatron_model_state

V = 64


def tiny(**kw):
    base = dict(num_layers=3, hidden_size=16, num_attention_heads=2, seq_length=8,
                padded_vocab_size=V, init_seed=3)
    base.update(kw)
    return TransformerConfig(**base)


def argv(*extra):
    return ["--num-layers", "4", "--hidden-size", "16", "--num-attention-heads", "2",
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--lr", "1e-3", "--mock-data", *extra]


# ------------------------------------------------------------------------- checkpoint layout

def test_bert_checkpoint_layout_is_megatrons():
    model = BertModel(tiny(num_tokentypes=2))
    nested = model.state_dict_for_save_checkpoint()
    assert set(nested) == {"language_model", "lm_head", "binary_head"}
    assert set(nested["language_model"]) == {"embedding", "encoder", "pooler"}
    assert set(nested["language_model"]["embedding"]) == {
        "word_embeddings", "position_embeddings", "tokentype_embeddings"}
    assert set(nested["lm_head"]) == {"bias", "dense.weight", "dense.bias", "layernorm.weight",
                                      "layernorm.bias"}
    assert set(nested["binary_head"]) == {"weight", "bias"}
    assert set(nested["language_model"]["pooler"]) == {"dense.weight", "dense.bias"}
    assert list(flat_model_state(nested)) == list(model.state_dict())


def test_gpt_layout_is_unchanged_by_the_generic_nesting():
    flat = {"language_model.embedding.word_embeddings.weight": torch.zeros(1),
            "language_model.encoder.final_layernorm.bias": torch.zeros(2),
            "word_embeddings.weight": torch.zeros(3)}
    nested = megatron_model_state(flat)
    assert nested["word_embeddings_for_head"]["weight"].shape == (3,)
    assert nested["language_model"]["encoder"]["final_layernorm.bias"].shape == (2,)
    assert list(flat_model_state(nested)) == list(flat)


def test_load_policy_decides_what_another_head_may_skip():
    with_head = BertModel(tiny(num_tokentypes=2))
    without = BertModel(tiny(num_tokentypes=0), add_binary_head=False)
    saved = flat_model_state(with_head.state_dict_for_save_checkpoint())
    with pytest.raises(UserError, match="does not match this model: missing 0, unexpected 5 "
                                        ".*language_model.pooler.dense.*binary_head"):
        load_flat_state(without, saved, "ckpt.pt")
    policy = LoadPolicy(ignore_unexpected=("binary_head.*", "language_model.pooler.*",
                                           "*.tokentype_embeddings.*"))
    missing, ignored = load_flat_state(without, saved, "ckpt.pt", policy)
    assert missing == [] and sorted(ignored) == sorted(
        n for n in saved if n.startswith(("binary_head", "language_model.pooler"))
        or "tokentype" in n)
    assert torch.equal(without.lm_head.bias, with_head.lm_head.bias)
    # the other way round: heads the checkpoint lacks keep their initialisation when allowed
    back = BertModel(tiny(num_tokentypes=2, init_seed=9))
    pooler_before = back.language_model.pooler.dense.weight.clone()
    part = flat_model_state(without.state_dict_for_save_checkpoint())
    with pytest.raises(UserError, match="missing"):
        back.load_checkpoint_state(part, "x.pt")
    missing, _ = back.load_checkpoint_state(part, "x.pt", LoadPolicy(
        allow_missing=("binary_head.*", "language_model.pooler.*", "*.tokentype_embeddings.*")))
    assert "binary_head.weight" in missing
    assert torch.equal(back.language_model.pooler.dense.weight, pooler_before)
    assert torch.equal(back.lm_head.dense.weight, without.lm_head.dense.weight)


def test_gpt_checkpoint_into_bert_is_refused_in_one_line():
    gpt = GPTModel(tiny())
    bert = BertModel(tiny(num_tokentypes=2))
    with pytest.raises(UserError) as err:
        bert.load_checkpoint_state(gpt.state_dict_for_save_checkpoint(), "gpt.pt")
    assert "\n" not in str(err.value) and "lm_head" in str(err.value)


def test_tied_embedding_weight_names_the_pair_halves():
    from megatron.parallel.state import ParallelState

    two_stages = [ParallelState(pp_size=2, pp_rank=r) for r in (0, 1)]
    first = BertModel(tiny(), parallel=two_stages[0], post_process=False, layer_ids=[0, 1])
    last = BertModel(tiny(), parallel=two_stages[1], pre_process=False, layer_ids=[2])
    assert first.tied_embedding_weight() is first.language_model.embedding.word_embeddings.weight
    assert last.tied_embedding_weight() is last.word_embeddings.weight
    assert "word_embeddings_for_head" in last.state_dict_for_save_checkpoint()
    assert BertModel(tiny()).tied_embedding_weight() is None  # pp 1: no pair


# ------------------------------------------------------------------------- flags -> config

def test_one_mapping_serves_runs_and_old_checkpoint_args():
    args = parse_args(argv("--apply-residual-connection-post-layernorm", "--train-iters", "1"),
                      world_size=1)
    args.padded_vocab_size = 128
    cfg = transformer_config_from_args(args)
    assert cfg.apply_residual_connection_post_layernorm and cfg.padded_vocab_size == 128
    # args saved by an older run lack the newer flags: the parser's defaults fill them
    old = argparse.Namespace(num_layers=4, hidden_size=16, num_attention_heads=2,
                             seq_length=32, padded_vocab_size=128)
    old_cfg = transformer_config_from_args(old)
    assert old_cfg.rope_theta == flag_defaults()["rotary_base"]
    assert not old_cfg.apply_residual_connection_post_layernorm and old_cfg.add_bias_linear


def test_checkpoint_fields_are_checked_by_flag_name():
    run = parse_args(argv("--train-iters", "1"), world_size=1)
    run.padded_vocab_size = 128
    saved = argparse.Namespace(**vars(run))
    check_shapes(saved, run, "ckpt.pt")
    saved.apply_residual_connection_post_layernorm = True
    with pytest.raises(UserError, match="--apply-residual-connection-post-layernorm on but this "
                                        "run has it off"):
        check_shapes(saved, run, "ckpt.pt")
    saved = argparse.Namespace(**vars(run))
    saved.hidden_size = 32
    with pytest.raises(UserError, match="--hidden-size 32 but --hidden-size 16"):
        check_shapes(saved, run, "ckpt.pt")


# ------------------------------------------------------------------------- Provider

def test_provider_runs_the_family_checks_before_training():
    from megatron.training import Provider, pretrain

    seen = []

    def check(args):
        seen.append(args.num_layers)
        raise UserError("family check")

    provider = Provider(model=None, datasets=None, forward_step=None, check_args=check)
    with pytest.raises(UserError, match="family check"):
        pretrain(provider, argv=argv("--train-iters", "1"))
    assert seen == [4]


def test_bert_refuses_what_it_does_not_implement():
    import pretrain_bert

    with pytest.raises(UserError, match="learned absolute"):
        pretrain_bert.main(argv("--train-iters", "2", "--position-embedding-type", "rope"))


# ------------------------------------------------------------------------- random-LTD hook

def _dropper(method="random", *extra):
    args = parse_args(argv("--train-iters", "4", "--random-ltd", "--random-ltd-method", method,
                           "--random-ltd-start", "8", "--random-ltd-schedule", "constant",
                           *extra), world_size=1)
    driver = TokenDroppingDriver(random_ltd_config_from_args(args), num_layers=4, seq_length=32,
                                 global_batch_size=4, seed=1)
    return driver, driver.begin_iteration(0)


def test_hook_passes_masks_to_the_dropper_and_plain_callables_get_ids():
    assert token_drop_for_batch(None, torch.tensor([0])) == (None, None)
    ids = torch.tensor([3, 5])
    state, observe = token_drop_for_batch(lambda s: TokenDropState(0, 0, {1: 8}, s), ids)
    assert torch.equal(state.sample_ids, ids) and observe is None
    special = torch.zeros(2, 32, dtype=torch.bool)
    special[:, 0] = True
    _, drop = _dropper("random", "--random-ltd-keep-special-tokens")
    state, observe = token_drop_for_batch(drop, ids, special_mask=special)
    assert torch.equal(state.keep_mask, special) and observe is None


def test_hook_hands_tokenbypass_the_losses_through_observe():
    driver, drop = _dropper("tokenbypass")
    labels = torch.randint(0, V, (2, 32))
    state, observe = token_drop_for_batch(drop, torch.tensor([0, 1]), labels=labels,
                                          tokens=labels, loss_mask=torch.ones(2, 32))
    assert state.priority is not None
    observe(torch.rand(2, 32, requires_grad=True))
    _, counts = driver.importance.pending()
    assert int(counts.sum()) == 64


# ------------------------------------------------------------------------- presets

@pytest.mark.parametrize("name,start,fraction", [("bert-ltd-1", 200, 0.8926),
                                                 ("bert-ltd-2", 128, 0.8697),
                                                 ("bert-ablation-3.8b", 256, 0.5798),
                                                 ("bert-ablation-6b", 256, 0.9155)])
def test_paper_presets_scale_to_the_run(name, start, fraction):
    preset = PRESETS[name]
    assert preset.start == start and preset.ramp_fraction == pytest.approx(fraction, abs=1e-4)
    args = parse_args(["--num-layers", "24", "--hidden-size", "16", "--num-attention-heads",
                       "2", "--seq-length", "512", "--micro-batch-size", "2", "--lr", "1e-4",
                       "--mock-data", "--train-iters", "10000", "--random-ltd-preset", name],
                      world_size=1)
    assert args.random_ltd and args.random_ltd_start == start and args.random_ltd_step == 16
    assert args.random_ltd_schedule_steps == round(preset.ramp_fraction * 10000)
    cfg = random_ltd_config_from_args(args)
    assert cfg.enabled and cfg.schedule == "fixed_linear" and cfg.seq_length == 512


def test_preset_with_token_budget_and_conflicts():
    base = ["--num-layers", "4", "--hidden-size", "16", "--num-attention-heads", "2",
            "--seq-length", "512", "--micro-batch-size", "2", "--lr", "1e-4", "--mock-data"]
    args = parse_args(base + ["--train-tokens", "1000000", "--random-ltd-preset", "bert-ltd-2"],
                      world_size=1)
    assert args.random_ltd_schedule_tokens == round(PRESETS["bert-ltd-2"].ramp_fraction * 1e6)
    with pytest.raises(UserError, match="leave out --random-ltd-start"):
        parse_args(base + ["--train-iters", "10", "--random-ltd-preset", "bert-ltd-1",
                           "--random-ltd-start", "64"], world_size=1)
    short = parse_args(["--num-layers", "4", "--hidden-size", "16", "--num-attention-heads",
                        "2", "--seq-length", "128", "--micro-batch-size", "2", "--lr", "1e-4",
                        "--mock-data", "--train-iters", "100", "--random-ltd-preset",
                        "bert-ltd-1"], world_size=1)
    assert short.random_ltd_start == 48  # 200 / 512 of 128, on the 16-token grid


def test_deepspeed_model_type_must_fit_the_entry_point(tmp_path):
    import json

    import pretrain_bert
    import pretrain_gpt

    section = {"enabled": True, "total_layer_num": 4, "random_ltd_layer_num": 2,
               "random_ltd_layer_id": [1, 2], "model_type": "decoder",
               "random_ltd_schedule": {"min_value": 16, "max_value": 32,
                                       "schedule_type": "fixed_linear",
                                       "schedule_config": {"require_steps": 4,
                                                           "seq_per_step": 16}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"data_efficiency": {"enabled": True, "data_routing": {
        "enabled": True, "random_ltd": section}}}))
    args = parse_args(argv("--train-iters", "4", "--deepspeed-config", str(path)),
                      world_size=1)
    pretrain_gpt.check_args(args)
    with pytest.raises(UserError, match="model_type is 'decoder' but pretrain_bert.py trains an "
                                        "encoder"):
        pretrain_bert.check_args(args)


# ------------------------------------------------------------------------- real tokens only

def test_real_tokens_only_never_keeps_padding_while_real_tokens_remain():
    from megatron.ltd.dropping import kept_indices_by_layer

    _, plain = _dropper("random")
    _, only_real = _dropper("random", "--random-ltd-real-tokens-only")
    assert only_real.real_tokens_only and not plain.real_tokens_only
    b, s = 6, 32
    lengths = torch.tensor([32, 20, 9, 8, 3, 1])  # kept length is 8
    padding = torch.arange(s)[None, :] >= lengths[:, None]  # [b, s] True = padding
    ids = torch.arange(100, 100 + b)
    state, _ = token_drop_for_batch(only_real, ids, padding_mask=padding)
    kept = kept_indices_by_layer(state, [1, 2], s, torch.device("cpu"))
    plain_kept = kept_indices_by_layer(token_drop_for_batch(plain, ids)[0], [1, 2], s,
                                       torch.device("cpu"))
    for layer in (1, 2):
        rows = kept[layer]
        assert rows.shape == (b, 8)
        for i, n in enumerate(lengths.tolist()):
            real = rows[i][rows[i] < n]
            assert len(real) == min(n, 8)  # every slot a real token while they last
            assert torch.equal(rows[i], torch.sort(rows[i]).values)
        # a sample without padding draws exactly plain random-LTD's tokens
        assert torch.equal(rows[0], plain_kept[layer][0])
    # plain random-LTD does keep padding in the short samples (what the option changes)
    assert (plain_kept[1][2] >= 9).any()
    # the draw is uniform over the real tokens: every real position of sample 1 shows up
    seen = set()
    for it in range(40):
        st = TokenDropState(1, it, {1: 8}, ids[1:2], priority=-padding[1:2].float())
        seen.update(kept_indices_by_layer(st, [1], s, torch.device("cpu"))[1][0].tolist())
    assert seen == set(range(20))


def test_real_tokens_only_flag_checks():
    with pytest.raises(UserError, match="needs --random-ltd"):
        parse_args(argv("--train-iters", "2", "--random-ltd-real-tokens-only"), world_size=1)
    import pretrain_gpt

    args = parse_args(argv("--train-iters", "2", "--random-ltd", "--random-ltd-start", "8",
                           "--random-ltd-schedule", "constant", "--random-ltd-real-tokens-only"),
                      world_size=1)
    with pytest.raises(UserError, match="GPT samples have no padding"):
        pretrain_gpt.check_args(args)
