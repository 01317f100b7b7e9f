"""Optimizer construction, loss scaling, gradient clipping and LR/weight-decay schedules."""

from megatron.optim.clip_grads import clip_grad_norm_fp32, count_zeros_fp32, get_grads_for_norm
from megatron.optim.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron.optim.lr_scheduler import (
    OptimizerParamScheduler,
    ScheduleSteps,
    scheduler_from_args,
    scheduler_steps_from_args,
)
from megatron.optim.optimizer import (
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    MegatronOptimizer,
    build_optimizer,
    get_param_groups,
)

__all__ = [
    "ConstantGradScaler", "DynamicGradScaler", "FP32Optimizer",
    "Float16OptimizerWithFloat16Params", "MegatronOptimizer", "OptimizerParamScheduler",
    "ScheduleSteps", "build_optimizer", "clip_grad_norm_fp32", "count_zeros_fp32",
    "get_grads_for_norm", "get_param_groups", "scheduler_from_args",
    "scheduler_steps_from_args",
]
