"""--use-distributed-optimizer: ZeRO-1 with torch's ZeroRedundancyOptimizer.

Choice (DESIGN.md rule 7): the torch optimizer inside our ``FP32Optimizer`` /
``Float16OptimizerWithFloat16Params`` is replaced by
``ZeroRedundancyOptimizer(param_groups, optimizer_class=AdamW|SGD, process_group=dp_group)``.
Each data-parallel rank owns a subset of the parameters (greedy, largest first, about 1/DP of the
elements); its local AdamW holds ``exp_avg``/``exp_avg_sq`` for those only and steps them; after
the step every owner broadcasts its updated parameters, so all replicas hold identical weights.
The wrappers are unchanged around it: gradients are all-reduced by DDP (every rank has the full
averaged gradients), so gradient clipping computes the norm from the full gradients, reduced over
the model-parallel group only - the global norm, each element counted once. fp16 inf/nan checks
likewise see identical gradients on every DP rank and skip the step together.

For bf16/fp16 models the fp32 master copies are what ZeRO steps and broadcasts: the Adam moments
(2 x 4 bytes per parameter) are sharded, the masters (4 bytes) stay replicated. Megatron's
distributed optimizer also shards the masters and reduce-scatters the gradients; that further
saving is not implemented.

Checkpoints. Megatron writes the sharded state to a separate ``distrib_optim.pt`` per (tp, pp)
rank, in the layout of its contiguous grad buffer, which ties it to the DP size (newer Megatron
reshards through torch.distributed.checkpoint). We consolidate instead: saving gathers every
rank's shard on DP rank 0 (``consolidate_state_dict``) into the ordinary torch optimizer
``state_dict`` (states keyed by global parameter index), stored under ``optimizer`` in
``model_optim_rng.pt`` as without the distributed optimizer. The saved state does not depend on
the DP size or on the flag: a run may resume with another DP size, with or without
``--use-distributed-optimizer``; each rank loads the entries of the parameters it owns.
"""

import inspect

import torch
import torch.distributed as dist


def is_zero(optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def shard_optimizer_state(wrapper, data_parallel_group):
    """Replace ``wrapper.optimizer`` (a fresh torch optimizer, no state yet) by a
    ZeroRedundancyOptimizer over the same parameter groups, sharded over ``data_parallel_group``.
    A no-op without a group (one DP rank). Returns ``wrapper``."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if data_parallel_group is None or is_zero(wrapper.optimizer):
        return wrapper
    local = wrapper.optimizer
    if len(local.state):
        raise ValueError("shard_optimizer_state must wrap a fresh optimizer (it has state)")
    cls = type(local)
    accepted = inspect.signature(cls.__init__).parameters
    defaults = {k: v for k, v in local.defaults.items() if k in accepted and k != "params"}
    groups = [dict(group, params=list(group["params"])) for group in local.param_groups]
    wrapper.optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=cls,
                                                process_group=data_parallel_group, **defaults)
    return wrapper


def local_optimizer(optimizer):
    """The torch optimizer that holds this rank's state (ZeRO's local one, else itself)."""
    return optimizer.optim if is_zero(optimizer) else optimizer


def optimizer_state_dict(optimizer):
    """The full (layout-independent) torch state dict. For ZeRO this is a collective over its
    DP group: call it on every DP rank; DP rank 0 gets the dict, the others None."""
    if not is_zero(optimizer):
        return optimizer.state_dict()
    optimizer.consolidate_state_dict(to=0)
    if optimizer.rank != 0:
        return None
    state = optimizer.state_dict()
    optimizer._all_state_dicts = []  # the gathered copies are in ``state`` now
    return state


def load_optimizer_state_dict(optimizer, state_dict):
    """Load a full torch state dict (from a run with any DP size); ZeRO keeps its own part."""
    if not is_zero(optimizer):
        optimizer.load_state_dict(state_dict)
        return
    # ZeroRedundancyOptimizer.load_state_dict overwrites entries of the dict it is given.
    optimizer.load_state_dict({**state_dict, "state": dict(state_dict["state"])})
    _place_step_counters(optimizer.optim)


def _place_step_counters(optimizer) -> None:
    """Put the ``step`` counters of fused / capturable groups back on their parameter's device.

    ZeroRedundancyOptimizer.load_state_dict writes the local optimizer's state itself and moves
    every 0-dim state tensor (Adam's ``step``) to the CPU (pytorch/pytorch#124133). The fused
    AdamW we build on GPU needs them on the parameters' device ("Expected all tensors to be on
    the same device ... state_steps" at the first step after a resume); torch's own
    Optimizer.load_state_dict does this conversion for fused and capturable groups.
    """
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for param in group["params"]:
            state = optimizer.state.get(param)
            step = state.get("step") if state else None
            if torch.is_tensor(step):
                state["step"] = step.to(device=param.device, dtype=torch.float32)


def local_state_numel(optimizer) -> int:
    """Elements of the optimizer state tensors held by this rank (step counters excluded)."""
    total = 0
    for state in local_optimizer(optimizer).state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                total += value.numel()
    return total


def dp_all_equal(tensors, group) -> bool:
    """True when ``tensors`` are bitwise equal on every rank of ``group`` (a test helper)."""
    if group is None:
        return True
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    reference = flat.clone()
    dist.broadcast(reference, src=dist.get_global_rank(group, 0), group=group)
    # on the tensors' device: NCCL moves only GPU tensors
    same = torch.tensor([1.0 if torch.equal(flat, reference) else 0.0], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN, group=group)
    return bool(same.item() == 1.0)
