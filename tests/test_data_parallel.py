"""Data parallelism on gloo ranks: DDP equals one process with the whole batch, ZeRO-1
(--use-distributed-optimizer) equals the replicated optimizer with half the state per rank,
and checkpoints are written per (tp, pp) rank with the DP-gathered RNG states."""

import argparse
import copy
import os

import pytest
import torch

from distributed_harness import run_distributed

V, H, HEADS, S = 64, 16, 2, 8
GLOBAL_BATCH, MICRO_BATCH = 8, 2


def _model(dtype=torch.float32):
    from megatron.model import GPTModel, TransformerConfig

    torch.manual_seed(1234)
    cfg = TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=HEADS,
                            seq_length=S, padded_vocab_size=V, hidden_dropout=0.0,
                            attention_dropout=0.0, params_dtype=dtype)
    model = GPTModel(cfg)
    with torch.no_grad():  # visible biases and norms
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _batches(steps):
    g = torch.Generator().manual_seed(99)
    return [torch.randint(0, V, (GLOBAL_BATCH, S + 1), generator=g) for _ in range(steps)]


def _loss(model, tokens):
    return model(tokens[:, :-1], labels=tokens[:, 1:]).float().mean()


def _train_steps(model, optimizer, batches, rank, dp, no_sync=None):
    """Megatron's step on this rank's slice: micro-batches, loss / num_micro_batches, the
    reduction skipped on all but the last micro-batch."""
    import contextlib

    per_rank = GLOBAL_BATCH // dp
    n_micro = per_rank // MICRO_BATCH
    for tokens in batches:
        optimizer.zero_grad()
        mine = tokens[rank * per_rank:(rank + 1) * per_rank]
        for i in range(n_micro):
            ctx = no_sync() if (no_sync is not None and i < n_micro - 1) \
                else contextlib.nullcontext()
            with ctx:
                loss = _loss(model, mine[i * MICRO_BATCH:(i + 1) * MICRO_BATCH])
                optimizer.scale_loss(loss / n_micro).backward()
        optimizer.step()


def _parallel(tp=1, pp=1):
    from megatron.parallel.initialize import build_parallel_state

    return build_parallel_state(tp, pp)


def _ddp_body(rank, world_size):
    from megatron.optim import build_optimizer
    from megatron.parallel.data_parallel import no_sync_factory, unwrap, wrap_data_parallel

    parallel = _parallel()
    assert parallel.dp_size == 2
    # one process, whole global batch as 4 micro-batches of 2 (no communication)
    reference = _model()
    ref_opt = build_optimizer(reference, lr=1e-2, clip_grad=1.0, log=lambda *_: None)
    batches = _batches(1)
    _train_steps(reference, ref_opt, batches, 0, 1)
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}

    model = _model()
    if rank == 1:  # DDP broadcasts DP rank 0's weights at wrapping
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    wrapped = wrap_data_parallel(model, parallel, bucket_cap_mb=0.01)  # several buckets
    assert unwrap(wrapped) is model
    no_sync = no_sync_factory(wrapped)
    assert no_sync is not None
    optimizer = build_optimizer(wrapped, lr=1e-2, clip_grad=1.0, log=lambda *_: None)
    # keep the grads for comparison: step without zero_grad after it
    _train_steps(wrapped, optimizer, batches, rank, 2, no_sync)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    # a second step, without no_sync (reduction after each micro-batch) still agrees
    batches = _batches(2)[1:]
    _train_steps(reference, ref_opt, batches, 0, 1)
    _train_steps(wrapped, optimizer, batches, rank, 2)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    return True


def test_ddp_equals_one_process_with_the_global_batch():
    assert run_distributed(_ddp_body, 2, timeout=90) == [True, True]


def test_no_wrapper_with_one_dp_rank():
    from megatron.parallel.data_parallel import no_sync_factory, unwrap, wrap_data_parallel
    from megatron.parallel.state import ParallelState

    model = torch.nn.Linear(2, 2)
    assert wrap_data_parallel(model, ParallelState()) is model
    assert no_sync_factory(model) is None and unwrap(model) is model


def _bf16_reduction_body(rank, world_size):
    from megatron.parallel.data_parallel import wrap_data_parallel
    from megatron.parallel.schedules import average_gradients

    parallel = _parallel()
    # rank r's gradient: 1 at positions r, r + 4, 2^-9 elsewhere. The mean in fp32 is
    # (1 + 3 * 2^-9) / 4, which rounds to 1.0078125 / 4 in bf16; a sum formed in bf16 drops
    # 2^-9 next to 1 (at least where the 1 is added first) and gives 1 / 4.
    grad = torch.full((8,), 2.0 ** -9)
    grad[rank::world_size] = 1.0
    model = torch.nn.Linear(1, 8, bias=False).to(torch.bfloat16)
    wrapped = wrap_data_parallel(model, parallel)
    wrapped(torch.ones(1, 1, dtype=torch.bfloat16)).backward(
        grad.to(torch.bfloat16).view(1, 8))  # d(x W^T)/dW with x = 1: the gradient itself
    module = torch.nn.Linear(1, 8, bias=False).to(torch.bfloat16)  # the PP > 1 path
    module.weight.grad = grad.to(torch.bfloat16).view(8, 1)
    average_gradients(module, parallel.dp_group)
    return model.weight.grad.float().view(-1).tolist(), module.weight.grad.float().view(-1).tolist()


