"""Small helpers shared by the entry points: batch masks, printing."""

import os

import torch


def print_rank_0(*args, **kwargs):
    """Print on rank 0 only (the RANK set by torchrun, or SLURM_PROCID)."""
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        print(*args, **kwargs, flush=True)


def get_ltor_masks_and_position_ids(tokens, eod, *, reset_position_ids=False,
                                    reset_attention_mask=False, eod_mask_loss=False):
    """Left-to-right masks and positions for a batch ``tokens`` [b, s] (Megatron semantics).

    Returns ``(attention_mask, loss_mask, position_ids)``. ``attention_mask`` is None for a
    plain causal mask (the model then uses the fused causal path); with
    ``reset_attention_mask`` it is a boolean [b, 1, s, s] tensor in Megatron's convention,
    True where attention is *masked out* (Megatron's ``attention_mask < 0.5``): a token may
    attend only to itself and earlier tokens of its own document. The EOD token belongs to the
    document it ends, as in Megatron.
    """
    b, s = tokens.shape
    device = tokens.device
    is_eod = tokens == eod
    loss_mask = torch.ones(b, s, dtype=torch.float32, device=device)
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0

    arange = torch.arange(s, device=device).unsqueeze(0).expand(b, s)  # [b, s]
    position_ids = arange
    attention_mask = None
    if reset_position_ids or reset_attention_mask:
        # Index of the first token of each token's document: one past the last EOD strictly
        # before it (exclusive running maximum).
        after_eod = torch.where(is_eod, arange + 1, torch.zeros_like(arange))
        doc_start = torch.cummax(after_eod, dim=1).values
        doc_start = torch.cat([torch.zeros(b, 1, dtype=doc_start.dtype, device=device),
                               doc_start[:, :-1]], dim=1)  # [b, s], exclusive
        if reset_position_ids:
            position_ids = arange - doc_start
        if reset_attention_mask:
            same_doc = doc_start.unsqueeze(2) == doc_start.unsqueeze(1)  # [b, s, s]
            causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
            attention_mask = ~(same_doc & causal).unsqueeze(1)  # [b, 1, s, s], True = masked
    return attention_mask, loss_mask, position_ids.contiguous()
