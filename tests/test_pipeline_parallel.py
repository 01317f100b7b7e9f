"""Pipeline parallelism: layer split, schedules, tied embeddings; PP=2 and PP=4 (gloo, CPU) match
the single-process run step for step, with and without random-LTD."""

import contextlib
import re
from types import SimpleNamespace

import pytest
import torch

from distributed_harness import run_distributed
from megatron.errors import UserError
from megatron.ltd.dropping import TokenDropState
from megatron.model import GPTModel
from megatron.model.config import TransformerConfig
from megatron.parallel.initialize import build_parallel_state
from megatron.parallel.pipeline_utils import (allreduce_embedding_grads, initialize_embedding_tie,
                                              parse_layer_split, stage_layer_ids)
from megatron.parallel.schedules import forward_backward
from megatron.parallel.state import ParallelState
from pretrain_gpt import forward_step_provider

MB, NUM_MB, SEQ, HIDDEN, VOCAB, LAYERS = 2, 4, 16, 32, 128, 4
SEED, LR = 1234, 0.5
HEAD_COPY = "word_embeddings.weight"  # the last stage's copy of the tied embedding


def make_config():
    return TransformerConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=4,
                             seq_length=SEQ, padded_vocab_size=VOCAB, hidden_dropout=0.0,
                             attention_dropout=0.0)


def reference_model():
    torch.manual_seed(SEED)
    return GPTModel(make_config())


def micro_batches(count):
    g = torch.Generator().manual_seed(7)
    return [{"text": torch.randint(1, VOCAB, (MB, SEQ + 1), generator=g),
             "index": torch.arange(MB) + MB * i} for i in range(count)]


def recording_forward_step(events):
    """pretrain_gpt's forward_step, recording ('F', k) at each forward and ('B', k) when the
    gradient of micro-batch k's output arrives."""
    inner = forward_step_provider(
        SimpleNamespace(device="cpu", reset_position_ids=False, reset_attention_mask=False,
                        eod_mask_loss=False), SimpleNamespace(eod=0))

    def forward_step(data_iterator, model, token_drop=None):
        k = sum(1 for e in events if e[0] == "F")
        events.append(("F", k))
        output, loss_func = inner(data_iterator, model, token_drop)
        if output.requires_grad:
            output.register_hook(lambda grad: events.append(("B", k)))
        return output, loss_func

    return forward_step


def token_drop_for(step):
    return lambda ids: TokenDropState(SEED, step, {1: 8, 2: 8}, ids)


