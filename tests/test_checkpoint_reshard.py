"""megatron/checkpoint_reshard.py and checkpointing.load_pretrained_weights: the weights of a
checkpoint saved under any TP/PP layout, merged into the full model and cut again for the rank
being built (TP1, TP2 x PP2, an uneven pipeline split), with one-line errors."""

import argparse
import os
import sys

import pytest
import torch

from megatron.checkpoint_reshard import (model_state_for_rank, read_full_model_state,
                                         resize_vocab)
from megatron.checkpointing import (TrainState, checkpoint_file, load_checkpoint,
                                    load_pretrained_weights, save_checkpoint)
from megatron.errors import UserError
from megatron.model import BertModel, GPTModel, LoadPolicy, TransformerConfig
from megatron.parallel.state import ParallelState

from distributed_harness import run_distributed
from training_helpers import ROOT, gpt_argv, run, tiny_bert_argv

sys.path.insert(0, os.path.join(ROOT, "tools"))
import checkpoint_util  # noqa: E402

V, H, HEADS, S, LAYERS = 128, 16, 4, 8, 4
QUIET = dict(log=lambda *_: None)


def _config(**extra):
    return TransformerConfig(**{"num_layers": LAYERS, "hidden_size": H,
                                "num_attention_heads": HEADS, "seq_length": S,
                                "padded_vocab_size": V, "hidden_dropout": 0.0,
                                "attention_dropout": 0.0, **extra})


def _gpt(parallel=ParallelState(), layer_ids=None, seed=0, **extra):
    torch.manual_seed(seed)
    return GPTModel(_config(**extra), parallel, pre_process=parallel.is_first_stage,
                    post_process=parallel.is_last_stage, layer_ids=layer_ids)


def _bert(parallel=ParallelState(), layer_ids=None, seed=0, binary_head=True, **extra):
    torch.manual_seed(seed)
    return BertModel(_config(num_tokentypes=2 if binary_head else 0, **extra), parallel,
                     pre_process=parallel.is_first_stage, post_process=parallel.is_last_stage,
                     layer_ids=layer_ids, add_binary_head=binary_head)


def _args(root, **extra):
    return argparse.Namespace(**{
        "save": root, "load": root, "no_save_optim": True, "no_save_rng": True,
        "no_load_optim": True, "no_load_rng": True, "finetune": False,
        "exit_on_missing_checkpoint": True, "num_layers": LAYERS, "hidden_size": H,
        "num_attention_heads": HEADS, "padded_vocab_size": V, "seq_length": S,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "consumed_train_samples": 0, **extra})


def _save(root, model, iteration=3, **extra):
    save_checkpoint(_args(root, **extra), TrainState(iteration=iteration), model, None, None,
                    **QUIET)


# An independent splitter (by name) of a full state for one rank.
def _expected_rank(full, t, tp, layer_ids, first, last, head_copy):
    def cut(name, tensor):
        if name.endswith(("query_key_value.weight", "query_key_value.bias",
                          "dense_h_to_4h.weight", "dense_h_to_4h.bias",
                          "word_embeddings.weight", "output_layer.weight", "lm_head.bias")):
            return tensor.chunk(tp, 0)[t]
        if name.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
            return tensor.chunk(tp, 1)[t]
        return tensor

    out = {}
    for name, tensor in full.items():
        parts = name.split(".")
        if "layers" in parts:
            i = parts.index("layers") + 1
            if int(parts[i]) in layer_ids:
                parts[i] = str(layer_ids.index(int(parts[i])))
                out[".".join(parts)] = cut(name, tensor)
        elif "embedding" in parts:
            if first:
                out[name] = cut(name, tensor)
        elif last:
            out[name] = cut(name, tensor)
    if head_copy:
        out["word_embeddings.weight"] = cut(
            "word_embeddings.weight", full["language_model.embedding.word_embeddings.weight"])
    return out


