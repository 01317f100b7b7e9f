"""Attention kernels for the cases torch's ``scaled_dot_product_attention`` serves badly.

On GPU, and on CPU without dropout, SDPA's fused kernels (flash / memory-efficient) are the fast
path and ``ParallelAttention`` uses them. On CPU with attention dropout -- every CPU training
run, as GPT's default ``--attention-dropout`` is 0.1 -- SDPA falls back to its math kernel: the
full [b, np, s, s] score matrix, half of it masked, in fp32, a Bernoulli mask drawn with
``bernoulli_`` (a slow per-element generator), and several full-size temporaries kept for
backward. Kernels here replace it:

* :func:`causal_attention_with_dropout` -- causal attention in query blocks, flash-attention
  style: block ``i`` of queries meets only keys ``0 .. end of block i``, so the masked upper
  triangle is never computed, normalised, dropped out or stored (about 56% of the work of the
  full matrix at s = 1024, 128-row blocks), with a hand-written backward. Compute is in fp32
  (bf16/fp16 inputs are upcast, as SDPA's math kernel does on CPU). About 4x faster than SDPA
  on CPU for one GPT-2-small layer's attention, forward + backward, and it keeps less for
  backward (two fp32 lower-triangle matrices instead of three full-size tensors).
  Explicit masks that hide the future (``--reset-attention-mask``'s per-document masks) are
  applied on top.
* :func:`padding_attention_with_dropout` -- bidirectional attention under a padding mask
  [b, 1, 1, r] (BERT), one sample at a time over its unmasked keys only: padded keys, whose
  probabilities are exactly 0, are never scored, dropped out or stored. Same backward identity,
  fp32 compute. About 1.6x faster than SDPA's math kernel (fp32) and 1.5x faster than
  ``core_attention`` (bf16) for one BERT-base layer's attention at s = 512 with 21% padding.
* :func:`varlen_attention_with_dropout` -- the same for packed sequences: the real tokens of a
  padded batch in one row set [1, np, N, hn] with each sample's rows contiguous (BERT's packed
  layers, ``megatron.model.transformer.PackedTokens``); each sample's queries meet its own keys,
  so padded queries are not computed either.
* :func:`core_attention` -- Megatron's CoreAttention (QK^T and PV in the activations' dtype, fp32
  softmax, dropout): the bf16 path on CPU for other non-causal masks (explicit [b, 1, r, r]).

Dropout masks here come from :func:`dropout_keep_mask`: 31-bit random integers compared with
``round(p * 2^31)`` (keep probability exact to 5e-10, finer than a float32 uniform), drawn
from the default generator -- so the RNG tracker's forks and activation recomputation's state
restores apply exactly as they do to ``F.dropout`` -- at about 2.5x the speed of ``bernoulli_``.
The stream differs from ``F.dropout``'s, so a CPU run and a GPU run (SDPA's own dropout) draw
different masks, as any two kernels do.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["causal_attention_with_dropout", "core_attention", "dropout_keep_mask",
           "padding_attention_with_dropout", "varlen_attention_with_dropout"]

_BITS = 31
_BLOCK = 128  # query rows per block: measured best of 64 / 128 / 256 at s = 1024 on CPU


def dropout_keep_mask(shape, p: float, device=None) -> torch.Tensor:
    """Boolean mask of ``shape``, each element True (kept) with probability ``1 - p``.

    Every int64 from the default generator is uniform on [0, 2^63); its two int32 halves give
    two independent uniform 31-bit values (the high half's sign bit is always 0; the low half's
    is masked off)."""
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_()
    bits = bits.view(torch.int32)[:n].bitwise_and_(0x7FFFFFFF)
    return (bits >= round(p * 2 ** _BITS)).view(shape)


class _CausalAttentionWithDropout(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + causal) with dropout, times v, in blocks of query rows.

    Saved for backward per block ``i`` (queries ``i0:i1``, keys ``:i1``): the probabilities
    ``P`` and the kept, unscaled probabilities ``P * keep``. Backward uses the flash-attention
    identity sum_j P_ij dP_ij = dO_i . O_i, so it needs no row reduction over the blocks.
    """

    @staticmethod
    def forward(ctx, q, k, v, dropout_p: float, block: int, mask):
        b, heads, r, d = q.shape
        dtype = torch.promote_types(q.dtype, torch.float32)
        scale = d ** -0.5
        qs = q.reshape(b * heads, r, d).to(dtype) * scale  # [N, r, d], N = b * heads
        kf = k.reshape(b * heads, r, d).to(dtype)
        vf = v.reshape(b * heads, r, d).to(dtype)
        out = torch.empty(b * heads, r, d, dtype=dtype, device=q.device)
        saved = []
        for i0 in range(0, r, block):
            i1 = min(i0 + block, r)
            scores = torch.bmm(qs[:, i0:i1], kf[:, :i1].transpose(1, 2))  # [N, i1 - i0, i1]
            future = torch.ones(i1 - i0, i1 - i0, dtype=torch.bool, device=q.device).triu_(1)
            scores[:, :, i0:].masked_fill_(future, float("-inf"))  # the diagonal block
            if mask is not None:  # [b|1, 1, r|1, r], True = masked out
                rows = mask[:, :, i0:i1] if mask.size(2) > 1 else mask
                scores.view(b, heads, i1 - i0, i1).masked_fill_(rows[..., :i1], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            if mask is not None:
                probs.nan_to_num_(0.0)  # a query that may see no key attends to nothing
            kept = torch.where(dropout_keep_mask(probs.shape, dropout_p, q.device), probs, 0.0)
            torch.bmm(kept, vf[:, :i1], out=out[:, i0:i1])
            saved += [probs, kept]
        out.mul_(1.0 / (1.0 - dropout_p))
        ctx.save_for_backward(qs, kf, vf, out, *saved)
        ctx.dropout_p, ctx.block, ctx.scale, ctx.in_dtype = dropout_p, block, scale, q.dtype
        return out.view(b, heads, r, d).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        qs, kf, vf, out, *saved = ctx.saved_tensors
        n, r, d = qs.shape
        shape = grad_out.shape
        inv_keep = 1.0 / (1.0 - ctx.dropout_p)
        grad_out = grad_out.reshape(n, r, d).to(qs.dtype)
        rowdot = (grad_out * out).sum(-1, keepdim=True)  # [N, r, 1] = sum_j P_ij dP_ij
        grad_out = grad_out * inv_keep  # the dropout scale, applied once
        dq, dk, dv = torch.empty_like(qs), torch.zeros_like(kf), torch.zeros_like(vf)
        for i, i0 in enumerate(range(0, r, ctx.block)):
            i1 = min(i0 + ctx.block, r)
            probs, kept = saved[2 * i], saved[2 * i + 1]
            g = grad_out[:, i0:i1]
            dv[:, :i1].baddbmm_(kept.transpose(1, 2), g)
            # d scores = P * (keep * inv_keep * dO v^T - rowdot) = kept * (g v^T) - P * rowdot
            dscores = torch.bmm(g, vf[:, :i1].transpose(1, 2))
            dscores.mul_(kept).addcmul_(probs, rowdot[:, i0:i1], value=-1.0)
            torch.bmm(dscores, kf[:, :i1], out=dq[:, i0:i1])
            dk[:, :i1].baddbmm_(dscores.transpose(1, 2), qs[:, i0:i1])
        dq.mul_(ctx.scale)
        dtype = ctx.in_dtype
        return (dq.view(shape).to(dtype), dk.view(shape).to(dtype), dv.view(shape).to(dtype),
                None, None, None)


def causal_attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  dropout_p: float, block: int = _BLOCK,
                                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal self-attention with dropout on the probabilities; q, k, v [b, np, r, hn] ->
    [b, np, r, hn] in q's dtype. Equal to ``F.scaled_dot_product_attention(q, k, v,
    dropout_p=dropout_p, is_causal=True)`` up to the dropout mask's stream.

    ``mask``: optional boolean [b|1, 1, r|1, r] in Megatron's convention (True = masked out),
    applied on top of causality -- e.g. ``--reset-attention-mask``'s per-document masks, or
    random-LTD's gathered rows and columns of them. A query left with no key gets zeros (as
    SDPA's math kernel gives)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if mask is not None:
        b, r = q.shape[0], q.shape[2]
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.size(1) != 1 \
                or mask.size(0) not in (1, b) or mask.size(2) not in (1, r) \
                or mask.size(3) != r:
            raise ValueError(f"mask must be bool [b|1, 1, r|1, r] with b={b}, r={r}; got "
                             f"{mask.dtype} {tuple(mask.shape)}")
    return _CausalAttentionWithDropout.apply(q, k, v, dropout_p, block, mask)


