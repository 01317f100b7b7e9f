"""Kept-length schedules (MSLG), RandomLTDScheduler, layer-token accounting, LayerToken LR."""

import argparse
import copy
import math

import numpy as np
import pytest
import torch

from megatron.errors import UserError
from megatron.ltd.layer_tokens import (cumulative_layer_tokens, iterations_for_layer_tokens,
                                       layer_averaged_seq_length, layer_token_lr_horizons,
                                       layer_token_lr_horizons_from_args,
                                       layer_tokens_per_step, run_layer_token_saving,
                                       theoretical_saving, total_layer_tokens)
from megatron.ltd.schedule import KeptLengthSchedule, RandomLTDScheduler, linear_layer_starts
from megatron.optim.lr_scheduler import OptimizerParamScheduler, scheduler_steps_from_args

GPT13B = dict(schedule_type="fixed_linear", min_value=128, max_value=2048, seq_per_step=16,
              require_steps=200000)
VIT = dict(schedule_type="fixed_linear", min_value=32, max_value=197, seq_per_step=8,
           require_steps=3910)


def deepspeed_fixed_linear(step, lo, hi, require_steps, seq_per_step):
    """DeepSpeed's __fixed_root_get_value with root_degree 1, written out for the test."""
    v = math.floor((float(step) / require_steps) ** (1.0 / 1) * (hi - lo) + lo)
    v -= v % seq_per_step
    return min(v, hi)


# -- fixed_linear -------------------------------------------------------------------------------


def test_fixed_linear_gpt3_1p3b_reference_vectors():
    s = KeptLengthSchedule(**GPT13B)
    expected = {0: 128, 1: 128, 1666: 128, 1667: 144, 100000: 1088, 199999: 2032, 200000: 2048,
                250000: 2048, 10 ** 7: 2048}
    assert {t: s.value(t) for t in expected} == expected
    assert s.values(list(expected)).tolist() == list(expected.values())


def test_fixed_linear_vit_reference_vectors():
    s = KeptLengthSchedule(**VIT)
    assert s.value(0) == 32
    assert s.value(3910) == 192  # max 197 is not a multiple of 8
    assert s.value(3981) == 192
    assert s.value(3982) == 197
    assert int(np.argmax(s.values(np.arange(5000)) == 197)) == 3982


@pytest.mark.parametrize("params", [GPT13B, VIT, dict(GPT13B, min_value=100, require_steps=777)])
def test_vectorised_equals_scalar_equals_deepspeed(params):
    s = KeptLengthSchedule(**params)
    steps = np.arange(0, int(params["require_steps"] * 1.05) + 3)
    vec = s.values(steps)
    ref = [deepspeed_fixed_linear(int(t), params["min_value"], params["max_value"],
                                  params["require_steps"], params["seq_per_step"])
           for t in steps[::7]]
    assert vec[::7].tolist() == ref
    assert [s.value(int(t)) for t in steps[::97]] == vec[::97].tolist()
    assert np.all(np.diff(vec) >= 0)
    assert vec.dtype == np.int64


def test_min_not_multiple_is_rounded_down_like_deepspeed():
    s = KeptLengthSchedule("fixed_linear", 100, 512, 16, require_steps=1000)
    assert s.value(0) == 96


def test_token_based_paper_recipe():
    # "start 128, +16 every 1.75B tokens, full length after 210B tokens"
    s = KeptLengthSchedule("fixed_linear", 128, 2048, 16, require_tokens=210 * 10 ** 9)
    assert s.unit == "tokens"
    assert s.value(0, 0) == 128
    assert s.value(5, 1_750_000_000 - 1) == 128
    assert s.value(5, 1_750_000_000) == 144
    assert s.value(5, 105 * 10 ** 9) == 1088
    assert s.value(0, 210 * 10 ** 9) == 2048
    with pytest.raises(ValueError):
        s.value(3)


