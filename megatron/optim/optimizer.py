"""Optimizer construction and Megatron's optimizer wrappers.

``build_optimizer`` groups the parameters (no weight decay for biases and norm weights), builds a
torch AdamW (Megatron's Adam is AdamW: decoupled weight decay) or SGD, fused where the device
supports it, and wraps it:

- ``FP32Optimizer``: model parameters are fp32; clip and step.
- ``Float16OptimizerWithFloat16Params``: model parameters are bf16/fp16. The torch optimizer owns
  fp32 master copies; each step copies the model grads into fp32 master grads, (fp16) unscales
  them and skips the step on inf/nan, clips, steps the masters and copies them back into the
  model parameters.

Gradients are taken from ``param.main_grad`` when the parameter has one (fp32 accumulation and
all-reduce, ``megatron.parallel.data_parallel.attach_main_grads``: bf16, or
--accumulate-allreduce-grads-in-fp32), otherwise from ``param.grad``. An fp32 ``main_grad``
becomes the master's ``.grad`` without a copy (as Megatron); it is zeroed at the next step.
"""

import torch
import torch.distributed as dist

from megatron.errors import UserError
from megatron.optim.clip_grads import clip_grad_norm_fp32, count_zeros_fp32, get_grads_for_norm
from megatron.optim.distributed import (load_optimizer_state_dict, optimizer_state_dict,
                                        shard_optimizer_state)
from megatron.optim.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron.parallel.data_parallel import grad_buffer

_TP_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "shared")


def _default_no_weight_decay(name, param):
    return name.endswith(".bias") or param.ndim == 1


def get_param_groups(model, no_weight_decay_cond=None, lr_mult=1.0, scale_lr_cond=None):
    """Split trainable parameters into groups with ``wd_mult`` (0 or 1) and ``lr_mult``.

    ``model`` is a module or a list of modules (virtual pipeline chunks). By default biases and
    1-D parameters (norm weights) get no weight decay. ``lr_mult`` applies to the parameters
    where ``scale_lr_cond(name, param)`` holds, or to all parameters when no condition is given.
    Empty groups are dropped; the group order is Megatron's.
    """
    modules = model if isinstance(model, (list, tuple)) else [model]
    no_wd = no_weight_decay_cond or _default_no_weight_decay
    buckets = {(1.0, False): [], (1.0, True): [], (0.0, False): [], (0.0, True): []}
    seen = set()
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            wd_mult = 0.0 if no_wd(name, param) else 1.0
            scaled = scale_lr_cond(name, param) if scale_lr_cond is not None else lr_mult != 1.0
            buckets[(wd_mult, bool(scaled))].append(param)
    groups = []
    for (wd_mult, scaled), params in buckets.items():
        if params:
            groups.append({"params": params, "wd_mult": wd_mult,
                           "lr_mult": lr_mult if scaled else 1.0})
    return groups


def _zero_grad_group(params, set_to_none):
    for p in params:
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()


