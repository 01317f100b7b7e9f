import torch

from megatron.utils import get_ltor_masks_and_position_ids


def reference_masks(tokens, eod, reset_position_ids, reset_attention_mask):
    """Megatron's loop, written plainly (True = may attend)."""
    b, s = tokens.shape
    mask = torch.tril(torch.ones(b, s, s)).bool()
    pos = torch.arange(s).repeat(b, 1)
    for i in range(b):
        prev = 0
        for j in (tokens[i] == eod).nonzero().flatten().tolist():
            if reset_attention_mask:
                mask[i, j + 1:, :j + 1] = False
            if reset_position_ids:
                pos[i, j + 1:] -= j + 1 - prev
                prev = j + 1
    return mask.unsqueeze(1), pos


def test_reset_masks_match_megatron_loop():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 5, (3, 17), generator=g)  # eod = 0 appears often
    tokens[0, -1] = 0
    tokens[1, 0] = 0
    for rp in (False, True):
        for ra in (False, True):
            mask, loss_mask, pos = get_ltor_masks_and_position_ids(
                tokens, 0, reset_position_ids=rp, reset_attention_mask=ra, eod_mask_loss=True)
            ref_mask, ref_pos = reference_masks(tokens, 0, rp, ra)
            assert torch.equal(pos, ref_pos)
            if ra:
                assert torch.equal(mask, ref_mask)
            else:
                assert mask is None
            assert torch.equal(loss_mask == 0, tokens == 0)
