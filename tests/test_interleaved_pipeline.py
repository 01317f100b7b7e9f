"""Interleaved 1F1B (--num-layers-per-virtual-pipeline-stage): PP=2 with 2 model chunks per
stage (gloo, CPU) matches the single-process run step for step, with and without random-LTD."""

import os

import pytest
import torch

from distributed_harness import run_distributed
from megatron.errors import UserError
from megatron.model import GPTModel
from megatron.model.module import flat_model_state
from megatron.model.config import TransformerConfig
from megatron.parallel.initialize import build_parallel_state
from megatron.parallel.pipeline_utils import (chunk_layer_ids, initialize_embedding_tie,
                                              virtual_pipeline_size)
from megatron.parallel.schedules import forward_backward
from megatron.parallel.state import ParallelState
from test_pipeline_parallel import (HEAD_COPY, HIDDEN, NUM_MB, SEED, SEQ, VOCAB, global_name,
                                    train)

EMBEDDING = "language_model.embedding.word_embeddings.weight"


def make_config(num_layers):
    return TransformerConfig(num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=4,
                             seq_length=SEQ, padded_vocab_size=VOCAB, hidden_dropout=0.0,
                             attention_dropout=0.0)


def reference_model(num_layers):
    torch.manual_seed(SEED)
    return GPTModel(make_config(num_layers))


def build_chunks(parallel, num_layers, per_chunk):
    """This rank's model chunks (virtual stages ``c * pp + rank``) with the reference model's
    initial weights, by global layer id."""
    full = reference_model(num_layers).state_dict()
    vp = virtual_pipeline_size(num_layers, parallel.pp_size, per_chunk)
    chunks, ids = torch.nn.ModuleList(), []
    for c in range(vp):
        layer_ids = chunk_layer_ids(num_layers, parallel.pp_size, parallel.pp_rank, per_chunk, c)
        chunk = GPTModel(make_config(num_layers), parallel,
                         pre_process=parallel.is_first_stage and c == 0,
                         post_process=parallel.is_last_stage and c == vp - 1,
                         layer_ids=layer_ids)
        for name, param in chunk.named_parameters():
            if name != HEAD_COPY:  # the tie initialisation fills it
                param.data.copy_(full[global_name(name, layer_ids)])
        chunks.append(chunk)
        ids.append(layer_ids)
    return chunks, ids


def chunk_params(chunks, ids):
    return {"head_copy" if name == HEAD_COPY else global_name(name, layer_ids):
            param.detach().numpy().copy()
            for chunk, layer_ids in zip(chunks, ids) for name, param in chunk.named_parameters()}


def drop_in(layers):
    """Random-LTD in ``layers`` (global ids), keeping 8 of 16 tokens."""
    from megatron.ltd.dropping import TokenDropState

    return lambda step: (lambda sample_ids: TokenDropState(SEED, step, dict.fromkeys(layers, 8),
                                                           sample_ids))


def _interleaved_body(rank, world_size, num_layers, per_chunk, steps, drop_layers, num_mb):
    parallel = build_parallel_state(tp=1, pp=world_size)
    chunks, ids = build_chunks(parallel, num_layers, per_chunk)
    initialize_embedding_tie(chunks, parallel)
    token_drop = drop_in(drop_layers) if drop_layers else None
    losses, events = train(chunks, parallel, steps, ltd=token_drop, num_mb=num_mb)
    return {"layer_ids": ids, "losses": losses, "events": events,
            "params": chunk_params(chunks, ids)}


def reference_run(num_layers, steps, drop_layers, num_mb):
    model = reference_model(num_layers)
    token_drop = drop_in(drop_layers) if drop_layers else None
    losses, _ = train(model, ParallelState(), steps, ltd=token_drop, num_mb=num_mb)
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


def check_against_reference(results, num_layers, steps, drop_layers, num_mb=NUM_MB):
    ref_losses, ref_params = reference_run(num_layers, steps, drop_layers, num_mb)
    assert results[0]["losses"] == [[]] * steps
    torch.testing.assert_close(torch.tensor(results[-1]["losses"]), torch.tensor(ref_losses),
                               rtol=1e-5, atol=0)
    merged = {}
    for r in results:
        merged.update({k: torch.from_numpy(v) for k, v in r["params"].items()
                       if k != "head_copy"})
    assert set(merged) == set(ref_params)
    for name, value in ref_params.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert (results[-1]["params"]["head_copy"] == results[0]["params"][EMBEDDING]).all()
    assert not torch.equal(merged[EMBEDDING], reference_model(num_layers).state_dict()[EMBEDDING])
    return ref_losses


def forwards_before_first_backward(events):
    return next(i for i, e in enumerate(events) if e[0] == "B")


