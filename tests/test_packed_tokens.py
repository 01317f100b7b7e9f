"""BERT's packed real tokens (``PackedTokens``, --no-pack-padded-tokens off): the encoder's
dense layers run on the real tokens of a padded batch only, attention per sample
(``varlen_attention_with_dropout`` on CPU with dropout, the padded kernels otherwise)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import megatron.model.transformer as transformer
from megatron.arguments import parse_args, transformer_config_from_args
from megatron.ltd.dropping import TokenDropState, kept_indices_by_layer
from megatron.model.attention import dropout_keep_mask, varlen_attention_with_dropout
from megatron.model.bert import bert_attention_mask
from megatron.model.classification import Classification
from megatron.model.config import TransformerConfig
from megatron.model.transformer import PackedTokens, ParallelTransformer
from megatron.parallel.random import build_rng_tracker
from megatron.parallel.state import ParallelState

B, S, H, HEADS = 4, 16, 32, 4
LENGTHS = (16, 11, 1, 7)  # a full sample, a one-token sample


def _qkv(n, heads=2, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, d, generator=g, dtype=dtype).requires_grad_()
            for _ in range(3)]


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=g, dtype=out.dtype))


BOUNDS = ((0, 5), (5, 6), (6, 13))


def test_varlen_attention_without_dropout_is_sdpa_per_sequence():
    q, k, v = _qkv(13)
    ours = varlen_attention_with_dropout(q, k, v, 0.0, BOUNDS)
    ref = torch.cat([F.scaled_dot_product_attention(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e])
                     for a, e in BOUNDS], dim=2)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(_grads(ours, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b)


def test_varlen_attention_dropout_matches_a_reference_with_the_same_masks():
    """Each sequence draws its [np, L, L] mask in order; a dense computation with those masks,
    kept probabilities scaled by 1 / (1 - p), is the same, forward and backward."""
    p = 0.3
    q, k, v = _qkv(13)
    torch.manual_seed(5)
    ours = varlen_attention_with_dropout(q, k, v, p, BOUNDS)
    torch.manual_seed(5)
    parts = []
    for a, e in BOUNDS:
        keep = dropout_keep_mask((2, e - a, e - a), p)
        probs = torch.softmax(q[0, :, a:e] @ k[0, :, a:e].transpose(1, 2) / 8 ** 0.5, -1)
        parts.append((probs * keep / (1 - p)) @ v[0, :, a:e])
    ref = torch.cat(parts, dim=1).unsqueeze(0)
    torch.testing.assert_close(ours, ref)
    torch.manual_seed(5)
    ours = varlen_attention_with_dropout(q, k, v, p, BOUNDS)
    for a, b in zip(_grads(ours, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b)


def test_varlen_attention_gradcheck_with_dropout():
    q, k, v = (t.detach()[:, :, :6, :3].requires_grad_() for t in _qkv(13))

    def f(q, k, v):
        torch.manual_seed(7)  # the same masks on every evaluation
        return varlen_attention_with_dropout(q, k, v, 0.25, ((0, 2), (2, 6)))

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_varlen_attention_bf16_keeps_dtype():
    q, k, v = _qkv(13, dtype=torch.bfloat16)
    ours = varlen_attention_with_dropout(q, k, v, 0.0, BOUNDS)
    ref = varlen_attention_with_dropout(*(t.double() for t in (q, k, v)), 0.0, BOUNDS)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("bounds, match", [
    (((0, 5), (5, 12)), "there are 13 rows"),
    (((0, 5), (6, 13)), "covering"),
    (((0, 0), (0, 13)), "non-empty"),
])
def test_varlen_attention_rejects_bad_bounds(bounds, match):
    q, k, v = _qkv(13)
    with pytest.raises(ValueError, match=match):
        varlen_attention_with_dropout(q, k, v, 0.0, bounds)
    with pytest.raises(ValueError, match="dropout_p"):
        varlen_attention_with_dropout(q, k, v, 1.0, BOUNDS)


def _padding(lengths=LENGTHS, leading=False):
    """[b, s] 1 = real token; ``leading``: the padding of sample 1 in the middle instead."""
    pad = (torch.arange(S)[None] < torch.tensor(lengths)[:, None]).long()
    if leading:
        pad[1] = 0
        pad[1, 3:14] = 1
    return pad


def test_packed_tokens_pack_and_unpack():
    pad = _padding(leading=True)
    x = torch.randn(B, S, 3)
    packing = PackedTokens.from_padding_mask(bert_attention_mask(pad), B, None)
    assert packing.bounds == ((0, 16), (16, 27), (27, 28), (28, 35))
    packed = packing.pack(x)
    assert packed.shape == (1, 35, 3)
    torch.testing.assert_close(packed[0], x[pad.bool()])
    assert packing.position_ids.tolist() == [list(range(16)) + list(range(3, 14)) + [0]
                                             + list(range(7))]
    base = torch.randn(B, S, 3)
    back = packing.unpack(packed * 2, base)
    torch.testing.assert_close(back[pad.bool()], 2 * x[pad.bool()])
    torch.testing.assert_close(back[~pad.bool()], base[~pad.bool()])
    assert torch.equal(packing.unpack(packed)[~pad.bool()], torch.zeros(int((pad == 0).sum()), 3))
    # no padding: nothing to pack
    assert PackedTokens.from_padding_mask(bert_attention_mask(torch.ones(B, S)), B, None) is None
    # a mask shared by the batch [1, 1, 1, s]
    shared = PackedTokens.from_padding_mask(bert_attention_mask(pad[:1] * 0 + _padding()[3:]),
                                            B, None)
    assert shared.bounds == ((0, 7), (7, 14), (14, 21), (21, 28))
    # an all-padding sample has no rows
    empty = _padding((16, 0, 3, 3))
    assert PackedTokens.from_padding_mask(bert_attention_mask(empty), B, None).bounds == \
        ((0, 16), (16, 19), (19, 22))


def _config(**kw):
    base = dict(num_layers=3, hidden_size=H, num_attention_heads=HEADS, seq_length=S,
                padded_vocab_size=64, hidden_dropout=0.0, attention_dropout=0.0, init_seed=3)
    base.update(kw)
    return TransformerConfig(**base)


def _block(config, *args, causal=False):
    return ParallelTransformer(config, *args, causal=causal).double()


def _pair(**kw):
    """The same block with packing on and off (float64)."""
    packed = _block(_config(**kw))
    padded = _block(_config(pack_padded_tokens=False, **kw))
    padded.load_state_dict(packed.state_dict())
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # biases and LayerNorms off their init, so every term shows
        for a, b in zip(packed.parameters(), padded.parameters()):
            a.add_(torch.randn(a.shape, generator=g, dtype=a.dtype) * 0.1)
            b.copy_(a)
    return packed, padded


def _run(block, x, pad, train, **kw):
    block.train(train)
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = block(x, torch.arange(S).expand(B, S), bert_attention_mask(pad), **kw)
    g = torch.Generator().manual_seed(9)
    weight = torch.randn(y.shape, generator=g, dtype=y.dtype) * pad[..., None]
    (y * weight).sum().backward()  # a loss on real positions only, as the MLM loss and pooler
    return y.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


@pytest.mark.parametrize("post_ln", [False, True], ids=["pre-ln", "post-ln"])
@pytest.mark.parametrize("rope", [False, True], ids=["learned", "rope"])
@pytest.mark.parametrize("leading", [False, True], ids=["trailing-pad", "inner-pad"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_packed_block_equals_padded_block_at_real_tokens(post_ln, rope, leading, train):
    packed, padded = _pair(apply_residual_connection_post_layernorm=post_ln,
                           position_embedding_type="rope" if rope else "learned_absolute")
    pad = _padding(leading=leading)
    x = torch.randn(B, S, H, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y, gx, gp = _run(packed, x, pad, train)
    y_ref, gx_ref, gp_ref = _run(padded, x, pad, train)
    real = pad.bool()
    torch.testing.assert_close(y[real], y_ref[real])
    torch.testing.assert_close(gx[real], gx_ref[real])
    for name in gp_ref:
        torch.testing.assert_close(gp[name], gp_ref[name], msg=lambda m, n=name: f"{n}: {m}")
    # padded positions skip the packed layers: the input, final-normed
    final = packed.final_layernorm
    torch.testing.assert_close(y[~real], final(x)[~real].detach())


def test_training_with_dropout_uses_the_varlen_kernel_and_stays_per_sample(monkeypatch):
    """With dropout on CPU the packed layers attend through the varlen kernel; a sample's real
    tokens never see another sample's (changing sample 0 leaves the others' outputs alone when
    dropout draws the same masks)."""
    calls = []
    kernel = transformer.varlen_attention_with_dropout

    def counting(*args):
        calls.append(args[4])
        return kernel(*args)

    monkeypatch.setattr(transformer, "varlen_attention_with_dropout", counting)
    block = _block(_config(attention_dropout=0.2)).train()
    pad = _padding()
    x = torch.randn(B, S, H, dtype=torch.float64)
    x2 = x.clone()
    x2[0] += torch.randn(S, H, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(0)
        a = block(x, None, bert_attention_mask(pad))
        torch.manual_seed(0)
        b = block(x2, None, bert_attention_mask(pad))
    assert calls == [((0, 16), (16, 27), (27, 28), (28, 35))] * 6
    real = pad.bool()
    real[0] = False
    torch.testing.assert_close(a[real], b[real])
    assert not torch.allclose(a[0], b[0])


def test_recompute_replays_the_packed_layers():
    """--recompute-granularity full with dropout: the checkpointed packed layers recompute the
    same masks (the layer's inputs, the packing among them, are what is kept)."""
    kw = dict(hidden_dropout=0.1, attention_dropout=0.1)
    plain = _block(_config(**kw), ParallelState(rng_tracker=build_rng_tracker(seed=1)))
    recompute = _block(_config(recompute_granularity="full", **kw),
                       ParallelState(rng_tracker=build_rng_tracker(seed=1)))
    recompute.load_state_dict(plain.state_dict())
    x = torch.randn(B, S, H, dtype=torch.float64)
    pad = _padding()
    torch.manual_seed(0)
    y, gx, gp = _run(plain, x, pad, True)
    torch.manual_seed(0)
    y2, gx2, gp2 = _run(recompute, x, pad, True)
    assert torch.equal(y, y2) and torch.equal(gx, gx2)
    assert all(torch.equal(gp[n], gp2[n]) for n in gp)


def test_dropping_layers_run_on_their_kept_real_tokens_packed():
    """random-LTD: the dropping layer gathers its kept tokens from the padded batch [b, s, h]
    (its kept positions index it) and runs on the real ones among them, packed; the full
    layers before and after run on all real tokens, packed."""
    block = _block(_config(num_layers=4)).train()
    pad = _padding()
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(
        i, (tuple(args[0].shape), len(args) > 4 and args[4] is not None)))
        for i, layer in enumerate(block.layers)]
    state = TokenDropState(0, 0, {1: 9, 2: 9}, torch.arange(B))
    try:
        block(torch.randn(B, S, H, dtype=torch.float64), None, bert_attention_mask(pad),
              token_drop=state)
    finally:
        for h in hooks:
            h.remove()
    kept = kept_indices_by_layer(state, [1, 2], S)
    n, n1, n2 = (int(pad.sum()), int(pad.gather(1, kept[1]).sum()),
                 int(pad.gather(1, kept[2]).sum()))
    assert n1 < B * 9 and n2 < B * 9  # some kept positions are padding
    assert seen == {0: ((1, n, H), True), 1: ((1, n1, H), True), 2: ((1, n2, H), True),
                    3: ((1, n, H), True)}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_packed_dropping_block_equals_padded_at_real_tokens(train):
    """With random-LTD the real tokens' outputs and every gradient equal the padded block's
    (float64, no dropout), kept and dropped tokens alike."""
    packed, padded = _pair(num_layers=4)
    pad = _padding(leading=True)
    x = torch.randn(B, S, H, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    state = TokenDropState(3, 1, {1: 9, 2: 6}, torch.arange(B))
    y, gx, gp = _run(packed, x, pad, train, token_drop=state)
    y_ref, gx_ref, gp_ref = _run(padded, x, pad, train, token_drop=state)
    real = pad.bool()
    torch.testing.assert_close(y[real], y_ref[real])
    torch.testing.assert_close(gx[real], gx_ref[real])
    for name in gp_ref:
        torch.testing.assert_close(gp[name], gp_ref[name], msg=lambda m, n=name: f"{n}: {m}")


def test_no_packing_without_padding_causal_masks_or_under_sequence_parallelism(monkeypatch):
    made = []
    original = PackedTokens.from_padding_mask.__func__

    def spy(cls, *args):
        made.append(original(cls, *args))
        return made[-1]

    monkeypatch.setattr(PackedTokens, "from_padding_mask", classmethod(spy))
    x = torch.randn(B, S, H, dtype=torch.float64)
    _block(_config())(x, None, bert_attention_mask(torch.ones(B, S)))
    assert made == [None]  # asked, nothing padded
    _block(_config(), causal=True)(x)  # GPT: no padding mask
    explicit = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None]
    _block(_config(), causal=True)(x, None, explicit)
    _block(_config(pack_padded_tokens=False))(
        x, None, bert_attention_mask(_padding()))
    assert made == [None]


def test_classifier_logits_equal_with_and_without_packing():
    """tasks/main.py's MNLI model: the same logits (eval) and gradients (train, no dropout)."""
    cfg = _config(num_layers=2, num_tokentypes=2)
    ours = Classification(cfg, 3).double()
    ref = Classification(dataclasses.replace(cfg, pack_padded_tokens=False), 3).double()
    ref.load_state_dict(ours.state_dict())
    pad = _padding()
    ids = torch.randint(0, 64, (B, S)).masked_fill(pad == 0, 0)
    types = torch.zeros_like(ids)
    for model in (ours, ref):
        model.zero_grad()
        model(ids, pad, types).square().sum().backward()
    torch.testing.assert_close(ours.eval()(ids, pad, types), ref.eval()(ids, pad, types))
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m, n=name: f"{n}: {m}")


def test_flag_turns_packing_off():
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64"]
    args = parse_args(base, world_size=1)
    args.padded_vocab_size = 128
    assert transformer_config_from_args(args).pack_padded_tokens is True
    args = parse_args(base + ["--no-pack-padded-tokens"], world_size=1)
    args.padded_vocab_size = 128
    assert transformer_config_from_args(args).pack_padded_tokens is False