def train(model, parallel, steps, ltd=False, no_sync=None, num_mb=NUM_MB):
    """``steps`` SGD steps through forward_backward; -> (losses per step, events). ``ltd``:
    True for ``token_drop_for``, or another step -> token_drop function. Each step
    consumes ``num_mb * dp_size`` micro-batches; DP rank d takes the d-th run of ``num_mb``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    step_size = num_mb * parallel.dp_size
    mine = [mb for i, mb in enumerate(micro_batches(steps * step_size))
            if (i % step_size) // num_mb == parallel.dp_rank]
    data, events, losses = iter(mine), [], []
    forward_step = recording_forward_step(events)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        reported = forward_backward(
            forward_step=forward_step, data_iterator=data, model=model, parallel=parallel,
            num_microbatches=num_mb, tensor_shape=(MB, SEQ, HIDDEN), dtype=torch.float32,
            scale_loss=lambda loss: loss,
            token_drop=(ltd if callable(ltd) else token_drop_for)(step) if ltd else None,
            no_sync=no_sync)
        allreduce_embedding_grads(model, parallel)
        optimizer.step()
        losses.append([float(d["lm loss"]) for d in reported])
    return losses, events


def global_name(name, layer_ids):
    return re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{layer_ids[int(m.group(1))]}.", name)


def build_stage(parallel, split=None):
    """This rank's stage, with the reference model's initial weights (by global layer id)."""
    ids = stage_layer_ids(LAYERS, parallel.pp_size, parallel.pp_rank, split)
    stage = GPTModel(make_config(), parallel, pre_process=parallel.is_first_stage,
                     post_process=parallel.is_last_stage, layer_ids=ids)
    full = reference_model().state_dict()
    for name, param in stage.named_parameters():
        if name != HEAD_COPY:  # the tie initialisation fills it
            param.data.copy_(full[global_name(name, ids)])
    return stage, ids


def _pipeline_body(rank, world_size, split, steps, ltd, forward_only, pp=None):
    """One pipeline of ``pp`` stages (default: all ranks); ``forward_only`` None: PP x DP."""
    parallel = build_parallel_state(tp=1, pp=pp or world_size)
    stage, ids = build_stage(parallel, split)
    initialize_embedding_tie(stage, parallel)
    out = {"layer_ids": ids}
    if HEAD_COPY in dict(stage.named_parameters()):
        out["head_copy_at_start"] = stage.word_embeddings.weight.detach().numpy().copy()
    if forward_only is None:  # PP x DP: the stage wrapped in torch DDP over the DP group
        ddp = torch.nn.parallel.DistributedDataParallel(stage, process_group=parallel.dp_group,
                                                        broadcast_buffers=False)
        out["losses"], _ = train(ddp, parallel, steps, ltd, no_sync=ddp.no_sync)
        out["dp_rank"], out["pp_rank"] = parallel.dp_rank, parallel.pp_rank
        out["params"] = stage_params(stage, ids)
        return out
    if forward_only:
        stage.eval()
        events = []
        with torch.no_grad():
            reported = forward_backward(
                forward_step=recording_forward_step(events),
                data_iterator=iter(micro_batches(NUM_MB)), model=[stage], parallel=parallel,
                num_microbatches=NUM_MB, tensor_shape=(MB, SEQ, HIDDEN), dtype=torch.float32,
                scale_loss=lambda loss: loss, forward_only=True)
        out.update(losses=[[float(d["lm loss"]) for d in reported]], events=events,
                   grads=[n for n, p in stage.named_parameters() if p.grad is not None])
        return out
    out["losses"], out["events"] = train(stage, parallel, steps, ltd)
    out["params"] = stage_params(stage, ids)
    return out


def stage_params(stage, ids):
    """Parameters by global name (the LM head's copy as 'head_copy'), as numpy arrays (tensors
    do not outlive the rank's process)."""
    return {"head_copy" if name == HEAD_COPY else global_name(name, ids):
            param.detach().numpy().copy() for name, param in stage.named_parameters()}


def reference_run(steps, ltd, num_mb=NUM_MB):
    model = reference_model()
    losses, _ = train(model, ParallelState(), steps, ltd, num_mb=num_mb)
    return losses, model.state_dict()


def check_against_reference(results, steps, ltd, reference=None):
    """``results``: the stages of one pipeline, in order."""
    ref_losses, ref_params = reference or reference_run(steps, ltd)
    assert all(r["losses"] == [[]] * steps for r in results[:-1])
    torch.testing.assert_close(torch.tensor(results[-1]["losses"]), torch.tensor(ref_losses),
                               rtol=1e-5, atol=0)
    merged = {}
    for r in results:
        assert not set(merged) & (set(r["params"]) - {"head_copy"}), "a layer on two stages"
        merged.update({k: torch.from_numpy(v) for k, v in r["params"].items()
                       if k != "head_copy"})
    assert set(merged) == set(ref_params)
    for name, value in ref_params.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the tied pair: equal at start and, after every step, still identical (bitwise)
    embedding = "language_model.embedding.word_embeddings.weight"
    start = reference_model().state_dict()[embedding]
    assert torch.equal(torch.from_numpy(results[-1]["head_copy_at_start"]), start)
    assert (results[-1]["params"]["head_copy"] == results[0]["params"][embedding]).all()
    assert not torch.equal(merged[embedding], start)  # it did train


# -- layer split -----------------------------------------------------------------------------

def test_stage_layer_ids_even_and_uneven():
    assert [stage_layer_ids(8, 4, r) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [stage_layer_ids(8, 2, r, [3, 5]) for r in range(2)] == [[0, 1, 2],
                                                                    [3, 4, 5, 6, 7]]
    assert parse_layer_split("3,5") == [3, 5]
    with pytest.raises(UserError, match="--num-layers .6. must be divisible by "
                                        "--pipeline-model-parallel-size .4."):
        stage_layer_ids(6, 4, 0)
    with pytest.raises(UserError, match="sums to 7, but --num-layers is 8"):
        stage_layer_ids(8, 2, 0, [3, 4])
    with pytest.raises(UserError, match="--pipeline-layer-split has 3 entries"):
        stage_layer_ids(8, 2, 0, [3, 4, 1])
    with pytest.raises(UserError, match=">= 1"):
        stage_layer_ids(8, 2, 0, [0, 8])
    with pytest.raises(UserError, match="--pipeline-layer-split"):
        parse_layer_split("3;5")


# -- no pipelining ---------------------------------------------------------------------------

def test_without_pipelining_is_the_gradient_accumulation_loop_bitwise():
    # One thread: a multi-threaded BLAS may pick another split (and summation order) when the
    # machine is busy, which is not what this bitwise comparison is about (seen once under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_schedule_with_the_accumulation_loop()
    finally:
        torch.set_num_threads(threads)


def _compare_schedule_with_the_accumulation_loop():
    model = reference_model()
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(1)
        yield

    forward_backward(forward_step=recording_forward_step([]),
                     data_iterator=iter(micro_batches(NUM_MB)), model=model,
                     parallel=ParallelState(), num_microbatches=NUM_MB,
                     tensor_shape=(MB, SEQ, HIDDEN), dtype=torch.float32,
                     scale_loss=lambda loss: loss * 8.0, no_sync=no_sync)
    # train_step's loop, written out
    manual = reference_model()
    forward_step, data = recording_forward_step([]), iter(micro_batches(NUM_MB))
    for _ in range(NUM_MB):
        output, loss_func = forward_step(data, manual)
        loss, _ = loss_func(output)
        (loss / NUM_MB * 8.0).backward()
    for (name, a), b in zip(model.named_parameters(), manual.parameters()):
        assert torch.equal(a.grad, b.grad), name
    # every forward and backward but the last micro-batch's ran inside no_sync
    assert len(entered) == 2 * (NUM_MB - 1)


def test_interleaved_schedule_without_pipeline_parallelism_is_refused_with_the_flag_name():
    with pytest.raises(UserError, match="--num-layers-per-virtual-pipeline-stage needs "
                                        "--pipeline-model-parallel-size > 1"):
        forward_backward(forward_step=None, data_iterator=None,
                         model=[reference_model(), reference_model()],
                         parallel=ParallelState(), num_microbatches=1, tensor_shape=(1,),
                         dtype=torch.float32, scale_loss=lambda loss: loss)


# -- pipelines -------------------------------------------------------------------------------

def test_pp2_1f1b_matches_single_process_and_follows_the_timeline():
    steps = 2
    results = run_distributed(_pipeline_body, 2, args=(None, steps, False, False), timeout=90)
    check_against_reference(results, steps, ltd=False)
    # the documented 1F1B timeline of 2 stages x 4 micro-batches (first step)
    order = lambda events: " ".join(f"{kind}{k}" for kind, k in events[:2 * NUM_MB])  # noqa
    assert order(results[0]["events"]) == "F0 F1 B0 F2 B1 F3 B2 B3"
    assert order(results[1]["events"]) == "F0 B0 F1 B1 F2 B2 F3 B3"


@pytest.mark.slow
def test_pp4_with_random_ltd_matches_single_process():
    steps = 2
    results = run_distributed(_pipeline_body, 4, args=(None, steps, True, False), timeout=90)
    assert [r["layer_ids"] for r in results] == [[0], [1], [2], [3]]
    check_against_reference(results, steps, ltd=True)
    # stage 0 warms up with pp - 1 = 3 forwards, then one forward, then four backwards;
    # the last stage alternates
    order = lambda events: " ".join(f"{kind}{k}" for kind, k in events[:2 * NUM_MB])  # noqa
    assert order(results[0]["events"]) == "F0 F1 F2 F3 B0 B1 B2 B3"
    assert order(results[2]["events"]) == "F0 F1 B0 F2 B1 F3 B2 B3"
    assert order(results[3]["events"]) == "F0 B0 F1 B1 F2 B2 F3 B3"
    # random-LTD changed the computation (else the test would not cover it)
    dense, _ = reference_run(steps, ltd=False)
    assert results[-1]["losses"][0] != pytest.approx(dense[0], rel=1e-4)


@pytest.mark.slow
def test_pp2_uneven_split_with_random_ltd_matches_single_process():
    steps = 2
    results = run_distributed(_pipeline_body, 2, args=([3, 1], steps, True, False), timeout=90)
    assert [r["layer_ids"] for r in results] == [[0, 1, 2], [3]]
    check_against_reference(results, steps, ltd=True)


def test_pp2_forward_only_gives_the_evaluation_losses():
    results = run_distributed(_pipeline_body, 2, args=(None, 1, False, True), timeout=90)
    model = reference_model().eval()
    forward_step, data = recording_forward_step([]), iter(micro_batches(NUM_MB))
    expected = []
    with torch.no_grad():
        for _ in range(NUM_MB):
            output, loss_func = forward_step(data, model)
            expected.append(float(loss_func(output)[0]))
    assert results[0]["losses"] == [[]]
    assert results[1]["losses"][0] == pytest.approx(expected, rel=1e-5)
    for r in results:
        assert [e[0] for e in r["events"]] == ["F"] * NUM_MB
        assert r["grads"] == []


def test_pp2_times_dp2_with_ddp_matches_single_process():
    # ranks 0, 1: stage 0 of DP replicas 0, 1; ranks 2, 3: stage 1. Each replica runs 4 of the
    # step's 8 micro-batches; averaged gradients equal one process running all 8.
    steps = 2
    results = run_distributed(_pipeline_body, 4, args=(None, steps, True, None, 2), timeout=90)
    assert [(r["pp_rank"], r["dp_rank"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    ref_losses, ref_params = reference_run(steps, ltd=True, num_mb=2 * NUM_MB)
    torch.testing.assert_close(
        torch.tensor([a + b for a, b in zip(results[2]["losses"], results[3]["losses"])]),
        torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for replica in (results[0::2], results[1::2]):
        replica[-1] = dict(replica[-1], losses=ref_losses)  # losses checked above
        check_against_reference(replica, steps, True, (ref_losses, ref_params))


def _average_fp16_body(rank, world_size):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from megatron.parallel.schedules import average_gradients

    # fp16 gradients carrying a loss scale: 40000 and 30000 fit in fp16, their sum does not.
    grad = torch.full((4, 3), 40000.0 if rank == 0 else 30000.0, dtype=torch.float16)
    module = torch.nn.Linear(3, 4, bias=False).half()
    module.weight.grad = grad.clone()
    average_gradients(module, dist.group.WORLD)
    ours = module.weight.grad.clone()
    # DDP's reducer on the same gradient (pre-multiplied by 1 / world, then summed)
    ddp = DistributedDataParallel(torch.nn.Linear(3, 4, bias=False).half())
    x = torch.eye(3, dtype=torch.float16)
    ddp(x).backward(grad.t().contiguous().clone())  # d(x W^T)/dW with x = I: grad^T^T = grad
    return ours.float().tolist(), ddp.module.weight.grad.float().tolist()


def test_average_gradients_does_not_overflow_fp16_and_matches_ddp():
    for ours, ddp in run_distributed(_average_fp16_body, 2):
        mean = float(torch.tensor(35000.0, dtype=torch.float16))  # 35008, the nearest fp16
        assert ours == [[mean] * 3] * 4  # inf when the sum is formed in fp16
        assert ours == ddp
