"""Gradient norm, clipping and zero counting over fp32 (main) gradients, Megatron style.

With tensor parallelism some parameters (layer norms, row-parallel biases) are replicated on every
TP rank; their gradients must enter the global norm once, so only TP rank 0 contributes them.
Parameters that are split across TP ranks carry ``param.tensor_model_parallel = True`` (set by the
parallel layers) and every rank contributes its shard. Parameters marked ``param.shared = True``
(e.g. the second copy of a tied embedding) are left out of the norm too. The partial sums are then
all-reduced over the model-parallel (TP x PP) group.
"""

import math

import torch
import torch.distributed as dist


def param_is_not_shared(param):
    return not getattr(param, "shared", False)


def param_is_not_tensor_parallel_duplicate(param, tp_rank=0):
    """True if this rank owns ``param``'s contribution to the global norm."""
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


def get_grads_for_norm(params, tp_rank=0):
    """The ``.grad`` tensors of ``params`` that count towards the global gradient norm."""
    return [
        p.grad.detach()
        for p in params
        if p.grad is not None
        and param_is_not_shared(p)
        and param_is_not_tensor_parallel_duplicate(p, tp_rank)
    ]


def _all_reduce(tensor, op, group):
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op, group=group)


def clip_grad_norm_fp32(params, grads_for_norm, max_norm, norm_type=2, model_parallel_group=None):
    """Clip the gradients of ``params`` in place so their global norm is at most ``max_norm``.

    ``grads_for_norm`` are the gradients that define the norm (see ``get_grads_for_norm``); all
    gradients of ``params`` are scaled. Returns the total norm before clipping, as a float.
    """
    if isinstance(params, torch.Tensor):
        params = [params]
    if isinstance(grads_for_norm, torch.Tensor):
        grads_for_norm = [grads_for_norm]
    params = list(params)
    grads = [p.grad.detach() for p in params if p.grad is not None]
    for g in grads:
        assert g.dtype == torch.float32, f"clip_grad_norm_fp32 expects fp32 grads, got {g.dtype}"
    # The partial norm is all-reduced: on the parameters' device even when this rank holds no
    # gradient (a CPU tensor cannot go through NCCL).
    device = grads[0].device if grads else (
        grads_for_norm[0].device if grads_for_norm else
        params[0].device if params else torch.device("cpu"))

    norm_type = float(norm_type)
    if math.isinf(norm_type):
        if grads_for_norm:
            total = torch.stack(torch._foreach_norm(grads_for_norm, norm_type)).max().float()
        else:
            total = torch.zeros((), dtype=torch.float32, device=device)
        _all_reduce(total, dist.ReduceOp.MAX, model_parallel_group)
        total_norm = total.item()
    else:
        if grads_for_norm:
            per_tensor = torch._foreach_norm(grads_for_norm, norm_type)
            total = torch.stack(per_tensor).float().pow(norm_type).sum()
        else:
            total = torch.zeros((), dtype=torch.float32, device=device)
        _all_reduce(total, dist.ReduceOp.SUM, model_parallel_group)
        total_norm = total.item() ** (1.0 / norm_type)

    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)
    return total_norm


def count_zeros_fp32(params, model_parallel_group=None, tp_rank=0):
    """Number of exactly-zero gradient entries, counted like the norm (no duplicates)."""
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    grads = get_grads_for_norm(params, tp_rank)
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        total += g.numel() - torch.count_nonzero(g)
    _all_reduce(total, dist.ReduceOp.SUM, model_parallel_group)
    return int(total.item())
