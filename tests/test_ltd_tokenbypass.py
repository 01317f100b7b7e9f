"""Special-token keeping (random-LTD's Tab. 4 ablation) and TokenBypass importance dropping:
selection, the per-id loss EMA, the driver, the GPT forward step, and training end to end."""

import argparse
import math
import types

import pytest
import torch

from megatron.checkpointing import checkpoint_file
from megatron.ltd import (TokenDropState, TokenDropper, TokenDroppingDriver, TokenImportance,
                          add_random_ltd_args, bypass_layer_ids, kept_indices_by_layer,
                          kept_indices_for_layers, random_ltd_config_from_args,
                          sample_kept_indices)
from megatron.model import GPTModel, TransformerConfig
from training_helpers import gpt_argv, run


def _hash_rank(seed, iteration, layer, sample_ids, s):
    """[b, s]: each position's rank in the hash order (0 = kept first by plain random-LTD),
    from the prefix property of the plain selection (kept m is kept m+1 minus one position)."""
    rank = torch.full((len(sample_ids), s), -1, dtype=torch.long)
    prev = torch.zeros(len(sample_ids), s, dtype=torch.bool)
    for m in range(1, s + 1):
        now = torch.zeros_like(prev).scatter(
            1, sample_kept_indices(seed, iteration, layer, sample_ids, s, m), True)
        assert (now & prev).sum() == prev.sum() and (now & ~prev).sum(1).eq(1).all()
        rank[now & ~prev] = m - 1
        prev = now
    return rank


def _as_set(row):
    return set(row.tolist())


# ----------------------------------------------------------------------------- keep special

def test_keep_special_contains_specials_sorted_and_is_otherwise_the_hash():
    b, s, r = 6, 16, 6
    ids = torch.arange(b) * 11 + 3
    torch.manual_seed(0)
    special = torch.rand(b, s) < 0.2
    special[0] = False  # no special tokens
    special[1, :] = False
    special[1, [0, 15]] = True
    got = kept_indices_for_layers(5, 2, [1, 2, 3], ids, s, r, keep_mask=special)  # [3, b, r]
    assert got.shape == (3, b, r)
    assert torch.equal(got, got.sort(-1).values) and (got[..., 1:] > got[..., :-1]).all()
    for j, layer in enumerate((1, 2, 3)):
        rank = _hash_rank(5, 2, layer, ids, s)
        for i in range(b):
            kept = _as_set(got[j, i])
            specials = set(special[i].nonzero().flatten().tolist())
            assert specials <= kept
            # the rest: the r - k smallest hash keys among the non-special positions
            others = sorted((p for p in range(s) if p not in specials), key=lambda p: rank[i, p])
            assert kept - specials == set(others[:r - len(specials)])
    # no special tokens: exactly plain random-LTD
    plain = kept_indices_for_layers(5, 2, [1, 2, 3], ids, s, r)
    assert torch.equal(got[:, 0], plain[:, 0])
    none = torch.zeros(b, s, dtype=torch.bool)
    assert torch.equal(kept_indices_for_layers(5, 2, [1, 2, 3], ids, s, r, keep_mask=none),
                       plain)


def test_keep_special_more_specials_than_kept_keeps_the_first():
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, [1, 3, 4, 8, 9, 11]] = True
    mask[1, ::2] = True
    got = sample_kept_indices(0, 0, 1, torch.tensor([4, 5]), 12, 4, keep_mask=mask)
    assert got.tolist() == [[1, 3, 4, 8], [0, 2, 4, 6]]


def test_keep_special_pure_and_uniform_over_the_rest():
    s, r, n = 12, 5, 6000
    mask = torch.zeros(n, s, dtype=torch.bool)
    mask[:, [2, 7]] = True
    ids = torch.arange(n) * 3 + 1
    got = sample_kept_indices(9, 4, 2, ids, s, r, keep_mask=mask)
    counts = torch.zeros(s).index_add_(0, got.flatten(), torch.ones(got.numel()))
    assert counts[2] == n and counts[7] == n
    rest = counts[[p for p in range(s) if p not in (2, 7)]] / n
    expected = (r - 2) / (s - 2)
    assert (rest - expected).abs().max() < 4 * math.sqrt(expected * (1 - expected) / n)
    # a pure function of the sample: any batch composition or order gives the same rows
    perm = torch.randperm(50)
    assert torch.equal(sample_kept_indices(9, 4, 2, ids[:50][perm], s, r, keep_mask=mask[:50]),
                       got[:50][perm])
    assert torch.equal(sample_kept_indices(9, 4, 2, ids[7:8], s, r, keep_mask=mask[7:8])[0],
                       got[7])