def _assert_rank_holds(model, full, t, tp, layer_ids, first, last):
    tied = "language_model.output_layer.weight" not in full
    expected = _expected_rank(full, t, tp, layer_ids, first, last,
                              head_copy=tied and last and not first)
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_tp2pp2_shards_load_into_tp1_and_into_every_tp2pp2_rank(tmp_path, family):
    build = _gpt if family == "gpt" else _bert
    src, shards = str(tmp_path / "tp1"), str(tmp_path / "tp2pp2")
    original = build()
    _save(src, original)
    checkpoint_util.convert(src, shards, 2, 2, **QUIET)
    full, args = read_full_model_state(shards)
    assert args.tensor_model_parallel_size == 2 and args.pipeline_model_parallel_size == 2
    assert list(full) == list(original.state_dict())
    for name, tensor in original.state_dict().items():
        assert torch.equal(full[name], tensor), name
    # into one process
    single = build(seed=1)
    load_pretrained_weights(shards, single, ParallelState(), **QUIET)
    _assert_rank_holds(single, full, 0, 1, list(range(LAYERS)), True, True)
    # into each rank of TP2 x PP2 (built without process groups: loading needs none)
    for p in range(2):
        for t in range(2):
            parallel = ParallelState(tp_size=2, tp_rank=t, pp_size=2, pp_rank=p)
            layer_ids = [2 * p, 2 * p + 1]
            model = build(parallel, layer_ids, seed=2)
            load_pretrained_weights(shards, model, parallel, **QUIET)
            _assert_rank_holds(model, full, t, 2, layer_ids, p == 0, p == 1)


def test_uneven_pipeline_split_and_untied_output_layer(tmp_path):
    src = str(tmp_path / "tp1")
    original = _gpt(untie_embeddings_and_output_weights=True)
    _save(src, original, untie_embeddings_and_output_weights=True)
    full = dict(original.state_dict())
    for p, layer_ids in enumerate(([0], [1, 2, 3])):
        parallel = ParallelState(tp_size=2, tp_rank=1, pp_size=2, pp_rank=p)
        model = _gpt(parallel, layer_ids, seed=3, untie_embeddings_and_output_weights=True)
        load_pretrained_weights(src, model, parallel, **QUIET)
        _assert_rank_holds(model, full, 1, 2, layer_ids, p == 0, p == 1)


def test_heads_of_another_model_follow_the_load_policy(tmp_path):
    """A BERT checkpoint into a BERT without the binary head: the token types, pooler and binary
    head are ignored by name and named in one line; without a policy the mismatch is one
    line."""
    src = str(tmp_path / "bert")
    original = _bert()
    _save(src, original)
    logs = []
    model = _bert(seed=4, binary_head=False)
    with pytest.raises(UserError, match="does not match this model: missing 0, unexpected 5 "):
        load_pretrained_weights(src, model, ParallelState(), **QUIET)
    policy = LoadPolicy(ignore_unexpected=("binary_head.*", "language_model.pooler.*",
                                           "language_model.embedding.tokentype_embeddings.*"))
    load_pretrained_weights(src, model, ParallelState(), policy=policy, log=logs.append)
    assert any("without 5 entries this model does not use (language_model, binary_head)" in line
               for line in logs), logs
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original.state_dict()[name]), name


def test_vocabulary_padding_of_another_tensor_parallel_size(tmp_path):
    """300 tokens padded for TP1 (384 rows, multiple 128) load into a TP2 model (512 rows):
    zero padding rows are added; and back, padding rows are cut. Paddings of no common
    vocabulary are refused."""
    src = str(tmp_path / "tp1")
    original = _bert(padded_vocab_size=384)
    _save(src, original, padded_vocab_size=384, make_vocab_size_divisible_by=128)
    logs = []
    parallel = ParallelState(tp_size=2, tp_rank=1)
    model = _bert(parallel, seed=5, padded_vocab_size=512)
    load_pretrained_weights(src, model, parallel, log=logs.append)
    emb = model.language_model.embedding.word_embeddings.weight  # rows 256..511
    want = original.language_model.embedding.word_embeddings.weight[256:]
    assert torch.equal(emb[:128], want) and not emb[128:].any()
    assert torch.equal(model.lm_head.bias[:128], original.lm_head.bias[256:])
    assert any("384 rows" in line and "512 in this model" in line for line in logs)
    resized, saved = resize_vocab(dict(original.state_dict()), 256)
    assert saved == 384 and resized["lm_head.bias"].shape == (256,)
    with pytest.raises(UserError, match="padded vocabulary of 384 but this model 1024: they do "
                                        "not pad one vocabulary"):
        load_pretrained_weights(src, _bert(seed=6, padded_vocab_size=1024), ParallelState(),
                                **QUIET)


