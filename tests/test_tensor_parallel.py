"""Tensor parallelism of the whole GPT model: TP=2/4 equal TP=1 (weights, logits, losses, grads,
with and without random-LTD), vocab-parallel cross entropy, dropout RNG semantics, sequence
parallelism, and full <-> partitioned state dicts."""

import pytest
import torch
import torch.nn.functional as F

from distributed_harness import run_distributed
from megatron.errors import UserError
from megatron.model import transformer
from megatron.ltd.dropping import TokenDropState, middle_layer_kept_lengths
from megatron.model import GPTModel, TransformerConfig
from megatron.parallel.state import ParallelState
from megatron.parallel.tp_state_dict import (gather_full_state_dict, merge_partitions,
                                             partition_of, split_full_state_dict, split_tensor)

SEED = 1234
B, S, V, H, HEADS, LAYERS = 2, 16, 128, 32, 4, 4
TOL = dict(rtol=1e-5, atol=1e-6)


def _config(**kw):
    base = dict(num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS, seq_length=S,
                padded_vocab_size=V, hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _token_drop(kept=8):
    return TokenDropState(seed=SEED, iteration=3, sample_ids=torch.tensor([5, 11]),
                          kept_lengths=middle_layer_kept_lengths(LAYERS, kept))


def _batch():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)


def _perturbed_reference(cfg):
    """TP=1 model from SEED with non-trivial biases and norms (zeros/ones hide layout bugs)."""
    torch.manual_seed(SEED)
    ref = GPTModel(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return ref


def _tp_state(tp):
    from megatron.parallel.initialize import build_parallel_state
    from megatron.parallel.random import build_rng_tracker

    import torch.distributed as dist
    return build_parallel_state(tp, 1, build_rng_tracker(SEED, dist.get_rank() % tp))


def _plain(x):
    """Tensors -> numpy arrays (torch tensors cannot cross the result queue once the rank
    process has exited: they travel as shared-memory handles)."""
    if isinstance(x, torch.Tensor):
        return x.numpy().copy()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


def _record_gathers(monkeypatch_target, log):
    """Wrap transformer.gather_tokens to log the kept indices each dropping layer uses."""
    original = monkeypatch_target.gather_tokens

    def recording(hidden, indices, flat=None):
        log.append(indices.clone())
        return original(hidden, indices, flat)
    monkeypatch_target.gather_tokens = recording
    return original


# ---- TP=2 / TP=4 GPT equals TP=1 ------------------------------------------------------------

def _gpt_equivalence_body(rank, world_size, variants):
    import megatron.model.transformer as transformer
    from megatron.parallel.mappings import gather_from_tp_region

    parallel = _tp_state(world_size)
    ids, labels = _batch()
    gathered_indices = []
    for overrides in variants:
        cfg = _config(**overrides)
        # 1. Same seed -> same full weights (master init then split), every parameter.
        torch.manual_seed(SEED)
        model = GPTModel(cfg, parallel)
        torch.manual_seed(SEED)
        plain = GPTModel(cfg)
        full = gather_full_state_dict(model, parallel)
        assert list(full) == list(plain.state_dict())
        for name, tensor in plain.state_dict().items():
            assert torch.equal(full[name], tensor), name
        # the TP layout of every parameter agrees with the name rules used by converters
        for name, p in model.named_parameters():
            expected = partition_of(name)
            tp_split = getattr(p, "tensor_model_parallel", False)
            actual = (p.partition_dim, p.partition_stride) if tp_split else None
            assert actual == expected, (name, actual, expected)

        # 2. Load perturbed weights through split_full_state_dict; logits, loss and grads match.
        ref = _perturbed_reference(cfg)
        model.load_state_dict(split_full_state_dict(ref.state_dict(), parallel))
        model.eval(), ref.eval()
        with torch.no_grad():
            logits = gather_from_tp_region(model(ids), parallel)
            torch.testing.assert_close(logits, ref(ids), **TOL)
        model.train(), ref.train()
        for drop in (None, _token_drop()):
            model.zero_grad(), ref.zero_grad()
            log = []
            original = _record_gathers(transformer, log)
            try:
                loss = model(ids, labels=labels, token_drop=drop)
            finally:
                transformer.gather_tokens = original
            ref_loss = ref(ids, labels=labels, token_drop=drop)
            torch.testing.assert_close(loss, ref_loss, **TOL)
            loss.mean().backward()
            ref_loss.mean().backward()
            grads = gather_full_state_dict(model, parallel, grads=True)
            ref_grads = {n: p.grad for n, p in ref.named_parameters()}
            assert set(grads) == set(ref_grads)
            for name, grad in grads.items():
                torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=name)
            if drop is not None:
                assert len(log) == LAYERS - 2 and all(i.shape == (B, 8) for i in log)
                gathered_indices.append(torch.stack(log))
    return _plain(gathered_indices)