def test_token_based_equals_step_based_at_constant_batch():
    gbs, seq, steps = 512, 2048, 200000
    by_step = RandomLTDScheduler(24, seq, KeptLengthSchedule(**GPT13B))
    by_tok = RandomLTDScheduler(24, seq, KeptLengthSchedule(
        "fixed_linear", 128, seq, 16, require_tokens=steps * gbs * seq))
    np.testing.assert_array_equal(by_step.kept_length_table(210000, gbs),
                                  by_tok.kept_length_table(210000, gbs))
    # and the scheduler's own raw-token counter drives it the same way step by step
    for t in range(3):
        assert by_tok.kept_lengths() == by_step.kept_lengths(t)
        by_tok.step(gbs)
        by_step.step(gbs)
    assert by_tok.consumed_tokens == 3 * gbs * seq


# -- other schedules ----------------------------------------------------------------------------


def test_constant_schedule():
    s = KeptLengthSchedule("constant", 100, 512, 16)
    assert s.value(0) == s.value(10 ** 6) == 100  # not rounded: the ablation's exact length
    assert s.values(np.arange(10)).tolist() == [100] * 10
    sched = RandomLTDScheduler(6, 512, s)
    assert sched.kept_lengths(0) == {1: 100, 2: 100, 3: 100, 4: 100}
    full = RandomLTDScheduler(6, 512, KeptLengthSchedule("constant", 512, 512))
    assert full.kept_lengths(0) == {}  # kept == seq: nothing drops


def test_fixed_root_growth():
    lin = KeptLengthSchedule("fixed_linear", 128, 2048, 16, require_steps=1000)
    root = KeptLengthSchedule("fixed_root", 128, 2048, 16, require_steps=1000, root_degree=2)
    square = KeptLengthSchedule("fixed_root", 128, 2048, 16, require_steps=1000,
                                root_degree=0.5)
    x = np.arange(1200)
    vr, vl, vs = root.values(x), lin.values(x), square.values(x)
    assert vr[0] == vl[0] == vs[0] == 128
    assert vr[1000] == vl[1000] == vs[1000] == 2048
    v = math.floor(math.sqrt(0.25) * 1920 + 128)
    assert root.value(250) == v - v % 16 == 1088
    assert np.all(vs <= vl) and np.all(vl <= vr)
    assert np.all(np.diff(vr) >= 0) and np.all(np.diff(vs) >= 0)
    assert [root.value(int(t)) for t in x[::13]] == vr[::13].tolist()


def test_schedule_validation():
    with pytest.raises(ValueError):
        KeptLengthSchedule("cosine", 128, 2048, require_steps=10)
    with pytest.raises(ValueError):
        KeptLengthSchedule("fixed_linear", 128, 2048)  # no horizon
    with pytest.raises(ValueError):
        KeptLengthSchedule("fixed_linear", 128, 2048, require_steps=1, require_tokens=1)
    with pytest.raises(ValueError):
        KeptLengthSchedule("fixed_linear", 4096, 2048, require_steps=10)
    with pytest.raises(ValueError):
        KeptLengthSchedule("fixed_linear", 128, 2048, require_steps=10, root_degree=2)


# -- scheduler ----------------------------------------------------------------------------------


def test_scheduler_defaults_and_deepspeed_layer_tokens():
    sched = RandomLTDScheduler(24, 2048, KeptLengthSchedule(**GPT13B))
    assert sched.layer_ids == tuple(range(1, 23))
    kept = sched.kept_lengths(0, 0)
    assert kept == {i: 128 for i in range(1, 23)}
    assert sched.reserved_length == sched.get_current_seq() == 128
    assert sched.step(512) == 512 * (128 * 22 + 2048 * 2)
    assert sched.kept_lengths(1667) == {i: 144 for i in range(1, 23)}
    assert sched.kept_lengths(200000) == {}  # full length: no layer drops
    assert sched.reserved_length == 2048


