"""GPT model: Megatron names, HF GPT-2 parity, masks, rope on token subsets, dtypes, init, FLOPs."""

import math

import pytest
import torch

from megatron.errors import UserError
from megatron.model import GPTModel, ParallelTransformer, TransformerConfig
from megatron.model.transformer import ParallelTransformerLayer
from megatron.model.utils import gpt_flops_per_iteration, gpt_flops_per_token
from megatron.parallel.random import build_rng_tracker
from megatron.parallel.state import ParallelState

V, H, HEADS, S = 96, 32, 4, 16


def _config(**kw):
    base = dict(num_layers=2, hidden_size=H, num_attention_heads=HEADS, seq_length=S,
                padded_vocab_size=V, hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPTModel(_config(**kw))


def _randomise_biases_and_norms(model):
    """Zero biases / unit norms would hide layout mistakes in parity tests."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)


def test_megatron_parameter_names():
    names = [n for n, _ in _model().named_parameters()]
    layer = ["input_layernorm.weight", "input_layernorm.bias",
             "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
             "self_attention.dense.weight", "self_attention.dense.bias",
             "post_attention_layernorm.weight", "post_attention_layernorm.bias",
             "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
             "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"]
    expected = ["language_model.embedding.word_embeddings.weight",
                "language_model.embedding.position_embeddings.weight"]
    expected += [f"language_model.encoder.layers.{i}.{n}" for i in range(2) for n in layer]
    expected += ["language_model.encoder.final_layernorm.weight",
                 "language_model.encoder.final_layernorm.bias"]
    assert names == expected
    untied = [n for n, _ in _model(untie_embeddings_and_output_weights=True,
                                   position_embedding_type="rope").named_parameters()]
    assert untied[-1] == "language_model.output_layer.weight"
    assert "language_model.embedding.position_embeddings.weight" not in untied
    assert len(untied) == len(expected)


def _to_hf(model, config):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf_config = GPT2Config(vocab_size=V, n_positions=config.max_position_embeddings, n_embd=H,
                           n_layer=config.num_layers, n_head=HEADS, activation_function="gelu_new",
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           layer_norm_epsilon=config.layernorm_epsilon)
    hf = GPT2LMHeadModel(hf_config).eval()
    ours = model.state_dict()
    hn = H // HEADS

    def qkv(t):
        # Megatron rows [np, 3, hn] -> HF [3, np, hn] (q, k, v blocks of all heads)
        t = t.view(HEADS, 3, hn, *t.shape[1:]).transpose(0, 1).reshape(3 * H, *t.shape[1:])
        return t.T if t.dim() == 2 else t

    sd = {"transformer.wte.weight": ours["language_model.embedding.word_embeddings.weight"],
          "transformer.wpe.weight": ours["language_model.embedding.position_embeddings.weight"],
          "transformer.ln_f.weight": ours["language_model.encoder.final_layernorm.weight"],
          "transformer.ln_f.bias": ours["language_model.encoder.final_layernorm.bias"]}
    for i in range(config.num_layers):
        m, h = f"language_model.encoder.layers.{i}.", f"transformer.h.{i}."
        for a, b in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            sd[h + b + ".weight"] = ours[m + a + ".weight"]
            sd[h + b + ".bias"] = ours[m + a + ".bias"]
        sd[h + "attn.c_attn.weight"] = qkv(ours[m + "self_attention.query_key_value.weight"])
        sd[h + "attn.c_attn.bias"] = qkv(ours[m + "self_attention.query_key_value.bias"])
        for a, b in (("self_attention.dense", "attn.c_proj"), ("mlp.dense_h_to_4h", "mlp.c_fc"),
                     ("mlp.dense_4h_to_h", "mlp.c_proj")):
            sd[h + b + ".weight"] = ours[m + a + ".weight"].T  # Conv1D stores [in, out]
            sd[h + b + ".bias"] = ours[m + a + ".bias"]
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name != "lm_head.weight":
                p.copy_(sd[name])
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    return hf


def test_parity_with_hf_gpt2():
    model = _model().eval()
    _randomise_biases_and_norms(model)
    hf = _to_hf(model, model.config)
    ids = torch.randint(0, V, (2, S))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        ref = torch.nn.functional.cross_entropy(theirs[:, :-1].transpose(1, 2), ids[:, 1:],
                                                reduction="none")
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_causality():
    model = _model().eval()
    ids = torch.randint(0, V, (1, S))
    changed = ids.clone()
    changed[0, 9:] = (changed[0, 9:] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("pos", ["learned_absolute", "rope"])
def test_explicit_mask_equals_is_causal(pos):
    model = _model(position_embedding_type=pos).eval()
    ids = torch.randint(0, V, (2, S))
    mask = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask), model(ids),
                                   rtol=1e-6, atol=1e-6)
        explicit = model(ids, position_ids=torch.arange(S).expand(2, S))
        torch.testing.assert_close(explicit, model(ids), rtol=0, atol=0)


def test_bidirectional_block_with_padding_mask():
    """The non-causal (BERT) path: an all-visible explicit mask equals no mask."""
    torch.manual_seed(0)
    block = ParallelTransformer(_config(), causal=False).eval()
    x = torch.randn(2, S, H)
    none = torch.zeros(2, 1, S, S, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(block(x, None, none), block(x), rtol=1e-6, atol=1e-6)
        pad = none.clone()
        pad[1, :, :, 12:] = True  # sample 1: last 4 tokens are padding keys
        out = block(x, None, pad)
        x2 = x.clone()
        x2[1, 12:] += 1.0
        torch.testing.assert_close(block(x2, None, pad)[1, :12], out[1, :12], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pos", ["rope", "learned_absolute"])
def test_layer_on_token_subset_with_positions(pos):
    """A layer run on kept tokens with their position ids equals, on those rows, the layer run on
    the whole sequence with the other tokens masked out as keys (what random-LTD relies on)."""
    torch.manual_seed(0)
    config = _config(position_embedding_type=pos, rotary_percent=0.5 if pos == "rope" else 1.0)
    layer = ParallelTransformerLayer(config, layer_number=1).eval()
    _randomise_biases_and_norms(layer)
    b = 2
    x = torch.randn(b, S, H)
    kept = torch.tensor([[0, 2, 3, 7, 8, 12, 15], [1, 4, 5, 6, 9, 10, 11]])  # [b, r], ascending
    positions = torch.arange(S).expand(b, S)
    x_kept = torch.gather(x, 1, kept.unsqueeze(-1).expand(-1, -1, H))  # [b, r, h]
    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)  # [s, s]
    dropped_key = torch.ones(b, S, dtype=torch.bool).scatter(1, kept, False)  # [b, s]
    mask = (causal[None] | dropped_key[:, None, :]).unsqueeze(1)  # [b, 1, s, s]
    with torch.no_grad():
        sub = layer(x_kept, kept, None)  # [b, r, h]
        full = layer(x, positions, mask)
    ref = torch.gather(full, 1, kept.unsqueeze(-1).expand(-1, -1, H))
    torch.testing.assert_close(sub, ref, rtol=1e-5, atol=1e-5)
    if pos == "rope":  # the positions matter: 0..r-1 would give something else
        with torch.no_grad():
            wrong = layer(x_kept, torch.arange(kept.size(1)).expand(b, -1), None)
        assert not torch.allclose(wrong, ref, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_backward(dtype):
    model = _model(params_dtype=dtype, hidden_dropout=0.1, attention_dropout=0.1)
    assert all(p.dtype == dtype for p in model.parameters())
    ids = torch.randint(0, V, (2, S))
    loss = model(ids, labels=ids)
    assert loss.dtype == torch.float32 and loss.shape == (2, S)
    loss.mean().backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all()
    with torch.no_grad():
        assert model.eval()(ids).dtype == dtype


def test_init_statistics():
    torch.manual_seed(0)
    layers, std = 4, 0.02
    model = GPTModel(_config(num_layers=layers, hidden_size=64, init_method_std=std))
    out_std = std / math.sqrt(2 * layers)
    sd = dict(model.named_parameters())
    for i in range(layers):
        pre = f"language_model.encoder.layers.{i}."
        for name, want in (("self_attention.dense.weight", out_std),
                           ("mlp.dense_4h_to_h.weight", out_std),
                           ("self_attention.query_key_value.weight", std),
                           ("mlp.dense_h_to_4h.weight", std)):
            got = sd[pre + name].std().item()
            assert abs(got - want) / want < 0.05, (name, got, want)
        assert torch.all(sd[pre + "mlp.dense_4h_to_h.bias"] == 0)
        assert torch.all(sd[pre + "input_layernorm.weight"] == 1)
        assert torch.all(sd[pre + "input_layernorm.bias"] == 0)
    word = sd["language_model.embedding.word_embeddings.weight"].std().item()
    assert abs(word - std) / std < 0.05


def test_recompute_matches_with_dropout():
    """Full activation recompute replays both the default and the tracker's RNG streams."""
    tracker = build_rng_tracker(seed=42)
    parallel = ParallelState(rng_tracker=tracker)
    torch.manual_seed(0)
    plain = GPTModel(_config(hidden_dropout=0.2, attention_dropout=0.2), parallel)
    recompute = GPTModel(_config(hidden_dropout=0.2, attention_dropout=0.2,
                                 recompute_granularity="full"), parallel)
    recompute.load_state_dict(plain.state_dict())
    ids = torch.randint(0, V, (2, S))
    start = tracker.get_states()
    results = []
    for model in (plain, recompute):
        tracker.set_states(start)
        torch.manual_seed(3)
        loss = model(ids, labels=ids).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-6, atol=1e-7)
    # and dropout is really on: another seed gives another loss
    tracker.set_states(start)
    torch.manual_seed(4)
    assert not torch.equal(plain(ids, labels=ids).mean().detach(), results[0][0])