# -- layout ----------------------------------------------------------------------------------

def test_chunk_layer_ids_follow_megatrons_virtual_stages():
    # 8 layers, 2 stages, chunks of 2: virtual stages 0..3 = rank 0, rank 1, rank 0, rank 1
    assert [[chunk_layer_ids(8, 2, r, 2, c) for c in range(2)] for r in range(2)] == \
        [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    assert [chunk_layer_ids(4, 2, 1, 1, c) for c in range(2)] == [[1], [3]]
    assert virtual_pipeline_size(8, 2, 1) == 4
    with pytest.raises(UserError, match="--num-layers-per-virtual-pipeline-stage .3."):
        virtual_pipeline_size(8, 2, 3)


def test_flag_sets_megatrons_virtual_size_and_refuses_what_cannot_interleave():
    from test_arguments import parse

    flag = "--num-layers-per-virtual-pipeline-stage"
    args = parse("--pipeline-model-parallel-size", "2", "--num-layers", "8", flag, "2",
                 "--global-batch-size", "4", world_size=2)
    assert args.virtual_pipeline_model_parallel_size == 2
    with pytest.raises(UserError, match="needs --pipeline-model-parallel-size > 1"):
        parse("--num-layers", "4", flag, "1", world_size=1)
    with pytest.raises(UserError, match=r"micro-batches per step \(3 = "):
        parse("--pipeline-model-parallel-size", "2", "--num-layers", "4", flag, "1",
              "--global-batch-size", "6", world_size=2)
    with pytest.raises(UserError, match="mutually exclusive"):
        parse("--pipeline-model-parallel-size", "2", "--num-layers", "4", flag, "1",
              "--pipeline-layer-split", "1,3", world_size=2)
    with pytest.raises(UserError, match=r"multiple of --pipeline-model-parallel-size \(2\) "
                                        r"times --num-layers-per-virtual-pipeline-stage \(3\)"):
        parse("--pipeline-model-parallel-size", "2", "--num-layers", "8", flag, "3",
              world_size=2)


def test_micro_batches_not_a_multiple_of_the_stages_are_refused_by_name():
    with pytest.raises(UserError, match="multiple of --pipeline-model-parallel-size .2."):
        forward_backward(forward_step=None, data_iterator=None,
                         model=[reference_model(4), reference_model(4)],
                         parallel=ParallelState(pp_size=2, pp_ranks=(0, 1)),
                         num_microbatches=3, tensor_shape=(1,), dtype=torch.float32,
                         scale_loss=lambda loss: loss)


# -- PP=2 x 2 chunks ---------------------------------------------------------------------------

def test_pp2_two_chunks_of_one_layer_matches_single_process():
    steps = 2
    results = run_distributed(_interleaved_body, 2, args=(4, 1, steps, (), NUM_MB), timeout=90)
    assert [r["layer_ids"] for r in results] == [[[0], [2]], [[1], [3]]]
    check_against_reference(results, 4, steps, ())
    # Megatron's warm-up: (p - r - 1) * 2 + (v - 1) * p forwards, then one more before the
    # first backward
    assert [forwards_before_first_backward(r["events"]) for r in results] == [5, 3]


@pytest.mark.slow
def test_pp2_two_chunks_of_two_layers_with_random_ltd_matches_single_process():
    steps = 3
    drop = (1, 2, 5, 6)  # a dropping layer in every chunk
    results = run_distributed(_interleaved_body, 2, args=(8, 2, steps, drop, NUM_MB),
                              timeout=120)
    assert [r["layer_ids"] for r in results] == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    ref_losses = check_against_reference(results, 8, steps, drop)
    dense, _ = reference_run(8, steps, (), NUM_MB)  # random-LTD changed the computation
    assert ref_losses[0] != pytest.approx(dense[0], rel=1e-4)


@pytest.mark.slow
def test_pp2_as_many_micro_batches_as_stages_runs_all_forwards_first():
    steps = 2
    results = run_distributed(_interleaved_body, 2, args=(4, 1, steps, (1, 2), 2), timeout=90)
    check_against_reference(results, 4, steps, (1, 2), num_mb=2)
    assert [forwards_before_first_backward(r["events"]) for r in results] == [4, 4]


# -- pretrain_gpt with --num-layers-per-virtual-pipeline-stage ----------------------------------

LTD = ["--random-ltd", "--random-ltd-start", "8", "--random-ltd-step", "4",
       "--random-ltd-schedule-steps", "3"]
TOKENBYPASS = ["--random-ltd", "--random-ltd-method", "tokenbypass", "--random-ltd-start", "16",
               "--random-ltd-schedule", "constant"]
INTERLEAVED = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
               "1"]