class MegatronOptimizer:
    """Common interface of the wrappers; ``self.optimizer`` is the torch optimizer."""

    def __init__(self, optimizer, clip_grad=1.0, log_num_zeros_in_grad=False,
                 model_parallel_group=None, tp_rank=0):
        self.optimizer = optimizer
        self.clip_grad = clip_grad
        self.log_num_zeros_in_grad = log_num_zeros_in_grad
        self.model_parallel_group = model_parallel_group
        self.tp_rank = tp_rank

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    def get_parameters(self):
        """The parameters the torch optimizer updates (fp32 masters for float16 models)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def clip_grad_norm(self, clip_grad):
        params = self.get_parameters()
        return clip_grad_norm_fp32(params, get_grads_for_norm(params, self.tp_rank), clip_grad,
                                   model_parallel_group=self.model_parallel_group)

    def count_zeros(self):
        return count_zeros_fp32(self.get_parameters(), self.model_parallel_group, self.tp_rank)

    def _clip_count_step(self):
        grad_norm = self.clip_grad_norm(self.clip_grad) if self.clip_grad > 0.0 else None
        num_zeros = self.count_zeros() if self.log_num_zeros_in_grad else None
        self.optimizer.step()
        return grad_norm, num_zeros

    def scale_loss(self, loss):
        """The loss to call ``backward`` on."""
        return loss

    def get_loss_scale(self):
        """Current loss scale as a one-element tensor (1.0 without a grad scaler)."""
        return torch.ones(1)

    def zero_grad(self, set_to_none=True):
        raise NotImplementedError

    def step(self):
        """Returns ``(update_successful, grad_norm, num_zeros)``."""
        raise NotImplementedError

    def reload_model_params(self):
        pass

    def state_dict(self):
        raise NotImplementedError

    def load_state_dict(self, state_dict):
        raise NotImplementedError


class FP32Optimizer(MegatronOptimizer):
    """Model parameters are fp32: the torch optimizer updates them directly."""

    def zero_grad(self, set_to_none=True):
        for group in self.optimizer.param_groups:
            _zero_grad_group(group["params"], set_to_none)

    @torch.no_grad()
    def step(self):
        for p in self.get_parameters():
            main_grad = getattr(p, "main_grad", None)
            if main_grad is not None:
                p.grad = main_grad
        grad_norm, num_zeros = self._clip_count_step()
        return True, grad_norm, num_zeros

    def state_dict(self):
        # As Megatron: the fp32 optimizer's checkpoint is the torch optimizer's state itself.
        # (--use-distributed-optimizer: a collective over DP; None on DP ranks other than 0.)
        return optimizer_state_dict(self.optimizer)

    def load_state_dict(self, state_dict):
        if "state" not in state_dict and "optimizer" in state_dict:
            state_dict = state_dict["optimizer"]
        load_optimizer_state_dict(self.optimizer, state_dict)


class Float16OptimizerWithFloat16Params(MegatronOptimizer):
    """bf16/fp16 model parameters with fp32 master copies owned by the torch optimizer.

    ``grad_scaler``: a ``ConstantGradScaler`` with --loss-scale, else for fp16 a
    ``DynamicGradScaler``, else (bf16) None.
    fp32 parameters of the model (if any) are updated in place, as in ``FP32Optimizer``.
    """

    def __init__(self, optimizer, clip_grad=1.0, log_num_zeros_in_grad=False,
                 model_parallel_group=None, tp_rank=0, grad_scaler=None):
        super().__init__(optimizer, clip_grad, log_num_zeros_in_grad, model_parallel_group,
                         tp_rank)
        self.grad_scaler = grad_scaler
        self.float16_groups = []          # model params (bf16/fp16), per group
        self.fp32_from_float16_groups = []  # their fp32 masters, per group
        self.fp32_from_fp32_groups = []   # model params that are already fp32, per group
        device = None
        for group in self.optimizer.param_groups:
            float16, masters, fp32 = [], [], []
            for i, param in enumerate(group["params"]):
                if not param.requires_grad:
                    continue
                device = device or param.device
                if param.dtype in (torch.float16, torch.bfloat16):
                    main = param.detach().clone().float()
                    for attr in _TP_ATTRS:
                        if hasattr(param, attr):
                            setattr(main, attr, getattr(param, attr))
                    group["params"][i] = main
                    if param in self.optimizer.state:
                        self.optimizer.state[main] = self.optimizer.state.pop(param)
                    float16.append(param)
                    masters.append(main)
                elif param.dtype == torch.float32:
                    fp32.append(param)
                else:
                    raise TypeError(f"unsupported parameter dtype {param.dtype}")
            self.float16_groups.append(float16)
            self.fp32_from_float16_groups.append(masters)
            self.fp32_from_fp32_groups.append(fp32)
        self._device = device or torch.device("cpu")
        if self.grad_scaler is not None:
            self.grad_scaler.to(self._device)

    # -- loss scaling ----------------------------------------------------------------------------

    def get_loss_scale(self):
        if self.grad_scaler is None:
            return torch.ones(1, device=self._device)
        return self.grad_scaler.scale

    def scale_loss(self, loss):
        if self.grad_scaler is None:
            return loss
        return loss * self.grad_scaler.scale.to(loss.device)

    # -- grads and params ------------------------------------------------------------------------

    def zero_grad(self, set_to_none=True):
        for groups in (self.float16_groups, self.fp32_from_float16_groups,
                       self.fp32_from_fp32_groups):
            for group in groups:
                _zero_grad_group(group, set_to_none)

    def _main_grads(self):
        grads = []
        for groups in (self.fp32_from_float16_groups, self.fp32_from_fp32_groups):
            for group in groups:
                grads.extend(p.grad for p in group if p.grad is not None)
        return grads

    def _copy_model_grads_to_main_grads(self):
        for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups):
            for model_param, main_param in zip(model_group, main_group):
                grad = grad_buffer(model_param)
                main_param.grad = None if grad is None else grad.float()
                # The fp32 copy holds it now; free the float16 grad.
                model_param.grad = None
        for group in self.fp32_from_fp32_groups:
            for param in group:
                main_grad = getattr(param, "main_grad", None)
                if main_grad is not None:
                    param.grad = main_grad

    def _unscale_main_grads_and_check_for_nan(self):
        found_inf = torch.zeros(1, dtype=torch.float32, device=self._device)
        grads = self._main_grads()
        if grads:
            inv_scale = self.grad_scaler.inv_scale.to(self._device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        if (self.model_parallel_group is not None and dist.is_available()
                and dist.is_initialized()):
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self.model_parallel_group)
        return found_inf.item() > 0

    def _copy_main_params_to_model_params(self):
        model, main = [], []
        for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups):
            model.extend(model_group)
            main.extend(main_group)
        if model:
            torch._foreach_copy_([p.data for p in model], [p.data for p in main])

    def _copy_model_params_to_main_params(self):
        model, main = [], []
        for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups):
            model.extend(model_group)
            main.extend(main_group)
        if model:
            torch._foreach_copy_([p.data for p in main], [p.data for p in model])

    def reload_model_params(self):
        """After loading model weights (without optimizer state): masters := model params."""
        self._copy_model_params_to_main_params()

    @torch.no_grad()
    def step(self):
        self._copy_model_grads_to_main_grads()
        if self.grad_scaler is not None:
            found_inf = self._unscale_main_grads_and_check_for_nan()
            self.grad_scaler.update(found_inf)
            if found_inf:
                return False, None, None
        grad_norm, num_zeros = self._clip_count_step()
        self._copy_main_params_to_model_params()
        return True, grad_norm, num_zeros

    # -- checkpointing ---------------------------------------------------------------------------

    def state_dict(self):
        state = {"optimizer": optimizer_state_dict(self.optimizer)}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        state["fp32_from_fp16_params"] = self.fp32_from_float16_groups
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        key = "optimizer" if "optimizer" in state_dict else "optimizer_state_dict"
        load_optimizer_state_dict(self.optimizer, state_dict[key])
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        # Without 'grad_scaler' (old or bf16 checkpoint) the fresh scaler is kept, as Megatron.
        key = "fp32_from_fp16_params" if "fp32_from_fp16_params" in state_dict \
            else "fp32_from_fp16"
        saved_groups = state_dict[key]
        if len(saved_groups) != len(self.fp32_from_float16_groups):
            raise UserError(f"optimizer checkpoint has {len(saved_groups)} master-param groups, "
                            f"the model has {len(self.fp32_from_float16_groups)}")
        for current_group, saved_group in zip(self.fp32_from_float16_groups, saved_groups):
            if len(current_group) != len(saved_group):
                raise UserError("optimizer checkpoint's master params do not match the model")
            for current, saved in zip(current_group, saved_group):
                current.data.copy_(saved.data)


def _torch_optimizer(name, groups, *, lr, weight_decay, adam_beta1, adam_beta2, adam_eps,
                     sgd_momentum, log):
    """AdamW or SGD, fused when the device supports it, else the foreach implementation."""
    if name == "adam":
        cls = torch.optim.AdamW
        kwargs = dict(lr=lr, weight_decay=weight_decay, betas=(adam_beta1, adam_beta2),
                      eps=adam_eps)
    elif name == "sgd":
        cls = torch.optim.SGD
        kwargs = dict(lr=lr, weight_decay=weight_decay, momentum=sgd_momentum)
    else:
        raise UserError(f"--optimizer must be 'adam' or 'sgd', got {name!r}")
    try:
        opt = cls(groups, fused=True, **kwargs)
        impl = "fused"
    except (RuntimeError, ValueError, TypeError):
        opt = cls(groups, foreach=True, **kwargs)
        impl = "foreach"
    log(f"> optimizer: torch.optim.{cls.__name__} ({impl})")
    return opt


_FLAG_NAMES = ("optimizer", "lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
               "sgd_momentum", "clip_grad", "fp16", "bf16", "loss_scale", "initial_loss_scale",
               "min_loss_scale", "loss_scale_window", "hysteresis", "log_num_zeros_in_grad",
               "use_distributed_optimizer")


def build_optimizer(model, args=None, *, optimizer="adam", lr=None, weight_decay=0.01,
                    adam_beta1=0.9,
                    adam_beta2=0.999, adam_eps=1e-8, sgd_momentum=0.9, clip_grad=1.0,
                    fp16=False, bf16=False, loss_scale=None, initial_loss_scale=2.0**32,
                    min_loss_scale=1.0, loss_scale_window=1000, hysteresis=2,
                    model_parallel_group=None, log=print, tp_rank=0,
                    log_num_zeros_in_grad=False, no_weight_decay_cond=None,
                    scale_lr_cond=None, lr_mult=1.0, use_distributed_optimizer=False,
                    data_parallel_group=None):
    """Build the Megatron optimizer for ``model`` (a module or list of modules).

    Keyword names follow Megatron's flags (``--adam-beta1`` -> ``adam_beta1`` ...). When a config
    ``args`` with those attribute names is given, its values replace the keywords'. ``loss_scale``
    None means dynamic loss scaling for fp16. ``tp_rank`` decides which replicated parameters
    count towards the gradient norm. ``use_distributed_optimizer`` shards the optimizer state
    over ``data_parallel_group`` (ZeRO-1, see ``megatron.optim.distributed``).
    """
    if args is not None:
        flags = dict(optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                     adam_beta1=adam_beta1, adam_beta2=adam_beta2, adam_eps=adam_eps,
                     sgd_momentum=sgd_momentum, clip_grad=clip_grad, fp16=fp16, bf16=bf16,
                     loss_scale=loss_scale, initial_loss_scale=initial_loss_scale,
                     min_loss_scale=min_loss_scale, loss_scale_window=loss_scale_window,
                     hysteresis=hysteresis, log_num_zeros_in_grad=log_num_zeros_in_grad,
                     use_distributed_optimizer=use_distributed_optimizer)
        flags.update({k: getattr(args, k) for k in _FLAG_NAMES if hasattr(args, k)})
        return build_optimizer(model, **flags, model_parallel_group=model_parallel_group,
                               log=log, tp_rank=tp_rank, no_weight_decay_cond=no_weight_decay_cond,
                               scale_lr_cond=scale_lr_cond, lr_mult=lr_mult,
                               data_parallel_group=data_parallel_group)
    if fp16 and bf16:
        raise UserError("--fp16 and --bf16 are mutually exclusive")
    if lr is None:
        raise UserError("--lr is required")
    if clip_grad < 0:
        raise UserError(f"--clip-grad must be >= 0, got {clip_grad}")
    groups = get_param_groups(model, no_weight_decay_cond, lr_mult, scale_lr_cond)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    for group in groups:
        group["lr"] = lr * group["lr_mult"]
        group["weight_decay"] = weight_decay * group["wd_mult"]
    torch_opt = _torch_optimizer(optimizer, groups, lr=lr, weight_decay=weight_decay,
                                 adam_beta1=adam_beta1, adam_beta2=adam_beta2,
                                 adam_eps=adam_eps, sgd_momentum=sgd_momentum, log=log)
    common = dict(clip_grad=clip_grad, log_num_zeros_in_grad=log_num_zeros_in_grad,
                  model_parallel_group=model_parallel_group, tp_rank=tp_rank)
    if not (fp16 or bf16):
        wrapper = FP32Optimizer(torch_opt, **common)
        return shard_optimizer_state(wrapper, data_parallel_group) \
            if use_distributed_optimizer else wrapper
    # As Megatron: --loss-scale is a static scale for fp16 and bf16 alike; without it fp16
    # scales dynamically and bf16 does not scale.
    grad_scaler = None
    if loss_scale:
        grad_scaler = ConstantGradScaler(loss_scale)
    elif fp16:
        grad_scaler = DynamicGradScaler(initial_scale=initial_loss_scale,
                                        min_scale=min_loss_scale, growth_factor=2.0,
                                        backoff_factor=0.5, growth_interval=loss_scale_window,
                                        hysteresis=hysteresis)
    wrapper = Float16OptimizerWithFloat16Params(torch_opt, grad_scaler=grad_scaler, **common)
    # After the wrapper swapped in the fp32 masters: ZeRO partitions the masters.
    return shard_optimizer_state(wrapper, data_parallel_group) \
        if use_distributed_optimizer else wrapper
