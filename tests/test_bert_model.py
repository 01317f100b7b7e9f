"""BERT model: parity with transformers' BertForPreTraining (post-LN), Megatron's checkpoint names
and nesting, save/load through megatron.checkpointing with LoadPolicy, and random-LTD on BERT
(keep-all is bitwise dense, kept tokens never attend padding, the MLM loss covers every masked
position after the last full layer)."""

import argparse

import pytest
import torch
import torch.nn.functional as F

from megatron.checkpointing import TrainState, checkpoint_file, load_checkpoint, save_checkpoint
from megatron.errors import UserError
from megatron.ltd.dropping import (TokenDropState, kept_indices_by_layer,
                                   middle_layer_kept_lengths)
from megatron.model import BertModel, GPTModel, LoadPolicy, TransformerConfig
from megatron.model.module import flat_model_state
from megatron.parallel.state import ParallelState

V, H, HEADS, S, B = 96, 32, 4, 16, 3
HN = H // HEADS
LENGTHS = (16, 11, 7)  # real tokens per sample: the 2nd and 3rd are padded


def _config(**kw):
    base = dict(num_layers=3, hidden_size=H, num_attention_heads=HEADS, seq_length=S,
                padded_vocab_size=V, hidden_dropout=0.0, attention_dropout=0.0,
                num_tokentypes=2, layernorm_epsilon=1e-12, init_seed=5)
    base.update(kw)
    return TransformerConfig(**base)


def _model(binary_head=True, **kw):
    return BertModel(_config(**kw), add_binary_head=binary_head)


def _randomise(model):
    """Zero biases / unit norms would hide layout mistakes in parity tests."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif "dense_h_to_4h" in name or "lm_head.dense" in name:
                p.mul_(20.0)  # pre-activations of order 1, where the GeLU variants differ
    return model


def _batch(b=B, lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (b, S), generator=g)
    padding = (torch.arange(S)[None] < torch.tensor(lengths)[:, None]).long()  # [b, s]
    ids = ids.masked_fill(padding == 0, 0)  # [PAD] = 0
    types = torch.zeros(b, S, dtype=torch.long)
    for i, n in enumerate(lengths):
        types[i, n // 2:n] = 1
    masked = (torch.rand(b, S, generator=g) < 0.3) & (padding > 0)
    masked[:, 1] = True  # at least one masked position per sample
    labels = torch.where(masked, torch.randint(5, V, (b, S), generator=g), -1)
    return ids, padding, types, labels


# --------------------------------------------------------------------- HF parity (post-LN)

def _to_hf(model):
    """transformers' BertForPreTraining with our (post-LN) weights."""
    from transformers import BertConfig, BertForPreTraining
    from transformers.activations import ACT2FN

    cfg = model.config
    hf_cfg = BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=cfg.num_layers,
                        num_attention_heads=HEADS, intermediate_size=cfg.ffn_hidden_size,
                        hidden_act="gelu_new",  # our MLP: Megatron's tanh bias-GeLU
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=2,
                        layer_norm_eps=cfg.layernorm_epsilon, attn_implementation="eager")
    hf = BertForPreTraining(hf_cfg).eval()
    # Megatron's BertLMHead uses the exact erf GeLU (HF uses hidden_act there too)
    hf.cls.predictions.transform.transform_act_fn = ACT2FN["gelu"]
    ours = model.state_dict()
    lm, enc = "language_model.", "language_model.encoder."

    def split_qkv(t):  # Megatron rows [np, 3, hn] -> (q, k, v), each [np * hn, ...]
        return t.view(HEADS, 3, HN, *t.shape[1:]).unbind(1)

    sd = {"bert.embeddings.word_embeddings.weight": ours[lm + "embedding.word_embeddings.weight"],
          "bert.embeddings.position_embeddings.weight":
              ours[lm + "embedding.position_embeddings.weight"],
          "bert.embeddings.token_type_embeddings.weight":
              ours[lm + "embedding.tokentype_embeddings.weight"],
          "bert.pooler.dense.weight": ours[lm + "pooler.dense.weight"],
          "bert.pooler.dense.bias": ours[lm + "pooler.dense.bias"],
          "cls.predictions.bias": ours["lm_head.bias"],
          "cls.seq_relationship.weight": ours["binary_head.weight"],
          "cls.seq_relationship.bias": ours["binary_head.bias"]}
    for p in ("weight", "bias"):
        sd[f"bert.embeddings.LayerNorm.{p}"] = ours[f"{enc}layers.0.input_layernorm.{p}"]
        sd[f"cls.predictions.transform.dense.{p}"] = ours[f"lm_head.dense.{p}"]
        sd[f"cls.predictions.transform.LayerNorm.{p}"] = ours[f"lm_head.layernorm.{p}"]
    n = cfg.num_layers
    for i in range(n):
        m, h = f"{enc}layers.{i}.", f"bert.encoder.layer.{i}."
        out_ln = f"{enc}layers.{i + 1}.input_layernorm" if i + 1 < n else f"{enc}final_layernorm"
        for p in ("weight", "bias"):
            q, k, v = split_qkv(ours[m + f"self_attention.query_key_value.{p}"])
            sd[h + f"attention.self.query.{p}"] = q.reshape(H, *q.shape[2:])
            sd[h + f"attention.self.key.{p}"] = k.reshape(H, *k.shape[2:])
            sd[h + f"attention.self.value.{p}"] = v.reshape(H, *v.shape[2:])
            sd[h + f"attention.output.dense.{p}"] = ours[m + f"self_attention.dense.{p}"]
            sd[h + f"attention.output.LayerNorm.{p}"] = ours[m + f"post_attention_layernorm.{p}"]
            sd[h + f"intermediate.dense.{p}"] = ours[m + f"mlp.dense_h_to_4h.{p}"]
            sd[h + f"output.dense.{p}"] = ours[m + f"mlp.dense_4h_to_h.{p}"]
            sd[h + f"output.LayerNorm.{p}"] = ours[out_ln + f".{p}"]
    own = dict(hf.named_parameters())
    assert set(own) == set(sd) | {"cls.predictions.decoder.bias"} or set(own) == set(sd), \
        sorted(set(own) ^ set(sd))
    with torch.no_grad():
        for name, p in own.items():
            if name in sd:
                p.copy_(sd[name])
    # the decoder is tied to the word embeddings (and its bias is cls.predictions.bias)
    assert torch.equal(hf.cls.predictions.decoder.weight, sd[
        "bert.embeddings.word_embeddings.weight"])
    assert torch.equal(hf.cls.predictions.decoder.bias, ours["lm_head.bias"])
    return hf