def pretrain_argv(data_prefix, save, *extra, iters=3):
    """A 4-layer GPT, 4 micro-batches of 1 per step, dropout 0, SGD (as test_parallel_training)."""
    from training_helpers import gpt_argv

    return gpt_argv(data_prefix, "--num-layers", "4", "--micro-batch-size", "1",
                    "--global-batch-size", "4", "--hidden-dropout", "0",
                    "--attention-dropout", "0", "--eval-interval", "100", "--eval-iters", "1",
                    "--optimizer", "sgd", "--lr", "0.05", "--save", save, *extra, iters=iters)


def lm_losses(result):
    """(training losses, evaluation losses) of a ``PretrainResult`` (the evaluation runs the
    forward-only schedule)."""
    return ([d["lm loss"] for _, d in result.train_losses],
            [d["lm loss"] for _, d in result.valid_losses])


def _pretrain(rank, world_size, runs):
    from training_helpers import run

    return [lm_losses(run(argv)[0]) for argv in runs]


def saved_chunks(root, iteration, pp=2):
    """{pipeline rank: the checkpoint file's dict} of one iteration (tensor rank 0)."""
    from megatron.checkpointing import read_checkpoint_file

    return {r: read_checkpoint_file(os.path.join(root, f"iter_{iteration:07d}",
                                                 f"mp_rank_00_{r:03d}", "model_optim_rng.pt"))
            for r in range(pp)}


@pytest.mark.slow
@pytest.mark.parametrize("method,tp", [("random-ltd", 1), ("tokenbypass", 1), ("random-ltd", 2)])
def test_pretrain_gpt_interleaved_matches_single_process(method, tp, data_prefix, tmp_path):
    from training_helpers import run

    extra = LTD if method == "random-ltd" else TOKENBYPASS
    single, _ = run(pretrain_argv(data_prefix, str(tmp_path / "single"), *extra))
    train, valid = lm_losses(single)
    assert len(valid) == 1  # the end-of-training evaluation
    layout = INTERLEAVED + ["--tensor-model-parallel-size", str(tp)]
    per_rank = run_distributed(_pretrain, 2 * tp, args=(
        [pretrain_argv(data_prefix, str(tmp_path / "vp"), *layout, *extra)],), timeout=300)
    for (losses,) in per_rank:
        assert losses[0] == pytest.approx(train, rel=1e-5)
        assert losses[1] == pytest.approx(valid, rel=1e-5)
    files = saved_chunks(str(tmp_path / "vp"), 3)
    for ckpt in files.values():  # Megatron's layout: one entry per chunk
        assert "model" not in ckpt and {"model0", "model1"} <= set(ckpt)
    assert files[0]["args"].virtual_pipeline_model_parallel_size == 2


@pytest.mark.slow
def test_pretrain_gpt_interleaved_with_data_parallelism_matches_single_process(data_prefix,
                                                                               tmp_path):
    """PP2 x DP2, 2 chunks per stage: the chunks' gradients averaged by the overlapped
    reducer (no DDP wrapper)."""
    from training_helpers import run

    batch = ["--global-batch-size", "8"]  # 4 micro-batches per DP rank
    single, _ = run(pretrain_argv(data_prefix, str(tmp_path / "single"), *LTD, *batch))
    train, valid = lm_losses(single)
    per_rank = run_distributed(_pretrain, 4, args=(
        [pretrain_argv(data_prefix, str(tmp_path / "vp"), *INTERLEAVED, *LTD, *batch)],),
        timeout=300)
    for (losses,) in per_rank:
        assert losses[0] == pytest.approx(train, rel=1e-5)
        assert losses[1] == pytest.approx(valid, rel=1e-5)


def _pretrain_bert(rank, world_size, argv):
    import pretrain_bert

    result = pretrain_bert.pretrain(pretrain_bert.PROVIDER, argv=argv, log=lambda *a: None)
    return [{k: float(v) for k, v in d.items()} for _, d in result.train_losses]


