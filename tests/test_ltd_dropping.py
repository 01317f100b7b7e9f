"""random-LTD token dropping: index sampling, gather/scatter, and dropping inside the GPT block."""

import pytest
import torch

from megatron.ltd import (TokenDropState, gather_attention_mask, gather_position_ids,
                          gather_tokens, kept_indices_by_layer, kept_indices_for_layers,
                          middle_layer_kept_lengths, sample_kept_indices, scatter_tokens)
from megatron.model import GPTModel, ParallelTransformer, TransformerConfig
from megatron.parallel.random import build_rng_tracker
from megatron.parallel.state import ParallelState

V, H, HEADS, S = 64, 32, 4, 16


def _config(**kw):
    base = dict(num_layers=4, hidden_size=H, num_attention_heads=HEADS, seq_length=S,
                padded_vocab_size=V, hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    model = GPTModel(_config(**kw))
    with torch.no_grad():  # non-trivial biases/norms so layout mistakes show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.train()


def _big_weights(module):
    """Weights ~N(0, 0.3^2): attention, and so masks and positions, matter a lot."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def _drop(sample_ids, kept=6, layers=4, seed=7, iteration=3):
    return TokenDropState(seed=seed, iteration=iteration,
                          kept_lengths=middle_layer_kept_lengths(layers, kept),
                          sample_ids=torch.as_tensor(sample_ids))


def _loss_and_grads(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids, **kw)  # [b, s]
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_bit_identical(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


# ----------------------------------------------------------------------------- index sampling

def test_indices_shape_sorted_distinct_in_range():
    idx = sample_kept_indices(1, 0, 1, torch.arange(50), 40, 13)
    assert idx.shape == (50, 13) and idx.dtype == torch.int64
    assert bool((idx[:, 1:] > idx[:, :-1]).all())  # strictly ascending: sorted and distinct
    assert int(idx.min()) >= 0 and int(idx.max()) < 40
    assert torch.equal(sample_kept_indices(1, 0, 1, torch.arange(3), 9, 9),
                       torch.arange(9).expand(3, 9))
    for bad in (0, 10):
        with pytest.raises(ValueError):
            sample_kept_indices(1, 0, 1, torch.arange(3), 9, bad)


def test_indices_uniform():
    """Chi-square on per-position and per-pair frequencies over many samples and iterations."""
    s, r, n = 24, 6, 6000
    idx = sample_kept_indices(0, 0, 1, torch.arange(n), s, r)  # across samples
    over_iterations = torch.cat([sample_kept_indices(0, it, 2, torch.tensor([5]), s, r)
                                 for it in range(1500)])
    for draws in (idx, over_iterations):
        count = torch.bincount(draws.flatten(), minlength=s).double()
        expected = draws.size(0) * r / s
        chi2 = float(((count - expected) ** 2 / expected).sum())
        assert chi2 < 60, chi2  # 23 dof: p(chi2 > 60) ~ 4e-5
    onehot = torch.zeros(n, s).scatter_(1, idx, 1.0)
    pairs = onehot.T @ onehot
    iu = torch.triu_indices(s, s, 1)
    pair_count = pairs[iu[0], iu[1]].double()
    expected = n * r * (r - 1) / (s * (s - 1))
    chi2 = float(((pair_count - expected) ** 2 / expected).sum())
    assert chi2 < 276 + 5 * (2 * 275) ** 0.5, chi2  # 275 dof, ~5 sigma


def test_indices_independent_across_layers():
    """The overlap of two layers' kept sets is hypergeometric (mean r^2/s)."""
    s, r, n = 32, 8, 4000
    both = kept_indices_for_layers(3, 1, [1, 2], torch.arange(n), s, r)  # [2, n, r]
    sets = torch.zeros(2, n, s).scatter_(2, both, 1.0)
    overlap = (sets[0] * sets[1]).sum(1)
    mean, var = r * r / s, r * r / s * (1 - r / s) * (s - r) / (s - 1)
    assert abs(float(overlap.mean()) - mean) < 5 * (var / n) ** 0.5
    assert abs(float(overlap.var()) - var) < 0.15 * var


def test_indices_differ_by_layer_iteration_sample_seed():
    ids = torch.arange(4)
    base = sample_kept_indices(1, 10, 2, ids, 64, 16)
    for other in (sample_kept_indices(1, 10, 3, ids, 64, 16),
                  sample_kept_indices(1, 11, 2, ids, 64, 16),
                  sample_kept_indices(2, 10, 2, ids, 64, 16),
                  sample_kept_indices(1, 10, 2, ids + 4, 64, 16)):
        assert not torch.equal(base, other)
        assert all(not torch.equal(a, b) for a, b in zip(base, other))
    rows = sample_kept_indices(1, 10, 2, torch.tensor([0, 1, 2, 3, 2 ** 32, 2 ** 40 + 1]), 64, 16)
    assert len({tuple(row.tolist()) for row in rows}) == 6  # high bits of the id count too


def test_indices_pure_function_of_the_sample():
    """A batch equals its rows one at a time; order, dtype, repetition and the global RNG are
    irrelevant; the layer-batched variant equals the per-layer call."""
    ids = torch.tensor([17, 3, 99, 12345678901, 0])
    rng = torch.get_rng_state()
    batch = sample_kept_indices(5, 2, 1, ids, 20, 7)
    assert torch.equal(torch.get_rng_state(), rng)  # torch's generator untouched
    for i, sid in enumerate(ids):
        assert torch.equal(sample_kept_indices(5, 2, 1, sid.view(1), 20, 7)[0], batch[i])
    perm = torch.tensor([4, 2, 0, 1, 3])
    assert torch.equal(sample_kept_indices(5, 2, 1, ids[perm], 20, 7), batch[perm])
    torch.manual_seed(123)
    assert torch.equal(sample_kept_indices(5, 2, 1, ids[:3].int(), 20, 7), batch[:3])
    layered = kept_indices_for_layers(5, 2, [2, 1], ids, 20, 7)
    assert torch.equal(layered[1], batch)
    assert torch.equal(layered[0], sample_kept_indices(5, 2, 2, ids, 20, 7))


def test_indices_reference_values():
    """Pinned values: any change to the hash changes every run's draws (and resumes)."""
    got = sample_kept_indices(1234, 5, 3, torch.tensor([0, 7]), 16, 5)
    assert got.tolist() == [[1, 4, 5, 7, 8], [3, 4, 6, 13, 15]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_indices_same_on_cuda():
    ids = torch.arange(64) * 7919
    cpu = kept_indices_for_layers(9, 4, [1, 2, 3], ids, 300, 77)
    gpu = kept_indices_for_layers(9, 4, [1, 2, 3], ids.cuda(), 300, 77)
    assert torch.equal(gpu.cpu(), cpu)


def test_token_drop_state():
    state = _drop([4, 5], kept=3, layers=5)
    assert dict(state.kept_lengths) == {1: 3, 2: 3, 3: 3}
    assert state.sample_ids.dtype == torch.int64
    with pytest.raises(TypeError):
        state.kept_lengths[0] = 1  # read-only
    with pytest.raises(ValueError):
        TokenDropState(0, 0, {1: 0}, torch.arange(2))
    with pytest.raises(ValueError):
        TokenDropState(0, 0, {1: 2}, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        TokenDropState(0, 0, {1: 2}, torch.zeros(2))
    got = kept_indices_by_layer(state, [0, 1, 3, 4], seq_len=8)
    assert sorted(got) == [1, 3]
    assert torch.equal(got[3], sample_kept_indices(state.seed, state.iteration, 3,
                                                   state.sample_ids, 8, 3))
    assert kept_indices_by_layer(state, [1, 2], seq_len=3) == {}  # r >= s: no dropping


# ----------------------------------------------------------------------------- gather/scatter

def test_gather_scatter_round_trip():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 5)
    idx = sample_kept_indices(0, 0, 1, torch.arange(3), 10, 4)
    part = gather_tokens(x, idx)
    assert part.shape == (3, 4, 5)
    for i in range(3):
        assert torch.equal(part[i], x[i, idx[i]])
    assert torch.equal(scatter_tokens(x, idx, part), x)
    new = torch.randn(3, 4, 5)
    out = scatter_tokens(x, idx, new)
    assert torch.equal(gather_tokens(out, idx), new)
    dropped = torch.ones(3, 10, dtype=torch.bool).scatter(1, idx, False)
    assert torch.equal(out[dropped], x[dropped])
    assert torch.equal(x, x.clone())  # out of place: x itself untouched
    assert torch.equal(gather_position_ids(None, idx, 10), idx)
    assert torch.equal(gather_position_ids(torch.arange(10)[None] + 100, idx, 10), idx + 100)


def test_gather_scatter_gradcheck():
    torch.manual_seed(0)
    idx = sample_kept_indices(0, 0, 1, torch.arange(2), 6, 3)
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        return scatter_tokens(x, idx, torch.tanh(gather_tokens(x, idx) @ w))

    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))
    g = torch.randn(2, 6, 3, dtype=torch.float64)
    (grad_x,) = torch.autograd.grad(f(x, w), x, g)
    dropped = torch.ones(2, 6, dtype=torch.bool).scatter(1, idx, False)
    assert torch.equal(grad_x[dropped], g[dropped])  # straight through, bit for bit


