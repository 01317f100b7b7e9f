"""Text generation: greedy/top-k/top-p sampling, EOD, context cropping, and the checkpoint CLI."""

import argparse
import io

import pytest
import torch

from megatron.errors import UserError
from megatron.model import GPTModel, TransformerConfig
from megatron.text_generation import filter_logits, generate, sample_next_token
from tools import generate_text

V = 64


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                padded_vocab_size=V)
    base.update(kw)
    return GPTModel(TransformerConfig(**base))


def test_greedy_is_deterministic_and_matches_argmax_loop():
    model = _model()  # training mode with dropout: generate must switch to eval and back
    prompt = [3, 14, 15, 9]
    out = generate(model, prompt, 6, greedy=True)
    assert model.training
    assert out[:4] == prompt and len(out) == 10
    assert generate(model, prompt, 6, greedy=True) == out
    model.eval()
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(6):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    assert tokens[0].tolist() == out


def test_batch_tensor_input_and_top_k_one_is_greedy():
    model = _model().eval()
    prompts = torch.randint(0, V, (3, 5))
    greedy = generate(model, prompts, 4, greedy=True)
    assert greedy.shape == (3, 9) and torch.equal(greedy[:, :5], prompts)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, prompts, 4, top_k=1, generator=gen), greedy)
    a = generate(model, prompts, 4, temperature=2.0, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompts, 4, temperature=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # same generator seed, same samples


def test_top_k_and_top_p_restrict_the_support():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    rows = logits.expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    drawn = set(sample_next_token(rows, top_k=5, generator=gen).tolist())
    assert drawn <= top5 and len(drawn) > 1
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    nucleus = set(order[: int((cum < 0.7).sum()) + 1].tolist())  # smallest set reaching 0.7
    assert 1 < len(nucleus) < 40
    kept = torch.isfinite(filter_logits(logits, top_p=0.7)[0])
    assert set(torch.nonzero(kept).flatten().tolist()) == nucleus
    drawn = set(sample_next_token(rows, top_p=0.7, generator=gen).tolist())
    assert drawn <= nucleus and len(drawn) > 1
    both = filter_logits(logits, top_k=2, top_p=0.99)
    assert int(torch.isfinite(both).sum()) == 2


def test_eod_stops_and_vocab_padding_is_never_sampled():
    model = _model().eval()
    prompt = [1, 2, 3]
    first = generate(model, prompt, 1, greedy=True)[-1]
    out = generate(model, prompt, 10, greedy=True, eod=first)
    assert out == prompt + [first]
    sampled = generate(model, torch.randint(0, V, (4, 3)), 8, temperature=3.0, vocab_size=10,
                       generator=torch.Generator().manual_seed(0))
    assert int(sampled[:, 3:].max()) < 10


def test_context_is_cropped_to_max_positions():
    model = _model().eval()
    long_prompt = torch.randint(0, V, (20,)).tolist()  # longer than 16 positions
    out = generate(model, long_prompt, 3, greedy=True)
    assert len(out) == 23
    tail = generate(model, long_prompt[-15:], 1, greedy=True)
    assert out[20] == tail[-1]  # the first step saw only the last 16 tokens


def _save_checkpoint(tmp_path, model, nested=False, iteration=5):
    c = model.config
    args = argparse.Namespace(
        num_layers=c.num_layers, hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads, ffn_hidden_size=c.ffn_hidden_size,
        seq_length=c.seq_length, max_position_embeddings=c.max_position_embeddings,
        padded_vocab_size=c.padded_vocab_size, position_embedding_type=c.position_embedding_type,
        untie_embeddings_and_output_weights=c.untie_embeddings_and_output_weights,
        tokenizer_type="NullTokenizer", vocab_size=V - 4, vocab_file=None, merge_file=None)
    state = model.state_dict()
    if nested:  # Megatron's state_dict_for_save_checkpoint layout
        lm = {}
        for k, v in state.items():
            _, part, rest = k.split(".", 2)
            if part == "embedding":
                module, name = rest.split(".")
                lm.setdefault("embedding", {}).setdefault(module, {})[name] = v
            elif part == "encoder":  # older Megatron calls the encoder 'transformer'
                lm.setdefault("transformer", {})[rest] = v
            else:
                lm.setdefault(part, {})[rest] = v
        state = {"language_model": lm}
    folder = tmp_path / f"iter_{iteration:07d}" / "mp_rank_00"
    folder.mkdir(parents=True)
    torch.save({"model": state, "args": args, "iteration": iteration, "checkpoint_version": 3.0},
               folder / "model_optim_rng.pt")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text(str(iteration))


@pytest.mark.parametrize("nested", [False, True])
def test_checkpoint_round_trip(tmp_path, nested):
    model = _model(seed=3, position_embedding_type="rope", untie_embeddings_and_output_weights=True)
    _save_checkpoint(tmp_path, model, nested=nested)
    loaded, args = generate_text.load_model(str(tmp_path))
    assert args.tokenizer_type == "NullTokenizer" and not loaded.training
    ids = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model.eval()(ids), rtol=0, atol=0)