@pytest.mark.parametrize("tp,variants", [
    (2, [{}, {"untie_embeddings_and_output_weights": True, "position_embedding_type": "rope"}]),
    (4, [{"recompute_granularity": "full"}]),
])
def test_gpt_tensor_parallel_equals_tp1(tp, variants):
    out = run_distributed(_gpt_equivalence_body, tp, args=(variants,), timeout=120)
    # random-LTD: every TP rank gathered the same kept tokens (a pure hash, no communication)
    for other in out[1:]:
        for mine, theirs in zip(out[0], other):
            assert (mine == theirs).all()
    assert all(len(o) == len(variants) for o in out)


# ---- vocab-parallel cross entropy ------------------------------------------------------------

def _cross_entropy_body(rank, world_size):
    import torch.distributed as dist
    from megatron.parallel.cross_entropy import vocab_parallel_cross_entropy

    parallel = _tp_state(world_size)
    g = torch.Generator().manual_seed(0)
    full = torch.randn(B, S, V, generator=g) * 4
    target = torch.randint(0, V, (B, S), generator=g)
    weights = torch.rand(B, S, generator=g)
    part = V // world_size
    local = full[..., rank * part:(rank + 1) * part].clone().requires_grad_()

    shapes = []
    original = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        shapes.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)
    dist.all_reduce = recording
    try:
        loss = vocab_parallel_cross_entropy(local, target, parallel)
        (loss * weights).sum().backward()
    finally:
        dist.all_reduce = original
    # three all-reduces of [b, s] (max, target logit, sum of exp); no full-vocab tensor moves
    assert shapes == [(B, S)] * 3, shapes
    ref_logits = full.clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.transpose(1, 2), target, reduction="none")
    (ref * weights).sum().backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(local.grad, ref_logits.grad[..., rank * part:(rank + 1) * part],
                               **TOL)


def _sequence_mappings_body(rank, world_size):
    """The sequence-parallel conjugate pairs, forward and backward, against hand results."""
    from megatron.parallel.mappings import (gather_from_sequence_parallel_region,
                                            reduce_scatter_to_sequence_parallel_region,
                                            scatter_to_sequence_parallel_region)

    parallel = _tp_state(world_size)
    full = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # [b, s, h], replicated
    mine = slice(2 * rank, 2 * rank + 2)
    x = full.clone().requires_grad_()
    chunk = scatter_to_sequence_parallel_region(x, parallel)
    assert torch.equal(chunk, full[:, mine])
    (chunk * (rank + 1)).sum().backward()  # backward all-gathers each rank's chunk gradient
    assert torch.equal(x.grad[:, :2], torch.ones(2, 2, 3)) and \
        torch.equal(x.grad[:, 2:], torch.full((2, 2, 3), 2.0))

    for partial in (True, False):
        c = full[:, mine].clone().requires_grad_()
        gathered = gather_from_sequence_parallel_region(c, parallel, partial)
        assert torch.equal(gathered, full)
        (gathered * (rank + 1)).sum().backward()
        # partial grads are reduce-scattered (1 + 2), complete ones just split
        want = 3.0 if partial else float(rank + 1)
        assert torch.equal(c.grad, torch.full((2, 2, 3), want))

    p = (full * (rank + 1)).requires_grad_()  # partial sums: they add up to 3 * full
    reduced = reduce_scatter_to_sequence_parallel_region(p, parallel)
    assert torch.equal(reduced, 3 * full[:, mine])
    (reduced * (rank + 1)).sum().backward()  # backward all-gathers
    assert torch.equal(p.grad[:, :2], torch.ones(2, 2, 3)) and \
        torch.equal(p.grad[:, 2:], torch.full((2, 2, 3), 2.0))


def _collectives_body(rank, world_size):
    _cross_entropy_body(rank, world_size)
    _sequence_mappings_body(rank, world_size)


