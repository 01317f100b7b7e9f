"""The CPU attention kernels of megatron/model/attention.py against SDPA and dense references."""
import pytest
import torch
import torch.nn.functional as F

from megatron.model.attention import (causal_attention_with_dropout, core_attention,
                                      dropout_keep_mask, padding_attention_with_dropout)


def qkv(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for _ in range(3)]


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=g).to(out.dtype))


@pytest.mark.parametrize("r,block", [(37, 16), (64, 64), (5, 128), (128, 32)])
def test_causal_attention_without_dropout_matches_sdpa(r, block):
    q, k, v = qkv((2, 3, r, 8))
    ours = causal_attention_with_dropout(q, k, v, 0.0, block)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads(ours, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b)


def test_causal_attention_bf16_matches_sdpa_and_keeps_dtype():
    q, k, v = qkv((1, 2, 40, 16), torch.bfloat16)
    ours = causal_attention_with_dropout(q, k, v, 0.0, 16)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, atol=1e-2, rtol=1e-2)
    for a, b in zip(grads(ours, (q, k, v)), grads(ref, (q, k, v))):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_causal_attention_dropout_matches_a_dense_reference_with_the_same_masks():
    """Block i of queries (rows i0:i1) meets keys :i1 and draws its mask in that order; a
    dense computation with those masks, kept positions scaled by 1 / (1 - p), is the same."""
    p, r, block = 0.3, 37, 16
    q, k, v = qkv((2, 3, r, 8), torch.float64)
    torch.manual_seed(5)
    ours = causal_attention_with_dropout(q, k, v, p, block)

    torch.manual_seed(5)
    keep = torch.zeros(6, r, r, dtype=torch.bool)
    for i0 in range(0, r, block):
        i1 = min(i0 + block, r)
        keep[:, i0:i1, :i1] = dropout_keep_mask((6, i1 - i0, i1), p)
    scores = (q @ k.transpose(-2, -1)) / 8 ** 0.5
    scores = scores.masked_fill(torch.ones(r, r, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(scores, -1) * keep.view(2, 3, r, r) / (1 - p)
    ref = probs @ v
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads(ours, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_causal_attention_dropout_backward_passes_gradcheck():
    q, k, v = qkv((2, 2, 19, 4), torch.float64)

    def f(q, k, v):
        torch.manual_seed(0)  # the same masks on every evaluation
        return causal_attention_with_dropout(q, k, v, 0.4, 8)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_causal_attention_rejects_bad_dropout():
    q, k, v = qkv((1, 1, 4, 4))
    with pytest.raises(ValueError, match="dropout_p"):
        causal_attention_with_dropout(q, k, v, 1.0)


def test_dropout_keep_mask_probability_independence_and_determinism():
    n, p = 1_000_000, 0.1
    torch.manual_seed(0)
    keep = dropout_keep_mask((n,), p)
    sigma = (p * (1 - p) / n) ** 0.5
    assert keep.dtype == torch.bool and keep.shape == (n,)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # the two int32 halves of each random int64 (even / odd positions) are both unbiased ...
    for half in (keep[0::2], keep[1::2]):
        assert abs(half.float().mean().item() - (1 - p)) < 5 * sigma * 2 ** 0.5
    # ... and independent: P(both dropped) = p^2
    both = (~keep[0::2] & ~keep[1::2]).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p / (n / 2)) ** 0.5
    torch.manual_seed(0)
    assert torch.equal(keep, dropout_keep_mask((n,), p))
    assert dropout_keep_mask((3, 5), 0.0).all()
    odd = dropout_keep_mask((7,), 0.5)  # odd sizes use half of the last int64
    assert odd.shape == (7,)


def test_core_attention_matches_sdpa_without_dropout():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    causal = core_attention(q, k, v, None, True, 0.0)
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    mask = torch.rand(2, 1, 7, 7, generator=g) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    torch.testing.assert_close(core_attention(q, k, v, mask, False, 0.0),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    # bf16 with dropout: finite, and the same draw under the same seed
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    torch.manual_seed(3)
    a = core_attention(qb, kb, vb, None, True, 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, core_attention(qb, kb, vb, None, True, 0.5))
    assert torch.isfinite(a.float()).all()


def test_gpt_attention_uses_the_block_causal_kernel_for_cpu_training_with_dropout(monkeypatch):
    import megatron.model.transformer as transformer
    from megatron.model.config import TransformerConfig
    from megatron.model.gpt import GPTModel

    calls = []

    def counting(*args, **kwargs):
        calls.append(args[3])
        return causal_attention_with_dropout(*args, **kwargs)

    monkeypatch.setattr(transformer, "causal_attention_with_dropout", counting)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                            padded_vocab_size=64, hidden_dropout=0.0, attention_dropout=0.2)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    tokens = torch.randint(0, 64, (2, 16))
    torch.manual_seed(1)
    first = model(tokens)
    assert calls == [0.2, 0.2]
    torch.manual_seed(1)
    torch.testing.assert_close(model(tokens), first)  # the masks follow the seed
    model(tokens, attention_mask=document_mask(2, 16, (4,)))  # per-document masks: causal
    assert len(calls) == 6
    model(tokens, attention_mask=torch.zeros(2, 1, 1, 16, dtype=torch.bool))  # not causal: SDPA
    assert len(calls) == 6
    model.eval()
    model(tokens)  # no dropout: SDPA's fused kernel
    assert len(calls) == 6


def document_mask(b, r, starts, seed=0):
    """--reset-attention-mask's mask (True = masked out): causal within documents that begin at
    ``starts`` (random per sample)."""
    from megatron.utils import get_ltor_masks_and_position_ids
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (b, r), generator=g)
    for i in range(b):
        for s in starts:
            tokens[i, (s + i) % r] = 0  # EOD
    return get_ltor_masks_and_position_ids(tokens, 0, reset_attention_mask=True)[0]


def test_causal_attention_with_a_document_mask_matches_sdpa():
    q, k, v = qkv((2, 3, 37, 8))
    mask = document_mask(2, 37, (5, 20))
    ours = causal_attention_with_dropout(q, k, v, 0.0, 16, mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads(ours, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b)
    # a query whose keys are all masked attends to nothing, with zero gradients
    blind = mask.clone()
    blind[..., 3, :] = True
    out = causal_attention_with_dropout(q, k, v, 0.0, 16, mask=blind)
    assert torch.isfinite(out).all() and (out[:, :, 3] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads(out, (q, k, v)))


@pytest.mark.slow
def test_causal_attention_with_a_mask_and_dropout_passes_gradcheck():
    q, k, v = qkv((2, 2, 19, 4), torch.float64)
    mask = document_mask(2, 19, (6,))

    def f(q, k, v):
        torch.manual_seed(0)
        return causal_attention_with_dropout(q, k, v, 0.4, 8, mask=mask)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_causal_attention_rejects_a_malformed_mask():
    q, k, v = qkv((2, 1, 4, 4))
    for bad in (torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4, dtype=torch.bool),
                torch.zeros(2, 4, 4, dtype=torch.bool)):
        with pytest.raises(ValueError, match="mask must be bool"):
            causal_attention_with_dropout(q, k, v, 0.1, mask=bad)


def test_which_masks_take_the_block_causal_kernel():
    from megatron.model.transformer import _masks_the_future
    assert _masks_the_future(None, True) and not _masks_the_future(None, False)
    assert _masks_the_future(document_mask(2, 9, (3,)), False)
    padding = torch.zeros(2, 1, 1, 9, dtype=torch.bool)
    assert not _masks_the_future(padding, False)
    sees_ahead = document_mask(2, 9, (3,)).clone()
    sees_ahead[0, 0, 1, 2] = False
    assert not _masks_the_future(sees_ahead, False)


# ---------------------------------------------------------------- padding masks (BERT)

def padding(lengths, r):
    """bool [b, 1, 1, r], True = masked out: sample i's real tokens are the first lengths[i]."""
    return (torch.arange(r)[None, :] >= torch.tensor(lengths)[:, None]).view(len(lengths), 1, 1, r)


@pytest.mark.parametrize("lengths", [(13, 5), (13, 13), (1, 9)])
def test_padding_attention_without_dropout_matches_sdpa(lengths):
    r = 13
    q, k, v = qkv((2, 3, r, 8))
    mask = padding(lengths, r)
    ours = padding_attention_with_dropout(q, k, v, 0.0, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads(ours, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b)


def test_padding_attention_with_holes_and_a_broadcast_mask_matches_sdpa():
    """Masked keys anywhere (not only at the end), one mask row for the whole batch."""
    r = 11
    q, k, v = qkv((3, 2, r, 4))
    mask = torch.zeros(1, 1, 1, r, dtype=torch.bool)
    mask[..., [0, 4, 5, 9]] = True
    ours = padding_attention_with_dropout(q, k, v, 0.0, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads(ours, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b)


def test_padding_attention_bf16_matches_sdpa_and_keeps_dtype():
    q, k, v = qkv((2, 2, 24, 16), torch.bfloat16)
    mask = padding((24, 10), 24)
    ours = padding_attention_with_dropout(q, k, v, 0.0, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, atol=1e-2, rtol=1e-2)
    for a, b in zip(grads(ours, (q, k, v)), grads(ref, (q, k, v))):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_padding_attention_dropout_matches_a_dense_reference_with_the_same_masks():
    """Sample i draws its mask [np, r, L_i] over its unmasked keys, in sample order; a dense
    computation with those masks (padded keys never kept), kept entries scaled by 1/(1-p)."""
    p, r, lengths = 0.3, 17, (17, 6)
    q, k, v = qkv((2, 3, r, 8), torch.float64)
    mask = padding(lengths, r)
    torch.manual_seed(5)
    ours = padding_attention_with_dropout(q, k, v, p, mask)

    torch.manual_seed(5)
    keep = torch.zeros(2, 3, r, r, dtype=torch.bool)
    for i, n in enumerate(lengths):
        keep[i, :, :, :n] = dropout_keep_mask((3, r, n), p)
    scores = (q @ k.transpose(-2, -1)) / 8 ** 0.5
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), -1) * keep / (1 - p)
    ref = probs @ v
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads(ours, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_padding_attention_dropout_backward_passes_gradcheck():
    q, k, v = qkv((2, 2, 9, 4), torch.float64)
    mask = torch.zeros(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 6:] = True
    mask[1, ..., [1, 3]] = True

    def f(q, k, v):
        torch.manual_seed(0)  # the same masks on every evaluation
        return padding_attention_with_dropout(q, k, v, 0.4, mask)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_padding_attention_fully_masked_sample_gives_zeros_and_rejects_bad_input():
    q, k, v = qkv((2, 1, 5, 4))
    mask = padding((0, 5), 5)
    out = padding_attention_with_dropout(q, k, v, 0.1, mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.sum().backward()
    assert torch.equal(k.grad[0], torch.zeros_like(k.grad[0]))
    with pytest.raises(ValueError):
        padding_attention_with_dropout(q, k, v, 1.0, mask)
    with pytest.raises(ValueError):
        padding_attention_with_dropout(q, k, v, 0.1, torch.zeros(2, 1, 5, 5, dtype=torch.bool))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_bert_training_with_attention_dropout_on_cpu_uses_the_per_sample_kernels(monkeypatch,
                                                                                  packed):
    """Packed real tokens (the default): the varlen kernel; --no-pack-padded-tokens: the
    padding kernel; evaluation (no dropout): SDPA."""
    import dataclasses

    import megatron.model.transformer as transformer
    from megatron.model import BertModel
    from megatron.model.config import TransformerConfig

    name = "varlen_attention_with_dropout" if packed else "padding_attention_with_dropout"
    kernel, calls = getattr(transformer, name), []

    def counting(*args, **kwargs):
        calls.append(args[3])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(transformer, name, counting)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                            padded_vocab_size=64, hidden_dropout=0.0, attention_dropout=0.2,
                            num_tokentypes=2)
    torch.manual_seed(0)
    model = BertModel(dataclasses.replace(cfg, pack_padded_tokens=packed))
    tokens = torch.randint(0, 64, (2, 16))
    pad = (torch.arange(16)[None] < torch.tensor([[16], [9]])).long()
    torch.manual_seed(1)
    first, _ = model(tokens, pad, tokentype_ids=torch.zeros_like(tokens))
    assert calls == [0.2, 0.2]
    torch.manual_seed(1)
    torch.testing.assert_close(model(tokens, pad, tokentype_ids=torch.zeros_like(tokens))[0],
                               first)  # the masks follow the seed
    model.eval()
    model(tokens, pad, tokentype_ids=torch.zeros_like(tokens))  # no dropout: SDPA
    assert len(calls) == 4