def test_model_args_and_activation_are_checked(tmp_path):
    src = str(tmp_path / "gpt")
    _save(src, _gpt())
    with pytest.raises(UserError, match="saved with --num-layers 4 but --num-layers 2"):
        load_pretrained_weights(src, GPTModel(_config(num_layers=2)), ParallelState(), **QUIET)
    with pytest.raises(UserError, match="saved with the tanh-approximate GeLU .* in its MLP but "
                                        "this run computes the exact erf GeLU"):
        load_pretrained_weights(src, _gpt(bias_gelu_fusion=False), ParallelState(), **QUIET)
    # the same function from other flags loads (--openai-gelu is tanh as the fusion is)
    load_pretrained_weights(src, _gpt(openai_gelu=True), ParallelState(), **QUIET)
    # BERT's LM head: exact GeLU unless --openai-gelu
    bert = str(tmp_path / "bert")
    _save(bert, _bert())
    with pytest.raises(UserError, match="in its BERT LM head but this run computes the "
                                        "tanh-approximate GeLU .*: drop --openai-gelu"):
        load_pretrained_weights(bert, _bert(openai_gelu=True), ParallelState(), **QUIET)
    # args of an architecture this model cannot compute
    swiglu = str(tmp_path / "swiglu")
    _save(swiglu, _gpt(), swiglu=True)
    with pytest.raises(UserError, match="holds a model this code cannot compute: --swiglu"):
        load_pretrained_weights(swiglu, _gpt(), ParallelState(), **QUIET)


def test_missing_and_broken_checkpoints_are_one_line(tmp_path):
    with pytest.raises(UserError, match="--pretrained-checkpoint .*nope: no latest_"):
        load_pretrained_weights(str(tmp_path / "nope"), _gpt(), ParallelState(), **QUIET)
    src, shards = str(tmp_path / "tp1"), str(tmp_path / "tp2")
    _save(src, _gpt())
    checkpoint_util.convert(src, shards, 2, 1, **QUIET)
    path = checkpoint_file(shards, 3, 1, 0, 1)
    with open(path, "r+b") as f:
        f.truncate(64)
    with pytest.raises(UserError, match=f"cannot read checkpoint {path}"):
        read_full_model_state(shards)
    os.remove(path)
    with pytest.raises(UserError, match="mp_rank_01/model_optim_rng.pt does not exist"):
        read_full_model_state(shards)
    os.rmdir(os.path.dirname(path))
    with pytest.raises(UserError, match="holds 1 shards along tensor_model_parallel_size but "
                                        "its args say 2"):
        load_pretrained_weights(shards, _gpt(), ParallelState(), **QUIET)
    with pytest.raises(UserError, match="no checkpoint of iteration 9"):
        read_full_model_state(src, iteration=9)


def test_model_state_for_rank_refuses_an_indivisible_split():
    full = dict(_gpt().state_dict())
    parallel = ParallelState(tp_size=3, tp_rank=0)
    with pytest.raises(UserError, match="not divisible by --tensor-model-parallel-size 3"):
        model_state_for_rank(full, _gpt(), parallel)


def test_finetune_loads_weights_of_another_layout_and_resume_names_the_converter(tmp_path):
    src, shards = str(tmp_path / "tp1"), str(tmp_path / "tp2pp2")
    original = _gpt()
    _save(src, original)
    checkpoint_util.convert(src, shards, 2, 2, **QUIET)
    model = _gpt(seed=7)
    state, ckpt = load_checkpoint(_args(shards, finetune=True), model, None, None, **QUIET)
    assert state.iteration == 0 and ckpt["args"].tensor_model_parallel_size == 2
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with pytest.raises(UserError, match="tools/checkpoint_util.py"):
        load_checkpoint(_args(shards), _gpt(), None, None, **QUIET)