def test_vocab_parallel_cross_entropy_and_sequence_mappings_tp2():
    run_distributed(_collectives_body, 2, timeout=60)


def test_padded_vocab_must_divide_by_tp():
    with pytest.raises(UserError, match="--make-vocab-size-divisible-by"):
        GPTModel(_config(padded_vocab_size=130), ParallelState(tp_size=4, tp_rank=0))
    with pytest.raises(UserError, match="--seq-length .* --sequence-parallel"):
        _config(seq_length=15, sequence_parallel=True).check_tensor_parallel(2)


# ---- dropout RNG: hidden/embedding masks agree across TP ranks, attention masks differ ---------

def _dropout_body(rank, world_size):
    parallel = _tp_state(world_size)
    ids, labels = _batch()
    out = {}
    for sp in (False, True):
        torch.manual_seed(SEED)  # the default generator: same seed on every TP rank
        model = GPTModel(_config(num_layers=2, hidden_dropout=0.3, attention_dropout=0.3,
                                 sequence_parallel=sp), parallel)
        masks, attention_states = [], []
        dropout, attention = F.dropout, transformer.causal_attention_with_dropout

        def recording_dropout(x, p=0.5, training=True, inplace=False):
            y = dropout(x, p, training, inplace)
            masks.append((y == 0) & (x != 0))
            return y

        def recording_attention(*args, **kwargs):  # the CPU kernel for attention with dropout
            attention_states.append(torch.get_rng_state())
            return attention(*args, **kwargs)
        F.dropout = recording_dropout
        transformer.causal_attention_with_dropout = recording_attention
        try:
            model(ids, labels=labels).mean().backward()
        finally:
            F.dropout, transformer.causal_attention_with_dropout = dropout, attention
        assert len(masks) == 1 + 2 * 2 and len(attention_states) == 2  # embedding + 2 per layer
        out[sp] = (masks, attention_states, torch.get_rng_state())
    return _plain(out)