def core_attention(q, k, v, mask, is_causal, dropout_p):
    """Megatron's CoreAttention: QK^T and PV in the activations' dtype, the softmax in fp32,
    dropout on the probabilities. q, k, v [b, np, r, hn]; ``mask`` bool [b|1, 1, r, r] (True =
    attend) or None. Used for bf16 training on CPU with attention dropout and a non-causal mask,
    where torch's SDPA falls back to its math kernel and upcasts the whole attention to fp32;
    the result has the precision of Megatron's own (unfused and fused) softmax path."""
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-2, -1)).float() * scale  # [b, np, r, r] fp32
    r_q, r_k = scores.shape[-2], scores.shape[-1]
    if is_causal:
        future = torch.ones(r_q, r_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)  # [b, np, r, r]
    probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)  # [b, np, r, hn]


class _PaddingAttentionWithDropout(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + padding mask) with dropout, times v, one sample at a time,
    over that sample's unmasked keys only.

    A key masked out for every query of a sample (padding) gets probability exactly 0, so it is
    left out of the products instead of being scored, masked, normalised, dropped out and
    stored: the work and memory scale with the sample's real length. Saved for backward per
    sample: the key columns used, the probabilities ``P`` and the kept, unscaled probabilities
    ``P * keep``; the backward is the causal kernel's (flash-attention's identity
    sum_j P_ij dP_ij = dO_i . O_i).
    """

    @staticmethod
    def forward(ctx, q, k, v, dropout_p: float, mask):
        b, heads, r, d = q.shape
        dtype = torch.promote_types(q.dtype, torch.float32)
        scale = d ** -0.5
        # contiguous [b, np, r, d] (bmm on the strided views of the QKV output is ~5x slower)
        qs = q.to(dtype, memory_format=torch.contiguous_format, copy=True).mul_(scale)
        kf = k.to(dtype, memory_format=torch.contiguous_format)
        vf = v.to(dtype, memory_format=torch.contiguous_format)
        out = torch.zeros(b, heads, r, d, dtype=dtype, device=q.device)
        saved, columns = [], []
        for i in range(b):
            cols = _unmasked_columns(mask[i if mask.size(0) > 1 else 0, 0, 0])
            columns.append(cols)
            if cols is None:  # no key to attend to: zeros
                continue
            probs, kept = _kept_probabilities(qs[i], _columns(kf[i], cols), dropout_p)
            torch.bmm(kept, _columns(vf[i], cols), out=out[i])  # [np, r, L] x [np, L, d]
            saved += [probs, kept]
        out.mul_(1.0 / (1.0 - dropout_p))
        ctx.save_for_backward(qs, kf, vf, out, *saved)
        ctx.columns, ctx.dropout_p, ctx.scale, ctx.in_dtype = columns, dropout_p, scale, q.dtype
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        qs, kf, vf, out, *saved = ctx.saved_tensors
        grad_out = grad_out.to(qs.dtype)
        rowdot = (grad_out * out).sum(-1, keepdim=True)  # [b, np, r, 1] = sum_j P_ij dP_ij
        grad_out = grad_out * (1.0 / (1.0 - ctx.dropout_p))
        dq, dk, dv = torch.zeros_like(qs), torch.zeros_like(kf), torch.zeros_like(vf)
        it = iter(saved)
        for i, cols in enumerate(ctx.columns):
            if cols is None:
                continue
            probs, kept = next(it), next(it)
            g = grad_out[i]  # [np, r, d]
            dscores = _score_gradient(g, _columns(vf[i], cols), probs, kept, rowdot[i])
            torch.bmm(dscores, _columns(kf[i], cols), out=dq[i])
            if isinstance(cols, int):
                torch.bmm(kept.transpose(1, 2), g, out=dv[i, :, :cols])
                torch.bmm(dscores.transpose(1, 2), qs[i], out=dk[i, :, :cols])
            else:
                dv[i].index_copy_(1, cols, torch.bmm(kept.transpose(1, 2), g))
                dk[i].index_copy_(1, cols, torch.bmm(dscores.transpose(1, 2), qs[i]))
        dq.mul_(ctx.scale)
        dtype = ctx.in_dtype
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None, None


def _kept_probabilities(qs, k, dropout_p: float):
    """One sequence's attention probabilities ``P = softmax(qs k^T)`` [np, r_q, L] and ``P *
    keep``, its dropped-out copy without the 1 / (1 - p) scale (the per-sample kernels' forward;
    ``qs`` [np, r_q, d] already scaled, ``k`` [np, L, d])."""
    probs = torch.softmax(torch.bmm(qs, k.transpose(1, 2)), dim=-1)
    kept = torch.where(dropout_keep_mask(probs.shape, dropout_p, qs.device), probs, 0.0)
    return probs, kept


def _score_gradient(g, v, probs, kept, rowdot):
    """The scores' gradient of one sequence (the per-sample kernels' backward), ``g`` the
    output gradient already times 1 / (1 - p), ``rowdot`` = sum_j P_ij dP_ij:
    d scores = P * (keep * inv_keep * dO v^T - rowdot) = kept * (g v^T) - P * rowdot."""
    return torch.bmm(g, v.transpose(1, 2)).mul_(kept).addcmul_(probs, rowdot, value=-1.0)


def _unmasked_columns(masked: torch.Tensor):
    """masked: bool [r], True = masked out -> None (every key masked), an int L (the first L
    keys are the unmasked ones: padding at the end, the usual case), or the indices [L]."""
    cols = (~masked).nonzero().view(-1)
    n = cols.numel()
    if n == 0:
        return None
    if int(cols[-1]) == n - 1:
        return n
    return cols


def _columns(t: torch.Tensor, cols):
    """t [np, r, d] -> the keys ``cols`` (see ``_unmasked_columns``) [np, L, d]."""
    return t[:, :cols] if isinstance(cols, int) else t.index_select(1, cols)


def padding_attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   dropout_p: float, mask: torch.Tensor) -> torch.Tensor:
    """Bidirectional self-attention under a padding mask, with dropout on the probabilities;
    q, k, v [b, np, r, hn] -> [b, np, r, hn] in q's dtype (compute in fp32, as SDPA's math
    kernel on CPU). ``mask``: bool [b|1, 1, 1, r], True = masked out (BERT's padding, or
    random-LTD's gathered columns of it). Equal to ``F.scaled_dot_product_attention(q, k, v,
    attn_mask=~mask, dropout_p=dropout_p)`` up to the dropout mask's stream; a sample whose keys
    are all masked gets zeros (SDPA: NaN)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    b, r = q.shape[0], q.shape[2]
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.size(1) != 1 or mask.size(2) != 1 \
            or mask.size(0) not in (1, b) or mask.size(3) != r:
        raise ValueError(f"mask must be bool [b|1, 1, 1, r] with b={b}, r={r}; got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    return _PaddingAttentionWithDropout.apply(q, k, v, dropout_p, mask)


class _VarlenAttentionWithDropout(torch.autograd.Function):
    """Bidirectional attention with dropout within each segment ``start:end`` of packed rows:
    q, k, v [np, N, d] (one row set, the samples one after another), every query of a segment
    attends to the keys of its segment only. Saved and backward as the padding kernel's."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p: float, bounds):
        _, heads, n, d = q.shape
        dtype = torch.promote_types(q.dtype, torch.float32)
        scale = d ** -0.5
        # contiguous [np, N, d]: each segment is then a [np, L, d] view with unit row stride
        qs = q[0].to(dtype, memory_format=torch.contiguous_format, copy=True).mul_(scale)
        kf = k[0].to(dtype, memory_format=torch.contiguous_format)
        vf = v[0].to(dtype, memory_format=torch.contiguous_format)
        out = torch.empty(heads, n, d, dtype=dtype, device=q.device)
        saved = []
        for start, end in bounds:
            seg = slice(start, end)
            probs, kept = _kept_probabilities(qs[:, seg], kf[:, seg], dropout_p)  # [np, L, L]
            out[:, seg] = torch.bmm(kept, vf[:, seg])
            saved += [probs, kept]
        out.mul_(1.0 / (1.0 - dropout_p))
        ctx.save_for_backward(qs, kf, vf, out, *saved)
        ctx.bounds, ctx.dropout_p, ctx.scale, ctx.in_dtype = bounds, dropout_p, scale, q.dtype
        return out.unsqueeze(0).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        qs, kf, vf, out, *saved = ctx.saved_tensors
        grad_out = grad_out[0].to(qs.dtype)  # [np, N, d]
        rowdot = (grad_out * out).sum(-1, keepdim=True)  # [np, N, 1] = sum_j P_ij dP_ij
        grad_out = grad_out * (1.0 / (1.0 - ctx.dropout_p))
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(kf), torch.empty_like(vf)
        for i, (start, end) in enumerate(ctx.bounds):
            probs, kept = saved[2 * i], saved[2 * i + 1]
            seg = slice(start, end)
            g = grad_out[:, seg]
            dscores = _score_gradient(g, vf[:, seg], probs, kept, rowdot[:, seg])  # [np, L, L]
            dq[:, seg] = torch.bmm(dscores, kf[:, seg])
            dk[:, seg] = torch.bmm(dscores.transpose(1, 2), qs[:, seg])
            dv[:, seg] = torch.bmm(kept.transpose(1, 2), g)
        dq.mul_(ctx.scale)
        dtype = ctx.in_dtype
        return (dq.unsqueeze(0).to(dtype), dk.unsqueeze(0).to(dtype), dv.unsqueeze(0).to(dtype),
                None, None)


def varlen_attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  dropout_p: float, bounds) -> torch.Tensor:
    """Bidirectional self-attention over packed sequences with dropout on the probabilities;
    q, k, v [1, np, N, hn] -> [1, np, N, hn] in q's dtype (compute in fp32). ``bounds``: the
    ``(start, end)`` rows of each sequence, non-empty, ascending and covering 0..N exactly.
    Equal, sequence by sequence, to ``F.scaled_dot_product_attention`` on that sequence alone
    up to the dropout mask's stream."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    n = q.size(2)
    if q.dim() != 4 or q.size(0) != 1:
        raise ValueError(f"q must be [1, np, N, hn], got {tuple(q.shape)}")
    previous = 0
    for start, end in bounds:
        if start != previous or end <= start:
            raise ValueError(f"bounds must be non-empty (start, end) rows covering 0..{n} in "
                             f"order; got {list(bounds)}")
        previous = end
    if previous != n:
        raise ValueError(f"bounds end at row {previous}, but there are {n} rows")
    return _VarlenAttentionWithDropout.apply(q, k, v, dropout_p, tuple(bounds))