# -- checkpoints of real multi-process runs ----------------------------------------------------

def _train(rank, world_size, argv, bert):
    if bert:
        import pretrain_bert

        pretrain_bert.pretrain(pretrain_bert.datasets_provider, pretrain_bert.model_provider,
                               pretrain_bert.forward_step_provider, argv=argv,
                               log=lambda *_: None)
    else:
        run(argv)


LAYOUTS = {"TP2": (2, ["--tensor-model-parallel-size", "2"]),
           "PP2": (2, ["--pipeline-model-parallel-size", "2"]),
           "TP2xPP2": (4, ["--tensor-model-parallel-size", "2",
                           "--pipeline-model-parallel-size", "2"])}


def _independent_merge(root, tp, pp, layers):
    """The full model by concatenating the shard files directly (no reshard code)."""
    from megatron.checkpointing import flat_model_state

    per = layers // pp
    full = {}
    for p in range(pp):
        ranks = [flat_model_state(torch.load(checkpoint_file(root, 2, t, p, pp),
                                             weights_only=False)["model"]) for t in range(tp)]
        for name, tensor in ranks[0].items():
            if name == "word_embeddings.weight":
                continue
            parts = name.split(".")
            if "layers" in parts:
                i = parts.index("layers") + 1
                parts[i] = str(int(parts[i]) + p * per)
            dim = (0 if name.endswith(("query_key_value.weight", "query_key_value.bias",
                                       "dense_h_to_4h.weight", "dense_h_to_4h.bias",
                                       "word_embeddings.weight", "lm_head.bias"))
                   else 1 if name.endswith(("self_attention.dense.weight",
                                            "dense_4h_to_h.weight")) else None)
            full[".".join(parts)] = tensor if dim is None else \
                torch.cat([r[name] for r in ranks], dim)
    return full


@pytest.mark.slow
@pytest.mark.parametrize("family,layout", [("gpt", "TP2"), ("gpt", "PP2"),
                                           ("gpt", "TP2xPP2"), ("bert", "TP2xPP2")])
def test_checkpoints_of_parallel_runs_load_into_any_layout(family, layout, data_prefix,
                                                           tmp_path):
    world, flags = LAYOUTS[layout]
    ckpt = str(tmp_path / "ckpt")
    common = ["--num-layers", "4", "--save", ckpt, "--save-interval", "2", *flags]
    if family == "gpt":
        argv = gpt_argv(data_prefix, *common, "--micro-batch-size", "1", iters=2)
    else:
        argv = tiny_bert_argv(*common, iters=2)
    run_distributed(_train, world, args=(argv, family == "bert"), timeout=300)
    tp, pp = (2 if "TP2" in layout else 1), (2 if "PP2" in layout else 1)
    full, args = read_full_model_state(ckpt)
    independent = _independent_merge(ckpt, tp, pp, 4)
    assert list(full) == list(independent)
    for name, tensor in independent.items():
        assert torch.equal(full[name], tensor), name
    from megatron.arguments import transformer_config_from_args

    overrides = {"num_tokentypes": 2} if family == "bert" else {}
    config = transformer_config_from_args(args, **overrides)
    cls = BertModel if family == "bert" else GPTModel
    targets = [(ParallelState(), list(range(4)))]
    targets += [(ParallelState(tp_size=2, tp_rank=t, pp_size=2, pp_rank=p), [2 * p, 2 * p + 1])
                for p in range(2) for t in range(2)]
    for parallel, layer_ids in targets:
        model = cls(config, parallel, pre_process=parallel.is_first_stage,
                    post_process=parallel.is_last_stage, layer_ids=layer_ids)
        load_pretrained_weights(ckpt, model, parallel, **QUIET)
        _assert_rank_holds(model, full, parallel.tp_rank, parallel.tp_size, layer_ids,
                           parallel.is_first_stage, parallel.is_last_stage)
