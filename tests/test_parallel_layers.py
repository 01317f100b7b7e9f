"""Tensor-parallel layers, mappings, vocab-parallel cross entropy and the RNG tracker."""

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from megatron.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.parallel.mappings import (
    copy_to_tp_region, gather_from_tp_region, reduce_from_tp_region, scatter_to_tp_region)
from megatron.parallel.random import (
    MODEL_PARALLEL_RNG, RNGStatesTracker, build_rng_tracker, model_parallel_seed, tp_region_rng)
from megatron.parallel.state import ParallelState

INIT = lambda t: torch.nn.init.normal_(t, std=0.02)  # noqa: E731


def _ranks(tp):
    return [ParallelState(tp_size=tp, tp_rank=r) for r in range(tp)]


def test_parallel_state_defaults_and_validation():
    p = ParallelState()
    assert (p.tp_size, p.pp_size, p.dp_size, p.tp_group) == (1, 1, 1, None)
    assert p.is_first_stage and p.is_last_stage
    with pytest.raises(ValueError):
        ParallelState(tp_size=2, tp_rank=2)


def test_mappings_are_identity_at_tp1():
    x = torch.randn(2, 3, 4)
    p = ParallelState()
    for fn in (copy_to_tp_region, reduce_from_tp_region, scatter_to_tp_region,
               gather_from_tp_region):
        assert fn(x, p) is x


@pytest.mark.parametrize("tp", [2, 4])
def test_partition_shapes_and_master_init(tp):
    """Per-rank shapes; the partitions concatenate to the TP=1 weight drawn from the same seed."""
    torch.manual_seed(0)
    full_col = ColumnParallelLinear(8, 16, init_method=INIT).weight
    torch.manual_seed(0)
    full_row = RowParallelLinear(16, 8, init_method=INIT).weight
    torch.manual_seed(0)
    full_emb = VocabParallelEmbedding(32, 8, init_method=INIT).weight
    cols, rows, embs = [], [], []
    for p in _ranks(tp):
        torch.manual_seed(0)
        col = ColumnParallelLinear(8, 16, init_method=INIT, parallel=p)
        torch.manual_seed(0)
        row = RowParallelLinear(16, 8, init_method=INIT, parallel=p)
        torch.manual_seed(0)
        emb = VocabParallelEmbedding(32, 8, init_method=INIT, parallel=p)
        assert col.weight.shape == (16 // tp, 8) and col.bias.shape == (16 // tp,)
        assert row.weight.shape == (8, 16 // tp) and row.bias.shape == (8,)
        assert emb.weight.shape == (32 // tp, 8)
        dims = (col.weight.partition_dim, row.weight.partition_dim, emb.weight.partition_dim)
        assert dims == (0, 1, 0)
        assert col.weight.tensor_model_parallel and col.bias.tensor_model_parallel
        assert not row.bias.tensor_model_parallel
        assert emb.vocab_start_index == p.tp_rank * 32 // tp
        cols.append(col.weight)
        rows.append(row.weight)
        embs.append(emb.weight)
    torch.testing.assert_close(torch.cat(cols, 0), full_col, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(rows, 1), full_row, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(embs, 0), full_emb, rtol=0, atol=0)


def test_linear_forward_tp1():
    torch.manual_seed(0)
    col = ColumnParallelLinear(8, 12, init_method=INIT)
    row = RowParallelLinear(12, 8, init_method=INIT, bias=False)
    with torch.no_grad():
        col.bias.normal_()
    x = torch.randn(2, 5, 8)
    y = col(x)
    assert torch.is_tensor(y) and y.shape == (2, 5, 12)
    torch.testing.assert_close(y, x @ col.weight.T + col.bias)
    torch.testing.assert_close(row(y), y @ row.weight.T)
    skip = ColumnParallelLinear(8, 12, init_method=INIT, skip_bias_add=True)
    out, bias = skip(x)
    assert bias is skip.bias
    torch.testing.assert_close(out, x @ skip.weight.T)
    emb = VocabParallelEmbedding(10, 4, init_method=INIT)
    ids = torch.tensor([[0, 9, 3]])
    torch.testing.assert_close(emb(ids), emb.weight[ids])


def test_bf16_params():
    col = ColumnParallelLinear(8, 12, init_method=INIT, params_dtype=torch.bfloat16)
    assert col.weight.dtype == torch.bfloat16 and col.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(2, 7, 50) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, 50, (2, 7))
    loss = vocab_parallel_cross_entropy(logits, target)
    assert loss.dtype == torch.float32 and loss.shape == (2, 7)
    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits.transpose(1, 2), target, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    weights = torch.rand(2, 7)
    (loss * weights).sum().backward()
    (ref * weights).sum().backward()
    assert logits.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, rtol=tol, atol=tol)
    assert torch.equal(logits.detach(), ref_logits.detach().to(dtype))  # input untouched


def test_cross_entropy_inplace_reuses_logits():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, requires_grad=True)
    w = torch.randn(16, 30, requires_grad=True)
    target = torch.randint(0, 30, (2, 4))
    logits = x @ w  # [2, 4, 30]
    ptr = logits.data_ptr()
    loss = vocab_parallel_cross_entropy(logits, target, inplace=True)
    # The logits buffer now holds the softmax.
    assert logits.data_ptr() == ptr
    torch.testing.assert_close(logits.sum(-1), torch.ones(2, 4))
    loss.sum().backward()
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    F.cross_entropy((x2 @ w2).transpose(1, 2), target, reduction="sum").backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_rng_tracker_fork_and_states():
    tracker = build_rng_tracker(seed=1234, tp_rank=1)
    assert tracker.has(MODEL_PARALLEL_RNG)
    assert model_parallel_seed(1234, 1) == 1234 + 2718 + 1
    torch.manual_seed(7)
    default_before = torch.get_rng_state()
    saved = tracker.get_states()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), default_before)  # default generator untouched
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the tracked state advanced
    expected = torch.Generator().manual_seed(1234 + 2718 + 1)
    torch.testing.assert_close(a, torch.rand(4, generator=expected))
    tracker.set_states(saved)
    with tracker.fork():
        torch.testing.assert_close(torch.rand(4), a)
    with pytest.raises(RuntimeError):
        tracker.add(MODEL_PARALLEL_RNG, 5)
    with pytest.raises(RuntimeError):
        with RNGStatesTracker().fork("missing"):
            pass