def test_bf16_gradients_are_averaged_in_fp32():
    mean = float(torch.tensor((1 + 3 * 2.0 ** -9) / 4).to(torch.bfloat16))
    assert mean == 1.0078125 / 4
    for ddp, averaged in run_distributed(_bf16_reduction_body, 4):
        assert ddp == [mean] * 8
        assert averaged == [mean] * 8


def _zero_body(rank, world_size, dtype_name):
    from megatron.optim import build_optimizer
    from megatron.optim.distributed import dp_all_equal, is_zero, local_state_numel
    from megatron.parallel.data_parallel import no_sync_factory, wrap_data_parallel

    dtype = getattr(torch, dtype_name)
    half = dtype != torch.float32
    parallel = _parallel()
    batches = _batches(4)
    runs = {}
    for distributed in (False, True):
        model = _model(dtype)
        wrapped = wrap_data_parallel(model, parallel)
        opt = build_optimizer(wrapped, lr=1e-2, clip_grad=0.05, bf16=half,
                              use_distributed_optimizer=distributed,
                              data_parallel_group=parallel.dp_group, log=lambda *_: None)
        assert is_zero(opt.optimizer) == distributed
        _train_steps(wrapped, opt, batches[:3], rank, 2, no_sync_factory(wrapped))
        runs[distributed] = (model, wrapped, opt)
    (m_rep, w_rep, o_rep), (m_zero, _, o_zero) = runs[False], runs[True]
    for (name, a), b in zip(m_rep.named_parameters(), m_zero.parameters()):
        assert torch.equal(a, b), name  # identical after 3 clipped steps
    assert dp_all_equal(list(m_zero.parameters()), parallel.dp_group)
    full, mine = local_state_numel(o_rep.optimizer), local_state_numel(o_zero.optimizer)
    n_params = sum(p.numel() for p in m_rep.parameters())
    assert full == 2 * n_params
    # greedy partition: about half of the elements on each rank
    assert 0.4 * full <= mine <= 0.6 * full, (mine, full)

    # consolidated state = the replicated optimizer's state (layout independent)
    state_rep, state_zero = o_rep.state_dict(), o_zero.state_dict()
    inner_rep, inner_zero = (state_rep["optimizer"], state_zero["optimizer"]) if half \
        else (state_rep, state_zero)
    if rank != 0:
        assert inner_zero is None
    else:
        assert sorted(inner_zero["state"]) == sorted(inner_rep["state"])
        for index, entry in inner_rep["state"].items():
            for key, value in entry.items():
                assert torch.equal(value, inner_zero["state"][index][key]), (index, key)
    # resume: the replicated run's state loads into ZeRO (each rank keeps its part) and the
    # next step equals the replicated run's next step
    loaded = _model(dtype)
    with torch.no_grad():
        for p, q in zip(loaded.parameters(), m_rep.parameters()):
            p.copy_(q)
    w_loaded = wrap_data_parallel(loaded, parallel)
    o_loaded = build_optimizer(w_loaded, lr=1e-2, clip_grad=0.05, bf16=half,
                               use_distributed_optimizer=True,
                               data_parallel_group=parallel.dp_group, log=lambda *_: None)
    o_loaded.load_state_dict(copy.deepcopy(state_rep))  # as if read from a file
    assert local_state_numel(o_loaded.optimizer) == mine
    _train_steps(w_loaded, o_loaded, batches[3:], rank, 2, no_sync_factory(w_loaded))
    _train_steps(w_rep, o_rep, batches[3:], rank, 2, no_sync_factory(w_rep))
    for (name, a), b in zip(loaded.named_parameters(), m_rep.parameters()):
        assert torch.equal(a, b), name
    return mine, full


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_distributed_optimizer_equals_replicated_with_half_the_state(dtype_name):
    out = run_distributed(_zero_body, 2, args=(dtype_name,), timeout=90)
    assert sum(m for m, _ in out) == out[0][1]  # the shards partition the state


class _Sched:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


def _ckpt_args(root, **kw):
    base = dict(save=root, load=root, no_save_optim=False, no_save_rng=False,
                no_load_optim=False, no_load_rng=False, finetune=False,
                exit_on_missing_checkpoint=True, tensor_model_parallel_size=1,
                pipeline_model_parallel_size=2)
    base.update(kw)
    return argparse.Namespace(**base)


