"""bf16 gradients accumulate and all-reduce in fp32 ``main_grad`` buffers (Megatron's
--accumulate-allreduce-grads-in-fp32, forced for bf16)."""

import pytest
import torch
from torch import nn

from distributed_harness import run_distributed
from megatron.arguments import parse_args
from megatron.optim import build_optimizer
from megatron.parallel.data_parallel import attach_main_grads, zero_main_grads
from megatron.parallel.schedules import forward_backward
from megatron.parallel.state import ParallelState
from megatron.training import uses_main_grads
from training_helpers import gpt_argv, run

NUM_MB = 16


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8)).to(torch.bfloat16)


def _micro_batches():
    g = torch.Generator().manual_seed(1)
    # different scales per micro-batch: a bf16 running sum loses the small ones' low bits
    return [(torch.randn(4, 16, generator=g) * (1 + 4 * (i % 3))).to(torch.bfloat16)
            for i in range(NUM_MB)]


def _forward_step(data_iterator, model):
    x = next(data_iterator)
    out = model(x)

    def loss_func(output):
        loss = output.float().pow(2).mean()
        return loss, {"loss": loss.detach()}

    return out, loss_func


def test_micro_batch_grads_accumulate_in_fp32():
    model = _model()
    attach_main_grads(model)
    optimizer = build_optimizer(model, lr=0.0, bf16=True, clip_grad=0.0, optimizer="sgd",
                                log=lambda _: None)
    optimizer.zero_grad()
    zero_main_grads(model)
    forward_backward(forward_step=_forward_step, data_iterator=iter(_micro_batches()),
                     model=model, parallel=ParallelState(), num_microbatches=NUM_MB,
                     tensor_shape=(4, 1, 16), dtype=torch.bfloat16,
                     scale_loss=optimizer.scale_loss)
    assert all(p.grad is None for p in model.parameters())  # freed after each micro-batch
    optimizer.step()
    masters = [m.grad for group in optimizer.fp32_from_float16_groups for m in group]
    order = [p for group in optimizer.float16_groups for p in group]

    # reference: every micro-batch's bf16 gradient on its own, summed in fp32 and in bf16
    reference = _model()
    fp32_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in reference.named_parameters()}
    bf16_sum = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    data = iter(_micro_batches())
    for _ in range(NUM_MB):
        reference.zero_grad(set_to_none=True)
        out, loss_func = _forward_step(data, reference)
        (loss_func(out)[0] / NUM_MB).backward()
        for n, p in reference.named_parameters():
            assert p.grad.dtype == torch.bfloat16
            fp32_sum[n] += p.grad.float()
            bf16_sum[n] += p.grad
    names = {id(p): n for n, p in model.named_parameters()}
    lost_bits = 0
    for param, master in zip(order, masters):
        name = names[id(param)]
        assert master.dtype == torch.float32
        assert torch.equal(master, fp32_sum[name]), name
        lost_bits += int((bf16_sum[name].float() != fp32_sum[name]).sum())
    assert lost_bits > 0  # bf16 accumulation would have given other gradients


def test_flag_is_forced_for_bf16_and_ignored_for_fp32():
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "10", "--lr",
            "1e-3", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]
    flag = "--accumulate-allreduce-grads-in-fp32"
    cases = {(): False, (flag,): False, ("--bf16",): True, ("--bf16", flag): True,
             ("--fp16",): False, ("--fp16", flag): True}
    for extra, want in cases.items():
        args = parse_args(base + list(extra))
        assert args.accumulate_allreduce_grads_in_fp32 is want, extra
        assert uses_main_grads(args) is want, extra


# -- bf16 under DP / PP / TP matches one process -------------------------------------------------

def _argv(data_prefix, *extra):
    return gpt_argv(data_prefix, "--num-layers", "4", "--micro-batch-size", "1",
                    "--global-batch-size", "4", "--hidden-dropout", "0",
                    "--attention-dropout", "0", "--eval-interval", "100", "--eval-iters", "1",
                    "--optimizer", "sgd", "--lr", "0.05", "--bf16", *extra, iters=3)


def _train(rank, world_size, argv):
    result, _ = run(argv)
    main_grads = all(getattr(p, "main_grad", None) is not None for p in result.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in result.model.parameters())
    # numpy (exact for bf16 values): tensors would travel through shared memory
    params = {n: p.detach().float().numpy() for n, p in result.model.named_parameters()}
    return [d["lm loss"] for _, d in result.train_losses], main_grads, params


@pytest.fixture(scope="module")
def bf16_reference(data_prefix):
    result, _ = run(_argv(data_prefix))
    assert all(p.main_grad.dtype == torch.float32 for p in result.model.parameters())
    return ([d["lm loss"] for _, d in result.train_losses],
            {n: p.detach().clone() for n, p in result.model.named_parameters()})


LAYOUTS = {
    "DP2": (2, []),
    "PP2": (2, ["--pipeline-model-parallel-size", "2"]),
    "TP2": (2, ["--tensor-model-parallel-size", "2"]),
    "TP2xPP2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "PP2xDP2": (4, ["--pipeline-model-parallel-size", "2"]),
    "DP2-distributed-optimizer": (2, ["--use-distributed-optimizer"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bf16_layout_matches_single_process(layout, data_prefix, bf16_reference):
    world, flags = LAYOUTS[layout]
    per_rank = run_distributed(_train, world, args=(_argv(data_prefix, *flags),), timeout=300)
    ref_losses, ref_params = bf16_reference
    for losses, main_grads, _ in per_rank:
        assert main_grads
        assert losses == pytest.approx(ref_losses, rel=1e-3)
    assert ref_losses[-1] < ref_losses[0]
    if layout.startswith("DP2"):  # whole model per rank: replicas identical, close to one process's
        first = per_rank[0][2]
        for name, value in ref_params.items():
            assert (per_rank[1][2][name] == first[name]).all(), name
            torch.testing.assert_close(torch.from_numpy(first[name]), value.float(), rtol=0,
                                       atol=1e-2, msg=lambda m, name=name: f"{name}: {m}")


def test_fp16_with_the_flag_trains_through_loss_scaling(data_prefix):
    """fp16 + --accumulate-allreduce-grads-in-fp32: the dynamic loss scale's first steps
    overflow (inf in main_grad, step skipped, buffers zeroed next step), later ones train."""
    result, logs = run(gpt_argv(data_prefix, "--fp16", "--accumulate-allreduce-grads-in-fp32",
                                "--initial-loss-scale", "65536", iters=8))
    assert all(p.main_grad.dtype == torch.float32 for p in result.model.parameters())
    losses = [d["lm loss"] for _, d in result.train_losses]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
