"""Data-parallel gradient reduction over the DP group: fp32 ``main_grad`` buffers, or torch DDP.

bf16 (and --accumulate-allreduce-grads-in-fp32): as Megatron-LM, which forces that flag for
bf16, every trainable parameter gets a persistent fp32 ``main_grad`` buffer
(``attach_main_grads``). A post-accumulate-grad hook adds each micro-batch's ``.grad`` into it
and frees ``.grad``, so gradient accumulation over micro-batches happens in fp32, not in the
parameter dtype; the training step zeroes the buffers before its first micro-batch
(``zero_main_grads``) and, after the schedule's backward passes, averages them over the DP group
(``allreduce_gradients``, bucketed by ``bucket_cap_mb``; no overlap with backward). torch DDP is
not used in this mode: its reducer reads ``.grad``. The optimizer takes ``main_grad`` in place of
``.grad`` (``megatron.optim.optimizer._grad_of``); tied-embedding and sequence-parallel gradient
reductions use it too. The parameters are broadcast from DP rank 0 once, as DDP does at
wrapping. ``wrap_data_parallel(..., main_grads=True)`` sets this up and returns the module
itself.

Otherwise (fp32; fp16 without the flag: Megatron's default accumulates in the parameter dtype)
torch.nn.parallel.DistributedDataParallel with ``process_group=parallel.dp_group`` (DESIGN.md
rule 7) does what Megatron's local DDP does - gradients are averaged over the data-parallel
replicas in buckets that are all-reduced while backward is still running - and passes our
equivalence test (DP=2 with the global batch split per rank gives the averaged gradients and
the parameters of one process with the whole batch). Settings:

- ``broadcast_buffers=False``: our modules hold no state that must follow rank 0 each step;
- the module's parameters are broadcast from DP rank 0 once, at wrapping, so every replica
  starts identical (DDP's ``init_sync``);
- gradients are averaged (DDP divides by the DP size), matching Megatron's
  ``--DDP-impl local`` with ``average_in_collective``.

A bf16 model under DDP (only when a caller asks for it without main grads) gets a comm hook
(``allreduce_hook``) that all-reduces an fp32 copy of each bf16 bucket and rounds the average
to bf16 once (gloo and NCCL add bf16 in bf16). With one DP rank no wrapper is added.

Gradient accumulation under DDP: the pipeline schedule calls ``no_sync_factory(model)()`` around
every micro-batch except the last one, so the reduction runs once per step.
"""

from typing import Callable, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron.parallel.state import ParallelState


def wrap_data_parallel(model: nn.Module, parallel: ParallelState,
                       bucket_cap_mb: float = 25, main_grads: bool = False) -> nn.Module:
    """``model`` wrapped for gradient all-reduce (average) over ``parallel.dp_group``.

    With ``dp_size == 1`` the model is returned unchanged. ``main_grads``: accumulate into fp32
    ``main_grad`` buffers instead (``attach_main_grads``); the model is returned unwrapped (its
    parameters broadcast from DP rank 0) and the training step reduces the buffers with
    ``allreduce_gradients``. A ``ModuleList`` (the interleaved schedule's model chunks) is
    treated the same way, without the buffers unless ``main_grads``.
    """
    chunks = isinstance(model, nn.ModuleList)  # the interleaved schedule's model chunks
    if main_grads or chunks:
        # The chunks' forwards are called one by one, never the list's: no DDP wrapper; the
        # training step averages the gradients after the schedule, as for main grads.
        if main_grads:
            attach_main_grads(model)
        if parallel.dp_size > 1 and parallel.dp_group is not None:
            broadcast_from_first(model, parallel.dp_group)
        return model
    if parallel.dp_size == 1 or parallel.dp_group is None:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = None
    first = next(model.parameters(), None)
    if first is not None and first.device.type == "cuda":
        device_ids = [first.device.index]
    ddp = DistributedDataParallel(model, device_ids=device_ids,
                                  process_group=parallel.dp_group,
                                  bucket_cap_mb=bucket_cap_mb, find_unused_parameters=False,
                                  **_no_buffer_sync(DistributedDataParallel))
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        ddp.register_comm_hook(parallel.dp_group, allreduce_hook)
    return ddp