def test_scheduler_matches_deepspeed_update_seq_with_micro_batches():
    """DeepSpeed calls update_seq(global_steps) at every forward (each micro-batch) and counts
    layer tokens once per new step; we call kept_lengths per micro-batch and step once."""
    lo, hi, req, sps, L, ids, gbs = 24, 64, 40, 8, 6, [1, 2, 4], 12
    ds = dict(current_value=lo, current_steps=-1, consumed=0)

    def update_seq(step):
        if ds["current_value"] < hi:
            ds["current_value"] = deepspeed_fixed_linear(step, lo, hi, req, sps)
        if step != ds["current_steps"]:
            ds["consumed"] += gbs * (ds["current_value"] * len(ids) + hi * (L - len(ids)))
            ds["current_steps"] = step

    sched = RandomLTDScheduler(L, hi, KeptLengthSchedule("fixed_linear", lo, hi, sps,
                                                         require_steps=req), layer_ids=ids)
    for step in range(60):
        for _micro in range(3):
            update_seq(step)
            kept = sched.kept_lengths(step)
            if ds["current_value"] < hi:
                assert kept == {i: ds["current_value"] for i in ids}
            else:
                assert kept == {}
        sched.step(gbs)
        assert sched.consumed_layer_tokens == ds["consumed"]
        assert sched.reserved_length == ds["current_value"]
    sd = sched.state_dict()
    assert sd["current_steps"] == ds["current_steps"] == 59
    assert sd["current_value"] == ds["current_value"] and sd["consumed_layer_tokens"] == \
        ds["consumed"]
    assert (sd["min_value"], sd["max_value"]) == (lo, hi)


def test_per_layer_starts():
    starts = linear_layer_starts(32, 96, 4)
    assert starts == [32, 53, 75, 96]
    sch = {lid: KeptLengthSchedule("fixed_linear", st, 128, 8, require_steps=100)
           for lid, st in zip([1, 2, 3, 4], starts)}
    sched = RandomLTDScheduler(6, 128, sch)
    kept = sched.kept_lengths(0)
    assert kept == {1: 32, 2: 48, 3: 72, 4: 96}
    assert sched.reserved_length == pytest.approx(np.mean([32, 48, 72, 96]))
    assert sched.layer_tokens_per_sample() == 32 + 48 + 72 + 96 + 2 * 128
    table = sched.kept_length_table(3, 1)
    assert table[0].tolist() == [32, 48, 72, 96]
    assert sched.step(3) == 3 * (32 + 48 + 72 + 96 + 256)


def test_step_without_kept_lengths_evaluates_next_iteration():
    sched = RandomLTDScheduler(4, 8, KeptLengthSchedule("fixed_linear", 4, 8, 2,
                                                        require_steps=4))
    assert [sched.step(1) for _ in range(6)] == [24, 24, 28, 28, 32, 32]
    assert sched.iteration == 6 and sched.consumed_tokens == 6 * 8


def test_exact_resume_and_state_keys():
    def make():
        return RandomLTDScheduler(12, 256, KeptLengthSchedule(
            "fixed_root", 64, 256, 16, require_tokens=40 * 4 * 256, root_degree=2))

    full, first = make(), make()
    seq_full = []
    for t in range(80):
        seq_full.append(full.kept_lengths(t))
        full.step(4)
    seq_resumed = []
    for t in range(30):
        seq_resumed.append(first.kept_lengths(t))
        first.step(4)
    sd = copy.deepcopy(first.state_dict())
    for key in ("consumed_layer_tokens", "current_steps", "current_value", "min_value",
                "max_value"):
        assert key in sd
    second = make()
    second.load_state_dict(torch.load(_roundtrip(sd), weights_only=False))
    for t in range(30, 80):
        seq_resumed.append(second.kept_lengths(t))
        second.step(4)
    assert seq_resumed == seq_full
    assert second.state_dict() == full.state_dict()