def test_tp_region_rng_without_tracker():
    with tp_region_rng(ParallelState()):
        pass
    with pytest.raises(RuntimeError):
        tp_region_rng(ParallelState(tp_size=2, tp_rank=0))


# ---- two real gloo ranks: the TP path matches TP=1 ------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp2_worker(rank, port, result_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    p = ParallelState(tp_size=2, tp_rank=rank, tp_group=dist.group.WORLD)
    torch.manual_seed(0)
    emb = VocabParallelEmbedding(16, 8, init_method=INIT, parallel=p)
    col = ColumnParallelLinear(8, 12, init_method=INIT, parallel=p)
    row = RowParallelLinear(12, 8, init_method=INIT, parallel=p)
    head = ColumnParallelLinear(8, 16, bias=False, init_method=INIT, parallel=p)
    ids = torch.tensor([[1, 15, 8, 3], [0, 7, 9, 12]])
    hidden = row(F.gelu(col(emb(ids))))  # [2, 4, 8]
    logits = head(hidden)  # [2, 4, 8] per rank
    loss = vocab_parallel_cross_entropy(logits, ids, p)
    loss.sum().backward()
    full_logits = gather_from_tp_region(logits.detach(), p)
    grads = {"emb": emb.weight.grad, "col": col.weight.grad, "row": row.weight.grad}
    torch.save({"loss": loss.detach(), "logits": full_logits, "grads": grads},
               os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_tp2_matches_tp1(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_tp2_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.manual_seed(0)
    emb = VocabParallelEmbedding(16, 8, init_method=INIT)
    col = ColumnParallelLinear(8, 12, init_method=INIT)
    row = RowParallelLinear(12, 8, init_method=INIT)
    head = ColumnParallelLinear(8, 16, bias=False, init_method=INIT)
    ids = torch.tensor([[1, 15, 8, 3], [0, 7, 9, 12]])
    logits = head(row(F.gelu(col(emb(ids)))))
    ref = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    ref.sum().backward()
    for r in (r0, r1):
        torch.testing.assert_close(r["loss"], ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["logits"], logits.detach(), rtol=1e-5, atol=1e-6)
    for name, layer, dim in (("emb", emb, 0), ("col", col, 0), ("row", row, 1)):
        gathered = torch.cat([r0["grads"][name], r1["grads"][name]], dim)
        torch.testing.assert_close(gathered, layer.weight.grad)


@pytest.mark.parametrize("tp_rank", [None, 0, 1], ids=["tp1", "tp2-rank0", "tp2-rank1"])
def test_embedding_gradient_goes_sparse_into_an_fp32_main_grad(tp_rank, monkeypatch):
    """bf16 with fp32 main grads: the lookup's gradient is the looked-up rows only (sparse),
    summed into main_grad in fp32 (duplicate ids too); ids outside a TP rank's range add
    nothing (one rank's half alone: the cross-rank sum is left out). Without a main_grad the
    gradient stays dense, as before."""
    import megatron.parallel.layers as layers
    from megatron.parallel.data_parallel import attach_main_grads

    monkeypatch.setattr(layers, "reduce_from_tp_region", lambda tensor, parallel: tensor)
    parallel = ParallelState() if tp_rank is None else ParallelState(tp_size=2, tp_rank=tp_rank)
    torch.manual_seed(0)
    emb = VocabParallelEmbedding(16, 8, init_method=INIT, parallel=parallel,
                                 params_dtype=torch.bfloat16)
    ids = torch.tensor([[1, 15, 8, 3, 1], [0, 7, 9, 12, 1]])  # id 1 three times
    g = torch.Generator().manual_seed(2)
    grad_out = torch.randn(2, 5, 8, generator=g).to(torch.bfloat16)
    emb(ids).backward(grad_out)
    dense = emb.weight.grad
    assert dense.layout == torch.strided and dense.dtype == torch.bfloat16
    emb.weight.grad = None
    attach_main_grads(emb)
    emb(ids).backward(grad_out)
    assert emb.weight.grad is None  # the hook took it
    want = torch.zeros(emb.weight.shape)
    start = emb.vocab_start_index
    for i, token in enumerate(ids.flatten().tolist()):
        if start <= token < emb.vocab_end_index:
            want[token - start] += grad_out.reshape(-1, 8)[i].float()
    assert torch.equal(emb.weight.main_grad, want)
    torch.testing.assert_close(emb.weight.main_grad, dense.float(), atol=2e-2, rtol=0)
