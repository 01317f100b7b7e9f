import math
from types import SimpleNamespace

import pytest

from megatron.errors import UserError
from megatron.optim.lr_scheduler import (
    OptimizerParamScheduler,
    scheduler_from_args,
    scheduler_steps_from_args,
)

MAX, MIN = 1.0, 0.1


class FakeOptimizer:
    def __init__(self):
        self.param_groups = [
            {"params": [], "lr": 0.0, "weight_decay": 0.0, "wd_mult": 1.0, "lr_mult": 1.0},
            {"params": [], "lr": 0.0, "weight_decay": 0.0, "wd_mult": 0.0, "lr_mult": 0.5},
        ]


def make(style="linear", gbs=4, train_iters=100, wd=(0.01, 0.01, "constant"), init_lr=0.0,
         opt=None, **flags):
    steps = scheduler_steps_from_args(global_batch_size=gbs, train_iters=train_iters, **flags)
    return OptimizerParamScheduler(
        opt or FakeOptimizer(), max_lr=MAX, min_lr=MIN, init_lr=init_lr,
        lr_warmup_steps=steps.lr_warmup_steps, lr_decay_steps=steps.lr_decay_steps,
        lr_decay_style=style, lr_warmup_tokens=steps.lr_warmup_tokens,
        lr_decay_tokens=steps.lr_decay_tokens, start_wd=wd[0], end_wd=wd[1],
        wd_incr_steps=steps.wd_incr_steps, wd_incr_style=wd[2])


def lr_at(sched, samples, tokens=None):
    """Step the scheduler to `samples` consumed samples and return the LR."""
    return sched.step(samples - sched.num_steps, token_num=tokens)


# -- iteration-based: GBS 4, 100 iters, 10 warmup iters -> warmup 40, decay 400 samples ----------

@pytest.mark.parametrize("style", ["linear", "cosine", "constant", "inverse-square-root"])
def test_iteration_based_warmup(style):
    s = make(style, lr_warmup_iters=10)
    assert (s.lr_warmup_steps, s.lr_decay_steps) == (40, 400)
    assert s.get_lr() == 0.0
    assert lr_at(s, 20) == pytest.approx(0.5)
    assert lr_at(s, 40) == pytest.approx(1.0)


def test_iteration_based_linear_and_cosine_boundaries():
    lin = make("linear", lr_warmup_iters=10)
    cos = make("cosine", lr_warmup_iters=10)
    # ratio = (samples - 40) / 360
    assert lr_at(lin, 220) == pytest.approx(MIN + 0.5 * (MAX - MIN))
    assert lr_at(cos, 130) == pytest.approx(MIN + 0.5 * (math.cos(math.pi / 4) + 1) * 0.9)
    assert lr_at(cos, 220) == pytest.approx(0.55)
    for s in (lin, cos):
        assert lr_at(s, 400) == pytest.approx(MIN)
        assert lr_at(s, 404) == MIN


def test_constant_and_inverse_square_root():
    const = make("constant", lr_warmup_iters=10)
    assert lr_at(const, 200) == MAX and lr_at(const, 1000) == MAX
    isr = make("inverse-square-root", lr_warmup_iters=10)
    assert lr_at(isr, 160) == pytest.approx(0.5)          # sqrt(40/160)
    assert lr_at(isr, 400) == pytest.approx(math.sqrt(0.1))
    assert lr_at(isr, 401) == MIN                         # past the decay horizon


def test_init_lr_and_group_multipliers():
    s = make("linear", lr_warmup_iters=10, init_lr=0.2)
    assert s.get_lr() == pytest.approx(0.2)
    lr_at(s, 20)
    g0, g1 = s.optimizer.param_groups
    assert g0["lr"] == pytest.approx(0.6) and g1["lr"] == pytest.approx(0.3)
    assert g0["weight_decay"] == 0.01 and g1["weight_decay"] == 0.0


def test_warmup_fraction_iteration_based():
    s = make("linear", lr_warmup_fraction=0.1, lr_decay_iters=50)
    assert (s.lr_warmup_steps, s.lr_decay_steps, s.wd_incr_steps) == (20, 200, 400)


# -- sample-based ---------------------------------------------------------------------------------

