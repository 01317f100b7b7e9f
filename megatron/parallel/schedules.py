"""Forward/backward schedules over the micro-batches of one step: no pipelining, and 1F1B.

One entry point, ``forward_backward``, called by the training loop (and, with
``forward_only=True``, by evaluation) on every rank.

The contract with ``forward_step``
----------------------------------
``forward_step(data_iterator, model, token_drop) -> (output, loss_func)`` and
``loss_func(output) -> (loss, {name: value})``, as in ``pretrain_gpt.py``. It is called once per
micro-batch on EVERY pipeline stage, and every stage reads the micro-batch from its own
``data_iterator`` (the data is deterministic, so all stages see the same batch):

- the first stage's model embeds the tokens;
- a later stage's model ignores the tokens and starts from the activation the schedule received
  from the previous stage (``model.set_input_tensor``, called before ``forward_step``), but uses
  the position ids and attention mask of the batch; ``token_drop(sample_ids)`` gives every stage
  the same ``TokenDropState``, so a random-LTD layer drops the same tokens whichever stage holds
  it and the kept length is the same on every stage;
- the last stage's model applies the LM head and the loss (labels), and only there is
  ``loss_func`` called: its reported dict is what ``forward_backward`` returns, one per
  micro-batch; other stages return ``[]``. A non-last stage's ``output`` is its hidden states
  ``[micro_batch, seq, hidden]``, sent to the next stage.

The loss is divided by ``num_microbatches`` (gradient accumulation) and passed through
``scale_loss`` (the optimizer's loss scaling) before its backward, exactly as the
single-process loop does: with pp_size 1 the schedule is that loop, bit for bit.

1F1B (Narayanan et al. 2021; Megatron-LM's non-interleaved schedule)
--------------------------------------------------------------------
Stage ``r`` of ``p`` first runs ``min(p - r - 1, m)`` warm-up forwards, then alternates one
forward and one backward, then drains the remaining backwards. Backwards run in micro-batch
order, so each parameter accumulates its gradient in the same order as without pipelining.
A stage keeps at most ``p - r`` micro-batches' activations alive. Two stages, four micro-batches
(``Fi``/``Bi``: forward/backward of micro-batch i; ``.`` idle)::

    time       1    2    3    4    5    6    7    8    9    10
    stage 0    F0   F1   .    B0   F2   B1   F3   B2   .    B3
    stage 1    .    F0   B0   F1   B1   F2   B2   F3   B3   .

    stage 0: warm-up F0 (send act0) | F1 (send act1, recv grad0) B0 | F2 (send act2, recv
             grad1) B1 | F3 (send act3, recv grad2) B2 | cool-down (recv grad3) B3
    stage 1: (recv act0) F0 B0 (send grad0, recv act1) | F1 B1 (send grad1, recv act2) | F2 B2
             (send grad2, recv act3) | F3 B3 (send grad3)

Each "send x, recv y" pair is one batched exchange with the same neighbour (``p2p``), so the
two stages never wait on each other in a cycle.

Data-parallel gradient reduction: ``no_sync`` (a context-manager factory, e.g. a DDP-style
wrapper's ``no_sync``) is entered around every forward and backward of the step except the
last micro-batch's forward and the step's final backward, so a reducer that reads its sync flag
at backward time reduces once per step. torch's DistributedDataParallel arms its reducer at
forward time, and under 1F1B other backwards run between the last forward and the last
backward; so with pp_size > 1 a DDP-wrapped stage runs the whole schedule inside DDP's
``no_sync`` and its gradients are then averaged over DDP's group in bucketed all-reduces
(``data_parallel.allreduce_gradients``, also exported here as ``average_gradients``): the
same result as DDP's reduction, without the overlap with backward. The training loop does
not use DDP there (nor with fp32 ``main_grad`` buffers, nor for interleaved chunks): it passes
the ``no_sync`` of a ``data_parallel.OverlappedGradReducer``, which reads its flag at backward
time, so each bucket's all-reduce starts during the step's final backward.

Interleaved 1F1B (Narayanan et al. 2021, section 2.2; Megatron-LM's
``forward_backward_pipelining_with_interleaving``)
---------------------------------------------------------------------------------------------
With --num-layers-per-virtual-pipeline-stage each rank holds ``v`` model chunks: chunk ``c`` of
rank ``r`` is virtual stage ``c * p + r`` (``pipeline_utils.chunk_layer_ids``), so an
activation goes around the ranks ``v`` times (the last rank's chunk ``c`` sends to rank 0's
chunk ``c + 1``; ``ParallelState.next_stage_rank`` wraps). ``model`` is then a list of the
chunks. Forward "virtual micro-batch" ``k`` runs chunk ``(k mod p*v) // p``, backward ``k`` the
chunk counted from the end, so micro-batches go through chunks in groups of ``p``; ``m`` must
be a multiple of ``p``. Rank ``r`` warms up with ``(p - r - 1) * 2 + (v - 1) * p`` forwards
(all ``m * v`` when ``m == p``), then alternates, then drains, exchanging with both neighbours
in one batch per step exactly as Megatron-LM does (the same order, so the same messages). Every
chunk reads the step's micro-batches in order from its own view of ``data_iterator`` (read
once, replayed to the other chunks), and random-LTD draws by global layer id, so a chunk drops
the tokens the same layer drops in one process. Each parameter's gradient still accumulates in
micro-batch order (a chunk's backwards run in micro-batch order). ``no_sync`` is entered around
every backward but each chunk's last, so an overlapped reducer
(``data_parallel.OverlappedGradReducer``) reduces each chunk's gradients as its last backward
produces them (chunks are never DDP-wrapped: DDP arms at forward time).
"""

