import torch

from megatron.utils import get_ltor_masks_and_position_ids


def reference_masks(tokens, eod, reset_position_ids, reset_attention_mask):
    """Megatron's loop, written plainly; returns Megatron's ``mask < 0.5`` (True = masked out)."""
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
    return ~mask.unsqueeze(1), pos


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


def test_reset_attention_mask_isolates_documents_in_the_model():
    """The model reads the mask as Megatron does: without an EOD it is the plain causal mask;
    with one, the tokens after it see nothing of the previous document."""
    from megatron.model.config import TransformerConfig
    from megatron.model.gpt import GPTModel
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                            padded_vocab_size=64, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(cfg).eval()
    tokens = torch.randint(1, 64, (2, 16))
    mask, _, pos = get_ltor_masks_and_position_ids(tokens, 0, reset_attention_mask=True)
    torch.testing.assert_close(model(tokens, pos, mask), model(tokens, pos, None))

    tokens[:, 5] = 0  # EOD ends the first document at position 5
    mask, _, pos = get_ltor_masks_and_position_ids(tokens, 0, reset_position_ids=True,
                                                   reset_attention_mask=True)
    changed = tokens.clone()
    changed[:, :5] = torch.randint(1, 64, (2, 5))  # a different first document
    out, out_changed = model(tokens, pos, mask), model(changed, pos, mask)
    torch.testing.assert_close(out[:, 6:], out_changed[:, 6:])
    assert not torch.allclose(out[:, :5], out_changed[:, :5])


def test_run_main_turns_environment_os_errors_into_one_line(capsys):
    import errno

    import pytest

    from megatron.errors import UserError, run_main

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.bin.tmp")

    with pytest.raises(SystemExit) as exit_:
        run_main(disk_full)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: /data/out.bin.tmp: No space left on device\n"

    def user_error():
        raise UserError("--input x: no such file")

    with pytest.raises(SystemExit):
        run_main(user_error)
    assert capsys.readouterr().err == "error: --input x: no such file\n"

    def bug():
        raise OSError(errno.EBADF, "Bad file descriptor")  # not the environment's: traceback

    with pytest.raises(OSError):
        run_main(bug)
