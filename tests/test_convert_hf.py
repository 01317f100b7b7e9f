"""tools/convert_hf.py: Megatron GPT/BERT checkpoints <-> Hugging Face transformers, logits equal
both ways in fp32 (every GeLU each side has), any TP/PP on either side, tokenizer files that
AutoTokenizer loads, an imported checkpoint that generates and trains, one-line errors.

transformers models are built from configs here (never downloaded); HF_HUB_OFFLINE is set."""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from megatron.arguments import flag_defaults, transformer_config_from_args  # noqa: E402
from megatron.checkpoint_reshard import read_full_model_state  # noqa: E402
from megatron.checkpointing import (TrainState, atomic_torch_save,  # noqa: E402
                                    checkpoint_file, load_pretrained_weights,
                                    megatron_model_state, save_checkpoint)
from megatron.errors import UserError, run_main  # noqa: E402
from megatron.model import BertModel, GPTModel  # noqa: E402
from megatron.model.bert import bert_attention_mask  # noqa: E402

from distributed_harness import run_distributed  # noqa: E402
from training_helpers import BERT_VOCAB, MERGES, ROOT, VOCAB, gpt_argv, run  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tools"))
import checkpoint_util  # noqa: E402
import convert_hf  # noqa: E402

GPT_V, BERT_V = 1501, 1000  # the test tokenizer files' sizes
BERT_OURS = 1002  # our WordPiece tokenizer appends [BOS] and [EOS], as Megatron's
H, HEADS, LAYERS, POS = 32, 4, 2, 16
TOL = 1e-5
QUIET = dict(log=lambda *_: None)
GPT_TOKENIZER = dict(tokenizer_type="GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)
BERT_TOKENIZER = dict(tokenizer_type="BertWordPieceLowerCase", vocab_file=BERT_VOCAB)


def _randomize(model, seed):
    """Every parameter random (LayerNorm weights around 1), so no mapping hides behind zeros
    or ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if "layernorm" in name.lower() and name.endswith("weight")
                    else noise)
    return model.eval()


def _args(padded, **fields):
    """Args as a run of the parser would save them."""
    return argparse.Namespace(**{
        **flag_defaults(), "num_layers": LAYERS, "hidden_size": H, "num_attention_heads": HEADS,
        "seq_length": POS, "max_position_embeddings": POS, "padded_vocab_size": padded,
        "make_vocab_size_divisible_by": 64, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "save": None, "no_save_optim": True, "no_save_rng": True, **fields})


def _our_model(args, family, **overrides):
    if family == "gpt":
        return GPTModel(transformer_config_from_args(args, **overrides))
    config = transformer_config_from_args(args, num_tokentypes=2, **overrides)
    return BertModel(config, add_binary_head=getattr(args, "bert_binary_head", True))


def _save(root, model, args):
    args.save = root
    save_checkpoint(args, TrainState(iteration=5), model, None, None, **QUIET)


def gpt_checkpoint(root, seed=0, **fields):
    args = _args(1536, **GPT_TOKENIZER, **fields)
    model = _randomize(_our_model(args, "gpt"), seed)
    _save(root, model, args)
    return model


def bert_checkpoint(root, seed=0, **fields):
    fields = {"apply_residual_connection_post_layernorm": True, "layernorm_epsilon": 1e-12,
              "bias_gelu_fusion": False, **fields}
    args = _args(1024, **BERT_TOKENIZER, **fields)
    model = _randomize(_our_model(args, "bert"), seed)
    _save(root, model, args)
    return model


def _tokens(vocab, b=2, s=POS, seed=1):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


# -- GPT -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("gelu,fields", [("gelu_new", {}), ("gelu_new", {"openai_gelu": True}),
                                         ("gelu", {"bias_gelu_fusion": False})])
def test_gpt_export_logits_equal(tmp_path, gelu, fields):
    ours = gpt_checkpoint(str(tmp_path / "ckpt"), **fields)
    out = str(tmp_path / "hf")
    assert convert_hf.export(str(tmp_path / "ckpt"), out, **QUIET) == "GPT2LMHeadModel"
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.activation_function == gelu and hf.config.vocab_size == GPT_V
    ids = _tokens(GPT_V)
    with torch.no_grad():
        diff = _max_diff(ours(ids)[..., :GPT_V], hf(ids).logits)
    assert diff < TOL, diff
    tok = transformers.AutoTokenizer.from_pretrained(out)
    from megatron.tokenizer import build_tokenizer

    mine = build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)
    text = "hello world, the tokenizers agree"
    assert tok(text)["input_ids"] == mine.tokenize(text)
    assert tok.eos_token_id == mine.eod


def _hf_gpt(out, act="gelu_new", seed=3, positions=POS, layers=LAYERS, tie=True):
    config = transformers.GPT2Config(vocab_size=GPT_V, n_positions=positions, n_embd=H,
                                     n_layer=layers, n_head=HEADS, activation_function=act,
                                     bos_token_id=GPT_V - 1, eos_token_id=GPT_V - 1,
                                     tie_word_embeddings=tie)
    model = transformers.GPT2LMHeadModel(config)
    _randomize(model, seed)
    model.save_pretrained(out)
    shutil.copyfile(VOCAB, os.path.join(out, "vocab.json"))
    shutil.copyfile(MERGES, os.path.join(out, "merges.txt"))
    return model


def _load_imported(save, family):
    full, args = read_full_model_state(save)
    model = _our_model(args, family, hidden_dropout=0.0, attention_dropout=0.0)
    load_pretrained_weights(save, model, **QUIET)
    return model.eval(), args


@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh", "gelu"])
def test_gpt_import_logits_equal(tmp_path, act):
    hf = _hf_gpt(str(tmp_path / "hf"), act).eval()
    save = str(tmp_path / "ckpt")
    args = convert_hf.import_(str(tmp_path / "hf"), save, make_divisible=64, **QUIET)
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "1"  # as Megatron-LM's HF loaders (md.iteration = 1)
    assert args.padded_vocab_size == 1536 and args.openai_gelu == (act != "gelu")
    assert args.vocab_file == os.path.join(os.path.abspath(save), "vocab.json")
    ours, _ = _load_imported(save, "gpt")
    ids = _tokens(GPT_V)
    with torch.no_grad():
        logits = ours(ids)
        diff = _max_diff(logits[..., :GPT_V], hf(ids).logits)
    assert diff < TOL, diff
    assert not ours.language_model.embedding.word_embeddings.weight[GPT_V:].any()  # padding


def test_gpt_untied_output_layer_round_trip(tmp_path):
    hf = _hf_gpt(str(tmp_path / "hf"), tie=False).eval()
    save, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    args = convert_hf.import_(str(tmp_path / "hf"), save, make_divisible=64, **QUIET)
    assert args.untie_embeddings_and_output_weights
    convert_hf.export(save, back, **QUIET)
    again = transformers.GPT2LMHeadModel.from_pretrained(back).eval()
    assert not again.config.tie_word_embeddings
    for name, tensor in hf.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_tp2pp2_checkpoint_exports_identically_to_tp1(tmp_path):
    src, shards = str(tmp_path / "tp1"), str(tmp_path / "tp2pp2")
    gpt_checkpoint(src)
    checkpoint_util.convert(src, shards, 2, 2, **QUIET)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    convert_hf.export(src, a, **QUIET)
    convert_hf.export(shards, b, **QUIET)
    from safetensors.torch import load_file

    ta, tb = (load_file(os.path.join(d, "model.safetensors")) for d in (a, b))
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    for name in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        with open(os.path.join(a, name)) as fa, open(os.path.join(b, name)) as fb:
            assert fa.read() == fb.read(), name


def test_import_for_tp2pp2_holds_the_tp1_weights(tmp_path):
    _hf_gpt(str(tmp_path / "hf"), layers=4)
    one, four = str(tmp_path / "tp1"), str(tmp_path / "tp2pp2")
    convert_hf.import_(str(tmp_path / "hf"), one, make_divisible=64, **QUIET)
    convert_hf.import_(str(tmp_path / "hf"), four, target_tp=2, target_pp=2, make_divisible=64,
                       **QUIET)
    assert sorted(os.listdir(os.path.join(four, "iter_0000001"))) == \
        ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    full_one, _ = read_full_model_state(one)
    full_four, args = read_full_model_state(four)
    assert args.tensor_model_parallel_size == 2 and args.padded_vocab_size == 1536
    assert list(full_one) == list(full_four)
    assert all(torch.equal(full_one[k], full_four[k]) for k in full_one)


# -- BERT ----------------------------------------------------------------------------------------

def _bert_inputs(b=3, s=POS):
    ids = _tokens(BERT_V, b, s, seed=2)
    types = torch.zeros(b, s, dtype=torch.long)
    types[:, s // 2:] = 1
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, s - 5:] = 0  # padding at the end of sample 1
    mask[2, s - 1:] = 0
    return ids, types, mask


@pytest.mark.parametrize("gelu,fields", [("gelu", {}),
                                         ("gelu_new", {"openai_gelu": True,
                                                       "bias_gelu_fusion": True})])
def test_bert_export_pretraining_logits_equal(tmp_path, gelu, fields):
    ours = bert_checkpoint(str(tmp_path / "ckpt"), **fields)
    out = str(tmp_path / "hf")
    assert convert_hf.export(str(tmp_path / "ckpt"), out, **QUIET) == "BertForPreTraining"
    hf = transformers.BertForPreTraining.from_pretrained(out).eval()
    assert hf.config.hidden_act == gelu
    ids, types, mask = _bert_inputs()
    with torch.no_grad():
        lm, binary = ours(ids, mask, types)
        got = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    assert hf.config.vocab_size == BERT_OURS
    lm_diff = _max_diff(lm[..., :BERT_OURS][real], got.prediction_logits[real])
    nsp_diff = _max_diff(binary, got.seq_relationship_logits)
    assert lm_diff < TOL and nsp_diff < TOL, (lm_diff, nsp_diff)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    from megatron.tokenizer import build_tokenizer

    mine = build_tokenizer("BertWordPieceLowerCase", vocab_file=BERT_VOCAB)
    assert len(tok) == BERT_OURS and tok.convert_ids_to_tokens(mine.eod) == "[EOS]"
    assert tok("Hello world the", add_special_tokens=False)["input_ids"] == \
        mine.tokenize("Hello world the")


def _hf_bert(out, cls="BertForPreTraining", act="gelu", seed=4, lower=True):
    config = transformers.BertConfig(vocab_size=BERT_V, hidden_size=H, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=4 * H,
                                     max_position_embeddings=POS, hidden_act=act)
    model = getattr(transformers, cls)(config)
    _randomize(model, seed)
    model.save_pretrained(out)
    shutil.copyfile(BERT_VOCAB, os.path.join(out, "vocab.txt"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": lower, "tokenizer_class": "BertTokenizer"}, f)
    return model.eval()


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_bert_import_pretraining_logits_equal(tmp_path, act):
    hf = _hf_bert(str(tmp_path / "hf"), act=act)
    save = str(tmp_path / "ckpt")
    args = convert_hf.import_(str(tmp_path / "hf"), save, make_divisible=64, **QUIET)
    assert args.apply_residual_connection_post_layernorm and args.layernorm_epsilon == 1e-12
    assert args.tokenizer_type == "BertWordPieceLowerCase" and args.bert_binary_head
    ours, _ = _load_imported(save, "bert")
    ids, types, mask = _bert_inputs()
    with torch.no_grad():
        lm, binary = ours(ids, mask, types)
        got = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    assert _max_diff(lm[..., :BERT_V][real], got.prediction_logits[real]) < TOL
    assert _max_diff(binary, got.seq_relationship_logits) < TOL


def test_bert_masked_lm_and_bert_model_import(tmp_path):
    """BertForMaskedLM: encoder + LM head (token types kept); BertModel: encoder + pooler."""
    ids, types, mask = _bert_inputs()
    hf = _hf_bert(str(tmp_path / "mlm"), cls="BertForMaskedLM")
    convert_hf.import_(str(tmp_path / "mlm"), str(tmp_path / "a"), make_divisible=64, **QUIET)
    full, args = read_full_model_state(str(tmp_path / "a"))
    assert not args.bert_binary_head and "lm_head.bias" in full
    ours, _ = _load_imported(str(tmp_path / "a"), "bert")
    with torch.no_grad():
        lm, _ = ours(ids, mask, types)
        want = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
    assert _max_diff(lm[..., :BERT_V][mask.bool()], want[mask.bool()]) < TOL
    hf = _hf_bert(str(tmp_path / "enc"), cls="BertModel")
    convert_hf.import_(str(tmp_path / "enc"), str(tmp_path / "b"), make_divisible=64, **QUIET)
    full, _ = read_full_model_state(str(tmp_path / "b"))
    assert "language_model.pooler.dense.weight" in full and "lm_head.bias" not in full
    convert_hf.export(str(tmp_path / "b"), str(tmp_path / "back"), **QUIET)
    again = transformers.BertModel.from_pretrained(str(tmp_path / "back")).eval()
    with torch.no_grad():
        want = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).pooler_output
        got = again(input_ids=ids, token_type_ids=types, attention_mask=mask).pooler_output
    assert _max_diff(want, got) < TOL


def _classifier_checkpoint(root, bert_root, head, rows, seed=5):
    """A finetuned classifier in this project's layout, built from a BERT checkpoint: the
    encoder and pooler, no pretraining heads, a random ``<head>.weight/bias``."""
    full, args = read_full_model_state(bert_root)
    state = {k: v for k, v in full.items() if not k.startswith(("lm_head.", "binary_head."))}
    g = torch.Generator().manual_seed(seed)
    state[f"{head}.weight"] = torch.randn(rows, H, generator=g) * 0.1
    state[f"{head}.bias"] = torch.randn(rows, generator=g) * 0.1
    atomic_torch_save({"args": args, "checkpoint_version": 3.0, "iteration": 7,
                       "model": megatron_model_state(state)}, checkpoint_file(root, 7))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("7")
    return state


def _our_pooled(bert, ids, types, mask):
    lm = bert.language_model
    hidden = lm(ids, bert.default_position_ids(ids), bert_attention_mask(mask),
                tokentype_ids=types)
    return lm.pooler(hidden)


def test_bert_classifier_exports_as_sequence_classification(tmp_path):
    bert = bert_checkpoint(str(tmp_path / "bert"), openai_gelu=True, bias_gelu_fusion=True)
    state = _classifier_checkpoint(str(tmp_path / "cls"), str(tmp_path / "bert"),
                                   "classification_head", 3)
    out = str(tmp_path / "hf")
    assert convert_hf.export(str(tmp_path / "cls"), out, **QUIET) == \
        "BertForSequenceClassification"
    hf = transformers.BertForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.num_labels == 3
    ids, types, mask = _bert_inputs()
    with torch.no_grad():
        want = torch.nn.functional.linear(_our_pooled(bert, ids, types, mask),
                                          state["classification_head.weight"],
                                          state["classification_head.bias"])
        got = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
    assert _max_diff(want, got) < TOL


def test_bert_multiple_choice_exports_as_multiple_choice(tmp_path):
    bert = bert_checkpoint(str(tmp_path / "bert"))
    state = _classifier_checkpoint(str(tmp_path / "mc"), str(tmp_path / "bert"),
                                   "multichoice_head", 1)
    out = str(tmp_path / "hf")
    assert convert_hf.export(str(tmp_path / "mc"), out, **QUIET) == "BertForMultipleChoice"
    hf = transformers.BertForMultipleChoice.from_pretrained(out).eval()
    ids, types, mask = _bert_inputs(b=4)
    with torch.no_grad():
        want = torch.nn.functional.linear(_our_pooled(bert, ids, types, mask),
                                          state["multichoice_head.weight"],
                                          state["multichoice_head.bias"]).view(2, 2)
        got = hf(input_ids=ids.view(2, 2, -1), token_type_ids=types.view(2, 2, -1),
                 attention_mask=mask.view(2, 2, -1)).logits
    assert _max_diff(want, got) < TOL


def test_bert_exports_what_hf_can_compute_only(tmp_path):
    bert_checkpoint(str(tmp_path / "pre_ln"), apply_residual_connection_post_layernorm=False)
    with pytest.raises(UserError, match="cannot be exported exactly: a pre-LayerNorm BERT"):
        convert_hf.export(str(tmp_path / "pre_ln"), str(tmp_path / "x"), **QUIET)
    # Megatron's default BERT: tanh (fused bias-GeLU) MLP, exact-GeLU LM head
    bert_checkpoint(str(tmp_path / "mixed"), bias_gelu_fusion=True)
    with pytest.raises(UserError, match="HF BERT's hidden_act sets both"):
        convert_hf.export(str(tmp_path / "mixed"), str(tmp_path / "x"), **QUIET)
    # ... whose classifier (no LM head) exports
    _classifier_checkpoint(str(tmp_path / "cls"), str(tmp_path / "mixed"),
                           "classification_head", 2)
    convert_hf.export(str(tmp_path / "cls"), str(tmp_path / "ok"), **QUIET)
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "ok")).hidden_act == \
        "gelu_new"
    assert not os.path.exists(str(tmp_path / "x"))


def test_through_the_finetuning_model_classes_if_present(tmp_path):
    """Through megatron/model/classification.py and multiple_choice.py (the tasks work) when
    they exist: their logits equal the exported HF models'."""
    try:
        from megatron.model.classification import Classification
        from megatron.model.multiple_choice import MultipleChoice
    except ImportError:
        pytest.skip("megatron/model/classification.py / multiple_choice.py are not there yet")
    bert_checkpoint(str(tmp_path / "bert"), openai_gelu=True, bias_gelu_fusion=True)
    _, args = read_full_model_state(str(tmp_path / "bert"))
    config = transformer_config_from_args(args, num_tokentypes=2, hidden_dropout=0.0,
                                          attention_dropout=0.0)
    ids, types, mask = _bert_inputs(b=4)
    for name, model, hf_class, shape in (
            ("classification_head", Classification(config, num_classes=3),
             "BertForSequenceClassification", (4, -1)),
            ("multichoice_head", MultipleChoice(config), "BertForMultipleChoice", (2, 2, -1))):
        root, out = str(tmp_path / name), str(tmp_path / f"{name}_hf")
        state = _classifier_checkpoint(root, str(tmp_path / "bert"), name,
                                       3 if name == "classification_head" else 1)
        load_pretrained_weights(root, model, **QUIET)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        convert_hf.export(root, out, **QUIET)
        hf = getattr(transformers, hf_class).from_pretrained(out).eval()
        with torch.no_grad():
            want = model.eval()(ids.view(shape), mask.view(shape), types.view(shape))
            got = hf(input_ids=ids.view(shape), token_type_ids=types.view(shape),
                     attention_mask=mask.view(shape)).logits
        assert _max_diff(want, got) < TOL, name


# -- the imported checkpoint generates and trains ------------------------------------------------

def test_imported_gpt2_generates_as_hf_does(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import generate_text
    from megatron.text_generation import generate

    hf = _hf_gpt(str(tmp_path / "hf"), positions=32).eval()
    save = str(tmp_path / "ckpt")
    convert_hf.import_(str(tmp_path / "hf"), save, make_divisible=64, **QUIET)
    model, args = generate_text.load_model(save)
    tok = generate_text.build_tokenizer_from_args(args)
    prompt = tok.tokenize("hello world")
    ours = generate(model, prompt, 8, greedy=True, eod=None, vocab_size=tok.vocab_size)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.eod, eos_token_id=None)[0].tolist()
    assert ours == theirs
    out = io.StringIO()
    generate_text.main(["--load", save, "--prompt", "hello world", "--greedy",
                        "--max-new-tokens", "8"], out=out)
    assert out.getvalue().splitlines()[1] == tok.detokenize(theirs)


@pytest.mark.slow
def test_imported_gpt2_finetunes_with_pretrain_gpt(tmp_path, data_prefix):
    _hf_gpt(str(tmp_path / "hf"), positions=32)
    save = str(tmp_path / "ckpt")
    convert_hf.import_(str(tmp_path / "hf"), save, make_divisible=64, **QUIET)
    result, logs = run(gpt_argv(data_prefix, "--load", save, "--finetune", iters=2))
    assert any(f"loaded model weights from {save}" in str(line) for line in logs)
    losses = [d["lm loss"] for _, d in result.train_losses]
    assert len(losses) >= 1 and all(torch.isfinite(torch.tensor(losses)))


def _losses(rank, world_size, argv):
    return [d["lm loss"] for _, d in run(argv)[0].train_losses]


@pytest.mark.slow
def test_import_for_tp2pp2_trains_as_tp1(tmp_path, data_prefix):
    """One HF GPT-2 imported for TP1 and for TP2 x PP2: a 4-process finetuning run loses
    exactly what the single-process one does."""
    _hf_gpt(str(tmp_path / "hf"), positions=32, layers=4)
    one, four = str(tmp_path / "tp1"), str(tmp_path / "tp2pp2")
    convert_hf.import_(str(tmp_path / "hf"), one, make_divisible=64, **QUIET)
    main = ["python", "tools/convert_hf.py", "import", "--input", str(tmp_path / "hf"),
            "--save", four, "--target-tensor-parallel-size", "2",
            "--target-pipeline-parallel-size", "2", "--make-vocab-size-divisible-by", "64"]
    proc = subprocess.run([sys.executable, *main[1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    def argv(load, *extra):
        return gpt_argv(data_prefix, "--num-layers", "4", "--micro-batch-size", "1",
                        "--hidden-dropout", "0", "--attention-dropout", "0", "--optimizer",
                        "sgd", "--lr", "0.05", "--eval-interval", "100", "--load", load,
                        "--finetune", *extra, iters=3)

    single = _losses(0, 1, argv(one))
    parallel = run_distributed(_losses, 4, args=(argv(four, "--tensor-model-parallel-size",
                                                      "2", "--pipeline-model-parallel-size",
                                                      "2"),), timeout=300)
    assert parallel[0] == pytest.approx(single, rel=1e-5)


# -- bad input -----------------------------------------------------------------------------------

def _one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        run_main(convert_hf.main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_import_bad_inputs_are_one_line(tmp_path, capsys):
    save = str(tmp_path / "out")

    def imp(path):
        return _one_line_error(capsys, ["import", "--input", str(path), "--save", save])

    assert "not a directory" in imp(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no config.json (not a Hugging Face model directory)" in imp(tmp_path / "empty")
    transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, vocab_size=100).save_pretrained(
        str(tmp_path / "llama"))
    assert "model_type 'llama' (no architectures) is not supported" in imp(tmp_path / "llama") \
        or "model_type 'llama' (LlamaForCausalLM) is not supported" in imp(tmp_path / "llama")
    bad = tmp_path / "bad_json"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert "config.json: malformed JSON" in imp(bad)
    _hf_gpt(str(tmp_path / "corrupt"))
    weights = tmp_path / "corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert f"cannot read {weights}" in imp(tmp_path / "corrupt")
    _hf_gpt(str(tmp_path / "relu"), act="relu")
    assert "activation_function 'relu'" in imp(tmp_path / "relu")
    _hf_gpt(str(tmp_path / "notok"))
    os.remove(tmp_path / "notok" / "merges.txt")
    assert "no merges.txt" in imp(tmp_path / "notok")
    assert not os.path.exists(save)


def test_import_tokenizer_that_does_not_belong_is_refused(tmp_path, capsys):
    _hf_bert(str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "vocab.txt", "a") as f:  # 1000 + 5 tokens for 1000 rows
        f.write("".join(f"[extra{i}]\n" for i in range(5)))
    err = _one_line_error(capsys, ["import", "--input", str(tmp_path / "hf"), "--save",
                                   str(tmp_path / "out")])
    assert "the tokenizer has 1005 tokens but config.json's vocab_size is 1000" in err
    # the weights disagree with config.json
    _hf_gpt(str(tmp_path / "gpt"))
    config = json.loads((tmp_path / "gpt" / "config.json").read_text())
    config["n_layer"] = 3
    (tmp_path / "gpt" / "config.json").write_text(json.dumps(config))
    err = _one_line_error(capsys, ["import", "--input", str(tmp_path / "gpt"), "--save",
                                   str(tmp_path / "out2")])
    assert "has no tensor transformer.h.2.ln_1.weight" in err


def test_export_bad_inputs_are_one_line(tmp_path, capsys):
    def exp(load, *extra):
        return _one_line_error(capsys, ["export", "--load", str(load), "--output",
                                        str(tmp_path / "hf"), *extra])

    assert "latest_checkpointed_iteration.txt" in exp(tmp_path / "nope")
    root = str(tmp_path / "ckpt")
    gpt_checkpoint(root)
    assert "no checkpoint of iteration 3" in exp(root, "--iteration", "3")
    # the tokenizer of another model: 1501 tokens, 1024 rows
    small = str(tmp_path / "small")
    args = _args(1024, **GPT_TOKENIZER)
    _save(small, _our_model(args, "gpt"), args)
    assert "1501 tokens" in exp(small) and "vocabulary of 1024" in exp(small)
    # args that do not describe the tensors
    mismatch = str(tmp_path / "mismatch")
    shutil.copytree(root, mismatch)
    path = checkpoint_file(mismatch, 5)
    ckpt = torch.load(path, weights_only=False)
    ckpt["args"].num_layers = 3
    torch.save(ckpt, path)
    assert "no tensor language_model.encoder.layers.2.input_layernorm.weight, which its args " \
        "(3 layers) describe" in exp(mismatch)
    with open(path, "r+b") as f:
        f.truncate(100)
    assert f"cannot read checkpoint {path}" in exp(mismatch)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "x").write_text("x")
    assert "exists and is not an empty directory" in exp(root)


@pytest.mark.slow
def test_command_line_round_trip(tmp_path):
    _hf_gpt(str(tmp_path / "hf"))
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    script = os.path.join(ROOT, "tools", "convert_hf.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for argv in (["import", "--input", str(tmp_path / "hf"), "--save", ckpt,
                  "--target-tensor-parallel-size", "2"],
                 ["export", "--load", ckpt, "--output", back]):
        proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, script, "import", "--input", str(tmp_path / "nope"),
                           "--save", ckpt], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    model = transformers.GPT2LMHeadModel.from_pretrained(back)
    original = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"))
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
