"""SCTD (``--random-ltd-method sctd``, megatron/ltd/sctd.py): the dual step's loss equals a hand
computation from the model's pieces (both passes, both [CLS] KL terms, the detached full-pass
target) with equal gradients; non-dual steps are the plain TokenBypass-dropped pass; layer
tokens count the extra full pass; flags; pretrain_bert under TP2 / PP2 / DP2 equals one process
across dual steps; resume across a dual step is bitwise. (Sequence parallelism follows
TokenBypass's support for it: its BERT query layer refuses --sequence-parallel.)"""

import argparse

import pytest
import torch
import torch.nn.functional as F

from megatron.errors import UserError
from megatron.ltd.config import random_ltd_config_from_args
from megatron.ltd.driver import TokenDropper, TokenDroppingDriver, token_drop_for_batch
from megatron.ltd.dropping import kept_indices_by_layer
from megatron.ltd.layer_tokens import (cumulative_layer_tokens, layer_token_lr_horizons,
                                      total_layer_tokens)
from megatron.ltd.schedule import RandomLTDScheduler
from megatron.ltd.sctd import SCTDDrop, SCTDDropper, SCTDOutput, is_dual_step, sctd_loss
from megatron.ltd.tokenbypass import TokenImportance
from megatron.model import BertModel, TransformerConfig
from megatron.model.bert import bert_attention_mask

V, H, HEADS, S, B, L = 96, 32, 4, 16, 3, 4
LENGTHS = (16, 11, 7)
KEPT = {2: 8}  # TokenBypass's layers for L = 4: L/2 .. L-2 = [2], half the sequence