def test_parity_with_hf_bert_for_pretraining_post_ln():
    model = _randomise(_model(apply_residual_connection_post_layernorm=True)).eval()
    hf = _to_hf(model)
    ids, padding, types, labels = _batch()
    with torch.no_grad():
        logits, binary = model(ids, padding, tokentype_ids=types)
        out = hf(input_ids=ids, attention_mask=padding, token_type_ids=types)
        real = padding.bool()
        err_mlm = (logits[real] - out.prediction_logits[real]).abs().max().item()
        err_bin = (binary - out.seq_relationship_logits).abs().max().item()
        assert err_mlm < 2e-6 and err_bin < 2e-6, (err_mlm, err_bin)  # observed ~1e-7
        assert logits.abs().max() > 0.3 and binary.abs().max() > 0.01  # not trivially zero
        # the per-token MLM loss equals the cross entropy of HF's logits at masked positions
        loss, binary2 = model(ids, padding, tokentype_ids=types, lm_labels=labels)
        assert loss.shape == (B, S) and loss.dtype == torch.float32
        assert torch.equal(binary2, binary)
        ref = F.cross_entropy(out.prediction_logits.transpose(1, 2), labels.clamp(min=0),
                              reduction="none")
        m = labels >= 0
        torch.testing.assert_close(loss[m], ref[m], rtol=0, atol=1e-5)
    print(f"HF BERT parity: max |MLM logit diff| {err_mlm:.2e}, |binary diff| {err_bin:.2e}")