def test_sample_based():
    st = scheduler_steps_from_args(global_batch_size=8, train_samples=1000, lr_warmup_samples=100)
    assert (st.lr_warmup_steps, st.lr_decay_steps, st.wd_incr_steps) == (100, 1000, 1000)
    st = scheduler_steps_from_args(global_batch_size=8, train_samples=1000,
                                   lr_decay_samples=800, lr_warmup_fraction=0.25)
    assert (st.lr_warmup_steps, st.lr_decay_steps) == (200, 800)
    s = make("linear", train_iters=None, train_samples=1000, lr_decay_samples=800,
             lr_warmup_fraction=0.25)
    assert lr_at(s, 100) == pytest.approx(0.5)
    assert lr_at(s, 500) == pytest.approx(MIN + 0.5 * 0.9)
    assert lr_at(s, 801) == MIN


# -- token-based ---------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_token_warmup_and_decay(style):
    s = make(style, gbs=1, train_iters=10_000, lr_warmup_tokens=100, lr_decay_tokens=1100)
    assert lr_at(s, 1, tokens=50) == pytest.approx(0.5)
    assert lr_at(s, 2, tokens=100) == pytest.approx(1.0)
    assert lr_at(s, 3, tokens=600) == pytest.approx(0.55)       # ratio 0.5 for both styles
    assert lr_at(s, 4, tokens=1100) == pytest.approx(MIN)
    assert lr_at(s, 5, tokens=1101) == MIN                       # steps still far from 10000


def test_token_isr_uses_tokens():
    s = make("inverse-square-root", gbs=1, train_iters=10_000, lr_warmup_tokens=100,
             lr_decay_tokens=10_000)
    assert lr_at(s, 1, tokens=400) == pytest.approx(0.5)


def test_step_warmup_token_decay_captures_warmup_tokens():
    # 5 warmup iters of GBS 2 = 10 samples; 30 tokens per iteration.
    s = make("linear", gbs=2, lr_warmup_iters=5, lr_decay_tokens=1000)
    assert s.lr_warmup_tokens is None
    for it in range(1, 6):
        lr = lr_at(s, 2 * it, tokens=30 * it)
        assert lr == pytest.approx(it / 5)
    assert s.lr_warmup_tokens == 150
    assert lr_at(s, 12, tokens=180) == pytest.approx(MIN + (1 - 30 / 850) * 0.9)
    assert lr_at(s, 14, tokens=1001) == MIN                      # token horizon, not steps

    # Resume from a checkpoint taken after the capture: same LR, no mismatch error.
    sd = s.state_dict()
    r = make("linear", gbs=2, lr_warmup_iters=5, lr_decay_tokens=1000)
    r.load_state_dict(sd)
    assert r.lr_warmup_tokens == 150 and r.get_lr() == MIN
    assert r.state_dict() == sd


def test_token_only_run_uses_train_tokens_as_horizon():
    st = scheduler_steps_from_args(global_batch_size=4, train_tokens=1000,
                                   lr_warmup_fraction=0.01)
    assert st.lr_decay_steps is None and st.wd_incr_steps is None
    assert (st.lr_warmup_tokens, st.lr_decay_tokens) == (10, 1000)
    s = make("cosine", train_iters=None, train_tokens=1000, lr_warmup_tokens=100)
    assert lr_at(s, 4, tokens=50) == pytest.approx(0.5)
    assert lr_at(s, 8, tokens=550) == pytest.approx(0.55)
    assert lr_at(s, 12, tokens=1001) == MIN


def test_tokens_can_be_layer_tokens():
    """The token counter is opaque: feeding layer tokens (x num_layers) scales the horizon."""
    layers = 24
    a = make("cosine", gbs=1, train_iters=10_000, lr_warmup_tokens=100, lr_decay_tokens=1100)
    b = make("cosine", gbs=1, train_iters=10_000, lr_warmup_tokens=100 * layers,
             lr_decay_tokens=1100 * layers)
    for i, t in enumerate([30, 100, 400, 900, 1200], start=1):
        assert lr_at(a, i, tokens=t) == pytest.approx(lr_at(b, i, tokens=t * layers))


# -- weight decay ----------------------------------------------------------------------------------

def test_weight_decay_increment():
    # wd horizon = train_iters * GBS = 100 samples
    lin = make("linear", gbs=1, train_iters=100, wd=(0.0, 0.1, "linear"))
    cos = make("linear", gbs=1, train_iters=100, wd=(0.0, 0.1, "cosine"))
    assert lin.get_wd() == 0.0 and cos.get_wd() == 0.0
    lr_at(lin, 50)
    lr_at(cos, 25)
    assert lin.get_wd() == pytest.approx(0.05)
    assert cos.get_wd() == pytest.approx(0.1 * 0.5 * (math.cos(0.75 * math.pi) + 1))
    assert lin.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.05)
    assert lin.optimizer.param_groups[1]["weight_decay"] == 0.0
    lr_at(lin, 101)
    assert lin.get_wd() == 0.1
    with pytest.raises(UserError, match="--weight-decay-incr-style"):
        make("linear", wd=(0.0, 0.1, "constant"))