def test_dropout_rng_across_tp_ranks():
    r0, r1 = run_distributed(_dropout_body, 2, timeout=60)
    masks0, attn0, default0 = r0[False]
    masks1, attn1, default1 = r1[False]
    # embedding and hidden dropout: the default generator, identical on both ranks
    assert all((a == b).all() for a, b in zip(masks0, masks1))
    assert all(0 < m.mean() < 0.6 for m in masks0)
    assert (default0 == default1).all()
    # attention dropout: the tracker's 'model-parallel-rng' state, seed + 2718 + tp_rank
    for rank, states in ((0, attn0), (1, attn1)):
        expected = torch.Generator().manual_seed(SEED + 2718 + rank).get_state().numpy()
        assert (states[0] == expected).all()
    assert not any((a == b).all() for a, b in zip(attn0, attn1))
    # sequence parallel: each rank holds different tokens, so the hidden masks differ (tracker)
    sp0, sp1 = r0[True][0], r1[True][0]
    assert sp0[0].shape == (B, S // 2, H)
    assert not any((a == b).all() for a, b in zip(sp0, sp1))


# ---- sequence parallelism ---------------------------------------------------------------------

def _sequence_parallel_body(rank, world_size):
    from megatron.parallel.layers import allreduce_sequence_parallel_grads

    parallel = _tp_state(world_size)
    ids, labels = _batch()
    ref_cfg = _config()
    ref = _perturbed_reference(ref_cfg)
    for overrides in ({}, {"recompute_granularity": "full"}):
        dense = GPTModel(_config(**overrides), parallel)
        sp = GPTModel(_config(sequence_parallel=True, **overrides), parallel)
        dense.load_state_dict(split_full_state_dict(ref.state_dict(), parallel))
        sp.load_state_dict(split_full_state_dict(ref.state_dict(), parallel))
        marked = sorted(n for n, p in sp.named_parameters() if getattr(p, "sequence_parallel",
                                                                       False))
        assert all("layernorm" in n or n.endswith("dense.bias") or n.endswith("4h_to_h.bias")
                   for n in marked) and len(marked) == LAYERS * 6 + 2
        emb = sp.language_model.embedding(ids, torch.arange(S).expand(B, S))
        assert emb.shape == (B, S // world_size, H)
        for drop in (None, _token_drop(8)):
            dense.zero_grad(), sp.zero_grad()
            loss = dense(ids, labels=labels, token_drop=drop)
            sp_loss = sp(ids, labels=labels, token_drop=drop)
            assert sp_loss.shape == (B, S)
            torch.testing.assert_close(sp_loss, loss, **TOL)
            loss.mean().backward()
            sp_loss.mean().backward()
            partial = sp.language_model.encoder.final_layernorm.weight.grad.clone()
            allreduce_sequence_parallel_grads(sp, parallel)
            want = gather_full_state_dict(dense, parallel, grads=True)
            got = gather_full_state_dict(sp, parallel, grads=True)
            for name, grad in want.items():
                torch.testing.assert_close(got[name], grad, **TOL, msg=name)
            # before the all-reduce the LayerNorm grads covered this rank's tokens only
            assert not torch.allclose(partial, got["language_model.encoder.final_layernorm."
                                                   "weight"])
    # random-LTD kept lengths must split across the TP ranks under sequence parallelism
    with pytest.raises(UserError, match="--sequence-parallel.*kept length 7"):
        sp(ids, labels=labels, token_drop=_token_drop(7))

    # Two pipeline stages on one rank (rope): the later stage receives a sequence chunk and
    # still derives the full-length position ids.
    cfg = _config(sequence_parallel=True, position_embedding_type="rope")
    whole = GPTModel(cfg, parallel)
    first = GPTModel(cfg, parallel, post_process=False, layer_ids=[0, 1])
    last = GPTModel(cfg, parallel, pre_process=False, layer_ids=[2, 3])
    sd = whole.state_dict()
    first.load_state_dict({k: v for k, v in sd.items() if k in first.state_dict()})
    stage = {k.replace("layers.2.", "layers.0.").replace("layers.3.", "layers.1."): v
             for k, v in sd.items()}
    stage["word_embeddings.weight"] = sd["language_model.embedding.word_embeddings.weight"]
    last.load_state_dict({k: v for k, v in stage.items() if k in last.state_dict()})
    hidden = first(ids)
    assert hidden.shape == (B, S // world_size, H)
    last.set_input_tensor(hidden)
    torch.testing.assert_close(last(None, labels=labels), whole(ids, labels=labels), **TOL)


def test_sequence_parallel_equals_tensor_parallel():
    run_distributed(_sequence_parallel_body, 2, timeout=120)


# ---- full <-> partitioned state dicts (no communication) -------------------------------------

def test_split_full_state_dict_matches_tp_construction():
    cfg = _config(untie_embeddings_and_output_weights=True)
    torch.manual_seed(SEED)
    full = GPTModel(cfg).state_dict()
    for tp in (2, 4):
        parts = []
        for rank in range(tp):
            parallel = ParallelState(tp_size=tp, tp_rank=rank)
            torch.manual_seed(SEED)
            model = GPTModel(cfg, parallel)  # construction does not communicate
            for split in (split_full_state_dict(full, parallel),
                          split_full_state_dict(full, parallel, model=model)):
                for name, tensor in model.state_dict().items():
                    assert torch.equal(split[name], tensor), (tp, rank, name)
            parts.append(model.state_dict())
        # QKV rows hold whole heads: rank r's rows are heads [r*np, (r+1)*np) of [np, 3, hn]
        qkv = "language_model.encoder.layers.0.self_attention.query_key_value.weight"
        per_head = full[qkv].view(HEADS, 3, H // HEADS, H)
        np_ = HEADS // tp
        for rank in range(tp):
            assert torch.equal(parts[rank][qkv].view(np_, 3, H // HEADS, H),
                               per_head[rank * np_:(rank + 1) * np_])


def test_strided_split_round_trip():
    full = torch.arange(24.0).view(12, 2)
    parts = [split_tensor(full, 0, 3, 2, r) for r in range(2)]
    # 6 blocks of 2 rows; rank 0 holds blocks 0, 2, 4
    assert torch.equal(parts[0][:, 0], torch.tensor([0.0, 2, 8, 10, 16, 18]))
    assert torch.equal(merge_partitions(parts, 0, 3), full)
    assert partition_of("language_model.encoder.layers.3.self_attention.dense.weight") == (1, 1)
    assert partition_of("language_model.encoder.layers.3.self_attention.dense.bias") is None
    assert partition_of("lm_head.dense.weight") is None
