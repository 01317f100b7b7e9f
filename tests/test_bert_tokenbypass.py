"""TokenBypass for BERT (Hou et al. 2022; SPEC section 3): the per-id MLM-loss EMA (attributed to
the original id, ranked by the input id), special tokens always kept and padding never, the query
layer L/2-1 (kept queries over all keys/values) against a hand reference, keep-all bitwise dense,
the table identical across micro-batch splits and DP2, TP2/PP2 equal one process, bitwise resume
(pretrain_bert with --mock-data, dropout 0, SGD, as tests/test_bert_training.py)."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import pretrain_bert
from distributed_harness import run_distributed
from megatron.checkpointing import checkpoint_file
from megatron.ltd import TokenDroppingDriver, TokenImportance
from megatron.ltd.config import add_random_ltd_args, random_ltd_config_from_args
from megatron.ltd.dropping import TokenDropState, kept_indices_by_layer
from megatron.ltd.tokenbypass import bypass_layer_ids
from megatron.model import BertModel, TransformerConfig
from megatron.model.transformer import is_encoder_model
from training_helpers import tiny_bert_argv

V, H, HEADS, S, B, L = 96, 32, 4, 16, 3, 4
CLS, SEP, MASK, UNK, PAD = 2, 3, 4, 1, 0


def _driver(num_layers=L, encoder=True, *extra):
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--seq-length", type=int)
    add_random_ltd_args(parser)
    args = parser.parse_args(["--num-layers", str(num_layers), "--seq-length", str(S),
                              "--random-ltd", "--random-ltd-method", "tokenbypass",
                              "--random-ltd-start", "8", "--random-ltd-schedule", "constant",
                              *extra])
    return TokenDroppingDriver(random_ltd_config_from_args(args), num_layers=num_layers,
                               seq_length=S, global_batch_size=2, seed=5, encoder=encoder)


def test_encoder_layers_query_layer_and_layer_tokens():
    assert bypass_layer_ids(4, encoder=True) == (1, 2) and bypass_layer_ids(4) == (2,)
    assert bypass_layer_ids(24, encoder=True) == tuple(range(11, 23))
    assert bypass_layer_ids(2, encoder=True) == ()
    bert = _driver()
    assert bert.cfg.layer_ids == (1, 2) and bert.query_layers == (1,)
    assert bert.uses_importance and bert.importance.attribute_to == "mlm"
    drop = bert.begin_iteration(0)
    assert drop.uses_importance and drop.query_layers == (1,)
    assert drop.kept_lengths == {1: 8, 2: 8}
    # the query layer counts at the kept length (its queries): 2 full layers + 2 at 8
    assert bert.end_iteration() == 2 * (2 * S + 2 * 8)
    gpt = _driver(encoder=False)  # GPT's TokenBypass is unchanged
    assert gpt.cfg.layer_ids == (2,) and gpt.query_layers == ()
    assert gpt.importance.attribute_to == "target"
    cfg = TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=HEADS,
                            seq_length=S, padded_vocab_size=V, num_tokentypes=2)
    assert is_encoder_model(BertModel(cfg))
    from megatron.model import GPTModel
    assert not is_encoder_model(GPTModel(cfg))


def test_importance_is_the_ema_of_the_mlm_loss_of_the_original_id():
    imp = TokenImportance(attribute_to="mlm")
    tokens = torch.tensor([[CLS, MASK, 7, 8, SEP], [CLS, 9, MASK, 7, SEP]])
    labels = torch.tensor([[-1, 7, -1, 8, -1], [-1, 9, 8, -1, -1]])  # original ids, masked
    loss_mask = (labels >= 0).float()
    losses = torch.tensor([[9.0, 2.0, 9.0, 4.0, 9.0], [9.0, 6.0, 1.0, 9.0, 9.0]])
    imp.observe(labels[:1], losses[:1], loss_mask[:1], tokens[:1])  # two micro-batches
    imp.observe(labels[1:], losses[1:], loss_mask[1:], tokens[1:])
    assert torch.equal(imp.ema, torch.full((10,), 10.0, dtype=torch.float64))  # once per step
    assert imp.step() == 3
    want = torch.full((10,), 10.0, dtype=torch.float64)
    want[7] = 0.995 * 10 + 0.005 * 2.0
    want[8] = 0.995 * 10 + 0.005 * (4.0 + 1.0) / 2
    want[9] = 0.995 * 10 + 0.005 * 6.0
    assert torch.equal(imp.ema, want)
    # a second step compounds
    imp.observe(labels[:1], losses[:1] * 0 + 3.0, loss_mask[:1], tokens[:1])
    imp.step()
    assert imp.ema[7].item() == 0.995 * want[7].item() + 0.005 * 3.0
    # positions are ranked by their INPUT id: [MASK] positions by [MASK]'s (unseen: 10)
    rank = imp.position_importance(labels, tokens)
    assert torch.equal(rank, imp.importance(tokens))
    assert rank[0, 1].item() == 10.0 and rank[0, 2].item() == imp.ema[7].item()
    # checkpoints carry the attribution
    other = TokenImportance(attribute_to="mlm")
    other.load_state_dict(imp.state_dict())
    assert torch.equal(other.ema, imp.ema)
    from megatron.errors import UserError
    with pytest.raises(UserError):
        TokenImportance().load_state_dict(imp.state_dict())


def _batch(seed=0, lengths=(16, 12, 9)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, S), generator=g)
    padding = (torch.arange(S)[None] < torch.tensor(lengths)[:, None]).long()
    ids[:, 0] = CLS
    for i, n in enumerate(lengths):
        ids[i, n - 1] = SEP
    ids[0, 5], ids[1, 3], ids[2, 4] = MASK, MASK, UNK
    ids = ids.masked_fill(padding == 0, PAD)
    types = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), -1)
    labels[0, 5], labels[1, 3], labels[2, 2] = 11, 12, 13
    return ids, padding, types, labels


def _state(driver, ids, padding, labels, sample_ids=(3, 4, 5)):
    special = torch.isin(ids, torch.tensor([CLS, SEP, MASK, UNK])) & (padding > 0)
    return driver.begin_iteration(0)(torch.tensor(sample_ids), special_mask=special,
                                     labels=labels, tokens=ids, padding_mask=padding == 0)


def test_specials_always_kept_padding_never_top_importance_otherwise():
    driver = _driver()
    ids, padding, types, labels = _batch()
    # specials least important, padding most: the selection must still keep / drop them
    table = torch.linspace(1.0, 9.0, V, dtype=torch.float64)
    table[[CLS, SEP, MASK, UNK]] = 0.0
    table[PAD] = 100.0
    driver.importance.ema = table
    state = _state(driver, ids, padding, labels)
    assert state.shared_layers and state.query_layers == frozenset({1})
    kept = kept_indices_by_layer(state, range(L), S)
    assert set(kept) == {1, 2} and torch.equal(kept[1], kept[2])  # one kept set
    for i in range(B):
        row = set(kept[1][i].tolist())
        real = padding[i].nonzero().squeeze(1).tolist()
        specials = [p for p in real if int(ids[i, p]) in (CLS, SEP, MASK, UNK)]
        assert set(specials) <= row
        assert row <= set(real)  # never padding (every sample has >= 8 real tokens)
        others = [p for p in real if p not in specials]
        ranked = sorted(others, key=lambda p: -table[ids[i, p]].item())
        want = set(ranked[:8 - len(specials)])
        assert row - set(specials) == want


def _model(post_ln=False, num_layers=L):
    cfg = TransformerConfig(num_layers=num_layers, hidden_size=H, num_attention_heads=HEADS,
                            seq_length=S, padded_vocab_size=V, hidden_dropout=0.0,
                            attention_dropout=0.0, num_tokentypes=2, layernorm_epsilon=1e-12,
                            init_seed=5, apply_residual_connection_post_layernorm=post_ln)
    model = BertModel(cfg, add_binary_head=True)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _reference_query_layer(layer, x, padding, idx, post_ln):
    """Hand computation: layer on the full x [b, s, h], kept queries idx [b, r] over all keys."""
    att = layer.self_attention
    n1 = F.layer_norm(x, (H,), layer.input_layernorm.weight, layer.input_layernorm.bias, 1e-12)
    qkv = n1 @ att.query_key_value.weight.t() + att.query_key_value.bias  # [b, s, 3h]
    qkv = qkv.view(B, S, HEADS, 3 * (H // HEADS))
    q, k, v = qkv.split(H // HEADS, dim=-1)  # [b, s, np, hn]
    out = torch.zeros(B, idx.size(1), H)
    for i in range(B):
        for j, p in enumerate(idx[i].tolist()):
            scores = torch.einsum("nd,snd->ns", q[i, p], k[i]) / math.sqrt(H // HEADS)
            scores = scores.masked_fill(padding[i][None] == 0, -math.inf)
            ctx = torch.einsum("ns,snd->nd", scores.softmax(-1), v[i]).reshape(H)
            out[i, j] = ctx @ att.dense.weight.t() + att.dense.bias
    residual = (n1 if post_ln else x).gather(1, idx[..., None].expand(-1, -1, H))
    y = residual + out
    n2 = F.layer_norm(y, (H,), layer.post_attention_layernorm.weight,
                      layer.post_attention_layernorm.bias, 1e-12)
    mlp = layer.mlp
    inner = F.gelu(n2 @ mlp.dense_h_to_4h.weight.t() + mlp.dense_h_to_4h.bias,
                   approximate="tanh")
    return (n2 if post_ln else y) + inner @ mlp.dense_4h_to_h.weight.t() + mlp.dense_4h_to_h.bias


@pytest.mark.parametrize("post_ln", [False, True], ids=["pre-ln", "post-ln"])
def test_query_layer_is_kept_queries_over_all_keys(post_ln):
    model = _model(post_ln).train()
    ids, padding, types, labels = _batch()
    state = _state(_driver(), ids, padding, labels)
    idx = kept_indices_by_layer(state, range(L), S)[1]
    seen = {}

    def capture(n):
        def hook(module, args, out):
            seen[n] = (args, out)
        return hook

    layers = model.language_model.encoder.layers
    handles = [layer.register_forward_hook(capture(n)) for n, layer in enumerate(layers)]
    try:
        model(ids, padding, tokentype_ids=types, lm_labels=labels, token_drop=state)
    finally:
        for h in handles:
            h.remove()
    (x, _, _, q_idx), out = seen[1]
    assert x.shape == (B, S, H) and torch.equal(q_idx, idx) and out.shape == (B, 8, H)
    with torch.no_grad():
        want = _reference_query_layer(layers[1], x, padding, idx, post_ln)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # layer 2 runs on the kept tokens only: its input is layer 1's kept outputs
    (x2, *_), out2 = seen[2]
    assert x2.shape == (B, 8, H) and torch.equal(x2, out)
    # the dropped tokens skip layers 1 and 2; the last layer is full and gets them back
    (x3, _, _, _, packing), _ = seen[3]
    real = padding.bool()
    assert x3.shape == (1, int(real.sum()), H)  # a full layer: on the packed real tokens
    x3 = packing.unpack(x3)  # [b, s, h], padded rows zero
    dropped = torch.ones(B, S, dtype=torch.bool).scatter(1, idx, False)
    assert torch.equal(x3[dropped & real], x[dropped & real])
    kept_real = real.gather(1, idx)
    assert torch.equal(x3.gather(1, idx[..., None].expand(-1, -1, H))[kept_real],
                       out2[kept_real])


def _loss_and_grads(model, ids, padding, types, labels, **kw):
    model.zero_grad(set_to_none=True)
    loss, binary = model(ids, padding, tokentype_ids=types, lm_labels=labels, **kw)
    ((loss * (labels >= 0)).sum() + binary.sum()).backward()
    return [loss.detach(), binary.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("post_ln", [False, True], ids=["pre-ln", "post-ln"])
def test_keep_all_is_bitwise_dense(post_ln):
    model = _model(post_ln).train()
    ids, padding, types, labels = _batch()
    dense = _loss_and_grads(model, ids, padding, types, labels)
    full = TokenDropState(5, 0, {1: S, 2: S}, torch.arange(B), shared_layers=True,
                          query_layers={1})
    got = _loss_and_grads(model, ids, padding, types, labels, token_drop=full)
    assert all(torch.equal(a, b) for a, b in zip(got, dense))
    encoder = model.language_model.encoder
    # against the padded batch's dense layers (packed ones round differently)
    encoder.config.pack_padded_tokens = False
    try:
        dense = _loss_and_grads(model, ids, padding, types, labels)
        encoder._always_gather = True  # through the query layer and gather/scatter, all positions
        routed = _loss_and_grads(model, ids, padding, types, labels, token_drop=full)
    finally:
        encoder._always_gather = False
        encoder.config.pack_padded_tokens = True
    assert all(torch.equal(a, b) for a, b in zip(routed, dense))


# ------------------------------------------------------------------ pretrain_bert end to end

TB = ["--random-ltd", "--random-ltd-method", "tokenbypass", "--random-ltd-start", "16",
      "--random-ltd-schedule", "constant"]
ITERS = 4
# Tables of different layouts / splits agree up to one fp32 rounding of a per-token loss (about
# 5e-7 at a loss of 7) times (1 - beta) per step: the per-token losses of differently shaped
# micro-batches may differ in the last bit; the table arithmetic itself is float64 and synced.
ATOL = 1e-8


def bert_argv(*extra, iters=ITERS):
    return tiny_bert_argv("--optimizer", "sgd", *TB, *extra, iters=iters)


def _run(argv):
    logs = []
    return pretrain_bert.pretrain(pretrain_bert.PROVIDER, argv=argv, log=logs.append), logs


def _losses(result):
    return [(d["lm loss"], d["sop loss"]) for _, d in result.train_losses]


def _table(root, iteration, pp_size=1):
    ckpt = torch.load(checkpoint_file(root, iteration, 0, 0, pp_size), weights_only=False)
    return ckpt["random_ltd_scheduler"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bert_tb_ref"))
    result, logs = _run(bert_argv("--save", root, "--save-interval", "2"))
    return _losses(result), root, logs


@pytest.mark.slow
def test_trains_updates_the_table_and_counts_layer_tokens(reference):
    losses, root, logs = reference
    assert len(losses) == ITERS and all(math.isfinite(v) for pair in losses for v in pair)
    assert any("random-LTD (tokenbypass): layers [1, 2]" in line for line in logs)
    state = _table(root, ITERS)
    ema = state["token_importance"]["ema"]
    assert state["token_importance"]["attribute_to"] == "mlm"
    assert ema.lt(10.0).any() and not ema.eq(10.0).all()
    # layers 0 and 3 full (32), the query layer 1 and layer 2 at the kept 16
    assert state["consumed_layer_tokens"] == ITERS * 4 * (2 * 32 + 2 * 16)


@pytest.mark.slow
def test_micro_batch_split_gives_the_same_table(tmp_path):
    """One optimizer step of 4 samples as 4 micro-batches of 1 or 2 of 2: the same table (the
    per-id sums are over the global batch, applied once per step). Only the first step is
    compared: BERT's loss is a mean per micro-batch, so the split changes the gradients and
    the parameters after it, as in Megatron."""
    tables = []
    for mbs in ("1", "2"):
        root = str(tmp_path / mbs)
        _run(bert_argv("--micro-batch-size", mbs, "--save", root, "--save-interval", "1",
                       iters=2))
        tables.append(_table(root, 1)["token_importance"]["ema"])
    assert tables[0].ne(10.0).any()
    torch.testing.assert_close(tables[1], tables[0], rtol=0, atol=ATOL)


def _train(rank, world_size, argv):
    return _losses(_run(argv)[0])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["DP2", "TP2", "PP2", "TP2-sequence-parallel"])
def test_layouts_match_one_process_and_share_the_table(layout, reference, tmp_path):
    ref_losses, root, _ = reference
    world, flags, pp = {"DP2": (2, [], 1),
                        "TP2": (2, ["--tensor-model-parallel-size", "2"], 1),
                        "PP2": (2, ["--pipeline-model-parallel-size", "2"], 2),
                        "TP2-sequence-parallel": (2, ["--tensor-model-parallel-size", "2",
                                                      "--sequence-parallel"], 1)}[layout]
    ckpt = str(tmp_path / "ckpt")
    argv = bert_argv("--save", ckpt, "--save-interval", "2", *flags)
    per_rank = run_distributed(_train, world, args=(argv,), timeout=300)
    for got in per_rank:
        err = max(abs(x - y) / abs(y) for pa, pb in zip(got, ref_losses) for x, y in zip(pa, pb))
        print(f"{layout}: max relative loss difference {err:.1e}")
        assert err < 2e-6, (got, ref_losses)
    want = _table(root, ITERS)["token_importance"]["ema"]
    tables = [_table(ckpt, ITERS, pp)["token_importance"]["ema"]]
    if pp == 2:  # every stage holds the same table
        tables.append(torch.load(checkpoint_file(ckpt, ITERS, 0, 1, 2), weights_only=False)[
            "random_ltd_scheduler"]["token_importance"]["ema"])
        assert torch.equal(tables[0], tables[1])
    for t in tables:
        torch.testing.assert_close(t, want, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_resume_is_bitwise(reference, tmp_path):
    ref_losses, root, _ = reference
    ckpt = str(tmp_path / "split")
    first, _ = _run(bert_argv("--save", ckpt, "--exit-interval", "2"))
    second, _ = _run(bert_argv("--load", ckpt, "--save", ckpt))
    assert _losses(first) + _losses(second) == ref_losses
    assert torch.equal(_table(ckpt, ITERS)["token_importance"]["ema"],
                       _table(root, ITERS)["token_importance"]["ema"])
