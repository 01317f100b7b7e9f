import pytest
import torch

from megatron.errors import UserError
from megatron.optim.grad_scaler import ConstantGradScaler, DynamicGradScaler


def _scale(s):
    return s.scale.item()


def test_hysteresis_backoff_and_growth_sequence():
    s = DynamicGradScaler(initial_scale=16.0, min_scale=1.0, growth_interval=3, hysteresis=2)
    seq = []
    for found_inf in [True, True, True, False, False, False, True, False, False, True, True]:
        s.update(found_inf)
        seq.append(_scale(s))
    # 1st overflow only spends hysteresis; afterwards each overflow halves; 3 clean steps double
    # and refill hysteresis, so the next single overflow does not back off; clean steps short of
    # the window do not refill it, so the overflow after them does.
    assert seq == [16.0, 8.0, 4.0, 4.0, 4.0, 8.0, 8.0, 8.0, 8.0, 4.0, 2.0]


def test_overflow_resets_growth_counter():
    s = DynamicGradScaler(initial_scale=8.0, growth_interval=2, hysteresis=5)
    s.update(False)
    s.update(True)  # restarts the clean-step count
    s.update(False)
    assert _scale(s) == 8.0
    s.update(False)
    assert _scale(s) == 16.0


def test_min_scale_floor_and_inv_scale():
    s = DynamicGradScaler(initial_scale=4.0, min_scale=2.0, growth_interval=10, hysteresis=1)
    for _ in range(5):
        s.update(True)
    assert _scale(s) == 2.0
    assert s.inv_scale.item() == 0.5
    assert s.scale.dtype == torch.float32 and s.scale.shape == (1,)


def test_state_dict_round_trip():
    s = DynamicGradScaler(initial_scale=2.0**10, growth_interval=4, hysteresis=3)
    for f in [True, False, False]:
        s.update(f)
    t = DynamicGradScaler(initial_scale=2.0**20, growth_interval=4, hysteresis=3)
    t.load_state_dict(s.state_dict())
    for f in [False, True, True, True, False]:
        s.update(f)
        t.update(f)
        assert _scale(s) == _scale(t)
    assert s.state_dict()["growth_tracker"] == t.state_dict()["growth_tracker"]
    assert s.state_dict()["hysteresis_tracker"] == t.state_dict()["hysteresis_tracker"]


def test_constant_scaler():
    s = ConstantGradScaler(128.0)
    s.update(True)
    s.update(False)
    assert _scale(s) == 128.0 and s.inv_scale.item() == 1.0 / 128
    assert s.state_dict() == {}
    with pytest.raises(UserError, match="--loss-scale"):
        ConstantGradScaler(0.0)


def test_bad_flags_name_the_flag():
    with pytest.raises(UserError, match="--min-loss-scale"):
        DynamicGradScaler(initial_scale=1.0, min_scale=4.0)
    with pytest.raises(UserError, match="--hysteresis"):
        DynamicGradScaler(hysteresis=0)
    with pytest.raises(UserError, match="--loss-scale-window"):
        DynamicGradScaler(growth_interval=0)