def test_token_drop_state_validates_the_per_position_inputs():
    ids = torch.arange(2)
    with pytest.raises(ValueError, match="keep_mask"):
        TokenDropState(0, 0, {1: 2}, ids, keep_mask=torch.zeros(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        TokenDropState(0, 0, {1: 2}, ids, keep_mask=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="floating"):
        TokenDropState(0, 0, {1: 2}, ids, priority=torch.zeros(2, 8, dtype=torch.long))
    state = TokenDropState(0, 0, {1: 2}, ids, keep_mask=torch.zeros(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="seq_len"):
        kept_indices_by_layer(state, [1], seq_len=6)


# ----------------------------------------------------------------------------- TokenBypass

def test_priority_keeps_the_top_r_ties_by_the_hash():
    b, s, r = 5, 16, 7
    ids = torch.arange(b) + 100
    torch.manual_seed(1)
    priority = torch.randint(0, 4, (b, s)).double()  # many ties
    special = torch.zeros(b, s, dtype=torch.bool)
    special[2, [5, 6]] = True
    got = sample_kept_indices(3, 8, 2, ids, s, r, keep_mask=special, priority=priority)
    assert torch.equal(got, got.sort(-1).values)
    rank = _hash_rank(3, 8, 2, ids, s)
    for i in range(b):
        prio = priority[i].masked_fill(special[i], math.inf)
        ref = sorted(range(s), key=lambda p: (-float(prio[p]), int(rank[i, p])))[:r]
        assert _as_set(got[i]) == set(ref)
    # equal priorities: plain random-LTD's draw
    assert torch.equal(sample_kept_indices(3, 8, 2, ids, s, r, priority=torch.ones(b, s)),
                       sample_kept_indices(3, 8, 2, ids, s, r))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_special_and_priority_selection_same_on_cuda():
    ids = torch.arange(32) * 7919
    torch.manual_seed(4)
    mask = torch.rand(32, 300) < 0.05
    prio = torch.randint(0, 5, (32, 300)).double()
    for kw in ({"keep_mask": mask}, {"keep_mask": mask, "priority": prio}):
        cpu = kept_indices_for_layers(9, 4, [1, 2], ids, 300, 77, **kw)
        gpu = kept_indices_for_layers(9, 4, [1, 2], ids.cuda(), 300, 77,
                                      **{k: v.cuda() for k, v in kw.items()})
        assert torch.equal(gpu.cpu(), cpu)


def test_shared_layers_one_set_for_all_layers():
    b, s = 3, 16
    torch.manual_seed(2)
    state = TokenDropState(1, 4, {3: 8, 4: 8, 5: 8}, torch.arange(b),
                           priority=torch.rand(b, s), shared_layers=True)
    got = kept_indices_by_layer(state, [2, 3, 4, 5], s)
    assert sorted(got) == [3, 4, 5]
    assert torch.equal(got[3], got[4]) and torch.equal(got[3], got[5])
    # a pipeline stage holding only layer 5 draws the same set
    assert torch.equal(kept_indices_by_layer(state, [5], s)[5], got[3])
    assert torch.equal(got[3], sample_kept_indices(1, 4, 3, torch.arange(b), s, 8,
                                                   priority=state.priority))


def test_importance_ema_hand_computed_and_checkpoint():
    imp = TokenImportance()
    labels = torch.tensor([[3, 5, 3, 7]])
    losses = torch.tensor([[2.0, 1.0, 4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # id 7 is masked out: not observed
    imp.observe(labels, losses, mask)
    imp.observe(torch.tensor([[5, 3]]), torch.tensor([[3.0, float("nan")]]))  # nan: left out
    assert torch.equal(imp.ema, torch.full((6,), 10.0, dtype=torch.float64))  # not yet
    assert imp.step() == 2
    expect3 = 0.995 * 10 + 0.005 * (2.0 + 4.0) / 2
    expect5 = 0.995 * 10 + 0.005 * (1.0 + 3.0) / 2
    assert imp.ema[3].item() == pytest.approx(expect3, abs=1e-12)
    assert imp.ema[5].item() == pytest.approx(expect5, abs=1e-12)
    assert imp.ema[[0, 1, 2, 4]].eq(10.0).all()
    imp.observe(torch.tensor([[5]]), torch.tensor([[0.5]]))
    imp.step()
    assert imp.ema[5].item() == pytest.approx(0.995 * expect5 + 0.005 * 0.5, abs=1e-12)
    assert imp.ema[3].item() == pytest.approx(expect3, abs=1e-12)  # absent: unchanged
    assert imp.step() == 0
    # importance of positions: of the target ids; unseen ids are 10
    pos = imp.position_importance(torch.tensor([[5, 3, 99]]))
    assert pos.tolist() == [[imp.ema[5].item(), imp.ema[3].item(), 10.0]]
    fresh = TokenImportance()
    fresh.load_state_dict(imp.state_dict())
    assert torch.equal(fresh.ema, imp.ema)


def _driver(num_layers=6, *extra):
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--seq-length", type=int)
    add_random_ltd_args(parser)
    args = parser.parse_args(["--num-layers", str(num_layers), "--seq-length", "16",
                              "--random-ltd", "--random-ltd-start", "8",
                              "--random-ltd-schedule", "constant", *extra])
    return TokenDroppingDriver(random_ltd_config_from_args(args), num_layers=num_layers,
                               seq_length=16, global_batch_size=2, seed=5)


def test_only_the_bypass_layers_drop_the_same_top_tokens():
    assert bypass_layer_ids(6) == (3, 4) and bypass_layer_ids(4) == (2,)
    assert bypass_layer_ids(3) == (1,) and bypass_layer_ids(24) == tuple(range(12, 23))
    driver = _driver(6, "--random-ltd-method", "tokenbypass")
    assert driver.cfg.layer_ids == (3, 4)
    assert driver.scheduler.layer_ids == (3, 4)
    torch.manual_seed(0)
    V = 64
    driver.importance.ema = torch.rand(V, dtype=torch.float64)
    drop = driver.begin_iteration(0)
    assert drop.kept_lengths == {3: 8, 4: 8}
    config = TransformerConfig(num_layers=6, hidden_size=16, num_attention_heads=2,
                               seq_length=16, padded_vocab_size=V, hidden_dropout=0.0,
                               attention_dropout=0.0)
    model = GPTModel(config).train()
    tokens = torch.randint(0, V, (2, 16))
    labels = torch.randint(0, V, (2, 16))
    tokens[1, 4] = V - 1  # the "EOD"
    state = drop(torch.tensor([10, 11]), special_mask=tokens == V - 1, labels=labels)
    seen = {}
    for layer in model.language_model.encoder.layers:
        layer.register_forward_pre_hook(
            lambda m, args: seen.setdefault(m.layer_number, []).append(args[0].detach()))
    model(tokens, labels=labels, token_drop=state)
    assert [seen[i][0].size(1) for i in range(6)] == [16, 16, 16, 8, 8, 16]
    kept = kept_indices_by_layer(state, range(6), 16)
    assert torch.equal(kept[3], kept[4])
    prio = driver.importance.ema[labels]
    prio[1, 4] = math.inf
    for i in range(2):
        top = set(prio[i].topk(8).indices.tolist())  # no ties among random floats
        assert _as_set(kept[3][i]) == top
    assert 4 in _as_set(kept[3][1])
    # padding is never kept (when there are enough other tokens)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[:, 8:] = True
    state = drop(torch.tensor([10, 11]), labels=labels, padding_mask=pad)
    assert kept_indices_by_layer(state, [3], 16)[3].tolist() == [list(range(8))] * 2
    # explicit layer ids are kept as given; random-LTD keeps its default layers
    assert _driver(6, "--random-ltd-method", "tokenbypass", "--random-ltd-layer-ids", "2",
                   "3").cfg.layer_ids == (2, 3)
    assert _driver(6).cfg.layer_ids == (1, 2, 3, 4)


def test_driver_updates_once_per_step_and_checkpoints_the_table():
    driver = _driver(4, "--random-ltd-method", "tokenbypass")
    drop = driver.begin_iteration(0)
    assert isinstance(drop, TokenDropper) and drop.accepts_tokens and drop.wants_losses
    labels = torch.tensor([[1, 2], [1, 1]])
    drop.observe_losses(labels, torch.tensor([[1.0, 2.0], [3.0, 5.0]]), torch.ones(2, 2))
    drop.observe_losses(torch.tensor([[2]]), torch.tensor([[4.0]]))
    driver.end_iteration()
    ema = driver.importance.ema
    assert ema[1].item() == pytest.approx(0.995 * 10 + 0.005 * 3.0)
    assert ema[2].item() == pytest.approx(0.995 * 10 + 0.005 * 3.0)
    state = driver.state_dict()
    assert torch.equal(state["token_importance"]["ema"], ema)
    other = _driver(4, "--random-ltd-method", "tokenbypass")
    other.load_state_dict(state)
    assert torch.equal(other.importance.ema, ema)
    assert other.scheduler.state_dict() == driver.scheduler.state_dict()
    # random-LTD: no table, observing is a no-op, the state is the scheduler's alone
    plain = _driver(4, "--random-ltd-keep-special-tokens")
    drop = plain.begin_iteration(0)
    assert not drop.wants_losses and plain.importance is None
    assert "token_importance" not in plain.state_dict()
    special = torch.zeros(2, 16, dtype=torch.bool)
    special[:, 3] = True
    st = drop(torch.tensor([0, 1]), special_mask=special, labels=labels)
    assert st.keep_mask is special and st.priority is None and not st.shared_layers
    assert all(3 in _as_set(row) for row in kept_indices_by_layer(st, [1], 16)[1])
    assert _driver(4).begin_iteration(0)(torch.tensor([0]), special_mask=special[:1]) \
        .keep_mask is None  # ablation off: specials are not forced


def test_forward_step_feeds_specials_and_losses_but_not_in_evaluation():
    import pretrain_gpt

    args = types.SimpleNamespace(device="cpu", reset_position_ids=False,
                                 reset_attention_mask=False, eod_mask_loss=False)
    V, eod = 64, 63
    forward_step = pretrain_gpt.forward_step_provider(args, types.SimpleNamespace(eod=eod))
    torch.manual_seed(3)
    text = torch.randint(0, eod, (2, 17))
    text[:, 6] = eod
    batch = {"text": text, "index": torch.tensor([4, 9])}
    config = TransformerConfig(num_layers=4, hidden_size=16, num_attention_heads=2,
                               seq_length=16, padded_vocab_size=V, hidden_dropout=0.0,
                               attention_dropout=0.0)
    model = GPTModel(config)
    driver = _driver(4, "--random-ltd-method", "tokenbypass")
    drop = driver.begin_iteration(0)
    states = []
    call = drop.__call__

    def spy(*a, **kw):
        states.append(call(*a, **kw))
        return states[-1]

    drop_spy = type("Spy", (), {"accepts_tokens": True, "wants_losses": True,
                                "observe_losses": staticmethod(drop.observe_losses),
                                "__call__": staticmethod(spy)})()
    model.train()
    out, loss_func = forward_step(iter([batch]), model, drop_spy)
    loss, _ = loss_func(out)
    assert torch.isfinite(loss)
    assert states[0].keep_mask[:, 6].all() and states[0].keep_mask.sum() == 2  # EOD inputs
    sums, counts = driver.importance.pending()
    assert counts.sum() == 32 and counts[eod] == 2  # labels[:, 5] = EOD
    driver.end_iteration()
    table = driver.importance.ema.clone()
    assert not table.eq(10.0).all()
    # evaluation: no token_drop, so nothing is observed
    model.eval()
    with torch.no_grad():
        out, loss_func = forward_step(iter([batch]), model)
        loss_func(out)
    assert driver.importance.pending() is None
    driver.end_iteration()
    assert torch.equal(driver.importance.ema, table)
    # a plain callable (sample ids only) still works
    out, _ = forward_step(iter([batch]), model.train(),
                          lambda ids: TokenDropState(0, 0, {1: 8, 2: 8}, ids))
    assert out.shape == (2, 16)


# ----------------------------------------------------------------------------- end to end

BYPASS = ["--num-layers", "4", "--random-ltd", "--random-ltd-method", "tokenbypass",
          "--random-ltd-start", "16", "--random-ltd-schedule", "constant"]
SPECIAL = ["--num-layers", "4", "--random-ltd", "--random-ltd-start", "8", "--random-ltd-step",
           "4", "--random-ltd-schedule-steps", "6", "--random-ltd-keep-special-tokens"]


def _resume_is_bitwise(data_prefix, tmp_path, flags, iters, stop):
    """Full run with evaluation vs. a stop/resume pair without: same losses, parameters and
    checkpointed random-LTD state (evaluation changes nothing, resume is exact)."""
    full, _ = run(gpt_argv(data_prefix, *flags, "--save", str(tmp_path / "full"), iters=iters))
    ckpt = str(tmp_path / "split")
    no_eval = ["--eval-iters", "0"]
    first, _ = run(gpt_argv(data_prefix, *flags, *no_eval, "--save", ckpt, "--exit-interval",
                            str(stop), iters=iters))
    second, _ = run(gpt_argv(data_prefix, *flags, *no_eval, "--load", ckpt, "--save", ckpt,
                             iters=iters))
    losses = [d["lm loss"] for _, d in full.train_losses]
    assert len(losses) == iters and all(math.isfinite(v) for v in losses)
    assert [d for _, d in first.train_losses + second.train_losses] == \
        [d for _, d in full.train_losses]
    for a, b in zip(full.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    mid = torch.load(checkpoint_file(ckpt, stop), weights_only=False)["random_ltd_scheduler"]
    end_full = torch.load(checkpoint_file(str(tmp_path / "full"), iters),
                          weights_only=False)["random_ltd_scheduler"]
    end_split = torch.load(checkpoint_file(ckpt, iters), weights_only=False)[
        "random_ltd_scheduler"]
    return mid, end_full, end_split


@pytest.mark.slow
def test_tokenbypass_trains_saves_its_table_and_resumes_bitwise(data_prefix, tmp_path):
    mid, end_full, end_split = _resume_is_bitwise(data_prefix, tmp_path, BYPASS, 6, 3)
    table = mid["token_importance"]["ema"]
    assert table.dtype == torch.float64 and not table.eq(10.0).all()
    assert table.lt(10.0).any()  # updated from the observed losses (about ln V < 10)
    assert torch.equal(end_full["token_importance"]["ema"], end_split["token_importance"]["ema"])
    assert not torch.equal(end_full["token_importance"]["ema"][:table.numel()], table)
    # layer tokens: only layer 2 of 4 drops, to 16 of 32
    assert end_full["consumed_layer_tokens"] == 6 * 4 * (3 * 32 + 16)


@pytest.mark.slow
def test_keep_special_tokens_trains_and_resumes_bitwise(data_prefix, tmp_path):
    mid, end_full, end_split = _resume_is_bitwise(data_prefix, tmp_path, SPECIAL, 4, 2)
    assert "token_importance" not in mid
    assert end_full == end_split


def test_tokenbypass_defaults_to_a_constant_half_of_the_sequence():
    from megatron.arguments import parse_args
    from megatron.ltd.config import random_ltd_config_from_args

    args = parse_args(["--num-layers", "8", "--hidden-size", "32", "--num-attention-heads", "4",
                       "--seq-length", "64", "--micro-batch-size", "1", "--train-iters", "2",
                       "--lr", "1e-3", "--mock-data", "--random-ltd", "--random-ltd-method",
                       "tokenbypass"], world_size=1)
    cfg = random_ltd_config_from_args(args)
    assert (cfg.schedule, cfg.start) == ("constant", 32)