def test_cli_prints_greedy_sample(tmp_path):
    model = _model(seed=4)
    _save_checkpoint(tmp_path, model)
    out = io.StringIO()
    generate_text.main(["--load", str(tmp_path), "--prompt", "1 2 3", "--greedy",
                        "--max-new-tokens", "5"], out=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("--- sample 1")
    expected = generate(model, [1, 2, 3], 5, greedy=True, eod=V - 4, vocab_size=V - 3)
    new = [t for t in expected[3:] if t != V - 4]
    assert lines[1] == "1 2 3" + " ".join(str(t) for t in new)


def test_cli_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="latest_checkpointed_iteration"):
        generate_text.load_model(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(UserError, match="iter_0000007"):
        generate_text.load_model(str(tmp_path))
    with pytest.raises(UserError, match="--top-p"):
        generate_text.parse_args(["--load", str(tmp_path), "--top-p", "1.5"])


def test_sharded_or_mismatched_checkpoints_are_user_errors(tmp_path):
    model = _model(seed=5)
    _save_checkpoint(tmp_path / "tp2", model)
    path = tmp_path / "tp2" / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["args"].tensor_model_parallel_size = 2  # mp_rank_00 would be one shard of two
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="checkpoint_util.py"):
        generate_text.load_model(str(tmp_path / "tp2"))
    ckpt["args"].tensor_model_parallel_size = 1
    ckpt["args"].ffn_hidden_size = 64  # args that do not describe the saved tensors
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="dense_h_to_4h"):
        generate_text.load_model(str(tmp_path / "tp2"))


def test_loads_what_pretraining_saved(data_prefix, tmp_path):
    """pretrain_gpt --save -> generate_text.load_model gives the trained model's logits."""
    from training_helpers import gpt_argv, run

    ckpt = str(tmp_path / "ckpt")
    trained, _ = run(gpt_argv(data_prefix, "--save", ckpt, "--position-embedding-type", "rope",
                              "--untie-embeddings-and-output-weights", "--disable-bias-linear",
                              "--eval-iters", "0", iters=2))
    loaded, args = generate_text.load_model(ckpt)
    ids = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), trained.model.eval()(ids), rtol=0, atol=0)


def test_tokenizer_follows_the_checkpoint_vocab_extra_ids():
    """The training run's tokenizer had --vocab-extra-ids ids more: so must the sampler's
    vocabulary (they are real ids, not padding)."""
    import os

    spm = os.path.join(os.path.dirname(__file__), "assets", "tokenizers", "spm.model")
    args = argparse.Namespace(tokenizer_type="SentencePieceTokenizer", tokenizer_model=spm,
                              vocab_extra_ids=2)
    from megatron.tokenizer import build_tokenizer

    expected = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm, vocab_extra_ids=2)
    assert generate_text.build_tokenizer_from_args(args).vocab_size == expected.vocab_size


def test_args_the_model_cannot_represent_are_refused_or_mapped():
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                padded_vocab_size=V)
    # --apply-residual-connection-post-layernorm leaves every shape unchanged: the model
    # implements it (BERT's variant), so it must reach the config, not be dropped.
    post_ln = generate_text.config_from_args(argparse.Namespace(
        **base, apply_residual_connection_post_layernorm=True))
    assert post_ln.apply_residual_connection_post_layernorm
    with pytest.raises(UserError, match="swiglu"):
        generate_text.config_from_args(argparse.Namespace(**base, swiglu=True))
    with pytest.raises(UserError, match="RMSNorm"):
        generate_text.config_from_args(argparse.Namespace(**base, normalization="RMSNorm"))
    ok = generate_text.config_from_args(argparse.Namespace(**base, normalization="LayerNorm",
                                                           swiglu=False))
    assert ok.add_bias_linear
    # args of a run saved before add_bias_linear was recorded: disable_bias_linear only
    old = generate_text.config_from_args(argparse.Namespace(**base, disable_bias_linear=True))
    assert not old.add_bias_linear