def test_gather_attention_mask():
    b, s = 2, 8
    idx = sample_kept_indices(0, 0, 1, torch.arange(b), s, 5)
    torch.manual_seed(0)
    full = torch.rand(b, 1, s, s) > 0.5
    pad = torch.rand(b, 1, 1, s) > 0.5
    shared = torch.rand(1, 1, s, s) > 0.5
    got_full = gather_attention_mask(full, idx, s)
    got_pad = gather_attention_mask(pad, idx, s)
    got_shared = gather_attention_mask(shared, idx, s)
    assert got_full.shape == (b, 1, 5, 5) and got_pad.shape == (b, 1, 1, 5)
    for i in range(b):
        k = idx[i]
        assert torch.equal(got_full[i, 0], full[i, 0][k][:, k])
        assert torch.equal(got_shared[i, 0], shared[0, 0][k][:, k])
        assert torch.equal(got_pad[i, 0, 0], pad[i, 0, 0][k])
    assert gather_attention_mask(None, idx, s) is None
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
    assert torch.equal(gather_attention_mask(causal, idx, s)[0, 0],
                       torch.triu(torch.ones(5, 5, dtype=torch.bool), 1))  # sorted: still causal


# ----------------------------------------------------------------------------- in the block

def test_dropped_positions_skip_the_layer_and_pass_gradient():
    torch.manual_seed(0)
    block = ParallelTransformer(_config(num_layers=3), post_process=False).train()
    x = torch.randn(2, S, H, requires_grad=True)
    state = TokenDropState(1, 2, {1: 5}, torch.tensor([10, 11]))
    idx = kept_indices_by_layer(state, [1], S)[1]
    # hook the middle layer's input/output: its dropped rows come out as they went in
    seen = {}
    block.layers[1].register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out))
    x1 = block.layers[0](x)
    out = block(x, token_drop=state)
    assert seen["inp"].shape == (2, 5, H)
    dropped = torch.ones(2, S, dtype=torch.bool).scatter(1, idx, False)
    x2 = scatter_tokens(x1, idx, seen["out"])
    assert torch.equal(x2[dropped], x1[dropped])
    assert torch.equal(out, block.layers[2](x2))
    # gradient through layer 1 alone: dropped rows get the upstream gradient unchanged
    h = x1.detach().requires_grad_()
    y = block._forward_dropped(block.layers[1], h, None, None, idx)
    assert torch.equal(y[dropped], h[dropped])
    g = torch.randn_like(y)
    (gh,) = torch.autograd.grad(y, h, g)
    assert torch.equal(gh[dropped], g[dropped])
    assert not torch.equal(gh[~dropped], g[~dropped])