def _no_buffer_sync(ddp_class):
    """DDP's flag for "do not broadcast buffers before every forward" (our buffers are equal on
    every rank by construction): ``forward_sync_buffers=False`` where torch has it (it
    deprecates ``broadcast_buffers``, with a FutureWarning on every rank), else the old name."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def attach_main_grads(model: nn.Module) -> nn.Module:
    """Give every trainable parameter of ``model`` a persistent fp32 ``main_grad`` (zeros) and a
    post-accumulate-grad hook that adds ``.grad`` into it and frees ``.grad``. Idempotent."""
    for param in model.parameters():
        if not param.requires_grad or getattr(param, "main_grad", None) is not None:
            continue
        param.main_grad = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        param.register_post_accumulate_grad_hook(_accumulate_into_main_grad)
    return model


def _accumulate_into_main_grad(param: torch.Tensor) -> None:
    grad = param.grad
    if grad is not None and grad is not param.main_grad:  # an optimizer may alias them
        param.main_grad.add_(grad)
    param.grad = None


def zero_main_grads(model: nn.Module) -> None:
    """Zero the ``main_grad`` buffers (start of a step); drops any ``.grad`` aliasing them."""
    for param in model.parameters():
        main_grad = getattr(param, "main_grad", None)
        if main_grad is not None:
            if param.grad is main_grad:
                param.grad = None
            main_grad.zero_()


def grad_buffer(param: nn.Parameter, zeros_if_missing: bool = False) -> Optional[torch.Tensor]:
    """The gradient reductions and the optimizer act on: ``main_grad`` where the parameter has
    one, else ``.grad``. ``zeros_if_missing``: a parameter backward did not reach gets a zero
    ``.grad``, so every rank enters a collective with the same tensors."""
    grad = getattr(param, "main_grad", None)
    if grad is None:
        if param.grad is None and zeros_if_missing:
            param.grad = torch.zeros_like(param)
        grad = param.grad
    return grad


@torch.no_grad()
def broadcast_from_first(model: nn.Module, group) -> None:
    """Parameters and buffers := those of the group's first rank (DDP's init sync)."""
    src = dist.get_global_rank(group, 0)
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=src, group=group)


def allreduce_gradients(module: nn.Module, group, bucket_cap_mb: float = 25) -> None:
    """Average the gradients of ``module``'s parameters over ``group`` (what DDP computes), in
    buckets of at most ``bucket_cap_mb`` (one parameter larger than that is its own bucket).

    The gradient is ``main_grad`` where a parameter has one, else ``.grad`` (None counts as
    zero). As DDP's reducer, each gradient is multiplied by ``1 / world`` before the
    all-reduce, not divided after it: fp16 gradients carry the loss scale, and summing them
    first overflows (two ranks at 40000 give inf in fp16; their average is 40000), which the
    fp16 optimizer would take for an overflow of the step. bf16 gradients are reduced in fp32
    and rounded once, as ``allreduce_hook`` does for DDP's buckets."""
    world = dist.get_world_size(group)
    cap = max(1, int(bucket_cap_mb * 1024 * 1024))
    pending = {}  # dtype -> (grads, bytes)

    def flush(grads):
        flat = torch._utils._flatten_dense_tensors(grads)  # [sum of numels]
        if flat.dtype == torch.bfloat16:
            flat = flat.float()
        flat.mul_(1.0 / world)
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    for param in module.parameters():
        if not param.requires_grad:
            continue
        grad = grad_buffer(param, zeros_if_missing=True)
        grads, size = pending.get(grad.dtype, ([], 0))
        grads.append(grad)
        size += grad.numel() * 4  # the bytes of the fp32 (or narrower) reduction buffer
        if size >= cap:
            flush(grads)
            grads, size = [], 0
        pending[grad.dtype] = (grads, size)
    for grads, _ in pending.values():
        if grads:
            flush(grads)


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