@pytest.mark.slow
def test_pretrain_bert_interleaved_with_random_ltd_matches_single_process():
    """BERT's binary head and pooler live on the last rank's last chunk; both losses match."""
    from training_helpers import tiny_bert_argv

    argv = tiny_bert_argv("--random-ltd", "--random-ltd-start", "16", "--random-ltd-step", "8",
                          "--random-ltd-schedule-steps", "2", "--optimizer", "sgd", iters=3)
    (expected,) = run_distributed(_pretrain_bert, 1, args=(argv,), timeout=300)
    per_rank = run_distributed(_pretrain_bert, 2, args=(argv + INTERLEAVED,), timeout=300)
    assert {"lm loss", "sop loss"} <= set(expected[0])
    for losses in per_rank:
        assert [sorted(d) for d in losses] == [sorted(d) for d in expected]
        for got, want in zip(losses, expected):
            assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_sctd_with_model_chunks_is_refused_by_name():
    """SCTD's doubled full + dropped batch is built for the plain 1F1B schedule."""
    from distributed_harness import DistributedTestError
    from training_helpers import tiny_bert_argv

    argv = tiny_bert_argv("--random-ltd", "--random-ltd-method", "sctd", "--optimizer", "sgd",
                          iters=2) + INTERLEAVED
    with pytest.raises(DistributedTestError, match="--random-ltd-method sctd with "
                                                   "--num-layers-per-virtual-pipeline-stage"):
        run_distributed(_pretrain_bert, 2, args=(argv,), timeout=120)


@pytest.mark.slow
def test_pretrain_gpt_interleaved_resumes_bitwise(data_prefix, tmp_path):
    straight = pretrain_argv(data_prefix, str(tmp_path / "straight"), *INTERLEAVED, *LTD,
                             iters=4)
    first = pretrain_argv(data_prefix, str(tmp_path / "resumed"), *INTERLEAVED, *LTD,
                          "--exit-interval", "2", iters=4)
    second = pretrain_argv(data_prefix, str(tmp_path / "resumed"), *INTERLEAVED, *LTD,
                           "--load", str(tmp_path / "resumed"), iters=4)
    per_rank = run_distributed(_pretrain, 2, args=([straight, first, second],), timeout=300)
    losses, before, after = (train for train, _ in per_rank[0])
    assert before + after == losses  # exact
    a, b = saved_chunks(str(tmp_path / "straight"), 4), saved_chunks(str(tmp_path / "resumed"), 4)
    for rank in a:
        for key in ("model0", "model1"):
            flat_a, flat_b = flat_model_state(a[rank][key]), flat_model_state(b[rank][key])
            assert flat_a.keys() == flat_b.keys()
            for name in flat_a:
                assert torch.equal(flat_a[name], flat_b[name]), (rank, key, name)


@pytest.mark.slow
def test_interleaved_checkpoint_converts_and_loads_across_layouts(data_prefix, tmp_path):
    """An interleaved checkpoint (model0/model1 per stage) merges in Megatron's virtual-stage
    order: tools/checkpoint_util.py writes the plain layout (model only), and --finetune loads
    weights both ways (interleaved -> one process, plain -> PP 2 x 2 chunks) with the same
    first loss."""
    from megatron.checkpoint_reshard import read_full_model_state
    from tools import checkpoint_util

    vp, plain = str(tmp_path / "vp"), str(tmp_path / "plain")
    run_distributed(_pretrain, 2, args=([pretrain_argv(data_prefix, vp, *INTERLEAVED,
                                                       iters=2)],), timeout=300)
    full, _ = read_full_model_state(vp)
    files = saved_chunks(vp, 2)
    for rank, ckpt in files.items():
        for chunk in (0, 1):
            (layer,) = chunk_layer_ids(4, 2, rank, 1, chunk)
            for name, tensor in flat_model_state(ckpt[f"model{chunk}"]).items():
                if ".layers.0." in name:
                    assert torch.equal(full[name.replace(".layers.0.", f".layers.{layer}.")],
                                       tensor)
    logs = []
    checkpoint_util.convert(vp, plain, 1, 1, log=logs.append)
    assert any("its optimizer state is not" in line for line in logs)
    converted, _ = read_full_model_state(plain)
    assert converted.keys() == full.keys()
    assert all(torch.equal(converted[n], full[n]) for n in full)

    finetune = ["--finetune", "--no-load-optim", "--no-load-rng"]
    (single,) = run_distributed(_pretrain, 1, args=(
        [pretrain_argv(data_prefix, str(tmp_path / "a"), "--load", vp, *finetune, iters=2)],),
        timeout=300)
    per_rank = run_distributed(_pretrain, 2, args=(
        [pretrain_argv(data_prefix, str(tmp_path / "b"), "--load", plain, *finetune,
                       *INTERLEAVED, iters=2)],), timeout=300)
    (fresh,) = run_distributed(_pretrain, 1, args=(
        [pretrain_argv(data_prefix, str(tmp_path / "c"), iters=2)],), timeout=300)
    first_loss = single[0][0][0]  # (training losses, evaluation losses) of the one run
    assert first_loss != pytest.approx(fresh[0][0][0], rel=1e-3)  # the weights were loaded
    for ((train, _),) in per_rank:
        assert train == pytest.approx(single[0][0], rel=1e-5)