def test_pipeline_stages_compose():
    full = _model().eval()
    c = full.config
    torch.manual_seed(1)
    first = GPTModel(c, pre_process=True, post_process=False, layer_ids=[0]).eval()
    last = GPTModel(c, pre_process=False, post_process=True, layer_ids=[1]).eval()
    assert [layer.layer_number for layer in last.language_model.encoder.layers] == [1]
    assert "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight" in last.state_dict()
    assert last.word_embeddings.weight.shared_embedding
    fsd = full.state_dict()
    first.load_state_dict({k: v for k, v in fsd.items()
                           if "layers.1." not in k and "final" not in k})
    last_sd = {k.replace("layers.1.", "layers.0."): v for k, v in fsd.items()
               if "layers.1." in k or "final" in k}
    last_sd["word_embeddings.weight"] = fsd["language_model.embedding.word_embeddings.weight"]
    last.load_state_dict(last_sd)
    ids = torch.randint(0, V, (2, S))
    with torch.no_grad():
        hidden = first(ids)
        assert hidden.shape == (2, S, H)
        last.set_input_tensor(hidden)
        torch.testing.assert_close(last(ids, labels=ids), full(ids, labels=ids), rtol=0, atol=0)


def test_config_validation_names_flags():
    with pytest.raises(UserError, match="--num-attention-heads"):
        _config(num_attention_heads=5)
    with pytest.raises(UserError, match="--position-embedding-type"):
        _config(position_embedding_type="alibi")
    with pytest.raises(UserError, match="--recompute-granularity"):
        _config(recompute_granularity="selective")
    with pytest.raises(UserError, match="--max-position-embeddings"):
        _config(max_position_embeddings=8)
    with pytest.raises(UserError, match="--tensor-model-parallel-size"):
        _config(num_attention_heads=2, hidden_size=32).check_tensor_parallel(4)
    c = _config(max_position_embeddings=None, ffn_hidden_size=None)
    assert (c.ffn_hidden_size, c.kv_channels, c.max_position_embeddings) == (4 * H, H // HEADS, S)


def test_num_parameters():
    model = _model()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    layers = 2 * (12 * H * H + 13 * H) + 2 * H
    assert model.num_parameters(exclude_embeddings=True) == layers
    assert total == layers + V * H + S * H
    untied = _model(untie_embeddings_and_output_weights=True)
    assert untied.num_parameters() == total + V * H


def test_flops_formula():
    B, s, l, h, v = 8, 1024, 24, 1024, 50304
    megatron = 72 * B * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))
    assert gpt_flops_per_iteration(B, s, l, h, v) == pytest.approx(megatron, rel=1e-12)
    with_recompute = 96 * B * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    assert gpt_flops_per_iteration(B, s, l, h, v, recompute=True) == pytest.approx(with_recompute)
    assert gpt_flops_per_iteration(B, s, l, h, v, kept_length=s) == pytest.approx(megatron)
    r = 128
    dropped = gpt_flops_per_iteration(B, s, l, h, v, kept_length=r)
    layer = lambda n: 72 * B * n * h * h * (1 + n / (6 * h))  # noqa: E731
    assert dropped == pytest.approx(2 * layer(s) + (l - 2) * layer(r) + 6 * B * s * h * v)
    assert gpt_flops_per_token(s, l, h, v) == pytest.approx(megatron / (B * s))
    # per-layer kept lengths: --random-ltd-layer-ids or TokenBypass's layers L/2 .. L-2
    bypass = {layer: r for layer in range(l // 2, l - 1)}
    assert gpt_flops_per_iteration(B, s, l, h, v, kept_lengths=bypass) == pytest.approx(
        (l - len(bypass)) * layer(s) + len(bypass) * layer(r) + 6 * B * s * h * v)
    middle = {layer: r for layer in range(1, l - 1)}
    assert gpt_flops_per_iteration(B, s, l, h, v, kept_lengths=middle) == pytest.approx(dropped)
    assert gpt_flops_per_iteration(B, s, l, h, v, kept_lengths={}) == pytest.approx(megatron)
