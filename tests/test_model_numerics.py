"""GPT numerics against a reference written from Megatron-LM's own equations (float64).

The reference follows megatron/model/{language_model,transformer,fused_softmax,
rotary_pos_embedding,fused_bias_gelu}.py and gpt_model.py literally: [s, b, h] layout, the fused
QKV output viewed as [s, b, np, 3 * hn] and split into q, k, v (checkpoint version 3), scores by
baddbmm with alpha 1 / (sqrt(hn) * layer_number) then the softmax scale layer_number
(--apply-query-key-layer-scaling), -10000 masking, rope from RotaryEmbedding(seq_length) at
positions 0..s-1 (position_ids unused), bias-gelu (tanh) with biases and F.gelu (erf) without,
bias-dropout-add, final LayerNorm, logits against the (tied or untied) output weight, the loss
on output.float().
"""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.model import GPTModel, TransformerConfig
from megatron.model.transformer import ParallelMLP

V, H, HEADS, S, B = 64, 32, 4, 12, 2


def _megatron_rotary(seq_len, dim, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = torch.einsum("i,j->ij", torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # [s, 1, 1, d]


def _apply_rotary_pos_emb(t, freqs):
    rot_dim = freqs.shape[-1]
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = torch.chunk(t, 2, dim=-1)
    t = t * freqs.cos() + torch.cat((-x2, x1), dim=-1) * freqs.sin()
    return torch.cat((t, t_pass), dim=-1)


def _reference_logits(sd, cfg, input_ids, position_ids):
    """Megatron-LM's GPT forward (dropout 0) on the state dict ``sd``; -> logits [b, s, V]."""
    pre = "language_model."
    b, s = input_ids.shape
    np_, hn = cfg.num_attention_heads, cfg.kv_channels
    x = F.embedding(input_ids, sd[pre + "embedding.word_embeddings.weight"])
    if cfg.position_embedding_type == "learned_absolute":
        x = x + F.embedding(position_ids, sd[pre + "embedding.position_embeddings.weight"])
    x = x.transpose(0, 1)  # [s, b, h]
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    rot = _megatron_rotary(s, cfg.rotary_dim, cfg.rope_theta) \
        if cfg.position_embedding_type == "rope" else None

    def ln(t, name):
        return F.layer_norm(t, (t.size(-1),), sd[name + ".weight"], sd[name + ".bias"],
                            cfg.layernorm_epsilon)

    def linear(t, name):  # skip_bias_add: (output, bias)
        return t @ sd[name + ".weight"].T, sd.get(name + ".bias")

    for i in range(cfg.num_layers):
        layer = f"{pre}encoder.layers.{i}."
        mixed, bias = linear(ln(x, layer + "input_layernorm"),
                             layer + "self_attention.query_key_value")
        if bias is not None:
            mixed = mixed + bias
        q, k, v = mixed.view(s, b, np_, 3 * hn).split(hn, dim=-1)  # each [s, b, np, hn]
        if rot is not None:
            q, k = _apply_rotary_pos_emb(q, rot), _apply_rotary_pos_emb(k, rot)
        coeff = i + 1  # layer_number: --apply-query-key-layer-scaling
        scores = torch.baddbmm(torch.zeros(b * np_, s, s, dtype=x.dtype),
                               q.reshape(s, b * np_, hn).transpose(0, 1),
                               k.reshape(s, b * np_, hn).transpose(0, 1).transpose(1, 2),
                               beta=0.0, alpha=1.0 / (math.sqrt(hn) * coeff))
        scores = (scores.view(b, np_, s, s) * coeff).masked_fill(causal, -10000.0)
        probs = torch.softmax(scores, dim=-1).view(b * np_, s, s)
        context = torch.bmm(probs, v.reshape(s, b * np_, hn).transpose(0, 1))
        context = context.view(b, np_, s, hn).permute(2, 0, 1, 3).reshape(s, b, np_ * hn)
        out, bias = linear(context, layer + "self_attention.dense")
        x = x + (out if bias is None else out + bias)  # bias_dropout_add
        inter, bias = linear(ln(x, layer + "post_attention_layernorm"), layer + "mlp.dense_h_to_4h")
        if bias is not None:  # bias_gelu_impl
            z = inter + bias
            inter = z * 0.5 * (1.0 + torch.tanh(0.79788456 * z * (1 + 0.044715 * z * z)))
        else:  # bias_gelu_fusion off (--disable-bias-linear): F.gelu
            inter = F.gelu(inter)
        out, bias = linear(inter, layer + "mlp.dense_4h_to_h")
        x = x + (out if bias is None else out + bias)
    x = ln(x, pre + "encoder.final_layernorm")
    weight = sd.get(pre + "output_layer.weight", sd[pre + "embedding.word_embeddings.weight"])
    return (x @ weight.T).transpose(0, 1)  # [b, s, V]


def _model64(**kw):
    base = dict(num_layers=3, hidden_size=H, num_attention_heads=HEADS, seq_length=S,
                padded_vocab_size=V, hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    cfg = TransformerConfig(**base)
    torch.manual_seed(0)
    model = GPTModel(cfg).double().eval()
    with torch.no_grad():  # zero biases / unit norms would hide layout mistakes
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "dense_h_to_4h" in name:
                p.mul_(20.0)  # pre-activations of order 1, where the GeLU variants differ
    return cfg, model


CASES = [
    {},
    {"add_bias_linear": False},
    {"position_embedding_type": "rope"},
    {"position_embedding_type": "rope", "rotary_percent": 0.5, "add_bias_linear": False},
    {"untie_embeddings_and_output_weights": True, "kv_channels": 6, "ffn_hidden_size": 40},
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())
                         or "default")
def test_logits_and_grads_match_megatron_reference(kw):
    cfg, model = _model64(**kw)
    ids = torch.randint(0, V, (B, S))
    pos = torch.arange(S).expand(B, S)
    logits = model(ids, pos)
    cotangent = torch.randn_like(logits)
    grads = torch.autograd.grad(logits, list(model.parameters()), cotangent)
    sd = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    ref = _reference_logits(sd, cfg, ids, pos)
    ref_grads = torch.autograd.grad(ref, list(sd.values()), cotangent)
    # Not 1e-15: Megatron's bias-gelu constant 0.79788456 is sqrt(2/pi) to 8 digits only
    # (relative 1e-9); the erf GeLU (no biases) agrees to 1e-15.
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-9)
    for name, g, rg in zip(sd, grads, ref_grads):
        err = ((g - rg).abs().max() / rg.abs().max()).item()
        assert err < 1e-8, f"{name}: relative error {err:.1e}"
    # the loss: Megatron's cross entropy on output.float()
    labels = torch.randint(0, V, (B, S))
    loss = model(ids, pos, labels=labels)
    ref_loss = F.cross_entropy(ref.detach().float().transpose(1, 2), labels, reduction="none")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias, approximate", [(True, "tanh"), (False, "none")])
def test_mlp_gelu_is_megatrons_for_the_bias_setting(bias, approximate):
    """Megatron: bias-gelu fusion (tanh GeLU) with biases; --disable-bias-linear disables the
    fusion (arguments.py: args.bias_gelu_fusion = False) and F.gelu (erf) applies."""
    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, seq_length=4,
                            padded_vocab_size=16, add_bias_linear=bias)
    torch.manual_seed(0)
    mlp = ParallelMLP(cfg).double()
    with torch.no_grad():
        mlp.dense_h_to_4h.weight.normal_()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    pre = F.linear(x, mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias)
    expected = mlp.dense_4h_to_h(F.gelu(pre, approximate=approximate))
    other = mlp.dense_4h_to_h(F.gelu(pre, approximate="none" if bias else "tanh"))
    out = mlp(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert (out - other).abs().max() > 1e-6  # the two GeLUs really differ here


def test_rope_ignores_reset_position_ids_as_megatron_does():
    """Megatron rotates by the index in the sequence (RotaryEmbedding(seq_length)); per-document
    position ids (--reset-position-ids) change learned position embeddings only."""
    reset = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]] * B)
    arange = torch.arange(S).expand(B, S)
    ids = torch.randint(0, V, (B, S))
    cfg, rope = _model64(position_embedding_type="rope")
    with torch.no_grad():
        torch.testing.assert_close(rope(ids, reset), rope(ids, arange), rtol=0, atol=0)
        sd = {n: p for n, p in rope.named_parameters()}
        torch.testing.assert_close(rope(ids, reset), _reference_logits(sd, cfg, ids, reset),
                                   rtol=0, atol=1e-9)
    cfg, learned = _model64()
    with torch.no_grad():
        assert not torch.allclose(learned(ids, reset), learned(ids, arange))
        sd = {n: p for n, p in learned.named_parameters()}
        torch.testing.assert_close(learned(ids, reset), _reference_logits(sd, cfg, ids, reset),
                                   rtol=0, atol=1e-9)
