"""Megatron-DeepSpeed's --log-optimizer-states-to-tensorboard: size statistics of Adam's moments
and of the weights the optimizer updates.

Megatron-DeepSpeed's tags (``optimizer/<name>``, plotted against iterations and, as every
TensorBoard series here, consumed samples/tokens): ``variance_l2``, ``variance_sqrt_l2``,
``momentum_l2``, ``weight_l2`` (L2 norms of ``exp_avg_sq``, its square root, ``exp_avg`` and the
parameters), the same four as ``*_l1`` (L1 norms) and as ``*_abs_max`` (largest absolute value).

Each parameter counts once over the whole model, as the gradient norm does: tensor-parallel
shards on every rank, replicated parameters on tensor-parallel rank 0 only, the pipeline's shared
copy of the tied embedding never (Megatron-DeepSpeed sums every rank's copy of the replicated
ones over the TP group, which counts them TP times). Under --use-distributed-optimizer each
data-parallel rank holds the moments of its own parameters, so the sums also run over the DP
group. For fp16/bf16 models the weights are the fp32 master copies. A collective over the
model-parallel (and, with ZeRO, data-parallel) groups: call it on every rank.
"""

import torch
import torch.distributed as dist

from megatron.optim.clip_grads import (param_is_not_shared,
                                       param_is_not_tensor_parallel_duplicate)
from megatron.optim.distributed import is_zero, local_optimizer

NAMES = ("variance", "variance_sqrt", "momentum", "weight")


def _tensors(state, param):
    exp_avg_sq = state["exp_avg_sq"].float()
    return exp_avg_sq, exp_avg_sq.sqrt(), state["exp_avg"].float(), param.detach().float()


def optimizer_state_stats(optimizer, parallel) -> dict:
    """{'optimizer/<name>_l2' | '_l1' | '_abs_max': float} for a Megatron optimizer wrapper
    (empty before Adam's first step, or for SGD, which keeps no second moment)."""
    torch_opt = optimizer.optimizer
    local = local_optimizer(torch_opt)
    counted = [(local.state[p], p) for group in local.param_groups for p in group["params"]
               if "exp_avg_sq" in local.state.get(p, {}) and param_is_not_shared(p)
               and param_is_not_tensor_parallel_duplicate(p, parallel.tp_rank)]
    device = counted[0][1].device if counted else torch.device("cpu")
    sums = torch.zeros(8, dtype=torch.float64, device=device)  # 4 squared L2, 4 L1
    maxes = torch.zeros(4, dtype=torch.float64, device=device)
    for state, param in counted:
        for i, t in enumerate(_tensors(state, param)):
            sums[i] += torch.linalg.vector_norm(t, 2).double() ** 2
            sums[4 + i] += torch.linalg.vector_norm(t, 1).double()
            maxes[i] = torch.maximum(maxes[i], t.abs().max().double())
    groups = [parallel.mp_group]
    if is_zero(torch_opt):
        groups.append(parallel.dp_group)
    any_state = torch.tensor([float(bool(counted))], dtype=torch.float64, device=device)
    for group in groups:
        if group is not None and dist.is_initialized():
            dist.all_reduce(sums, group=group)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(any_state, op=dist.ReduceOp.MAX, group=group)
    if not any_state.item():
        return {}
    stats = {}
    for i, name in enumerate(NAMES):
        stats[f"optimizer/{name}_l2"] = float(sums[i].sqrt())
        stats[f"optimizer/{name}_l1"] = float(sums[4 + i])
        stats[f"optimizer/{name}_abs_max"] = float(maxes[i])
    return stats
