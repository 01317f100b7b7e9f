"""The data-parallel all-reduce overlapped with backward (``OverlappedGradReducer``) gives the
gradients of the all-reduce after backward (``allreduce_gradients``), bitwise, under PP2 x DP2
(fp32 ``.grad``) and DP2 with bf16 parameters (fp32 ``main_grad``), and its first bucket starts
before backward has produced the step's last gradient (gloo, CPU)."""

import torch

from distributed_harness import run_distributed
from megatron.parallel.data_parallel import (OverlappedGradReducer, allreduce_gradients,
                                             attach_main_grads, grad_buffer)
from megatron.parallel.initialize import build_parallel_state
from megatron.parallel.pipeline_utils import allreduce_embedding_grads, initialize_embedding_tie
from megatron.parallel.schedules import forward_backward
from test_pipeline_parallel import (HIDDEN, MB, NUM_MB, SEQ, build_stage, micro_batches,
                                    recording_forward_step, reference_model, token_drop_for)

BUCKET_MB = 0.02  # about 5000 fp32 values: several buckets in the tiny model


def one_step(model, parallel, events, no_sync=None, dtype=torch.float32):
    """One step's forward and backward passes over this DP rank's micro-batches."""
    mine = micro_batches(NUM_MB * parallel.dp_size)[NUM_MB * parallel.dp_rank:][:NUM_MB]
    forward_backward(forward_step=recording_forward_step(events), data_iterator=iter(mine),
                     model=model, parallel=parallel, num_microbatches=NUM_MB,
                     tensor_shape=(MB, SEQ, HIDDEN), dtype=dtype, scale_loss=lambda loss: loss,
                     token_drop=token_drop_for(0), no_sync=no_sync)


def grads(model):
    """By name, as numpy arrays (tensors do not outlive the rank's process)."""
    return {n: grad_buffer(p).detach().float().numpy().copy()
            for n, p in model.named_parameters()}


def compare_overlap(build, parallel, dtype=torch.float32):
    """-> (overlapped grads, after-backward grads, event order, bucket count) for two models
    from ``build()``."""
    model, after = build(), build()
    if dtype == torch.bfloat16:
        attach_main_grads(model)
        attach_main_grads(after)
    events = []
    reducer = OverlappedGradReducer(model, parallel.dp_group, bucket_cap_mb=BUCKET_MB,
                                    on_start=lambda i: events.append(("start", i)))
    first = next(model.parameters())  # reached last by backward
    first.register_post_accumulate_grad_hook(lambda p: events.append(("first param",)))
    one_step(model, parallel, events, reducer.no_sync, dtype)
    reducer.finish()
    allreduce_embedding_grads(model, parallel)
    one_step(after, parallel, [], None, dtype)
    allreduce_gradients(after, parallel.dp_group, bucket_cap_mb=BUCKET_MB)
    allreduce_embedding_grads(after, parallel)
    return grads(model), grads(after), events, len(reducer.buckets)


def _pp2_dp2_body(rank, world_size):
    parallel = build_parallel_state(tp=1, pp=2)

    def build():
        stage, _ = build_stage(parallel)
        initialize_embedding_tie(stage, parallel)
        return stage

    return (parallel.pp_rank, parallel.dp_rank, *compare_overlap(build, parallel))


def _bf16_dp2_body(rank, world_size):
    parallel = build_parallel_state(tp=1, pp=1)
    return compare_overlap(lambda: reference_model().to(torch.bfloat16), parallel,
                           torch.bfloat16)


def check(overlapped, after, events, buckets):
    assert buckets > 2
    assert overlapped.keys() == after.keys()
    for name in after:
        assert (overlapped[name] == after[name]).all(), name
    assert any(g.any() for g in after.values())
    # every bucket started once, in order; the first during the step's last backward, before
    # the gradient of the first parameter (the last one backward reaches) was accumulated
    starts = [e[1] for e in events if e[0] == "start"]
    assert starts == list(range(buckets))
    last_grad = len(events) - 1 - events[::-1].index(("first param",))
    assert events.index(("start", 0)) < last_grad


def test_overlapped_reduction_equals_the_reduction_after_backward_under_pp2_dp2():
    results = run_distributed(_pp2_dp2_body, 4, timeout=120)
    assert [(r[0], r[1]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for _, _, *rest in results:
        check(*rest)
    # the replicas of a stage end with the same (averaged) gradients
    for a, b in ((results[0], results[1]), (results[2], results[3])):
        for name in a[2]:
            assert (a[2][name] == b[2][name]).all(), name


def test_overlapped_reduction_of_bf16_main_grads_equals_the_reduction_after_backward():
    for result in run_distributed(_bf16_dp2_body, 2, timeout=120):
        check(*result)