# -- state dict ------------------------------------------------------------------------------------

def test_state_round_trip_and_keys():
    s = make("cosine", lr_warmup_iters=10)
    lr_at(s, 100, tokens=12345)
    sd = s.state_dict()
    assert set(sd) == {"max_lr", "lr_warmup_steps", "num_steps", "lr_decay_steps",
                       "lr_decay_style", "min_lr", "start_wd", "end_wd", "wd_incr_style",
                       "wd_incr_steps", "num_tokens", "lr_warmup_tokens", "lr_decay_tokens"}
    r = make("cosine", lr_warmup_iters=10)
    r.load_state_dict(sd)
    assert r.state_dict() == sd and r.get_lr() == s.get_lr()
    assert r.optimizer.param_groups[0]["lr"] == s.optimizer.param_groups[0]["lr"]
    assert lr_at(r, 200) == lr_at(s, 200)


def test_checkpoint_mismatch_needs_a_flag():
    sd = make("cosine", lr_warmup_iters=10).state_dict()
    with pytest.raises(UserError, match="decay style.*--override-opt_param-scheduler"):
        make("linear", lr_warmup_iters=10).load_state_dict(sd)

    over = make("linear", lr_warmup_iters=10)
    over.override_opt_param_scheduler = True
    over.load_state_dict(sd)
    assert over.lr_decay_style == "linear"

    use = make("linear", lr_warmup_iters=10, train_iters=50)
    use.use_checkpoint_opt_param_scheduler = True
    use.load_state_dict(sd)
    assert (use.lr_decay_style, use.lr_decay_steps) == ("cosine", 400)


def test_legacy_keys_accepted():
    s = make("linear", lr_warmup_iters=10)
    sd = s.state_dict()
    legacy = {"start_lr": sd["max_lr"], "min_lr": sd["min_lr"], "warmup_iter": 40,
              "end_iter": 400, "decay_style": "linear", "num_iters": 80}
    s.load_state_dict(legacy)
    assert s.num_steps == 80 and s.get_lr() == pytest.approx(MIN + (1 - 40 / 360) * 0.9)


# -- flag validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags, match", [
    (dict(train_iters=10, lr_warmup_iters=10), "--lr-warmup-iters"),
    (dict(train_samples=100, lr_warmup_samples=200), "--lr-warmup-samples"),
    (dict(train_iters=10, train_samples=100), "--train-iters and --train-samples"),
    (dict(train_iters=10, lr_warmup_fraction=0.1, lr_warmup_iters=1), "--lr-warmup-fraction"),
    (dict(train_iters=10, lr_decay_samples=100), "--lr-decay-samples"),
    (dict(train_samples=100, lr_decay_iters=10), "--lr-decay-iters"),
    (dict(), "--train-iters, --train-samples or --train-tokens"),
    (dict(train_tokens=100, lr_warmup_tokens=100), "--lr-warmup-tokens"),
    (dict(train_iters=10, lr_warmup_tokens=5, lr_warmup_iters=1), "--lr-warmup-tokens"),
])
def test_bad_flags(flags, match):
    with pytest.raises(UserError, match=match):
        scheduler_steps_from_args(global_batch_size=4, **flags)


def test_scheduler_from_args():
    args = SimpleNamespace(global_batch_size=4, train_iters=100, lr=1.0, min_lr=0.1,
                           lr_decay_style="linear", lr_warmup_iters=10, weight_decay=0.05,
                           weight_decay_incr_style="constant")
    s = scheduler_from_args(FakeOptimizer(), args)
    assert (s.lr_warmup_steps, s.lr_decay_steps) == (40, 400)
    assert (s.start_wd, s.end_wd) == (0.05, 0.05)
    assert lr_at(s, 220) == pytest.approx(0.55)
    with pytest.raises(UserError, match="--override-opt_param-scheduler"):
        scheduler_from_args(FakeOptimizer(), SimpleNamespace(
            **vars(args), override_opt_param_scheduler=True,
            use_checkpoint_opt_param_scheduler=True))


def test_steps_from_config_object():
    args = SimpleNamespace(global_batch_size=4, train_iters=25, train_samples=100,
                           lr_warmup_samples=10, lr_decay_iters=None, lr_warmup_iters=0)
    # train_iters derived from --train-samples by the loop: the run is sample-based.
    st = scheduler_steps_from_args(args)
    assert (st.lr_warmup_steps, st.lr_decay_steps, st.wd_incr_steps) == (10, 100, 100)
