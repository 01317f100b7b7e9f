"""Cross entropy over logits whose vocabulary dimension is split across tensor-parallel ranks.

Megatron-LM's ``_VocabParallelCrossEntropy``: each rank holds logits for its vocabulary slice;
the max, the target logit and the sum of exponentials are combined with three all-reduces over
[b, s] tensors, never gathering the [b, s, V] logits. The softmax is computed in place into the
(fp32) logits buffer and kept for backward, whose gradient is again formed in place, so the
whole loss costs one full-size fp32 buffer (the logits themselves when they are fp32 and
``inplace``), which matters with a 50k vocabulary.
"""

import torch
import torch.distributed as dist

from megatron.parallel.state import ParallelState


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, parallel, inplace):
        ctx.input_dtype = logits.dtype
        if logits.dtype != torch.float32:
            logits = logits.float()  # a private fp32 copy we may overwrite
        elif not inplace:
            logits = logits.clone()
        tp = parallel.tp_size

        # Shift by the row max (over the whole vocabulary) for a stable exp.
        logits_max = logits.amax(dim=-1)  # [b, s]
        if tp > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=parallel.tp_group)
        logits.sub_(logits_max.unsqueeze(-1))

        # The target's logit lives on one rank; the others contribute zero.
        part = logits.size(-1)
        if tp > 1:
            start = parallel.tp_rank * part
            outside = (target < start) | (target >= start + part)  # [b, s]
            local_target = (target - start).masked_fill(outside, 0)
        else:
            outside = None
            local_target = target
        local_target = local_target.unsqueeze(-1)  # [b, s, 1]
        predicted = logits.gather(-1, local_target).squeeze(-1)  # [b, s]
        if tp > 1:
            predicted = predicted.masked_fill(outside, 0.0)
            dist.all_reduce(predicted, group=parallel.tp_group)

        logits.exp_()
        sum_exp = logits.sum(dim=-1)  # [b, s]
        if tp > 1:
            dist.all_reduce(sum_exp, group=parallel.tp_group)
        loss = torch.log(sum_exp) - predicted  # [b, s]

        softmax = logits.div_(sum_exp.unsqueeze(-1))  # [b, s, V/tp], in place
        if outside is None:
            ctx.save_for_backward(softmax, local_target)
        else:
            ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = ctx.saved_tensors
        softmax, local_target = saved[0], saved[1]
        # d loss / d logits = softmax - one_hot(target), built in the saved buffer.
        grad = softmax
        if len(saved) == 3:
            hit = (~saved[2]).unsqueeze(-1).to(grad.dtype)  # 1 where the target is on this rank
            grad.scatter_add_(-1, local_target, -hit)
        else:
            minus_one = torch.full_like(local_target, -1.0, dtype=grad.dtype)  # [b, s, 1]
            grad.scatter_add_(-1, local_target, minus_one)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 parallel: ParallelState = ParallelState(), *,
                                 inplace: bool = False) -> torch.Tensor:
    """Per-token cross entropy ``[b, s]`` in fp32 of ``logits [b, s, V/tp]`` against ``target``.

    Equals ``F.cross_entropy(logits_full.float().transpose(1, 2), target, reduction='none')``.
    ``inplace=True`` lets the function reuse fp32 ``logits`` as its softmax buffer (the caller
    must not read them afterwards); non-fp32 logits are always copied to fp32 first. The
    backward may be run once only (the softmax buffer becomes the gradient).
    """
    return _VocabParallelCrossEntropy.apply(logits, target, parallel, inplace)
