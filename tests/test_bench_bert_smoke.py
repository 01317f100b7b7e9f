"""BERT benchmarks: the two scripts run in --quick mode (slow), and the padding-mask attention
kernel they led to (megatron/model/attention.py's ``padding_attention_with_dropout``, used by
BERT's CPU training with attention dropout) against SDPA and a dense reference."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron.model.attention import dropout_keep_mask, padding_attention_with_dropout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qkv(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for _ in range(3)]


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=g).to(out.dtype))


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


def test_bert_training_with_attention_dropout_on_cpu_uses_the_padding_kernel(monkeypatch):
    import megatron.model.transformer as transformer
    from megatron.model import BertModel
    from megatron.model.config import TransformerConfig

    calls = []

    def counting(*args, **kwargs):
        calls.append(args[3])
        return padding_attention_with_dropout(*args, **kwargs)

    monkeypatch.setattr(transformer, "padding_attention_with_dropout", counting)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                            padded_vocab_size=64, hidden_dropout=0.0, attention_dropout=0.2,
                            num_tokentypes=2)
    torch.manual_seed(0)
    model = BertModel(cfg)
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


def run_quick(script, *extra):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick",
                           *extra], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_bert_train_step_quick():
    out = run_quick("bench_bert_train_step.py")
    assert "padding" in out
    for dtype in ("fp32", "bf16"):
        assert f"{dtype}  HF/ours" in out and f"{dtype}  paired" in out


@pytest.mark.slow
def test_bench_bert_random_ltd_quick():
    out = run_quick("bench_bert_random_ltd.py")
    assert "ratio" in out and "ceiling" in out
    assert "r=16" in out and "dense" in out
