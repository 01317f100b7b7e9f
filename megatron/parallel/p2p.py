"""Point-to-point communication between neighbouring pipeline stages.

Activations travel to the next stage, their gradients back to the previous one. Every message
has the same shape, ``[micro_batch, seq, hidden]`` (random-LTD scatters dropped tokens back
before a stage ends, so the shape never changes), and a dtype known up front, so receivers
allocate their buffers without a shape handshake.

All sends and receives of one call are posted together with ``batch_isend_irecv`` and waited
on before returning: the relative order of sends and receives inside a call cannot deadlock
(NCCL groups them; gloo posts them asynchronously), which the 1F1B schedule relies on when a
stage sends an activation forward while it receives a gradient from the same neighbour.
Peers are global ranks from ``ParallelState.pp_ranks``; the ops run on the pipeline group.
Activations and gradients use distinct tags, so on gloo a message can never be matched with
one of the other kind (NCCL ignores tags and relies on the order, which both sides share).
"""

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron.parallel.initialize import PeerWaitError
from megatron.parallel.state import ParallelState

ACTIVATION_TAG = 0
GRADIENT_TAG = 1


def communicate(parallel: ParallelState, *, send_next: Optional[torch.Tensor] = None,
                send_prev: Optional[torch.Tensor] = None, recv_prev: bool = False,
                recv_next: bool = False, tensor_shape: Sequence[int] = (),
                dtype: torch.dtype = torch.float32,
                device: Optional[torch.device] = None
                ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Exchange tensors with the neighbouring stages in one batch.

    ``send_next``: activation for the next stage; ``send_prev``: gradient for the previous
    stage; ``recv_prev``: receive an activation from the previous stage; ``recv_next``:
    receive a gradient from the next stage. Returns ``(from_prev, from_next)`` (None where
    nothing was received). The received activation has ``requires_grad`` set, so the
    backward pass produces the gradient to send back.
    """
    if parallel.pp_size == 1:
        raise RuntimeError("pipeline communication needs pp_size > 1")
    if device is None:
        sent = send_next if send_next is not None else send_prev
        device = sent.device if sent is not None else torch.device("cpu")
    shape = tuple(tensor_shape)
    group = parallel.pp_group
    ops, from_prev, from_next = [], None, None
    # Fixed order (to prev, from prev, to next, from next) on every rank: on NCCL, two messages
    # between the same pair in the same direction match in posting order.
    if send_prev is not None:
        ops.append(dist.P2POp(dist.isend, _check(send_prev, shape, dtype),
                              parallel.prev_stage_rank, group, GRADIENT_TAG))
    if recv_prev:
        from_prev = torch.empty(shape, dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, from_prev, parallel.prev_stage_rank, group,
                              ACTIVATION_TAG))
    if send_next is not None:
        ops.append(dist.P2POp(dist.isend, _check(send_next, shape, dtype),
                              parallel.next_stage_rank, group, ACTIVATION_TAG))
    if recv_next:
        from_next = torch.empty(shape, dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, from_next, parallel.next_stage_rank, group,
                              GRADIENT_TAG))
    if ops:
        _wait_all(ops, dist.batch_isend_irecv(ops))
        if device.type == "cuda":
            # As Megatron-LM (batch_p2p_sync): the received buffers are read on the compute
            # stream next; make sure the communication stream has finished writing them.
            torch.cuda.synchronize()
    if from_prev is not None:
        from_prev.requires_grad_(True)
    return from_prev, from_next


def _wait_all(ops, requests) -> None:
    """Wait for every request; a failed wait (the group's --distributed-timeout-minutes, or a
    peer that died) names the peer rank it waited on where the backend gives one request per
    op (gloo; NCCL coalesces a batch into one)."""
    for i, request in enumerate(requests):
        try:
            request.wait()
        except RuntimeError as err:
            peer = ops[i].peer if len(requests) == len(ops) or len(ops) == 1 else None
            raise PeerWaitError(str(err), peer) from err


def _check(tensor: torch.Tensor, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        raise RuntimeError(f"pipeline message has shape {tuple(tensor.shape)} {tensor.dtype}, "
                           f"the schedule expects {shape} {dtype} (micro-batch, seq, hidden)")
    return tensor.detach().contiguous()


# The named exchanges of the 1F1B schedule (Megatron-LM's p2p_communication names). Each is a
# no-op returning None where the stage has no such neighbour (first / last stage).

def recv_forward(parallel, tensor_shape, dtype, device=None) -> Optional[torch.Tensor]:
    """Activation from the previous stage (None on the first stage)."""
    if parallel.is_first_stage:
        return None
    return communicate(parallel, recv_prev=True, tensor_shape=tensor_shape, dtype=dtype,
                       device=device)[0]


def recv_backward(parallel, tensor_shape, dtype, device=None) -> Optional[torch.Tensor]:
    """Gradient of this stage's output from the next stage (None on the last stage)."""
    if parallel.is_last_stage:
        return None
    return communicate(parallel, recv_next=True, tensor_shape=tensor_shape, dtype=dtype,
                       device=device)[1]


def send_forward(output: torch.Tensor, parallel, tensor_shape, dtype) -> None:
    """Activation to the next stage (nothing on the last stage)."""
    if not parallel.is_last_stage:
        communicate(parallel, send_next=output, tensor_shape=tensor_shape, dtype=dtype)


def send_backward(input_grad: Optional[torch.Tensor], parallel, tensor_shape, dtype) -> None:
    """Gradient of this stage's input to the previous stage (nothing on the first stage)."""
    if not parallel.is_first_stage:
        communicate(parallel, send_prev=input_grad, tensor_shape=tensor_shape, dtype=dtype)


def send_forward_recv_backward(output: torch.Tensor, parallel, tensor_shape, dtype
                               ) -> Optional[torch.Tensor]:
    """Send an activation forward and receive the gradient of an earlier output, in one batch."""
    if parallel.is_last_stage:
        return None
    return communicate(parallel, send_next=output, recv_next=True, tensor_shape=tensor_shape,
                       dtype=dtype, device=output.device)[1]


def send_backward_recv_forward(input_grad: Optional[torch.Tensor], parallel, tensor_shape,
                               dtype, device=None) -> Optional[torch.Tensor]:
    """Send an input gradient back and receive the next activation, in one batch."""
    if parallel.is_first_stage:
        return None
    return communicate(parallel, send_prev=input_grad, recv_prev=True,
                       tensor_shape=tensor_shape, dtype=dtype, device=device)[0]