@pytest.mark.slow
@pytest.mark.parametrize("pos", ["learned_absolute", "rope"])
def test_keep_all_tokens_is_bit_identical(pos):
    model = _model(position_embedding_type=pos)
    ids = torch.randint(0, V, (3, S))
    dense = _loss_and_grads(model, ids)
    full = TokenDropState(1, 0, {1: S, 2: S + 4}, torch.arange(3))
    _assert_bit_identical(_loss_and_grads(model, ids, token_drop=full), dense)
    # forced through gather -> layer -> scatter with every position kept
    encoder = model.language_model.encoder
    encoder._always_gather = True
    calls = []
    forward_dropped = encoder._forward_dropped

    def counting(layer, *args):
        calls.append(layer.layer_number)
        return forward_dropped(layer, *args)
    encoder._forward_dropped = counting
    try:
        _assert_bit_identical(_loss_and_grads(model, ids, token_drop=full), dense)
        mask = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None]
        _assert_bit_identical(_loss_and_grads(model, ids, token_drop=full, attention_mask=mask),
                              _loss_and_grads(model, ids, attention_mask=mask))
    finally:
        encoder._always_gather = False
        del encoder._forward_dropped
    assert calls == [1, 2, 1, 2]  # really went through the gather path


def test_dropping_changes_training_but_not_eval_or_none():
    model = _model()
    ids = torch.randint(0, V, (2, S))
    state = _drop([0, 1], kept=5)
    dense = _loss_and_grads(model, ids)
    dropped = _loss_and_grads(model, ids, token_drop=state)
    assert not torch.equal(dropped[0], dense[0])
    _assert_bit_identical(_loss_and_grads(model, ids, token_drop=None), dense)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, labels=ids, token_drop=state), model(ids, labels=ids))
    with pytest.raises(ValueError, match="sample_ids"):
        model.train()(ids, labels=ids, token_drop=_drop([0, 1, 2], kept=5))


