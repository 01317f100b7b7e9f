import copy
import io
import math

import pytest
import torch

from megatron.errors import UserError
from megatron.optim import (
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    OptimizerParamScheduler,
    build_optimizer,
    clip_grad_norm_fp32,
    count_zeros_fp32,
    get_grads_for_norm,
    get_param_groups,
)

quiet = dict(log=lambda msg: None)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8),
                               torch.nn.Linear(8, 3))


def set_grads(model, step, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)


def test_param_groups_no_decay_for_biases_and_norms():
    model = tiny_model()
    groups = get_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    by_wd = {g["wd_mult"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert by_wd == {1.0: ["0.weight", "2.weight"],
                     0.0: ["0.bias", "1.bias", "1.weight", "2.bias"]}
    assert all(g["lr_mult"] == 1.0 for g in groups)
    scaled = get_param_groups(model, lr_mult=0.1, scale_lr_cond=lambda n, p: n.startswith("2."))
    assert sorted((g["wd_mult"], g["lr_mult"], len(g["params"])) for g in scaled) == [
        (0.0, 0.1, 1), (0.0, 1.0, 3), (1.0, 0.1, 1), (1.0, 1.0, 1)]


def test_fp32_step_equals_torch_adamw():
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                          adam_eps=1e-8, clip_grad=0.0, **quiet)
    assert isinstance(opt, FP32Optimizer)
    decay = [ref[0].weight, ref[2].weight]
    no_decay = [ref[0].bias, ref[1].weight, ref[1].bias, ref[2].bias]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                fused=opt.param_groups[0]["fused"] or None)
    x = torch.randn(5, 4)
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
        assert opt.step() == (True, None, None)
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_weight_decay_skips_biases_and_norms():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=0.5, weight_decay=0.1, clip_grad=0.0, **quiet)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)   # Adam's update is 0: only weight decay moves params
    opt.step()
    for n, p in model.named_parameters():
        factor = (1 - 0.5 * 0.1) if n in ("0.weight", "2.weight") else 1.0
        assert torch.allclose(p, before[n] * factor, rtol=0, atol=1e-7), n


def test_main_grad_is_used():
    model = tiny_model()
    opt = build_optimizer(model, lr=0.1, clip_grad=0.0, optimizer="sgd", sgd_momentum=0.0,
                          weight_decay=0.0, **quiet)
    w = model[0].weight
    before = w.detach().clone()
    w.main_grad = torch.ones_like(w)
    opt.step()
    assert torch.allclose(w, before - 0.1)