import collections
import contextlib
from typing import Callable, Iterator, List, Optional, Sequence

import torch

from megatron.errors import UserError
from megatron.parallel import p2p
from megatron.parallel.data_parallel import allreduce_gradients
from megatron.parallel.pipeline_utils import unwrap_model
from megatron.parallel.state import ParallelState

average_gradients = allreduce_gradients  # the PP>1 DDP path's name (module docstring)


def forward_backward(*, forward_step: Callable, data_iterator: Iterator, model,
                     parallel: ParallelState, num_microbatches: int,
                     tensor_shape: Sequence[int], dtype: torch.dtype,
                     scale_loss: Callable[[torch.Tensor], torch.Tensor],
                     token_drop: Optional[Callable] = None, forward_only: bool = False,
                     no_sync: Optional[Callable] = None,
                     backward: Optional[Callable[[torch.Tensor], None]] = None) -> List[dict]:
    """Run the forward (and backward) passes of ``num_microbatches`` micro-batches.

    ``model``: this stage's module (possibly wrapped, e.g. in DDP), or a list (``ModuleList``)
    of its model chunks: with several, the interleaved schedule.
    ``tensor_shape`` / ``dtype``: of the activations passed between stages,
    ``[micro_batch, seq, hidden]``. ``scale_loss(loss)``: the tensor to backpropagate (loss
    scaling). ``token_drop``: passed to ``forward_step`` (random-LTD), None for no dropping.
    ``forward_only``: evaluation, no backward (run under ``torch.no_grad``). ``no_sync``: see
    the module docstring. ``backward(loss)``: runs the last stage's backward itself instead of
    ``scale_loss(loss).backward()`` (DeepSpeed's ``engine.backward``, which scales the loss and
    reduces the gradients). Gradients accumulate into the parameters' ``.grad`` (or, through their
    hooks, into fp32 ``main_grad`` buffers); the caller zeroes them before and steps the
    optimizer after (after ``allreduce_embedding_grads``).

    Returns the reported loss dicts of every micro-batch, in order, on the last stage; ``[]`` on
    the other stages.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if isinstance(model, (list, tuple, torch.nn.ModuleList)):
        if len(model) > 1:
            return _interleaved(list(model), forward_step, data_iterator, parallel,
                                num_microbatches, scale_loss, token_drop, forward_only, backward,
                                tuple(tensor_shape), dtype, no_sync)
        model = model[0]
    run = _Runner(forward_step, data_iterator, model, parallel, num_microbatches,
                  scale_loss, token_drop, no_sync, backward)
    if forward_only:
        with torch.no_grad():
            if parallel.pp_size == 1:
                for _ in range(num_microbatches):
                    run.forward(None)
            else:
                _forward_only_pipelined(run, tuple(tensor_shape), dtype)
        return run.losses
    if parallel.pp_size == 1:
        _no_pipelining(run)
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # DDP arms its reducer at forward time, but 1F1B runs other micro-batches' backwards
        # between the last forward and the last backward: keep DDP out of the schedule and
        # average the accumulated gradients over its group once, afterwards.
        run.no_sync = None
        with model.no_sync():
            _one_f_one_b(run, tuple(tensor_shape), dtype)
        allreduce_gradients(run.stage, model.process_group)
    else:
        _one_f_one_b(run, tuple(tensor_shape), dtype)
    return run.losses


class _Runner:
    """Forward and backward of one micro-batch on this stage; collects the reported losses."""

    def __init__(self, forward_step, data_iterator, model, parallel, num_microbatches,
                 scale_loss, token_drop, no_sync, loss_backward=None, computes_loss=None):
        self.computes_loss = parallel.is_last_stage if computes_loss is None else computes_loss
        """This model applies the head and the loss (the last stage; its last chunk)."""
        self.forward_step = forward_step
        self.data_iterator = data_iterator
        self.model = model
        self.stage = unwrap_model(model)
        self.parallel = parallel
        self.num_microbatches = num_microbatches
        self.scale_loss = scale_loss
        self.token_drop = token_drop
        self.no_sync = no_sync
        self.loss_backward = loss_backward or (lambda loss: self.scale_loss(loss).backward())
        self.losses: List[dict] = []
        self.forwards = 0
        self.backwards = 0
        self.device = next(self.stage.parameters()).device

    def _sync_context(self, final: bool):
        if self.no_sync is None or final:
            return contextlib.nullcontext()
        return self.no_sync()

    def forward(self, input_tensor: Optional[torch.Tensor]) -> torch.Tensor:
        """-> the tensor to backpropagate from: this stage's hidden states, or on the last
        stage the micro-batch's loss divided by the number of micro-batches."""
        final = self.forwards == self.num_microbatches - 1
        self.forwards += 1
        if self.parallel.pp_size > 1:
            self.stage.set_input_tensor(input_tensor)
        with self._sync_context(final):
            if self.token_drop is None:
                output, loss_func = self.forward_step(self.data_iterator, self.model)
            else:
                output, loss_func = self.forward_step(self.data_iterator, self.model,
                                                      self.token_drop)
        if not self.computes_loss:
            return output
        loss, reported = loss_func(output)
        self.losses.append(reported)
        return loss / self.num_microbatches

    def backward(self, input_tensor: Optional[torch.Tensor], output: torch.Tensor,
                 output_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Backpropagate one micro-batch; -> the gradient of its input (None on the first
        stage)."""
        final = self.backwards == self.num_microbatches - 1
        self.backwards += 1
        with self._sync_context(final):
            if output_grad is None:  # last stage: the loss
                self.loss_backward(output)
            else:
                torch.autograd.backward(output, grad_tensors=output_grad)
        if input_tensor is None:
            return None
        if input_tensor.grad is None:  # the stage did not use its input: a zero gradient
            return torch.zeros_like(input_tensor)
        return input_tensor.grad


def _no_pipelining(run: _Runner) -> None:
    """pp_size 1: forward and backward each micro-batch in turn (gradient accumulation)."""
    for _ in range(run.num_microbatches):
        run.backward(None, run.forward(None), None)


def _forward_only_pipelined(run: _Runner, shape, dtype) -> None:
    parallel = run.parallel
    for _ in range(run.num_microbatches):
        input_tensor = p2p.recv_forward(parallel, shape, dtype, run.device)
        output = run.forward(input_tensor)
        p2p.send_forward(output, parallel, shape, dtype)


def _one_f_one_b(run: _Runner, shape, dtype) -> None:
    """Non-interleaved 1F1B: warm-up forwards, steady one-forward-one-backward, cool-down."""
    parallel, m = run.parallel, run.num_microbatches
    warmup = min(parallel.pp_size - parallel.pp_rank - 1, m)
    steady = m - warmup
    inputs, outputs = [], []  # in flight: micro-batches forwarded but not yet backpropagated

    for _ in range(warmup):
        input_tensor = p2p.recv_forward(parallel, shape, dtype, run.device)
        output = run.forward(input_tensor)
        p2p.send_forward(output, parallel, shape, dtype)
        inputs.append(input_tensor)
        outputs.append(output)

    input_tensor = p2p.recv_forward(parallel, shape, dtype, run.device) if steady else None
    for i in range(steady):
        output = run.forward(input_tensor)
        output_grad = p2p.send_forward_recv_backward(output, parallel, shape, dtype)
        inputs.append(input_tensor)
        outputs.append(output)
        # backward of the oldest micro-batch in flight
        input_grad = run.backward(inputs.pop(0), outputs.pop(0), output_grad)
        if i == steady - 1:
            p2p.send_backward(input_grad, parallel, shape, dtype)
        else:
            input_tensor = p2p.send_backward_recv_forward(input_grad, parallel, shape, dtype,
                                                          run.device)

    for _ in range(warmup):
        output_grad = p2p.recv_backward(parallel, shape, dtype, run.device)
        input_grad = run.backward(inputs.pop(0), outputs.pop(0), output_grad)
        p2p.send_backward(input_grad, parallel, shape, dtype)


# -- interleaved 1F1B ----------------------------------------------------------------------------

class _ReplayedMicroBatches:
    """The step's micro-batches read once from one iterator; ``view()`` gives each model chunk
    an iterator over the same sequence (a chunk's k-th read is micro-batch k)."""

    def __init__(self, source: Iterator):
        self.source = source
        self.items: list = []

    def view(self) -> Iterator:
        position = 0
        while True:
            if position == len(self.items):
                self.items.append(next(self.source))
            yield self.items[position]
            position += 1


def _interleaved(chunks, forward_step, data_iterator, parallel, num_microbatches, scale_loss,
                 token_drop, forward_only, backward, shape, dtype, no_sync) -> List[dict]:
    """``forward_backward`` for a list of model chunks (module docstring)."""
    if parallel.pp_size == 1:
        raise UserError("--num-layers-per-virtual-pipeline-stage needs "
                        "--pipeline-model-parallel-size > 1")
    if num_microbatches % parallel.pp_size:
        raise UserError(f"the interleaved schedule (--num-layers-per-virtual-pipeline-stage) "
                        f"needs the number of micro-batches per step ({num_microbatches}) to be "
                        f"a multiple of --pipeline-model-parallel-size ({parallel.pp_size})")
    if any(isinstance(c, torch.nn.parallel.DistributedDataParallel) for c in chunks):
        raise ValueError("model chunks must not be DDP-wrapped (DDP arms at forward time): "
                         "average their gradients with data_parallel.OverlappedGradReducer")
    data = _ReplayedMicroBatches(data_iterator)
    last = len(chunks) - 1
    runs = [_Runner(forward_step, data.view(), chunk, parallel, num_microbatches, scale_loss,
                    token_drop, no_sync, backward,
                    computes_loss=parallel.is_last_stage and c == last)
            for c, chunk in enumerate(chunks)]
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        _interleaved_one_f_one_b(runs, shape, dtype, forward_only)
    return runs[-1].losses


def _interleaved_one_f_one_b(runs: List[_Runner], shape, dtype, forward_only: bool) -> None:
    """Megatron-LM's interleaved schedule over ``len(runs)`` chunks of this rank."""
    parallel = runs[0].parallel
    p, r, v = parallel.pp_size, parallel.pp_rank, len(runs)
    m = runs[0].num_microbatches
    total = m * v
    first_rank, last_rank = r == 0, r == p - 1
    pending = [collections.deque() for _ in range(v)]       # received activations, per chunk
    in_flight = [collections.deque() for _ in range(v)]     # (input, output) awaiting backward
    output_grads = [collections.deque() for _ in range(v)]  # received gradients, per chunk

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (p * v)) // p
        return c if forward else v - 1 - c

    def forward(k: int) -> Optional[torch.Tensor]:
        c = chunk_of(k, True)
        input_tensor = None if first_rank and c == 0 else pending[c].popleft()
        output = runs[c].forward(input_tensor)
        if not forward_only:
            in_flight[c].append((input_tensor, output))
        return None if last_rank and c == v - 1 else output  # the loss stays here

    def backward(k: int) -> Optional[torch.Tensor]:
        c = chunk_of(k, False)
        input_tensor, output = in_flight[c].popleft()
        grad = None if last_rank and c == v - 1 else output_grads[c].popleft()
        return runs[c].backward(input_tensor, output, grad)  # None on the first virtual stage

    def exchange(send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        if send_next is None and send_prev is None and not recv_prev and not recv_next:
            return None, None
        return p2p.communicate(parallel, send_next=send_next, send_prev=send_prev,
                               recv_prev=recv_prev, recv_next=recv_next, tensor_shape=shape,
                               dtype=dtype, device=runs[0].device)

    all_warmup = m == p  # every forward is a warm-up one
    if forward_only or all_warmup:
        warmup = total
    else:
        warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
    steady = total - warmup

    if not first_rank:
        pending[0].append(exchange(recv_prev=True)[0])
    for k in range(warmup):
        output = forward(k)
        next_chunk = chunk_of(k + 1, True)
        recv_prev = not (first_rank and next_chunk == 0) and k != total - 1
        # the last warm-up step also receives the first gradient the steady state needs
        recv_next = k == warmup - 1 and not (forward_only or all_warmup or last_rank)
        received, grad = exchange(send_next=output, recv_prev=recv_prev, recv_next=recv_next)
        if recv_prev:
            pending[next_chunk].append(received)
        if recv_next:
            output_grads[v - 1].append(grad)

    for k in range(steady):
        forward_k = k + warmup
        output = forward(forward_k)
        input_grad = backward(k)
        if first_rank:  # rank 0 is p - 1 virtual micro-batches ahead of the last rank
            next_forward = chunk_of(forward_k - (p - 1), True)
            recv_prev = next_forward != v - 1
            next_forward += 1
        else:
            next_forward, recv_prev = chunk_of(forward_k + 1, True), True
        if last_rank:  # and the last rank p - 1 ahead of rank 0 on the way back
            next_backward = chunk_of(k - (p - 1), False)
            recv_next = next_backward != 0
            next_backward -= 1
        else:
            next_backward, recv_next = chunk_of(k + 1, False), True
        recv_prev = recv_prev and k != steady - 1
        received, grad = exchange(send_next=output, send_prev=input_grad, recv_prev=recv_prev,
                                  recv_next=recv_next)
        if recv_prev:
            pending[next_forward].append(received)
        if recv_next:
            output_grads[next_backward].append(grad)

    if forward_only:
        return
    if all_warmup and not last_rank:
        output_grads[v - 1].append(exchange(recv_next=True)[1])
    for k in range(steady, total):
        input_grad = backward(k)
        next_backward = chunk_of(k + 1, False)
        recv_next = not (last_rank and next_backward == v - 1) and k != total - 1
        _, grad = exchange(send_prev=input_grad, recv_next=recv_next)
        if recv_next:
            output_grads[next_backward].append(grad)