def test_causality_with_dropping():
    model = _model()
    ids = torch.randint(0, V, (2, S))
    state = _drop([3, 4], kept=6)
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % V
    with torch.no_grad():
        a = model(ids, token_drop=state)
        b = model(changed, token_drop=state)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    # gradient form: d logits[:, i] / d embeddings[:, j > i] == 0
    emb = model.language_model.embedding
    captured = {}

    def keep(m, args, out):
        out.retain_grad()
        captured["x"] = out
    hook = emb.register_forward_hook(keep)
    model(ids, token_drop=state)[:, 5].sum().backward()
    hook.remove()
    assert float(captured["x"].grad[:, 6:].abs().max()) == 0.0
    assert float(captured["x"].grad[:, :6].abs().max()) > 0.0


@pytest.mark.slow
def test_micro_batch_split_and_data_parallel_ranks():
    """The same sample draws the same tokens whatever batch it is computed in."""
    model = _model()
    ids = torch.randint(0, V, (8, S))
    sample_ids = torch.arange(8) + 1000
    with torch.no_grad():
        whole = model(ids, labels=ids, token_drop=_drop(sample_ids, kept=5))  # [8, s]
        for micro in (4, 2, 1):
            parts = [model(ids[i:i + micro], labels=ids[i:i + micro],
                           token_drop=_drop(sample_ids[i:i + micro], kept=5))
                     for i in range(0, 8, micro)]
            torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-6, atol=1e-6)
        for dp in (2, 4):  # rank k of dp gets samples k, k+dp, ...: strided, not contiguous
            for rank in range(dp):
                part = model(ids[rank::dp], labels=ids[rank::dp],
                             token_drop=_drop(sample_ids[rank::dp], kept=5))
                torch.testing.assert_close(part, whole[rank::dp], rtol=1e-6, atol=1e-6)
        other = model(ids, labels=ids, token_drop=_drop(sample_ids + 8, kept=5))
    assert not torch.allclose(other, whole)  # the ids really select the tokens


@pytest.mark.parametrize("pos", ["rope", "learned_absolute"])
def test_kept_tokens_keep_their_positions(pos):
    """A dropping layer equals, on the kept rows, the full-length layer with the non-kept tokens
    masked out as keys: rope sees the ORIGINAL positions."""
    torch.manual_seed(0)
    config = _config(num_layers=3, position_embedding_type=pos)
    block = _big_weights(ParallelTransformer(config, post_process=False).train())
    layer = block.layers[1]
    b = 2
    x = torch.randn(b, S, H)
    positions = torch.arange(S).expand(b, S) + 3  # offset positions too
    state = TokenDropState(5, 1, {1: 7}, torch.tensor([40, 41]))
    idx = kept_indices_by_layer(state, [1], S)[1]
    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
    dropped_key = torch.ones(b, S, dtype=torch.bool).scatter(1, idx, False)
    eye = torch.eye(S, dtype=torch.bool)
    mask = ((causal[None] | dropped_key[:, None, :]) & ~eye).unsqueeze(1)  # no empty rows
    with torch.no_grad():
        dropped = block._forward_dropped(layer, x, positions, None, idx)
        full = layer(x, positions, mask)
    kept = ~dropped_key
    torch.testing.assert_close(dropped[kept], full[kept], rtol=1e-5, atol=1e-5)
    if pos == "rope":
        with torch.no_grad():
            shifted = layer(gather_tokens(x, idx), torch.arange(7).expand(b, 7))  # 0..r-1
        assert not torch.allclose(shifted.reshape(-1, H), full[kept], atol=1e-4)