def _model(post_ln=False):
    cfg = TransformerConfig(num_layers=L, hidden_size=H, num_attention_heads=HEADS,
                            seq_length=S, padded_vocab_size=V, hidden_dropout=0.0,
                            attention_dropout=0.0, num_tokentypes=2, layernorm_epsilon=1e-12,
                            init_seed=5, apply_residual_connection_post_layernorm=post_ln)
    model = BertModel(cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # large weights: the two passes' [CLS] states differ visibly
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.train()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, S), generator=g)
    padding = (torch.arange(S)[None] < torch.tensor(LENGTHS)[:, None]).long()
    ids = ids.masked_fill(padding == 0, 0)
    ids[:, 0] = 2  # [CLS]
    types = torch.zeros(B, S, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        types[i, n // 2:n] = 1
    masked = (torch.rand(B, S, generator=g) < 0.3) & (padding > 0)
    masked[:, 1] = True
    labels = torch.where(masked, torch.randint(5, V, (B, S), generator=g), -1)
    order = torch.tensor([0, 1, 1])
    return ids, padding, types, labels, masked.float(), order


def _importance():
    imp = TokenImportance()
    g = torch.Generator().manual_seed(3)
    imp.observe(torch.randint(5, V, (64,), generator=g), torch.rand(64, generator=g) * 9)
    imp.step()
    return imp


def _dropper(dual, importance):
    return SCTDDropper(17, 4, KEPT, keep_special=True, importance=importance, dual=dual)


def _drop_state(dual, importance, ids, labels, padding):
    special = (ids == 2) & (padding > 0)
    state, _ = token_drop_for_batch(_dropper(dual, importance), torch.tensor([5, 9, 2]),
                                    tokens=ids, labels=labels, special_mask=special,
                                    padding_mask=padding == 0)
    return state


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(model, ids, padding, types, labels, loss_mask, order, state, mlm_w, kl_w):
    """The dual step by hand: embedding, every layer called directly (the dropped pass
    gathers the kept tokens, their positions and mask columns, and writes them back), the
    heads' pieces, plain cross entropies and softmax KLs with the full pass detached."""
    lm = model.language_model
    pos = torch.arange(S).expand(B, S)
    mask = bert_attention_mask(padding)
    emb = lm.embedding(ids, pos, types)
    drops = kept_indices_by_layer(state, range(L), S)
    assert set(drops) == set(KEPT)

    def encode(dropping):
        h, pen = emb, None
        for i, layer in enumerate(lm.encoder.layers):
            if i == L - 1:
                pen = h
            if dropping and i in drops:
                idx = drops[i]  # [b, r]
                rows = torch.arange(B)[:, None]
                out = layer(h[rows, idx], pos[rows, idx],
                            torch.gather(mask, 3, idx[:, None, None, :]))
                h = h.clone()
                h[rows, idx] = out
            else:
                h = layer(h, pos, mask)
        return lm.encoder.final_layernorm(h), pen

    def heads(h):
        logits = F.linear(model.lm_head.transform(h),
                          lm.embedding.word_embeddings.weight) + model.lm_head.bias
        per_token = F.cross_entropy(logits.reshape(-1, V), labels.clamp(min=0).reshape(-1),
                                    reduction="none").view(B, S)
        mlm = (per_token * loss_mask).sum() / loss_mask.sum()
        sop = F.cross_entropy(model.binary_head(torch.tanh(lm.pooler.dense(h[:, 0]))), order)
        return mlm, sop

    def kl(p_hidden, q_hidden):
        p = torch.softmax(p_hidden.detach(), -1)
        return (p * (p.log() - torch.log_softmax(q_hidden, -1))).sum(-1).mean()

    full, full_pen = encode(False)
    dropped, drop_pen = encode(True)
    (mlm_f, sop_f), (mlm_d, sop_d) = heads(full), heads(dropped)
    kl_last, kl_pen = kl(full[:, 0], dropped[:, 0]), kl(full_pen[:, 0], drop_pen[:, 0])
    total = mlm_w * (mlm_f + sop_f + mlm_d + sop_d) + kl_w * (kl_last + kl_pen)
    parts = {"lm loss": mlm_d, "sop loss": sop_d, "sctd full lm loss": mlm_f,
             "sctd full sop loss": sop_f, "sctd kl last": kl_last, "sctd kl penultimate": kl_pen,
             "sctd kl loss": kl_last + kl_pen}
    return total, parts


@pytest.mark.parametrize("post_ln", [False, True], ids=["pre-ln", "post-ln"])
def test_dual_step_loss_and_gradients_equal_a_hand_computation(post_ln):
    model = _model(post_ln)
    ids, padding, types, labels, loss_mask, order = _batch()
    state = _drop_state(True, _importance(), ids, labels, padding)
    assert isinstance(state, SCTDDrop)
    out = model(ids, padding, tokentype_ids=types, lm_labels=labels, token_drop=state)
    assert isinstance(out, SCTDOutput)
    loss, report = sctd_loss(out, loss_mask, order, mlm_weight=0.5, kl_weight=0.05)
    got = _grads(model, loss)
    ref, parts = _reference(model, ids, padding, types, labels, loss_mask, order, state.drop,
                            0.5, 0.05)
    want = _grads(model, ref)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    assert set(report) == set(parts)
    for key, value in parts.items():
        torch.testing.assert_close(report[key], value.detach(), rtol=1e-5, atol=1e-7,
                                   msg=lambda m, key=key: f"{key}: {m}")
    assert report["sctd kl last"] > 1e-6 and report["sctd kl penultimate"] > 1e-6
    assert report["lm loss"] != report["sctd full lm loss"]  # the passes really differ
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_kl_gradient_reaches_the_dropped_pass_only():
    """KL(P_full || P_drop) with the full pass detached: with the MLM/SOP weight 0, the layers
    before the first dropping layer get gradient only through the dropped pass, and the KL's
    gradient equals the one computed with the full pass's [CLS] states as constants."""
    model = _model()
    ids, padding, types, labels, loss_mask, order = _batch(1)
    state = _drop_state(True, _importance(), ids, labels, padding)
    out = model(ids, padding, tokentype_ids=types, lm_labels=labels, token_drop=state)
    loss, _ = sctd_loss(out, loss_mask, order, mlm_weight=0.0, kl_weight=1.0)
    got = _grads(model, loss)
    consts = (out.cls_last_full.detach(), out.cls_penultimate_full.detach())
    out = model(ids, padding, tokentype_ids=types, lm_labels=labels, token_drop=state)
    manual = sum(
        (torch.softmax(c, -1) * (torch.log_softmax(c, -1) - torch.log_softmax(q, -1))).sum(-1)
        .mean() for c, q in zip(consts, (out.cls_last_drop, out.cls_penultimate_drop)))
    want = _grads(model, manual)
    assert set(want) <= set(got)
    for name, grad in got.items():  # the heads get zeros (weight 0), the manual loss none
        torch.testing.assert_close(grad, want.get(name, torch.zeros_like(grad)), rtol=1e-5,
                                   atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_non_dual_step_is_the_plain_tokenbypass_dropped_pass():
    model = _model()
    ids, padding, types, labels, loss_mask, order = _batch(2)
    importance = _importance()
    state = _drop_state(False, importance, ids, labels, padding)
    special = (ids == 2) & (padding > 0)
    plain = TokenDropper(17, 4, KEPT, keep_special=True, importance=importance)(
        torch.tensor([5, 9, 2]), special_mask=special, labels=labels, tokens=ids,
        padding_mask=padding == 0)
    assert not isinstance(state, SCTDDrop)
    for layer, idx in kept_indices_by_layer(plain, range(L), S).items():
        assert torch.equal(kept_indices_by_layer(state, range(L), S)[layer], idx)
        assert idx[:, 0].eq(0).all()  # [CLS] always kept
    a = model(ids, padding, tokentype_ids=types, lm_labels=labels, token_drop=state)
    b = model(ids, padding, tokentype_ids=types, lm_labels=labels, token_drop=plain)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # evaluation never runs two passes nor drops
    model.eval()
    with torch.no_grad():
        e = model(ids, padding, tokentype_ids=types, lm_labels=labels,
                  token_drop=_drop_state(True, importance, ids, labels, padding))
        d = model(ids, padding, tokentype_ids=types, lm_labels=labels)
    assert not isinstance(e, SCTDOutput) and torch.equal(e[0], d[0])


def _args(**kw):
    base = dict(random_ltd=True, random_ltd_method="sctd", num_layers=L, seq_length=S,
                global_batch_size=4)
    base.update(kw)
    return argparse.Namespace(**base)


def test_driver_dual_steps_layer_tokens_and_importance():
    cfg = random_ltd_config_from_args(_args(sctd_interval=3))
    assert (cfg.sctd_interval, cfg.sctd_kl_weight, cfg.sctd_mlm_weight) == (3, 0.05, 0.5)
    assert cfg.schedule == "constant" and cfg.start == S // 2
    driver = TokenDroppingDriver(cfg, num_layers=L, seq_length=S, global_batch_size=4, seed=1)
    assert driver.cfg.layer_ids == (2,) and driver.importance is not None
    dropped = 4 * (3 * S + S // 2)  # layers 0, 1, 3 full, layer 2 at S/2
    total, duals = 0, []
    for it in range(7):
        drop = driver.begin_iteration(it)
        assert isinstance(drop, SCTDDropper) and drop.keep_special
        duals.append(drop.dual)
        assert drop.batch_multiplier == (2 if drop.dual else 1)
        step = driver.end_iteration()
        assert step == dropped + (4 * S * L if drop.dual else 0)
        total += step
    assert duals == [is_dual_step(it, 3) for it in range(7)] == \
        [False, False, True, False, False, True, False]
    assert driver.consumed_layer_tokens == total == 7 * dropped + 2 * 4 * S * L
    assert "token_importance" in driver.state_dict()


def test_encoder_driver_drops_as_bert_tokenbypass():
    """SCTD on an encoder takes BERT TokenBypass's layers L/2-1 .. L-2 with L/2-1 the query
    layer, also at L = 4, where those ids equal random-LTD's default 1 .. L-2."""
    cfg = random_ltd_config_from_args(_args())
    driver = TokenDroppingDriver(cfg, num_layers=L, seq_length=S, global_batch_size=4, seed=1,
                                 encoder=True)
    assert driver.cfg.layer_ids == (1, 2) and driver.query_layers == (1,)
    driver.begin_iteration(0)
    assert driver.tokens_per_layer() == {0: S, 1: S // 2, 2: S // 2, 3: S}
    assert driver.end_iteration() == 4 * (2 * S + 2 * (S // 2))


def test_flags():
    assert random_ltd_config_from_args(_args()).sctd_interval == 10
    with pytest.raises(UserError, match="--sctd-interval needs"):
        random_ltd_config_from_args(_args(random_ltd_method="random", sctd_interval=5))
    with pytest.raises(UserError, match="--sctd-kl-weight needs"):
        random_ltd_config_from_args(_args(random_ltd=False, random_ltd_method=None,
                                          train_layer_tokens=10, sctd_kl_weight=0.1))
    with pytest.raises(UserError, match="--sctd-mlm-weight needs"):
        random_ltd_config_from_args(_args(random_ltd=False, random_ltd_method=None,
                                          sctd_mlm_weight=0.1))
    with pytest.raises(UserError, match="--sctd-interval must be at least 1"):
        random_ltd_config_from_args(_args(sctd_interval=0))


def test_layer_token_horizons_count_the_full_pass():
    """The whole-run tables (LayerToken LR horizons, --train-layer-tokens' iteration count)
    count SCTD's full-sequence pass exactly as the per-step accounting does."""
    budget = 7 * 4 * (3 * S + S // 2) + 2 * 4 * S * L  # the 7 steps of the test above
    cfg = random_ltd_config_from_args(_args(sctd_interval=3, layer_token_lr=True,
                                            train_layer_tokens=budget))
    driver = TokenDroppingDriver(cfg, num_layers=L, seq_length=S, global_batch_size=4, seed=1)
    table = cumulative_layer_tokens(driver.scheduler, 12, 4)
    for it in range(12):
        driver.begin_iteration(it)
        driver.end_iteration()
        assert driver.consumed_layer_tokens == table[it + 1]
        assert driver.budget_reached() == (it + 1 >= 7)
    assert driver.iteration_bound() == 7
    _, decay = layer_token_lr_horizons(global_batch_size=4, seq_length=S, num_layers=L,
                                       scheduler=driver.scheduler, train_iters=7)
    assert decay == budget
    # without dropping there is no dual step, so nothing extra
    dense = RandomLTDScheduler.from_config(None, L, S)
    assert total_layer_tokens(dense, 10, 4) == 10 * 4 * S * L


# ------------------------------------------------------------------ pretrain_bert end to end

def _sctd_argv(*extra, iters=4):
    from test_bert_training import LTD, bert_argv

    argv = bert_argv(iters=iters)
    i = argv.index(LTD[0])
    del argv[i:i + len(LTD)]  # SCTD's defaults: a constant half of the sequence
    return argv + ["--random-ltd", "--random-ltd-method", "sctd", "--sctd-interval", "2",
                   *extra]


def _run(argv):
    import pretrain_bert

    logs = []
    return pretrain_bert.pretrain(pretrain_bert.PROVIDER, argv=argv, log=logs.append), logs


def _layer_tokens(logs):
    return [int(l.split("consumed layer tokens: ")[1].split(" |")[0]) for l in logs
            if l.startswith(" iteration")]


def _train(rank, world_size, argv):
    return [d for _, d in _run(argv)[0].train_losses]


@pytest.fixture(scope="module")
def single():
    result, logs = _run(_sctd_argv("--optimizer", "sgd", "--exit-interval", "3"))
    return [d for _, d in result.train_losses], logs


def test_pretrain_bert_sctd_reports_and_layer_tokens(single):
    reports, logs = single
    assert [("sctd kl loss" in d) for d in reports] == [False, True, False]
    lines = [l for l in logs if l.startswith(" iteration")]
    consumed = _layer_tokens(logs)
    dropped = consumed[0]  # the dropped pass's (TokenBypass's accounting)
    assert dropped < 4 * 32 * 4  # global batch 4, seq 32, 4 layers: some layers drop
    # the dual step adds one full pass: s * L per sample
    assert consumed == [dropped, 2 * dropped + 4 * 32 * 4, 3 * dropped + 4 * 32 * 4]
    assert "sctd kl loss" in lines[1] and "sctd kl loss" not in lines[0]


def test_pretrain_bert_sctd_layer_token_budget(single):
    """--train-layer-tokens stops SCTD where its consumed layer tokens (full passes included)
    reach the budget, and the LayerToken LR decays to the minimum exactly there."""
    consumed = _layer_tokens(single[1])
    argv = _sctd_argv("--optimizer", "sgd", "--layer-token-lr", "--lr-decay-style", "linear",
                      "--min-lr", "0.0", "--train-layer-tokens", str(consumed[2]))
    del argv[argv.index("--train-iters"):argv.index("--train-iters") + 2]
    _, logs = _run(argv)
    assert _layer_tokens(logs) == consumed
    lrs = [float(l.split("learning rate: ")[1].split(" |")[0]) for l in logs
           if l.startswith(" iteration")]
    assert lrs[0] > lrs[1] > lrs[2] == 0.0


def test_tensorboard_shows_tokens_per_layer_and_the_full_pass(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(_sctd_argv("--optimizer", "sgd", "--exit-interval", "3",
                    "--tensorboard-dir", str(tmp_path / "tb")))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    kept = [e.value for e in events.Scalars("seqlen/random_ltd_reserved_length")]
    assert len(kept) == 3 and all(k < 32 for k in kept)
    per_layer = {layer: [e.value for e in events.Scalars(f"random-ltd/kept-tokens/layer-0{layer}")]
                 for layer in range(4)}
    # 4 layers: 0 full, 1 = L/2-1 the query layer (kept queries), 2 = L-2 kept, 3 full
    assert per_layer == {0: [32] * 3, 1: kept, 2: kept, 3: [32] * 3}
    assert [e.value for e in events.Scalars("random-ltd/sctd-full-pass")] == [0, 1, 0]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["TP2", "PP2", "DP2"])
def test_layouts_equal_one_process_across_dual_steps(layout, single):
    from distributed_harness import run_distributed
    from test_bert_training import LAYOUTS

    world, flags = LAYOUTS[layout]
    argv = _sctd_argv("--optimizer", "sgd", "--exit-interval", "3", *flags)
    ref = single[0]
    for got in run_distributed(_train, world, args=(argv,), timeout=300):
        assert [sorted(d) for d in got] == [sorted(d) for d in ref]
        for g, r in zip(got, ref):
            for key in r:
                # a KL of ~1e-4 is a difference of O(1) fp32 terms: absolute rounding ~1e-7
                tol = 2e-6 * abs(r[key]) + (3e-7 if "kl" in key else 0.0)
                assert abs(g[key] - r[key]) <= tol, (layout, key, g[key], r[key])


@pytest.mark.slow
def test_resume_across_a_dual_step_is_bitwise(tmp_path):
    """4 iterations (dual at 2 and 4) == 1, save, resume, 3 more: the same reports, layer
    tokens, importance table and parameters, bit for bit (Adam)."""
    from megatron.checkpointing import checkpoint_file

    argv = _sctd_argv("--lr", "1e-3")
    full, logs = _run(argv)
    ckpt = str(tmp_path / "ckpt")
    first, _ = _run(argv + ["--save", ckpt, "--exit-interval", "1"])
    second, _ = _run(argv + ["--load", ckpt, "--save", str(tmp_path / "again")])
    assert [i for i, _ in second.train_losses] == [2, 3, 4]
    assert [d for _, d in first.train_losses + second.train_losses] == \
        [d for _, d in full.train_losses]
    for (name, a), b in zip(full.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), name
    state = torch.load(checkpoint_file(str(tmp_path / "again"), 4), weights_only=False)
    ltd = state["random_ltd_scheduler"]
    consumed = _layer_tokens(logs)
    assert consumed[1] - 2 * consumed[0] == 4 * 32 * 4  # the dual step's full pass
    assert ltd["consumed_layer_tokens"] == consumed[-1] == 4 * consumed[0] + 2 * 4 * 32 * 4
    assert ltd["token_importance"]["ema"].ne(10.0).any()


def test_gpt_refuses_sctd(tmp_path):
    import pretrain_gpt
    from training_helpers import gpt_argv

    argv = gpt_argv(str(tmp_path / "none"), "--num-layers", "4", "--random-ltd",
                    "--random-ltd-method", "sctd")  # refused before any data is read
    with pytest.raises(UserError, match="sctd is a BERT method"):
        pretrain_gpt.pretrain(pretrain_gpt.PROVIDER, argv=argv, log=lambda *a: None)