def _ckpt_body(rank, world_size, root, phase):
    from megatron.checkpointing import TrainState, load_checkpoint, save_checkpoint
    from megatron.optim import build_optimizer
    from megatron.parallel.data_parallel import unwrap, wrap_data_parallel

    parallel = _parallel(tp=1, pp=2)
    torch.manual_seed(10 + parallel.pp_rank)  # the stages differ, DP replicas agree
    model = wrap_data_parallel(torch.nn.Linear(4, 3), parallel)
    opt = build_optimizer(model, lr=0.1, use_distributed_optimizer=True,
                          data_parallel_group=parallel.dp_group, log=lambda *_: None)
    logs = []
    if phase == "save":
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        torch.manual_seed(1000 + rank)  # a different RNG stream on every rank
        save_checkpoint(_ckpt_args(root), TrainState(iteration=5), model, opt, _Sched(),
                        log=logs.append, parallel=parallel)
        # plain lists: tensors would travel through shared memory the exiting rank frees
        return torch.rand(3).tolist(), {k: v.tolist() for k, v in
                                        unwrap(model).state_dict().items()}
    state, _ = load_checkpoint(_ckpt_args(root), model, opt, _Sched(), log=logs.append,
                               parallel=parallel)
    assert state.iteration == 5
    return (torch.rand(3).tolist(), {k: v.tolist() for k, v in unwrap(model).state_dict().items()},
            [line for line in logs if "WARNING" in line])


def test_checkpoint_per_rank_with_dp_gathered_rng(tmp_path):
    from megatron.checkpointing import TRACKER_FILENAME, checkpoint_file

    root = str(tmp_path / "ckpt")
    saved = run_distributed(_ckpt_body, 4, args=(root, "save"), timeout=90)
    with open(os.path.join(root, TRACKER_FILENAME)) as f:
        assert f.read() == "5"
    for pp in range(2):
        ckpt = torch.load(checkpoint_file(root, 5, 0, pp, 2), weights_only=False)
        assert len(ckpt["rng_state"]) == 2  # one per DP rank
        assert set(ckpt["optimizer"]["state"]) == {0, 1}  # consolidated: both parameters
    assert sorted(os.listdir(os.path.join(root, "iter_0000005"))) == \
        ["mp_rank_00_000", "mp_rank_00_001"]
    # DP 2 -> 2: each rank continues its own RNG stream; weights are per stage
    loaded = run_distributed(_ckpt_body, 4, args=(root, "load"), timeout=90)
    for rank in range(4):
        assert saved[rank][0] == loaded[rank][0]
        assert not loaded[rank][2]
        for key, value in saved[rank][1].items():
            assert value == loaded[rank][1][key]
    # DP 2 -> 1: entry 0 of the RNG list, with a warning
    loaded = run_distributed(_ckpt_body, 2, args=(root, "load"), timeout=90)
    for rank, stage_rank in ((0, 0), (1, 2)):
        assert saved[stage_rank][0] == loaded[rank][0]
        assert loaded[rank][2] and "data-parallel" in loaded[rank][2][0]
        for key, value in saved[stage_rank][1].items():
            assert value == loaded[rank][1][key]


def _zero_resume_body(rank, world_size, device_name):
    import io

    import torch.distributed as dist

    from megatron.optim import build_optimizer
    from megatron.optim.distributed import is_zero

    device = torch.device(device_name)

    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(8, 8).to(device)

    def build(model):
        return build_optimizer(model, lr=1e-2, use_distributed_optimizer=True,
                               data_parallel_group=dist.group.WORLD, log=lambda *_: None)

    def step(model, opt):
        opt.zero_grad()
        model(torch.ones(2, 8, device=device)).square().sum().backward()
        opt.step()

    model = make()
    opt = build(model)
    assert is_zero(opt.optimizer)
    step(model, opt)
    buf = io.BytesIO()  # as a checkpoint file, read back onto the CPU
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, map_location="cpu", weights_only=False)
    resumed_model = make()
    with torch.no_grad():
        for p, q in zip(resumed_model.parameters(), model.parameters()):
            p.copy_(q)
    resumed = build(resumed_model)
    resumed.load_state_dict(saved)
    local = resumed.optimizer.optim
    fused = bool(local.param_groups[0].get("fused"))
    for param, state in local.state.items():
        if fused:  # the fused kernels read the counters on the parameters' device
            assert state["step"].device == param.device
    # on GPU the fused step raised "Expected all tensors to be on the same device" here
    step(resumed_model, resumed)
    step(model, opt)
    return fused, all(torch.equal(a, b) for a, b in
                      zip(resumed_model.parameters(), model.parameters()))


def test_distributed_optimizer_resumes_with_fused_adamw():
    # one rank is enough: ZeroRedundancyOptimizer.load_state_dict moves Adam's step counters to
    # the CPU whatever the DP size (harmless on CPU: this checks the resume itself)
    [(_, same)] = run_distributed(_zero_resume_body, 1, args=("cpu",), timeout=90)
    assert same  # the resumed run continues exactly as the uninterrupted one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_distributed_optimizer_resumes_with_fused_adamw_on_gpu():
    # In this process (a forked rank cannot use CUDA once the parent has): one NCCL rank.
    import torch.distributed as dist

    from distributed_harness import free_port

    assert not dist.is_initialized()
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        fused, same = _zero_resume_body(0, 1, "cuda:0")
    finally:
        dist.destroy_process_group()
    assert fused  # build_optimizer picks the fused AdamW on GPU
    assert same  # raised "Expected all tensors to be on the same device" (state_steps) before
