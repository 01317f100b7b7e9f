"""Data-parallel gradient reduction: torch's DistributedDataParallel over the DP group.

Choice (DESIGN.md rule 7): torch.nn.parallel.DistributedDataParallel with
``process_group=parallel.dp_group`` does what Megatron's local DDP does - gradients are averaged
over the data-parallel replicas in buckets that are all-reduced while backward is still running -
and passes our equivalence test (DP=2 with the global batch split per rank gives the averaged
gradients and the parameters of one process with the whole batch). Settings:

- ``broadcast_buffers=False``: our modules hold no state that must follow rank 0 each step;
- the module's parameters are broadcast from DP rank 0 once, at wrapping, so every replica
  starts identical (DDP's ``init_sync``);
- gradients are averaged (DDP divides by the DP size), matching Megatron's
  ``--DDP-impl local`` with ``average_in_collective``.

bf16: Megatron-LM turns on ``--accumulate-allreduce-grads-in-fp32`` for bf16 (a bf16 sum over
many replicas loses the low bits: gloo and NCCL add bf16 in bf16). A bf16 model's DDP gets a
comm hook (``allreduce_hook``) that all-reduces an fp32 copy of each bf16 bucket and rounds the
average to bf16 once; fp32 and fp16 buckets are reduced in their dtype as DDP does (Megatron's
default for fp16). Difference left: the accumulation over micro-batches still happens in the
bf16 ``.grad`` (Megatron accumulates into an fp32 ``main_grad``). With one DP rank no wrapper
is added.

Gradient accumulation: the pipeline schedule calls ``no_sync_factory(model)()`` around every
micro-batch except the last one, so the reduction runs once per step.
"""

from typing import Callable, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron.parallel.state import ParallelState


def wrap_data_parallel(model: nn.Module, parallel: ParallelState,
                       bucket_cap_mb: float = 25) -> nn.Module:
    """``model`` wrapped for gradient all-reduce (average) over ``parallel.dp_group``.

    With ``dp_size == 1`` the model is returned unchanged.
    """
    if parallel.dp_size == 1 or parallel.dp_group is None:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = None
    first = next(model.parameters(), None)
    if first is not None and first.device.type == "cuda":
        device_ids = [first.device.index]
    ddp = DistributedDataParallel(model, device_ids=device_ids,
                                  process_group=parallel.dp_group,
                                  bucket_cap_mb=bucket_cap_mb, broadcast_buffers=False,
                                  find_unused_parameters=False)
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        ddp.register_comm_hook(parallel.dp_group, allreduce_hook)
    return ddp


def allreduce_hook(group, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the average over ``group``, bf16 buckets reduced in fp32.

    Each gradient is multiplied by ``1 / world`` and the results summed, as DDP's own reducer;
    a bf16 bucket is upcast for this and the average rounded to bf16 once.
    """
    buffer = bucket.buffer()
    work = buffer.float() if buffer.dtype == torch.bfloat16 else buffer
    work.mul_(1.0 / dist.get_world_size(group))
    future = dist.all_reduce(work, group=group, async_op=True).get_future()

    def unpack(fut):
        reduced = fut.value()[0]
        if reduced is not buffer:
            buffer.copy_(reduced)
        return buffer

    return future.then(unpack)


def is_data_parallel(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def unwrap(model):
    """The module inside a data-parallel wrapper (lists of modules unwrapped element-wise)."""
    if isinstance(model, (list, tuple)):
        return type(model)(unwrap(m) for m in model)
    while is_data_parallel(model):
        model = model.module
    return model


def no_sync_factory(model) -> Optional[Callable[[], ContextManager]]:
    """A callable returning a context that skips the gradient reduction (for all micro-batches
    but the last); None when ``model`` is not data-parallel (one DP rank)."""
    if isinstance(model, (list, tuple)):
        wrapped = [m for m in model if is_data_parallel(m)]
        if not wrapped:
            return None
        import contextlib

        def no_sync_all():
            stack = contextlib.ExitStack()
            for m in wrapped:
                stack.enter_context(m.no_sync())
            return stack

        return no_sync_all
    return model.no_sync if is_data_parallel(model) else None