def test_padding_and_masking_of_pre_ln_bert():
    """Megatron's default pre-LN BERT runs, every parameter gets a gradient, and the outputs at
    real positions do not depend on what the padded positions hold."""
    model = _randomise(_model())
    ids, padding, types, labels = _batch()
    loss, binary = model(ids, padding, tokentype_ids=types, lm_labels=labels)
    assert loss.shape == (B, S) and binary.shape == (B, 2)
    assert torch.isfinite(loss).all() and torch.isfinite(binary).all()
    ((loss * (labels >= 0)).sum() + binary.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # differs from the post-LN model with the same weights
    post = _model(apply_residual_connection_post_layernorm=True)
    post.load_state_dict(model.state_dict())
    with torch.no_grad():
        model.eval(), post.eval()
        a, _ = model(ids, padding, tokentype_ids=types)
        c, _ = post(ids, padding, tokentype_ids=types)
        assert not torch.allclose(a, c)
        junk = ids.masked_fill(padding == 0, 7)
        b_, _ = model(junk, padding, tokentype_ids=types.masked_fill(padding == 0, 1))
        real = padding.bool()
        assert torch.equal(a[real], b_[real])


def test_no_binary_head_has_no_pooler_or_token_types():
    model = _model(binary_head=False, num_tokentypes=0)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(("binary_head", "language_model.pooler")) for n in names)
    assert not any("tokentype" in n for n in names)
    ids, padding, _, labels = _batch()
    loss, binary = model(ids, padding, lm_labels=labels)
    assert binary is None and loss.shape == (B, S)


# --------------------------------------------------------------------- names and checkpoints