def _roundtrip(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_load_deepspeed_state_and_mismatch():
    sched = RandomLTDScheduler(24, 2048, KeptLengthSchedule(**GPT13B))
    ds_state = {"consumed_layer_tokens": 12345, "current_steps": 1999, "current_value": 144,
                "min_value": 128, "max_value": 2048}
    sched.load_state_dict(ds_state)
    assert sched.iteration == 2000 and sched.consumed_layer_tokens == 12345
    assert sched.reserved_length == 144
    assert sched.kept_lengths(2000) == {i: 144 for i in range(1, 23)}
    with pytest.raises(UserError, match="--seq-length"):
        sched.load_state_dict(dict(ds_state, max_value=1024))
    with pytest.raises(UserError, match="--random-ltd-start"):
        sched.load_state_dict(dict(ds_state, min_value=256))


def test_freeze_once_max_reached():
    sched = RandomLTDScheduler(4, 8, KeptLengthSchedule("fixed_linear", 4, 8, 2,
                                                        require_steps=4))
    assert sched.kept_lengths(10) == {}
    assert sched.kept_lengths(0) == {}  # DeepSpeed never recomputes once at max


# -- layer tokens -------------------------------------------------------------------------------


def test_layer_token_formulas():
    assert layer_tokens_per_step(128, num_layers=24, num_ltd_layers=22, max_length=2048,
                                 global_batch_size=512) == 512 * (128 * 22 + 2048 * 2)
    assert layer_tokens_per_step(4096, num_layers=24, num_ltd_layers=22,
                                 max_length=2048) == 2048 * 24
    arr = layer_tokens_per_step(np.array([128, 2048]), num_layers=24, num_ltd_layers=22,
                                max_length=2048)
    assert arr.tolist() == [6912, 49152]
    assert layer_averaged_seq_length(128, seq_length=2048, num_layers=24,
                                     num_ltd_layers=22) == 6912 // 24 == 288
    assert layer_averaged_seq_length(2048, seq_length=2048, num_layers=24,
                                     num_ltd_layers=22) == 2048
    assert layer_averaged_seq_length(np.array([1000, 3000]), seq_length=2048, num_layers=24,
                                     num_ltd_layers=22).tolist() == [
        (2048 * 2 + 1000 * 22) // 24, 2048]
    assert theoretical_saving(128, seq_length=2048, num_layers=24) == pytest.approx(
        1 - (2 * 2048 + 22 * 128) / (24 * 2048))
    assert theoretical_saving(2048, seq_length=2048, num_layers=24) == 0.0


def test_cumulative_layer_tokens_matches_stepping():
    sched = RandomLTDScheduler(6, 64, KeptLengthSchedule("fixed_linear", 16, 64, 8,
                                                         require_steps=25), layer_ids=[1, 3, 4])
    cum = cumulative_layer_tokens(sched, 40, 3)
    live = RandomLTDScheduler(6, 64, KeptLengthSchedule("fixed_linear", 16, 64, 8,
                                                        require_steps=25), layer_ids=[1, 3, 4])
    stepped = [0]
    for t in range(40):
        live.kept_lengths(t)
        live.step(3)
        stepped.append(live.consumed_layer_tokens)
    assert cum.tolist() == stepped
    assert total_layer_tokens(sched, 40, 3) == sched.total_layer_tokens(40, 3) == stepped[-1]
    assert sched.consumed_layer_tokens == 0  # whole-run totals do not touch the state


def test_gpt3_1p3b_run_layer_tokens_are_vectorised_and_match_reference():
    sched = RandomLTDScheduler(24, 2048, KeptLengthSchedule(**GPT13B))
    baseline_steps = 300 * 10 ** 9 // (512 * 2048)  # 286,102
    saving = run_layer_token_saving(sched, baseline_steps, 512)
    assert 1 - saving == pytest.approx(0.697, abs=1e-3)  # reference: 69.7% of the baseline
    # An LTD run stopping at Megatron-DeepSpeed's layer-averaged "300B tokens" takes ~1.30x steps.
    avg = layer_averaged_seq_length(sched.kept_length_table(400000, 512)[:, 0], seq_length=2048,
                                    num_layers=24, num_ltd_layers=22)
    steps = int(np.searchsorted(np.cumsum(avg * 512), 300 * 10 ** 9)) + 1
    assert steps / baseline_steps == pytest.approx(1.30, abs=0.01)


def test_iterations_for_layer_tokens():
    sched = RandomLTDScheduler(4, 8, KeptLengthSchedule("fixed_linear", 4, 8, 2,
                                                        require_steps=4))
    # cumulative: 0, 24, 48, 76, 104, 136, 168
    assert iterations_for_layer_tokens(sched, 64, 1, 6) == 3
    assert iterations_for_layer_tokens(sched, 48, 1, 6) == 2
    with pytest.raises(ValueError):
        iterations_for_layer_tokens(sched, 1000, 1, 6)


# -- LayerToken LR ------------------------------------------------------------------------------


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)


def _lt_lr_scheduler(warmup, decay, style, max_lr=1.0, min_lr=0.0):
    return OptimizerParamScheduler(
        _optimizer(), max_lr=max_lr, min_lr=min_lr, lr_warmup_steps=0, lr_decay_steps=None,
        lr_decay_style=style, start_wd=0.0, end_wd=0.0, wd_incr_steps=None,
        wd_incr_style="constant", lr_warmup_tokens=warmup, lr_decay_tokens=decay)


def test_layer_token_lr_hand_computed():
    # 4 layers (ids 1, 2 drop), s = 8, start 4, step 2, 4 steps to full; per-step layer tokens
    # 24, 24, 28, 28, 32, 32 -> cumulative 24, 48, 76, 104, 136, 168.
    sched = RandomLTDScheduler(4, 8, KeptLengthSchedule("fixed_linear", 4, 8, 2,
                                                        require_steps=4))
    warmup, decay = layer_token_lr_horizons(global_batch_size=1, seq_length=8, num_layers=4,
                                            scheduler=sched, train_iters=6, lr_warmup_iters=2)
    assert (warmup, decay) == (1 * 8 * 4 * 2, 168)
    lr = _lt_lr_scheduler(warmup, decay, "linear")
    got = [lr.get_lr()]
    for t in range(6):
        sched.kept_lengths(t)
        sched.step(1)
        got.append(lr.step(1, token_num=sched.consumed_layer_tokens))
    want = [0.0, 24 / 64, 48 / 64, 1 - 12 / 104, 1 - 40 / 104, 1 - 72 / 104, 0.0]
    assert got == pytest.approx(want, abs=1e-15)


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_layer_token_lr_equals_plain_schedule_without_dropping(style):
    gbs, s, L, iters, warm = 4, 16, 6, 50, 7
    sched = RandomLTDScheduler(L, s, KeptLengthSchedule("constant", s, s))  # b_t = s
    warmup, decay = layer_token_lr_horizons(global_batch_size=gbs, seq_length=s, num_layers=L,
                                            scheduler=sched, train_iters=iters,
                                            lr_warmup_iters=warm)
    plain_steps = scheduler_steps_from_args(global_batch_size=gbs, train_iters=iters,
                                            lr_warmup_iters=warm)
    plain = OptimizerParamScheduler(
        _optimizer(), max_lr=3e-4, min_lr=1e-6, lr_warmup_steps=plain_steps.lr_warmup_steps,
        lr_decay_steps=plain_steps.lr_decay_steps, lr_decay_style=style, start_wd=0.0,
        end_wd=0.0, wd_incr_steps=plain_steps.wd_incr_steps, wd_incr_style="constant")
    lt = _lt_lr_scheduler(warmup, decay, style, max_lr=3e-4, min_lr=1e-6)
    assert lt.get_lr() == plain.get_lr()
    for t in range(iters + 5):
        sched.kept_lengths(t)
        sched.step(gbs)
        assert lt.step(gbs, token_num=sched.consumed_layer_tokens) == plain.step(gbs), t


def test_layer_token_lr_horizon_sources_and_errors():
    kw = dict(global_batch_size=2, seq_length=8, num_layers=4)
    assert layer_token_lr_horizons(**kw, train_iters=10) == (0, 10 * 2 * 8 * 4)
    assert layer_token_lr_horizons(**kw, train_samples=20, lr_warmup_samples=4) == (
        4 * 8 * 4, 10 * 2 * 8 * 4)
    assert layer_token_lr_horizons(**kw, train_tokens=1000, lr_warmup_tokens=100) == (400, 4000)
    assert layer_token_lr_horizons(**kw, train_iters=10, lr_warmup_fraction=0.1) == (64, 640)
    assert layer_token_lr_horizons(**kw, train_iters=10, train_layer_tokens=500,
                                   lr_warmup_layer_tokens=50) == (50, 500)
    assert layer_token_lr_horizons(**kw, train_layer_tokens=500,
                                   lr_decay_layer_tokens=400) == (0, 400)
    with pytest.raises(UserError, match="--lr-warmup-iters"):
        layer_token_lr_horizons(**kw, train_iters=10, lr_warmup_iters=2,
                                lr_warmup_layer_tokens=5)
    with pytest.raises(UserError, match="must be smaller"):
        layer_token_lr_horizons(**kw, train_iters=10, lr_warmup_iters=10)
    with pytest.raises(UserError, match="decay horizon"):
        layer_token_lr_horizons(**kw)


def test_layer_token_lr_explicit_decay_flags_win_over_the_run_length():
    """As Megatron's scheduler: --lr-decay-tokens/-iters/-samples set the decay horizon even
    when --train-iters/--train-samples/--train-layer-tokens are given (Megatron-DeepSpeed's GPT
    recipes pass --train-iters as a loose bound with --lr-decay-tokens); they were ignored."""
    kw = dict(global_batch_size=2, seq_length=8, num_layers=4)
    assert layer_token_lr_horizons(**kw, train_iters=1000, lr_decay_tokens=300,
                                   lr_warmup_tokens=30) == (30 * 4, 300 * 4)
    assert layer_token_lr_horizons(**kw, train_iters=10, lr_decay_iters=5,
                                   train_layer_tokens=500) == (0, 5 * 2 * 8 * 4)
    assert layer_token_lr_horizons(**kw, train_samples=20, lr_decay_samples=12) == (
        0, 12 * 8 * 4)
    # a sample horizon that is not a whole number of steps: exactly samples * s * L when dense
    assert layer_token_lr_horizons(**kw, train_samples=21, train_iters=10) == (0, 21 * 8 * 4)
    # with dropping: full steps from the schedule, the partial step at its kept length
    sched = RandomLTDScheduler(4, 8, KeptLengthSchedule("fixed_linear", 4, 8, 2,
                                                        require_steps=4))
    # per-sample layer tokens 24, 24, 28, 28, 32, ...: 2 steps of 2 samples + 1 sample of step 2
    assert layer_token_lr_horizons(**kw, scheduler=sched, lr_decay_samples=5,
                                   train_samples=40) == (0, 2 * 24 + 2 * 24 + 28)
    # from the flags: --lr-decay-samples is read
    args = argparse.Namespace(global_batch_size=2, seq_length=8, num_layers=4, train_iters=20,
                              train_samples=40, train_tokens=None, lr_decay_iters=None,
                              lr_decay_samples=12, lr_decay_tokens=None, lr_warmup_iters=0,
                              lr_warmup_samples=4, lr_warmup_tokens=None,
                              lr_warmup_fraction=None, lr_warmup_layer_tokens=None,
                              lr_decay_layer_tokens=None, train_layer_tokens=None)
    assert layer_token_lr_horizons_from_args(args) == (4 * 8 * 4, 12 * 8 * 4)


def test_layer_token_lr_follows_lr_decay_tokens_like_the_plain_schedule():
    """Without dropping, LayerToken LR with --train-iters and --lr-decay-tokens/--lr-warmup-
    tokens decays over the same horizon as the plain token schedule (layer tokens = tokens x L)."""
    gbs, s, L, iters = 2, 8, 4, 30
    sched = RandomLTDScheduler(L, s, KeptLengthSchedule("constant", s, s))
    warmup, decay = layer_token_lr_horizons(global_batch_size=gbs, seq_length=s, num_layers=L,
                                            scheduler=sched, train_iters=iters,
                                            lr_warmup_tokens=3 * gbs * s,
                                            lr_decay_tokens=12 * gbs * s)
    lt = _lt_lr_scheduler(warmup, decay, "linear")
    got = []
    for t in range(iters):
        sched.kept_lengths(t)
        sched.step(gbs)
        got.append(lt.step(gbs, token_num=sched.consumed_layer_tokens))
    # peak after 3 steps, min LR from step 12 on (not stretched over the 30 --train-iters)
    assert got[2] == pytest.approx(1.0) and got[1] < 1.0
    assert got[11] == pytest.approx(0.0, abs=1e-12) and got[10] > 0.0