def test_bf16_masters_stay_fp32_and_model_follows():
    model = tiny_model().to(torch.bfloat16)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, bf16=True, clip_grad=0.0, **quiet)
    assert isinstance(opt, Float16OptimizerWithFloat16Params) and opt.grad_scaler is None
    masters = [p for g in opt.fp32_from_float16_groups for p in g]
    assert len(masters) == 6 and all(p.dtype == torch.float32 for p in masters)
    assert all(p.dtype == torch.float32 for p in opt.get_parameters())
    ref = [p.detach().clone().requires_grad_(True) for p in masters]
    ref_of = {id(m): r for m, r in zip(masters, ref)}
    ref_opt = torch.optim.AdamW(
        [{"params": [ref_of[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
         for g in opt.param_groups], lr=1e-2, fused=True)
    model_params = [p for g in opt.float16_groups for p in g]
    for step in range(3):
        opt.zero_grad()
        set_grads(model, step)
        for r, mp in zip(ref, model_params):
            r.grad = mp.grad.float()
        assert opt.step()[0]
        ref_opt.step()
    for m, r, mp in zip(masters, ref, model_params):
        assert torch.equal(m, r)
        assert mp.dtype == torch.bfloat16 and torch.equal(mp, m.to(torch.bfloat16))
    assert opt.scale_loss(torch.tensor(3.0)).item() == 3.0


def test_fp16_inf_skips_step_backs_off_after_hysteresis():
    model = tiny_model().half()
    opt = build_optimizer(model, lr=1e-2, fp16=True, initial_loss_scale=2.0**8, hysteresis=2,
                          loss_scale_window=1000, clip_grad=1.0, log_num_zeros_in_grad=True,
                          **quiet)
    assert opt.scale_loss(torch.tensor(2.0)).item() == 512.0
    before = [p.detach().clone() for p in model.parameters()]
    masters_before = [p.detach().clone() for p in opt.get_parameters()]
    for expected_scale in (256.0, 128.0):
        set_grads(model, 0, scale=256.0)
        model[0].weight.grad[0, 0] = float("inf")
        assert opt.step() == (False, None, None)
        assert opt.get_loss_scale().item() == expected_scale
        for a, b in zip(model.parameters(), before):
            assert torch.equal(a, b)
        for a, b in zip(opt.get_parameters(), masters_before):
            assert torch.equal(a, b)
    # A clean step: grads are unscaled by 1/128 before clipping; exact zeros are counted.
    set_grads(model, 1, scale=128.0)
    model[2].bias.grad.zero_()
    grads = [p.grad.float() / 128.0 for p in model.parameters()]
    ok, grad_norm, num_zeros = opt.step()
    assert ok and num_zeros == 3
    expected = math.sqrt(sum(g.double().square().sum().item() for g in grads))
    assert grad_norm == pytest.approx(expected, rel=1e-5)
    assert not any(torch.equal(a, b) for a, b in zip(model.parameters(), before)
                   if a.ndim > 1)


def test_fp16_constant_loss_scale():
    opt = build_optimizer(tiny_model().half(), lr=1e-2, fp16=True, loss_scale=64.0, **quiet)
    opt.grad_scaler.update(True)
    assert opt.get_loss_scale().item() == 64.0


def test_clip_grad_norm_values():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([4.0])
    norm = clip_grad_norm_fp32([a, b], [a.grad, b.grad], max_norm=1.0)
    assert norm == pytest.approx(5.0)
    coeff = 1.0 / (5.0 + 1e-6)
    assert torch.allclose(a.grad, torch.tensor([3.0 * coeff, 0.0]))
    assert torch.allclose(b.grad, torch.tensor([4.0 * coeff]))
    new_norm = math.sqrt(a.grad.square().sum() + b.grad.square().sum())
    assert new_norm == pytest.approx(1.0, abs=1e-6)
    # Below the threshold nothing changes.
    assert clip_grad_norm_fp32([a, b], [a.grad, b.grad], max_norm=10.0) == pytest.approx(1.0)
    assert torch.allclose(b.grad, torch.tensor([4.0 * coeff]))
    # Infinity norm.
    a.grad = torch.tensor([-7.0, 1.0])
    assert clip_grad_norm_fp32([a], [a.grad], max_norm=100.0, norm_type="inf") == 7.0


def test_optimizer_clipping_gives_expected_norm():
    model = tiny_model()
    opt = build_optimizer(model, lr=0.0, weight_decay=0.0, clip_grad=0.5, **quiet)
    set_grads(model, 3)
    expected = math.sqrt(sum(p.grad.double().square().sum().item() for p in model.parameters()))
    _, grad_norm, num_zeros = opt.step()
    assert grad_norm == pytest.approx(expected, rel=1e-6) and num_zeros is None
    clipped = math.sqrt(sum(p.grad.double().square().sum().item() for p in model.parameters()))
    assert clipped == pytest.approx(0.5, rel=1e-5)


def test_grads_for_norm_skip_tp_duplicates_and_shared():
    split = torch.nn.Parameter(torch.zeros(2))
    split.tensor_model_parallel = True
    replicated = torch.nn.Parameter(torch.zeros(2))
    shared = torch.nn.Parameter(torch.zeros(2))
    shared.shared = True
    for p in (split, replicated, shared):
        p.grad = torch.tensor([0.0, 1.0])
    assert len(get_grads_for_norm([split, replicated, shared], tp_rank=0)) == 2
    rank1 = get_grads_for_norm([split, replicated, shared], tp_rank=1)
    assert len(rank1) == 1 and rank1[0].data_ptr() == split.grad.data_ptr()
    assert count_zeros_fp32([split, replicated, shared], tp_rank=0) == 2
    assert count_zeros_fp32([split, replicated, shared], tp_rank=1) == 1


def test_bad_flags():
    with pytest.raises(UserError, match="--fp16 and --bf16"):
        build_optimizer(tiny_model(), lr=1.0, fp16=True, bf16=True, **quiet)
    with pytest.raises(UserError, match="--optimizer"):
        build_optimizer(tiny_model(), lr=1.0, optimizer="lamb", **quiet)


def _make(precision, model=None):
    model = model or tiny_model()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = model.to(dtype)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, clip_grad=1.0,
                          fp16=precision == "fp16", bf16=precision == "bf16",
                          initial_loss_scale=2.0**4, loss_scale_window=2, **quiet)
    sched = OptimizerParamScheduler(opt, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=1,
                                    lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.1,
                                    end_wd=0.1, wd_incr_steps=10, wd_incr_style="constant")
    return model, opt, sched


def _train_step(model, opt, sched, step):
    opt.zero_grad()
    set_grads(model, step, scale=opt.get_loss_scale().item())
    ok = opt.step()[0]
    sched.step(1, token_num=16 * (step + 1))
    return ok


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_state_dict_round_trip_is_bitwise(precision):
    model_a, opt_a, sched_a = _make(precision)
    for step in range(2):
        assert _train_step(model_a, opt_a, sched_a, step)

    model_b, opt_b, sched_b = _make(precision)
    _train_step(model_b, opt_b, sched_b, 0)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "optimizer": opt_b.state_dict(),
                "opt_param_scheduler": sched_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    if precision != "fp32":
        assert "fp32_from_fp16_params" in ckpt["optimizer"]
    if precision == "fp16":
        assert ckpt["optimizer"]["grad_scaler"]["growth_tracker"] == 1

    model_c, opt_c, sched_c = _make(precision, model=tiny_model(seed=7))
    model_c.load_state_dict(ckpt["model"])
    opt_c.reload_model_params()
    opt_c.load_state_dict(ckpt["optimizer"])
    sched_c.load_state_dict(ckpt["opt_param_scheduler"])
    assert _train_step(model_c, opt_c, sched_c, 1)

    for a, c in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(a, c)
    for a, c in zip(opt_a.get_parameters(), opt_c.get_parameters()):
        assert a.dtype == torch.float32 and torch.equal(a, c)
    assert opt_a.get_loss_scale().item() == opt_c.get_loss_scale().item()
    assert opt_a.param_groups[0]["lr"] == opt_c.param_groups[0]["lr"]


def _clip_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        split = torch.nn.Parameter(torch.zeros(1))
        split.tensor_model_parallel = True
        split.grad = torch.tensor([float(rank + 1)])       # shards: 1 and 2
        replicated = torch.nn.Parameter(torch.zeros(1))
        replicated.grad = torch.tensor([2.0])               # same on both TP ranks
        params = [split, replicated]
        group = dist.new_group(list(range(world)))
        norm = clip_grad_norm_fp32(params, get_grads_for_norm(params, tp_rank=rank), 1.0,
                                   model_parallel_group=group)
        zeros = count_zeros_fp32(params, group, tp_rank=rank)
        if rank == 0:
            torch.save({"norm": norm, "zeros": zeros, "grad": replicated.grad.clone()}, out_file)
    finally:
        dist.destroy_process_group()


def test_clip_norm_all_reduces_over_model_parallel_group(tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "out.pt"
    # fork: the children reuse the imported torch, which keeps this test fast.
    mp.start_processes(_clip_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2,
                       start_method="fork")
    res = torch.load(out)
    assert res["norm"] == pytest.approx(3.0)       # sqrt(1^2 + 2^2 + 2^2): replica counted once
    assert res["zeros"] == 0
    assert res["grad"].item() == pytest.approx(2.0 / (3.0 + 1e-6))


def test_build_from_config_object():
    from types import SimpleNamespace
    args = SimpleNamespace(optimizer="adam", lr=3e-4, weight_decay=0.1, adam_beta1=0.9,
                           adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0, fp16=False, bf16=True,
                           loss_scale=None, initial_loss_scale=2.0**32, min_loss_scale=1.0,
                           loss_scale_window=1000, hysteresis=2, seq_length=16)
    opt = build_optimizer(tiny_model().to(torch.bfloat16), args=args, **quiet)
    assert isinstance(opt, Float16OptimizerWithFloat16Params)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["lr"] == 3e-4
