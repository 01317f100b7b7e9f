"""Data-parallel gradient reduction over the DP group: fp32 ``main_grad`` buffers, or torch DDP.

bf16 (and --accumulate-allreduce-grads-in-fp32): as Megatron-LM, which forces that flag for
bf16, every trainable parameter gets a persistent fp32 ``main_grad`` buffer
(``attach_main_grads``). A post-accumulate-grad hook adds each micro-batch's ``.grad`` into it
and frees ``.grad``, so gradient accumulation over micro-batches happens in fp32, not in the
parameter dtype; the training step zeroes the buffers before its first micro-batch
(``zero_main_grads``) and averages them over the DP group with an ``OverlappedGradReducer``:
buckets all-reduced asynchronously as the step's last backward completes them (the overlap DDP
gives), finished before the optimizer step; ``allreduce_gradients`` is the same average after
backward. torch DDP is not used in this mode: its reducer reads ``.grad``. The optimizer takes
``main_grad`` in place of ``.grad`` (``megatron.optim.optimizer._grad_of``); tied-embedding and
sequence-parallel gradient reductions use it too. The parameters are broadcast from DP rank 0
once, as DDP does at wrapping. ``wrap_data_parallel(..., main_grads=True)`` sets this up and
returns the module itself. Pipeline stages (pp_size > 1) and the interleaved schedule's chunks
use the same reducer instead of DDP, whatever the dtype: DDP arms its reducer at forward time,
and 1F1B runs other backwards between the last forward and the last backward.

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

import contextlib
from typing import Callable, ContextManager, List, Optional

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
    ``allreduce_gradients`` or, overlapped with backward, an ``OverlappedGradReducer``. A
    ``ModuleList`` (the interleaved schedule's model chunks) and a pipeline stage (pp_size > 1)
    are treated the same way, without the buffers unless ``main_grads``.
    """
    chunks = isinstance(model, nn.ModuleList)  # the interleaved schedule's model chunks
    if main_grads or chunks or parallel.pp_size > 1:
        # No DDP wrapper (the chunks' forwards are called one by one, never the list's; DDP
        # arms at forward time, which 1F1B defeats): the training step reduces the gradients
        # with an OverlappedGradReducer.
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
    the buckets of about ``bucket_cap_mb`` that ``OverlappedGradReducer`` uses (``_buckets``),
    one after the other, after backward.

    The gradient is ``main_grad`` where a parameter has one, else ``.grad`` (None counts as
    zero). As DDP's reducer, each gradient is multiplied by ``1 / world`` before the
    all-reduce, not divided after it: fp16 gradients carry the loss scale, and summing them
    first overflows (two ranks at 40000 give inf in fp16; their average is 40000), which the
    fp16 optimizer would take for an overflow of the step. bf16 gradients are reduced in fp32
    and rounded once, as ``allreduce_hook`` does for DDP's buckets."""
    for bucket in _buckets(module, bucket_cap_mb):
        _BucketReduction([grad_buffer(p, zeros_if_missing=True) for p in bucket], group).wait()


class _BucketReduction:
    """One bucket's average over ``group``, started asynchronously: the gradients flattened
    into one buffer (fp32 for bf16), multiplied by ``1 / world`` and all-reduced (summed);
    ``wait()`` copies the average back into the gradients. Each element is reduced on its own,
    so the result does not depend on how gradients are grouped into buckets."""

    def __init__(self, grads, group):
        self.grads = grads
        flat = torch._utils._flatten_dense_tensors(grads)  # [sum of numels]
        if flat.dtype == torch.bfloat16:
            flat = flat.float()
        flat.mul_(1.0 / dist.get_world_size(group))
        self.flat = flat
        self.work = dist.all_reduce(flat, group=group, async_op=True)

    def wait(self) -> None:
        self.work.wait()
        offset = 0
        for g in self.grads:
            g.copy_(self.flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


class OverlappedGradReducer:
    """Average the gradients over the data-parallel group while backward is still running.

    For a model without a DDP wrapper (pipeline stages, the interleaved schedule's chunks, fp32
    ``main_grad`` buffers): the trainable parameters are grouped into buckets of at most
    ``bucket_cap_mb`` in reverse registration order (about the order backward reaches them),
    one dtype per bucket. Outside ``no_sync()`` (the schedule enters it for every backward but
    each model's last one of the step, as for DDP) a post-accumulate-grad hook marks a
    parameter's gradient final; a bucket whose gradients are all final starts its all-reduce
    asynchronously (``_BucketReduction``), so communication overlaps the rest of backward.
    Buckets start strictly in index order, the same on every rank, so the collectives match.
    ``finish()`` (before the optimizer step) starts the buckets backward did not complete
    (parameters it never reached reduce a zero gradient, as ``allreduce_gradients``) and waits
    for all of them. The average equals ``allreduce_gradients``'s element for element.
    ``on_start(bucket_index)``: called as each bucket starts (tests record the overlap).
    """

    def __init__(self, module: nn.Module, group, bucket_cap_mb: float = 25,
                 on_start: Optional[Callable[[int], None]] = None):
        self.group = group
        self.on_start = on_start
        self.buckets = _buckets(module, bucket_cap_mb)
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.syncing = True
        self._reset()
        for bucket in self.buckets:
            for param in bucket:  # after attach_main_grads' hook: main_grad is complete
                param.register_post_accumulate_grad_hook(self._grad_ready)

    def _reset(self) -> None:
        self.missing = [len(bucket) for bucket in self.buckets]
        self.seen = set()
        self.started: List[_BucketReduction] = []

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate only (not the step's last one)."""
        previous, self.syncing = self.syncing, False
        try:
            yield
        finally:
            self.syncing = previous

    def _grad_ready(self, param: torch.Tensor) -> None:
        if not self.syncing:
            return
        if id(param) in self.seen:
            raise RuntimeError("a parameter's gradient arrived twice in the step's last "
                               "backward: the overlapped all-reduce needs one backward per "
                               "micro-batch")
        self.seen.add(id(param))
        self.missing[self.bucket_of[id(param)]] -= 1
        while len(self.started) < len(self.buckets) and self.missing[len(self.started)] == 0:
            self._start(len(self.started))

    def _start(self, index: int) -> None:
        grads = [grad_buffer(p, zeros_if_missing=True) for p in self.buckets[index]]
        self.started.append(_BucketReduction(grads, self.group))
        if self.on_start is not None:
            self.on_start(index)

    def finish(self) -> None:
        """Start what backward did not, wait for every bucket; ready for the next step."""
        while len(self.started) < len(self.buckets):
            self._start(len(self.started))
        for reduction in self.started:
            reduction.wait()
        self._reset()


def _buckets(module, bucket_cap_mb):
    """``module``'s trainable parameters in reverse order, cut into buckets of one gradient
    dtype and about ``bucket_cap_mb`` (counted as fp32; a larger parameter is a bucket of its
    own)."""
    cap_bytes = max(1, int(bucket_cap_mb * 1024 * 1024))
    buckets, size, dtype = [], 0, None
    for param in reversed([p for p in module.parameters() if p.requires_grad]):
        grad_dtype = torch.float32 if getattr(param, "main_grad", None) is not None \
            else param.dtype
        if not buckets or grad_dtype != dtype or size >= cap_bytes:
            buckets.append([])
            size, dtype = 0, grad_dtype
        buckets[-1].append(param)
        size += param.numel() * 4
    return buckets


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