def test_bert_padding_mask_and_explicit_mask_with_dropping():
    """Non-causal block: a padding mask [b,1,1,s] and the equivalent explicit [b,1,s,s] mask give
    the same result with dropping on; padded keys do not influence kept tokens."""
    torch.manual_seed(0)
    block = _big_weights(ParallelTransformer(_config(num_layers=3), causal=False).train())
    x = torch.randn(2, S, H)
    pad = torch.zeros(2, 1, 1, S, dtype=torch.bool)
    pad[1, ..., 11:] = True
    explicit = pad.expand(2, 1, S, S)
    state = TokenDropState(0, 0, {1: 9}, torch.tensor([0, 1]))
    with torch.no_grad():
        a = block(x, None, pad, token_drop=state)
        b = block(x, None, explicit, token_drop=state)
        x2 = x.clone()
        x2[1, 11:] += torch.randn(5, H)
        c = block(x2, None, pad, token_drop=state)
    real = ~pad.view(2, S)  # the padding mask's dense layers skip padded positions (packed)
    torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c[1, :11], a[1, :11], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(c[1, 11:], a[1, 11:], atol=1e-2)


def test_explicit_causal_mask_equals_none_with_dropping():
    model = _model(position_embedding_type="rope")
    ids = torch.randint(0, V, (2, S))
    state = _drop([8, 9], kept=7)
    mask = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask, token_drop=state),
                                   model(ids, token_drop=state), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_recompute_with_dropping(dropout):
    tracker = build_rng_tracker(seed=42)
    parallel = ParallelState(rng_tracker=tracker)
    torch.manual_seed(0)
    plain = GPTModel(_config(hidden_dropout=dropout, attention_dropout=dropout), parallel)
    recompute = GPTModel(_config(hidden_dropout=dropout, attention_dropout=dropout,
                                 recompute_granularity="full"), parallel)
    recompute.load_state_dict(plain.state_dict())
    ids = torch.randint(0, V, (2, S))
    state = _drop([0, 1], kept=6)
    start = tracker.get_states()
    results = []
    for model in (plain.train(), recompute.train()):
        tracker.set_states(start)
        torch.manual_seed(3)
        results.append(_loss_and_grads(model, ids, token_drop=state))
    if dropout == 0.0:
        _assert_bit_identical(results[1], results[0])
    else:
        assert torch.equal(results[1][0], results[0][0])
        for name, grad in results[0][1].items():
            torch.testing.assert_close(results[1][1][name], grad, rtol=1e-6, atol=1e-7)


def test_pipeline_stages_use_global_layer_ids():
    full = _model()
    first = GPTModel(full.config, post_process=False, layer_ids=[0, 1]).train()
    last = GPTModel(full.config, pre_process=False, layer_ids=[2, 3]).train()
    fsd = full.state_dict()
    first.load_state_dict({k: v for k, v in fsd.items()
                           if "layers.2." not in k and "layers.3." not in k and "final" not in k})
    last_sd = {k.replace("layers.2.", "layers.0.").replace("layers.3.", "layers.1."): v
               for k, v in fsd.items() if "layers.2." in k or "layers.3." in k or "final" in k}
    last_sd["word_embeddings.weight"] = fsd["language_model.embedding.word_embeddings.weight"]
    last.load_state_dict(last_sd)
    ids = torch.randint(0, V, (2, S))
    state = TokenDropState(3, 1, {1: 5, 2: 9}, torch.tensor([6, 7]))
    with torch.no_grad():
        last.set_input_tensor(first(ids, token_drop=state))
        torch.testing.assert_close(last(ids, labels=ids, token_drop=state),
                                   full(ids, labels=ids, token_drop=state), rtol=0, atol=0)
        # layer 2 is global: a state naming local index 0 of the last stage would differ
        last.set_input_tensor(first(ids, token_drop=state))
        other = last(ids, labels=ids, token_drop=TokenDropState(3, 1, {1: 5, 0: 9},
                                                               torch.tensor([6, 7])))
    assert not torch.equal(other, full(ids, labels=ids, token_drop=state))