def test_megatron_parameter_names_and_nesting():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    layer = ["input_layernorm.weight", "input_layernorm.bias",
             "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
             "self_attention.dense.weight", "self_attention.dense.bias",
             "post_attention_layernorm.weight", "post_attention_layernorm.bias",
             "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
             "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"]
    expected = ["language_model.embedding.word_embeddings.weight",
                "language_model.embedding.position_embeddings.weight",
                "language_model.embedding.tokentype_embeddings.weight"]
    expected += [f"language_model.encoder.layers.{i}.{n}" for i in range(3) for n in layer]
    expected += ["language_model.encoder.final_layernorm.weight",
                 "language_model.encoder.final_layernorm.bias",
                 "language_model.pooler.dense.weight", "language_model.pooler.dense.bias",
                 "lm_head.bias", "lm_head.dense.weight", "lm_head.dense.bias",
                 "lm_head.layernorm.weight", "lm_head.layernorm.bias",
                 "binary_head.weight", "binary_head.bias"]
    assert sorted(names) == sorted(expected)
    nested = model.state_dict_for_save_checkpoint()
    assert nested["language_model"]["embedding"]["tokentype_embeddings"]["weight"].shape == (2, H)
    assert nested["language_model"]["encoder"]["layers.2.mlp.dense_4h_to_h.bias"].shape == (H,)
    assert nested["language_model"]["pooler"]["dense.weight"].shape == (H, H)
    assert nested["lm_head"]["bias"].shape == (V,)
    assert nested["lm_head"]["layernorm.weight"].shape == (H,)
    assert nested["binary_head"]["weight"].shape == (2, H)
    # pipeline stages: the first embeds, the last holds encoder tail, pooler, heads and
    # Megatron's word_embeddings_for_head; TP halves the vocabulary of the LM head's bias
    stages = [ParallelState(pp_size=2, pp_rank=r, tp_size=2) for r in (0, 1)]
    first = BertModel(_config(), stages[0], post_process=False, layer_ids=[0, 1])
    last = BertModel(_config(), stages[1], pre_process=False, layer_ids=[2])
    n0, n1 = first.state_dict_for_save_checkpoint(), last.state_dict_for_save_checkpoint()
    assert set(n0) == {"language_model"} and set(n0["language_model"]) == {"embedding",
                                                                            "encoder"}
    assert set(n1) == {"language_model", "lm_head", "binary_head", "word_embeddings_for_head"}
    assert set(n1["language_model"]) == {"encoder", "pooler"}
    assert "layers.0.input_layernorm.weight" in n1["language_model"]["encoder"]  # stage-local
    assert n1["word_embeddings_for_head"]["weight"].shape == (V // 2, H)
    assert n1["lm_head"]["bias"].shape == (V // 2,)
    assert list(flat_model_state(n1)) == list(last.state_dict())


def _ckpt_args(root, **kw):
    base = dict(save=root, load=root, no_save_optim=True, no_save_rng=True, no_load_optim=True,
                no_load_rng=True, finetune=False, exit_on_missing_checkpoint=True,
                num_layers=3, hidden_size=H, num_attention_heads=HEADS, ffn_hidden_size=4 * H,
                padded_vocab_size=V, seq_length=S, max_position_embeddings=S,
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                consumed_train_samples=0)
    base.update(kw)
    return argparse.Namespace(**base)


def _save(model, root):
    save_checkpoint(_ckpt_args(root), TrainState(iteration=2), model, None, None,
                    log=lambda *_: None)


def _load(model, root, policy=None, logs=None):
    return load_checkpoint(_ckpt_args(root, finetune=True), model, None, None,
                           log=(logs.append if logs is not None else lambda *_: None),
                           policy=policy)


def test_save_load_round_trip_and_load_policy(tmp_path):
    src = _randomise(_model())
    root = str(tmp_path / "bert")
    _save(src, root)
    saved = torch.load(checkpoint_file(root, 2), weights_only=False)["model"]
    assert set(saved) == {"language_model", "lm_head", "binary_head"}
    dst = _model(init_seed=99)
    _load(dst, root)
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name
    ids, padding, types, labels = _batch()
    src.eval(), dst.eval()
    with torch.no_grad():
        assert torch.equal(src(ids, padding, types, labels)[0], dst(ids, padding, types,
                                                                    labels)[0])

    # with binary head -> --bert-no-binary-head: strict refuses in one line
    plain = _model(binary_head=False, num_tokentypes=0, init_seed=99)
    with pytest.raises(UserError) as err:
        _load(plain, root)
    msg = str(err.value)
    assert "\n" not in msg and "unexpected 5" in msg and "binary_head" in msg \
        and "pooler" in msg and "tokentype_embeddings" in msg
    # a policy ignoring only the heads still refuses (token types are extra too)
    with pytest.raises(UserError, match="unexpected 1 .*tokentype_embeddings"):
        _load(plain, root, LoadPolicy(ignore_unexpected=("binary_head.*",
                                                         "language_model.pooler.*")))
    logs = []
    policy = LoadPolicy(ignore_unexpected=("binary_head.*", "language_model.pooler.*",
                                           "*.tokentype_embeddings.*"))
    _load(plain, root, policy, logs)
    assert any("without 5 entries" in line for line in logs)
    own = plain.state_dict()
    for name, value in src.state_dict().items():
        if name in own:
            assert torch.equal(own[name], value), name


def test_gpt_checkpoint_into_bert_is_refused_in_one_line(tmp_path):
    root = str(tmp_path / "gpt")
    gpt = GPTModel(_config(num_tokentypes=0))
    _save(gpt, root)
    with pytest.raises(UserError) as err:
        _load(_model(), root)
    msg = str(err.value)
    assert "\n" not in msg and "does not match this model" in msg and "lm_head" in msg


# --------------------------------------------------------------------- random-LTD

def _loss_and_grads(model, ids, padding, types, labels, **kw):
    model.zero_grad(set_to_none=True)
    loss, binary = model(ids, padding, tokentype_ids=types, lm_labels=labels, **kw)
    total = (loss * (labels >= 0)).sum() + F.cross_entropy(binary, torch.tensor([0, 1, 1]))
    total.backward()
    return (loss.detach(), binary.detach()), {n: p.grad.clone()
                                              for n, p in model.named_parameters()}


def _assert_bit_identical(a, b):
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


@pytest.mark.slow
@pytest.mark.parametrize("post_ln", [False, True], ids=["pre-ln", "post-ln"])
def test_keep_all_tokens_is_bit_identical_to_dense(post_ln):
    model = _randomise(_model(num_layers=4, apply_residual_connection_post_layernorm=post_ln))
    batch = _batch()
    dense = _loss_and_grads(model, *batch)
    full = TokenDropState(3, 1, middle_layer_kept_lengths(4, S), torch.arange(B))
    _assert_bit_identical(_loss_and_grads(model, *batch, token_drop=full), dense)
    encoder = model.language_model.encoder
    calls = []
    forward_dropped = encoder._forward_dropped

    def counting(layer, *args):
        calls.append(layer.layer_number)
        return forward_dropped(layer, *args)

    # against the padded batch's dense layers (packed ones round differently)
    encoder.config.pack_padded_tokens = False
    try:
        dense = _loss_and_grads(model, *batch)
        encoder._always_gather = True  # through gather -> layer -> scatter with every position
        encoder._forward_dropped = counting
        _assert_bit_identical(_loss_and_grads(model, *batch, token_drop=full), dense)
    finally:
        encoder._always_gather = False
        encoder.config.pack_padded_tokens = True
        encoder.__dict__.pop("_forward_dropped", None)
    assert calls == [1, 2]
    dropped = _loss_and_grads(model, *batch, token_drop=TokenDropState(
        3, 1, middle_layer_kept_lengths(4, 6), torch.arange(B)))
    assert not torch.equal(dropped[0][0], dense[0][0])  # dropping really changes the result


def test_kept_tokens_never_attend_padding():
    """Under dropping (training mode, dropout 0) the outputs at real positions do not depend on
    the padded positions' ids, token types or embeddings, whichever tokens the layers keep."""
    model = _randomise(_model(num_layers=4)).train()
    ids, padding, types, labels = _batch()
    state = TokenDropState(9, 4, middle_layer_kept_lengths(4, 8), torch.tensor([10, 11, 12]))
    kept = kept_indices_by_layer(state, [1, 2], S)
    pad_kept = [bool((padding.gather(1, kept[i]) == 0).any()) for i in (1, 2)]
    assert any(pad_kept)  # padded tokens are among the kept ones (no special treatment)

    def outputs(input_ids, token_types, hook=None):
        handle = None
        if hook is not None:
            handle = model.language_model.embedding.register_forward_hook(hook)
        try:
            with torch.no_grad():
                loss, binary = model(input_ids, padding, tokentype_ids=token_types,
                                     lm_labels=labels, token_drop=state)
                logits, _ = model(input_ids, padding, tokentype_ids=token_types,
                                  token_drop=state)
        finally:
            if handle is not None:
                handle.remove()
        return loss, binary, logits

    ref = outputs(ids, types)
    other_ids = ids.masked_fill(padding == 0, 42)
    other_types = types.masked_fill(padding == 0, 1)

    def noise(module, args, out):  # arbitrary embeddings at the padded positions
        g = torch.Generator().manual_seed(3)
        return torch.where(padding.bool()[..., None], out,
                           torch.randn(out.shape, generator=g) * 5)

    real = padding.bool()
    for variant in (outputs(other_ids, other_types), outputs(ids, types, noise)):
        assert torch.equal(variant[0][real], ref[0][real])
        assert torch.equal(variant[1], ref[1])  # the pooler reads [CLS]
        assert torch.equal(variant[2][real], ref[2][real])
        assert not torch.equal(variant[2], ref[2])  # padded positions did change


def test_mlm_loss_covers_every_masked_position_after_the_last_full_layer():
    model = _randomise(_model(num_layers=4)).train()
    ids, padding, types, labels = _batch()
    state = TokenDropState(2, 7, middle_layer_kept_lengths(4, 5), torch.arange(B))
    seen = {}
    hooks = [layer.register_forward_hook(
        lambda m, args, out, i=i: seen.__setitem__(i, args[0].shape))
        for i, layer in enumerate(model.language_model.encoder.layers)]
    try:
        loss, _ = model(ids, padding, tokentype_ids=types, lm_labels=labels, token_drop=state)
    finally:
        for h in hooks:
            h.remove()
    kept = kept_indices_by_layer(state, [1, 2], S)
    # every layer runs on its real tokens, packed: all of them, or the kept ones (5 of s)
    real, kept_real = int(padding.sum()), [int(padding.gather(1, kept[i]).sum()) for i in (1, 2)]
    assert seen == {0: (1, real, H), 1: (1, kept_real[0], H), 2: (1, kept_real[1], H),
                    3: (1, real, H)}
    masked = labels >= 0
    dropped_somewhere = torch.ones(B, S, dtype=torch.bool)
    for idx in kept.values():
        dropped_somewhere &= ~torch.zeros(B, S, dtype=torch.bool).scatter(1, idx, True)
    assert bool((masked & dropped_somewhere).any())  # masked tokens skipped by both middle layers
    assert bool((loss[masked] > 0).all()) and torch.isfinite(loss).all()
    # every masked position's loss is the cross entropy of the full-sequence logits there
    with torch.no_grad():
        logits, _ = model(ids, padding, tokentype_ids=types, token_drop=state)
    ref = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    torch.testing.assert_close(loss[masked].detach(), ref[masked], rtol=0, atol=1e-5)
    # and every masked position contributes gradient to the output weight
    (loss * masked).sum().backward()
    word_grad = model.language_model.embedding.word_embeddings.weight.grad
    targets = labels[masked].unique()
    assert bool((word_grad[targets].abs().sum(-1) > 0).all())
