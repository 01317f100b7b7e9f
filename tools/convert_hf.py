"""Move GPT and BERT weights between Megatron checkpoints and Hugging Face transformers.

    python tools/convert_hf.py export --load CKPT --output HF_DIR [--iteration N]
        [--vocab-file F] [--merge-file F]
    python tools/convert_hf.py import --input HF_DIR --save CKPT
        [--target-tensor-parallel-size N] [--target-pipeline-parallel-size M]
        [--make-vocab-size-divisible-by 128]

export: a checkpoint of any TP/PP layout (``megatron.checkpoint_reshard``) -> a directory that
``from_pretrained(HF_DIR)`` and ``AutoTokenizer.from_pretrained(HF_DIR)`` load offline:
``config.json``, ``model.safetensors`` and the tokenizer files (GPT-2 BPE: ``vocab.json`` +
``merges.txt``; WordPiece: ``vocab.txt``), copied from the paths in the checkpoint's args or
given by --vocab-file/--merge-file. GPT -> ``GPT2LMHeadModel``; BERT -> ``BertForPreTraining``
(``BertForMaskedLM`` without the binary head, ``BertModel`` without the LM head), a classifier
(``classification_head``) -> ``BertForSequenceClassification``, a multiple-choice model
(``multichoice_head``) -> ``BertForMultipleChoice``.

import: ``GPT2LMHeadModel`` (or ``GPT2Model``), ``BertForPreTraining``, ``BertForMaskedLM`` or
``BertModel`` -> a Megatron checkpoint for any TP/PP layout, written as Megatron-LM's own
converters write one (``iter_0000001``, tracker ``1``, model only: load it with --finetune, or
resume with --no-load-optim --no-load-rng), with args that describe the model and the tokenizer
files copied next to it.

What maps to what (ours <- -> HF):

- the fused QKV projection, rows per head [q_j; k_j; v_j] (Megatron's checkpoint version 3)
  <-> GPT-2's ``c_attn`` ([q | k | v] columns of a Conv1D, i.e. a transposed nn.Linear) or
  BERT's ``query``/``key``/``value``; GPT-2's other Conv1D weights are transposed too;
- the vocabulary: Megatron pads it to a multiple of --make-vocab-size-divisible-by x TP; HF
  holds the tokenizer's exact size: export drops the padding rows, import appends zero rows;
- GeLU (``TransformerConfig.gelu_approximate``): the tanh approximation (Megatron's
  --openai-gelu or its default fused bias-GeLU) <-> ``gelu_new`` (also ``gelu_pytorch_tanh``,
  ``gelu_fast`` on import); the exact erf GeLU (--no-bias-gelu-fusion) <-> ``gelu``. BERT's LM
  head computes the tanh GeLU only with --openai-gelu, while HF's ``hidden_act`` sets both:
  a BERT whose MLP and LM head differ exports without its LM head only;
- HF BERT is post-LayerNorm: it maps to --apply-residual-connection-post-layernorm, whose
  layer i ``input_layernorm`` is BERT's embedding LayerNorm (i = 0) or layer i-1's output
  LayerNorm, and the final LayerNorm the last layer's. A pre-LN BERT, a post-LN GPT, rope,
  --kv-channels other than hidden/heads, or any HF option our model cannot compute are refused
  in one line, never converted approximately.
"""

import argparse
import json
import os
import shutil
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron.checkpoint_files import (ReadOptions, add_read_flags,  # noqa: E402
                                       read_checkpoint_file)
from megatron.checkpoint_reshard import (check_divisible, full_model,  # noqa: E402
                                         read_full_model_state, split_model)
from megatron.checkpointing import (CHECKPOINT_VERSION, TRACKER_FILENAME,  # noqa: E402
                                    atomic_torch_save, atomic_write_text, checkpoint_file,
                                    megatron_model_state, saved_model_config)
from megatron.errors import UserError, run_main  # noqa: E402

LM = "language_model."
ENC = "language_model.encoder."
EMB = "language_model.embedding."
IMPORT_ITERATION = 1  # Megatron-LM's HF loaders set md.iteration = 1
GPT_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
BERT_TOKENIZERS = {"BertWordPieceLowerCase": True, "BertWordPieceCase": False}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("tools/convert_hf.py needs the 'transformers' package "
                        "(pip install 'megatron-ltd[hf]')") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


# -- tensor transforms, each with its inverse ---------------------------------------------------

def qkv_to_parts(fused, heads):
    """Our fused QKV rows, per head [q_j; k_j; v_j], -> (q, k, v), each head-major rows."""
    rest = fused.shape[1:]
    per_head = fused.reshape(heads, 3, fused.shape[0] // (3 * heads), *rest)
    return tuple(per_head[:, j].reshape(-1, *rest) for j in range(3))


def parts_to_qkv(q, k, v, heads):
    """(q, k, v) head-major rows -> our fused per-head [q_j; k_j; v_j] rows."""
    rest = q.shape[1:]
    stacked = torch.stack([t.reshape(heads, -1, *rest) for t in (q, k, v)], dim=1)
    return stacked.reshape(-1, *rest)


def _copy(tensors, ctx):
    return tensors[0]


def _transpose(tensors, ctx):
    return tensors[0].t()


# Each kind: (ours -> [HF tensors], [HF tensors] -> ours).
KINDS = {
    "copy": (lambda t, ctx: [t], _copy),
    "conv": (lambda t, ctx: [t.t()], _transpose),  # GPT-2's Conv1D holds W^T
    "qkv": (lambda t, ctx: list(qkv_to_parts(t, ctx["heads"])),
            lambda ts, ctx: parts_to_qkv(*ts, ctx["heads"])),
    "qkv_conv": (lambda t, ctx: [torch.cat(qkv_to_parts(t, ctx["heads"])).t()],
                 lambda ts, ctx: parts_to_qkv(*ts[0].t().chunk(3), ctx["heads"])),
    "qkv_bias": (lambda t, ctx: [torch.cat(qkv_to_parts(t, ctx["heads"]))],
                 lambda ts, ctx: parts_to_qkv(*ts[0].chunk(3), ctx["heads"])),
    "vocab": (lambda t, ctx: [t[:ctx["vocab"]]], lambda ts, ctx: _pad_rows(ts[0], ctx["padded"])),
}


def _pad_rows(tensor, rows):
    """Zero rows appended up to ``rows`` (Megatron's vocabulary padding)."""
    if tensor.shape[0] >= rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))])


# -- name maps: [(our name, (HF names...), kind)] -------------------------------------------------

def _layer_norm(ours, hf):
    return [(f"{ours}.weight", (f"{hf}.weight",), "copy"), (f"{ours}.bias", (f"{hf}.bias",), "copy")]


def _linear(ours, hf, kind="copy"):
    return [(f"{ours}.weight", (f"{hf}.weight",), kind), (f"{ours}.bias", (f"{hf}.bias",), "copy")]


def gpt_rules(num_layers, tied):
    """GPT <-> GPT2LMHeadModel (HF names with the ``transformer.`` prefix)."""
    rules = [(f"{EMB}word_embeddings.weight", ("transformer.wte.weight",), "vocab"),
             (f"{EMB}position_embeddings.weight", ("transformer.wpe.weight",), "copy")]
    for i in range(num_layers):
        ours, hf = f"{ENC}layers.{i}.", f"transformer.h.{i}."
        rules += _layer_norm(ours + "input_layernorm", hf + "ln_1")
        rules += [(ours + "self_attention.query_key_value.weight", (hf + "attn.c_attn.weight",),
                   "qkv_conv"),
                  (ours + "self_attention.query_key_value.bias", (hf + "attn.c_attn.bias",),
                   "qkv_bias")]
        rules += _linear(ours + "self_attention.dense", hf + "attn.c_proj", "conv")
        rules += _layer_norm(ours + "post_attention_layernorm", hf + "ln_2")
        rules += _linear(ours + "mlp.dense_h_to_4h", hf + "mlp.c_fc", "conv")
        rules += _linear(ours + "mlp.dense_4h_to_h", hf + "mlp.c_proj", "conv")
    rules += _layer_norm(f"{ENC}final_layernorm", "transformer.ln_f")
    if not tied:
        rules.append((f"{LM}output_layer.weight", ("lm_head.weight",), "vocab"))
    return rules


def bert_rules(num_layers, prefix, heads):
    """BERT (post-LN) <-> HF BERT; ``prefix``: ``bert.`` for the models with heads, '' for
    BertModel; ``heads``: the subset of 'pooler', 'lm', 'binary', 'classifier'."""
    p = prefix
    rules = [(f"{EMB}word_embeddings.weight", (f"{p}embeddings.word_embeddings.weight",),
              "vocab"),
             (f"{EMB}position_embeddings.weight", (f"{p}embeddings.position_embeddings.weight",),
              "copy"),
             (f"{EMB}tokentype_embeddings.weight",
              (f"{p}embeddings.token_type_embeddings.weight",), "copy")]
    rules += _layer_norm(f"{ENC}layers.0.input_layernorm", f"{p}embeddings.LayerNorm")
    for i in range(num_layers):
        ours, hf = f"{ENC}layers.{i}.", f"{p}encoder.layer.{i}."
        rules += [(ours + f"self_attention.query_key_value.{w}",
                   tuple(f"{hf}attention.self.{n}.{w}" for n in ("query", "key", "value")),
                   "qkv") for w in ("weight", "bias")]
        rules += _linear(ours + "self_attention.dense", hf + "attention.output.dense")
        rules += _layer_norm(ours + "post_attention_layernorm", hf + "attention.output.LayerNorm")
        rules += _linear(ours + "mlp.dense_h_to_4h", hf + "intermediate.dense")
        rules += _linear(ours + "mlp.dense_4h_to_h", hf + "output.dense")
        after = f"{ENC}layers.{i + 1}.input_layernorm" if i + 1 < num_layers \
            else f"{ENC}final_layernorm"
        rules += _layer_norm(after, hf + "output.LayerNorm")
    if "pooler" in heads:
        rules += _linear(f"{LM}pooler.dense", f"{p}pooler.dense")
    if "lm" in heads:
        rules += _linear("lm_head.dense", "cls.predictions.transform.dense")
        rules += _layer_norm("lm_head.layernorm", "cls.predictions.transform.LayerNorm")
        rules.append(("lm_head.bias", ("cls.predictions.bias",), "vocab"))
    if "binary" in heads:
        rules += _linear("binary_head", "cls.seq_relationship")
    if "classifier" in heads:
        rules += _linear(heads["classifier"], "classifier")
    return rules


def to_hf(full, rules, ctx):
    """Our full state -> HF state dict by ``rules``."""
    out = {}
    for ours, hf_names, kind in rules:
        for name, tensor in zip(hf_names, KINDS[kind][0](full[ours], ctx)):
            out[name] = tensor.contiguous()
    return out


def from_hf(hf, rules, ctx, where):
    """HF state dict -> our full state by ``rules``; a tensor the rules need and the file lacks
    is a one-line UserError naming ``where``."""
    out = {}
    for ours, hf_names, kind in rules:
        missing = [n for n in hf_names if n not in hf]
        if missing:
            raise UserError(f"{where} has no tensor {missing[0]} (its config.json describes a "
                            "model that has one)")
        out[ours] = KINDS[kind][1]([hf[n] for n in hf_names], ctx).contiguous()
    return out


# -- export ------------------------------------------------------------------------------------

BERT_HEAD_KEYS = ("lm_head.", "binary_head.", "classification_head.", "multichoice_head.",
                  f"{LM}pooler.", f"{EMB}tokentype_embeddings.")


def model_family(full):
    """'bert' when the state holds any of BERT's parts (heads, pooler, token types), else
    'gpt' (the causal model is not written in the weights)."""
    return "bert" if any(n.startswith(BERT_HEAD_KEYS) for n in full) else "gpt"


def _refuse_unexportable(config, family, load):
    """Architectures Hugging Face's GPT-2/BERT cannot compute: one line each."""
    problems = []
    if config.position_embedding_type != "learned_absolute":
        problems.append(f"--position-embedding-type {config.position_embedding_type} (HF "
                        f"{'GPT-2' if family == 'gpt' else 'BERT'} has learned absolute "
                        "positions)")
    if config.kv_channels * config.num_attention_heads != config.hidden_size:
        problems.append(f"--kv-channels {config.kv_channels} x {config.num_attention_heads} "
                        f"heads != --hidden-size {config.hidden_size}")
    post_ln = config.apply_residual_connection_post_layernorm
    if family == "gpt" and post_ln:
        problems.append("--apply-residual-connection-post-layernorm (GPT-2 is pre-LayerNorm)")
    if family == "bert" and not post_ln:
        problems.append("a pre-LayerNorm BERT (HF BERT is post-LayerNorm: only checkpoints "
                        "trained with --apply-residual-connection-post-layernorm export)")
    if family == "bert" and config.untie_embeddings_and_output_weights:
        problems.append("--untie-embeddings-and-output-weights (HF BERT ties the LM head)")
    if problems:
        raise UserError(f"--load {load}: cannot be exported exactly: {'; '.join(problems)}")


def _export_tokenizer(args, vocab_file, merge_file, padded, load):
    """(our tokenizer, {file name in HF_DIR: text}, tokenizer_config.json entries). WordPiece:
    the vocab file plus the tokens our tokenizer appends to it ([BOS], [EOS], as Megatron's),
    so that ids agree on both sides."""
    from tools.generate_text import build_tokenizer_from_args

    kind = getattr(args, "tokenizer_type", None)
    if kind != "GPT2BPETokenizer" and kind not in BERT_TOKENIZERS:
        raise UserError(f"--load {load}: tokenizer type {kind!r}: export writes GPT-2 BPE "
                        "(GPT2BPETokenizer) and WordPiece (BertWordPieceLowerCase/Case) "
                        "tokenizers only")
    tok = build_tokenizer_from_args(args, vocab_file, merge_file)
    vocab_file = vocab_file or args.vocab_file
    if kind == "GPT2BPETokenizer":
        eod = tok.inv_vocab[tok.eod]
        files = {"vocab.json": _read(vocab_file), "merges.txt": _read(merge_file or
                                                                      args.merge_file)}
        settings = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eod, "eos_token": eod,
                    "unk_token": eod}
    else:
        lines = bert_vocab_lines(vocab_file)
        lines += [tok.inv_vocab[i] for i in range(len(lines), tok.vocab_size)]
        files = {"vocab.txt": "".join(f"{line}\n" for line in lines)}
        settings = {"tokenizer_class": "BertTokenizer",
                    "do_lower_case": BERT_TOKENIZERS[kind]}
    if tok.vocab_size > padded:  # build_tokenizer_from_args checks the args' size only
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the checkpoint {load} "
                        f"has {padded} vocabulary rows: the tokenizer files do not belong to it")
    return tok, files, settings


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def bert_vocab_lines(path):
    """The tokens of a WordPiece vocab.txt, one per line (HF's and our ids: line numbers)."""
    lines = _read(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


def _gpt_hf_config(transformers, config, args, tok):
    eod = tok.eod
    return transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=config.max_position_embeddings,
        n_embd=config.hidden_size, n_layer=config.num_layers, n_head=config.num_attention_heads,
        n_inner=config.ffn_hidden_size,
        activation_function="gelu_new" if config.gelu_approximate == "tanh" else "gelu",
        layer_norm_epsilon=config.layernorm_epsilon,
        resid_pdrop=getattr(args, "hidden_dropout", 0.1),
        embd_pdrop=getattr(args, "hidden_dropout", 0.1),
        attn_pdrop=getattr(args, "attention_dropout", 0.1),
        initializer_range=config.init_method_std, bos_token_id=eod, eos_token_id=eod,
        tie_word_embeddings=not config.untie_embeddings_and_output_weights)


def _bert_hf_config(transformers, config, args, tok, num_labels=None):
    extra = {"num_labels": num_labels} if num_labels else {}
    return transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        intermediate_size=config.ffn_hidden_size,
        hidden_act="gelu_new" if config.gelu_approximate == "tanh" else "gelu",
        hidden_dropout_prob=getattr(args, "hidden_dropout", 0.1),
        attention_probs_dropout_prob=getattr(args, "attention_dropout", 0.1),
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=2,
        initializer_range=config.init_method_std, layer_norm_eps=config.layernorm_epsilon,
        pad_token_id=tok.pad, **extra)


def _bert_export_plan(full, config, load, log):
    """(HF class name, rules' heads, HF prefix, num_labels, our names left out) of a BERT."""
    if "classification_head.weight" in full:
        plan = ("BertForSequenceClassification", {"pooler": 1, "classifier":
                "classification_head"}, full["classification_head.weight"].shape[0])
    elif "multichoice_head.weight" in full:
        plan = ("BertForMultipleChoice", {"pooler": 1, "classifier": "multichoice_head"}, None)
    elif "lm_head.bias" in full:
        if config.gelu_approximate != config.lm_head_gelu_approximate:
            raise UserError(
                f"--load {load}: its MLP computes the tanh-approximate GeLU (Megatron's fused "
                "bias-GeLU) and its LM head the exact GeLU (Megatron's BertLMHead without "
                "--openai-gelu); HF BERT's hidden_act sets both, so the masked-LM model cannot "
                "be exported exactly (train with --openai-gelu or --no-bias-gelu-fusion)")
        binary = "binary_head.weight" in full
        plan = (("BertForPreTraining", {"pooler": 1, "lm": 1, "binary": 1}, None) if binary
                else ("BertForMaskedLM", {"lm": 1}, None))
    elif f"{LM}pooler.dense.weight" in full:
        plan = ("BertModel", {"pooler": 1}, None)
    else:
        raise UserError(f"--load {load}: a BERT without LM head, pooler or classifier: "
                        "nothing Hugging Face's BERT classes hold")
    cls, heads, num_labels = plan
    dropped = [n for n in full if n.startswith(("lm_head.", "binary_head."))
               and "classifier" in heads]
    if dropped:
        log(f"  {cls}: leaving out the pretraining heads the classifier checkpoint still holds "
            f"({len(dropped)} tensors of lm_head / binary_head)")
    return cls, heads, ("" if cls == "BertModel" else "bert."), num_labels, dropped


def _with_zero_biases(full, h, family):
    """Zero biases for the projections of a --disable-bias-linear model (HF's always have
    them), and zero token-type embeddings for a BERT without them (type ids then add
    nothing, as in our model)."""
    out = dict(full)
    for name, tensor in full.items():
        for proj in ("query_key_value", "self_attention.dense", "dense_h_to_4h",
                     "dense_4h_to_h"):
            if name.endswith(f"{proj}.weight") and name[:-6] + "bias" not in full:
                out[name[:-6] + "bias"] = tensor.new_zeros(tensor.shape[0])
    tokentypes = f"{EMB}tokentype_embeddings.weight"
    if family == "bert" and tokentypes not in out:
        out[tokentypes] = full[f"{EMB}word_embeddings.weight"].new_zeros(2, h)
    return out


def _check_consumed(full, rules, ignored, load, config):
    """Every tensor of the checkpoint must be exported (or named as left out)."""
    used = {ours for ours, _, _ in rules} | set(ignored)
    extra = [n for n in full if n not in used]
    if extra:
        raise UserError(f"--load {load}: {len(extra)} tensors that its args "
                        f"({config.num_layers} layers) do not describe, e.g. {extra[0]}")
    missing = [ours for ours, _, _ in rules if ours not in full]
    if missing:
        raise UserError(f"--load {load}: no tensor {missing[0]}, which its args "
                        f"({config.num_layers} layers) describe")


def _check_shapes(hf_state, model, load):
    own = model.state_dict()
    for name, tensor in hf_state.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise UserError(f"--load {load}: {name} has shape {tuple(tensor.shape)} but its "
                            f"args describe {tuple(own[name].shape)}")


def export(load, output, iteration=None, vocab_file=None, merge_file=None, log=print,
           reading=ReadOptions()):
    """Write the HF directory ``output`` from the Megatron checkpoint ``load`` (read as
    ``reading`` says); returns the HF class name."""
    transformers = _transformers()
    _check_output_dir(output)
    full, args = read_full_model_state(load, iteration, flag="--load", reading=reading)
    config, _ = saved_model_config(args, load)
    if config is None:
        raise UserError(f"--load {load}: its args do not describe a GPT or BERT model "
                        "(num_layers, hidden_size, num_attention_heads)")
    family = model_family(full)
    _refuse_unexportable(config, family, load)
    padded = full[f"{EMB}word_embeddings.weight"].shape[0] \
        if f"{EMB}word_embeddings.weight" in full else config.padded_vocab_size
    tok, files, tok_settings = _export_tokenizer(args, vocab_file, merge_file, padded, load)
    ctx = {"heads": config.num_attention_heads, "vocab": tok.vocab_size}
    if family == "gpt":
        cls_name, ignored = "GPT2LMHeadModel", []
        rules = gpt_rules(config.num_layers, not config.untie_embeddings_and_output_weights)
        hf_config = _gpt_hf_config(transformers, config, args, tok)
    else:
        cls_name, heads, prefix, num_labels, ignored = _bert_export_plan(full, config, load, log)
        rules = bert_rules(config.num_layers, prefix, heads)
        hf_config = _bert_hf_config(transformers, config, args, tok, num_labels)
    hf_config.architectures = [cls_name]
    full = _with_zero_biases(full, config.hidden_size, family)
    _check_consumed(full, rules, ignored, load, config)
    hf_state = to_hf(full, rules, ctx)
    model = getattr(transformers, cls_name)(hf_config)
    _check_shapes(hf_state, model, load)
    _load_tied(model, hf_state, load)
    dtype = full[f"{EMB}word_embeddings.weight"].dtype
    if dtype in (torch.float16, torch.bfloat16):
        model = model.to(dtype)
    tok_settings["model_max_length"] = config.max_position_embeddings
    _write_hf_dir(model, files, tok_settings, output, tok.vocab_size, transformers)
    log(f"exported {load} ({family.upper()}, {config.num_layers} layers, vocabulary "
        f"{tok.vocab_size} of {padded} rows) to {output} as {cls_name}")
    return cls_name


def _load_tied(model, hf_state, load):
    """Load ``hf_state`` into the HF model; the tied LM-head weights (and BERT's decoder bias,
    the same tensor as ``cls.predictions.bias``) come from what they are tied to."""
    own = model.state_dict()
    state = dict(hf_state)
    tied = {"lm_head.weight": "transformer.wte.weight",
            "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias"}
    for name, source in tied.items():
        if name in own and name not in state:
            state[name] = state[source]
    missing = sorted(set(own) - set(state))
    if missing:
        raise UserError(f"--load {load}: nothing in it maps to Hugging Face's {missing[0]}")
    model.load_state_dict(state, strict=True)


def _check_output_dir(output):
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise UserError(f"--output {output}: exists and is not an empty directory")


def _write_hf_dir(model, files, tok_settings, output, vocab_size, transformers):
    """save_pretrained + tokenizer files into a temporary directory renamed to ``output`` when
    complete; the tokenizer must load with AutoTokenizer and count ``vocab_size`` tokens."""
    tmp = f"{output.rstrip(os.sep)}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(tok_settings, f, indent=2)
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp)
        if len(hf_tok) != vocab_size:
            raise UserError(f"--output {output}: Hugging Face reads {len(hf_tok)} tokens from "
                            f"the tokenizer files, this checkpoint's tokenizer {vocab_size}")
        if os.path.isdir(output):
            os.rmdir(output)  # empty (checked first)
        os.replace(tmp, output)
    except OSError as err:
        raise UserError(f"--output {output}: cannot write: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- import ------------------------------------------------------------------------------------

SUPPORTED_IMPORTS = {"GPT2LMHeadModel": "gpt", "GPT2Model": "gpt",
                     "BertForPreTraining": "bert", "BertForMaskedLM": "bert", "BertModel": "bert"}
IGNORED_HF = (".attn.bias", ".attn.masked_bias", "embeddings.position_ids")


def read_hf_config(directory):
    """(raw config.json dict, the architecture class name)."""
    if not os.path.isdir(directory):
        raise UserError(f"--input {directory}: not a directory")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"--input {directory}: no config.json (not a Hugging Face model "
                        "directory)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else {"gpt2": "GPT2LMHeadModel", "bert": "BertForPreTraining"}.get(
        raw.get("model_type"))
    if arch not in SUPPORTED_IMPORTS:
        raise UserError(f"{path}: model_type {raw.get('model_type')!r} "
                        f"({arch or 'no architectures'}) is not supported: import reads "
                        f"{', '.join(SUPPORTED_IMPORTS)}")
    return raw, arch


def read_hf_weights(directory, reading=ReadOptions()):
    """{name: tensor} of ``model.safetensors`` (or its shards, or ``pytorch_model.bin``, read
    as a Megatron checkpoint file: verified, unpickled with the allowlist unless ``reading``
    says otherwise), names without the ``transformer.``/``bert.`` prefix and with legacy
    ``gamma``/``beta`` as ``weight``/``bias``."""
    from safetensors.torch import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    legacy = os.path.join(directory, "pytorch_model.bin")
    state = {}
    if os.path.isfile(single):
        paths = [single]
    elif os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{index}: malformed index ({err})") from None
        paths = [os.path.join(directory, s) for s in shards]
    elif os.path.isfile(legacy):
        paths = [legacy]
    else:
        raise UserError(f"--input {directory}: no model.safetensors (or pytorch_model.bin)")
    for path in paths:
        if path.endswith(".bin"):
            part = read_checkpoint_file(path, reading)
            if not isinstance(part, dict):
                raise UserError(f"{path}: expected a dict of tensors, found a "
                                f"{type(part).__name__}")
            state.update(part)
            continue
        try:
            part = load_file(path)
        except Exception as err:  # safetensors/torch report damage in many ways
            text = str(err).strip().splitlines()
            raise UserError(f"cannot read {path}: {type(err).__name__}: "
                            f"{text[0] if text else 'unreadable'}") from None
        state.update(part)
    return {_normalise_hf_name(n): t for n, t in state.items()}


def _normalise_hf_name(name):
    for legacy, new in ((".gamma", ".weight"), (".beta", ".bias")):
        if name.endswith(legacy) and "LayerNorm" in name:
            name = name[: -len(legacy)] + new
    return name


def _refuse(path, problems):
    if problems:
        raise UserError(f"{path}: not convertible exactly: {'; '.join(problems)}")


def _gpt_settings(raw, path, transformers):
    """Our args and mapping settings for a GPT-2 config."""
    c = transformers.GPT2Config.from_dict(raw)
    act = c.activation_function
    problems = []
    if act not in GPT_TANH + ("gelu",):
        problems.append(f"activation_function {act!r} (this model computes gelu_new or gelu)")
    if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
        problems.append("attention scaling other than 1/sqrt(head size)")
    if c.add_cross_attention:
        problems.append("add_cross_attention")
    if c.n_embd % c.n_head:
        problems.append(f"n_embd {c.n_embd} not divisible by n_head {c.n_head}")
    _refuse(path, problems)
    tanh = act in GPT_TANH
    return c, dict(
        num_layers=c.n_layer, hidden_size=c.n_embd, num_attention_heads=c.n_head,
        ffn_hidden_size=c.n_inner or 4 * c.n_embd, max_position_embeddings=c.n_positions,
        layernorm_epsilon=c.layer_norm_epsilon, openai_gelu=tanh, bias_gelu_fusion=tanh,
        untie_embeddings_and_output_weights=not c.tie_word_embeddings,
        hidden_dropout=c.resid_pdrop, attention_dropout=c.attn_pdrop,
        init_method_std=c.initializer_range, tokenizer_type="GPT2BPETokenizer")


def _bert_settings(raw, path, transformers, directory):
    c = transformers.BertConfig.from_dict(raw)
    act = c.hidden_act
    problems = []
    if raw.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {raw['position_embedding_type']!r}")
    if not isinstance(act, str) or act not in GPT_TANH + ("gelu",):
        problems.append(f"hidden_act {act!r} (this model computes gelu or gelu_new)")
    if c.is_decoder or c.add_cross_attention:
        problems.append("a decoder (is_decoder / add_cross_attention)")
    if c.type_vocab_size != 2:
        problems.append(f"type_vocab_size {c.type_vocab_size} (Megatron's BERT has 2 token "
                        "types)")
    if c.hidden_size % c.num_attention_heads:
        problems.append("hidden_size not divisible by num_attention_heads")
    _refuse(path, problems)
    tanh = act in GPT_TANH
    lower = _bert_lower_case(directory)
    return c, dict(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads, ffn_hidden_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, layernorm_epsilon=c.layer_norm_eps,
        openai_gelu=tanh, bias_gelu_fusion=tanh,
        apply_residual_connection_post_layernorm=True, hidden_dropout=c.hidden_dropout_prob,
        attention_dropout=c.attention_probs_dropout_prob, init_method_std=c.initializer_range,
        tokenizer_type="BertWordPieceLowerCase" if lower else "BertWordPieceCase")


def _bert_lower_case(directory):
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return True  # BertTokenizer's default
    try:
        with open(path) as f:
            return bool(json.load(f).get("do_lower_case", True))
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(f"{path}: malformed JSON ({err})") from None


def _import_tokenizer(directory, family, settings, make_divisible, tp):
    """(our tokenizer built from the HF directory's files, their names, args entries: the
    padded vocabulary)."""
    from megatron.tokenizer import build_tokenizer, vocab_size_with_padding

    names = ["vocab.json", "merges.txt"] if family == "gpt" else ["vocab.txt"]
    missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise UserError(f"--input {directory}: no {' / '.join(missing)} (the "
                        f"{'GPT-2 BPE' if family == 'gpt' else 'WordPiece'} tokenizer files "
                        "the checkpoint needs)")
    paths = [os.path.join(directory, n) for n in names]
    tok = build_tokenizer(settings["tokenizer_type"], vocab_file=paths[0],
                          merge_file=paths[1] if family == "gpt" else None)
    # ids the files give (HF's tokenizer); ours may append [BOS]/[EOS] to a WordPiece vocab
    file_tokens = tok.vocab_size if family == "gpt" else len(bert_vocab_lines(paths[0]))
    entries = {"make_vocab_size_divisible_by": make_divisible,
               "padded_vocab_size": vocab_size_with_padding(tok.vocab_size, make_divisible, tp)}
    return tok, file_tokens, names, entries


def _copy_tokenizer(directory, names, save):
    """Copy the tokenizer files next to the checkpoint: {args field: absolute path}."""
    os.makedirs(save, exist_ok=True)
    copies = [_copy_atomic(os.path.join(directory, n), os.path.join(save, n)) for n in names]
    return {"vocab_file": copies[0], "merge_file": copies[1] if len(copies) > 1 else None}


def _copy_atomic(source, target):
    tmp = f"{target}.tmp.{os.getpid()}"
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except OSError as err:
        raise UserError(f"cannot write {target}: {err.strerror or err}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.abspath(target)


def _check_vocab(hf_vocab, file_tokens, tok, padded, directory):
    """The HF embedding rows must hold every token id of the tokenizer files and fit the
    padded vocabulary (rows beyond them, e.g. for the [BOS]/[EOS] our WordPiece tokenizer
    appends, are zero padding)."""
    if file_tokens > hf_vocab:
        raise UserError(f"--input {directory}: the tokenizer has {file_tokens} tokens but "
                        f"config.json's vocab_size is {hf_vocab}: the tokenizer files do not "
                        "belong to this model")
    if hf_vocab > padded:
        raise UserError(f"--input {directory}: config.json's vocab_size {hf_vocab} exceeds the "
                        f"{tok.vocab_size} tokenizer tokens padded to {padded}; pass a larger "
                        "--make-vocab-size-divisible-by")


def _hf_rules(family, arch, settings):
    if family == "gpt":
        rules = gpt_rules(settings["num_layers"],
                          not settings["untie_embeddings_and_output_weights"])
        return [(o, tuple(n[len("transformer."):] if arch == "GPT2Model" else n
                          for n in names), k) for o, names, k in rules]
    heads = {"BertForPreTraining": {"pooler": 1, "lm": 1, "binary": 1},
             "BertForMaskedLM": {"lm": 1}, "BertModel": {"pooler": 1}}[arch]
    return bert_rules(settings["num_layers"], "" if arch == "BertModel" else "bert.", heads)


def _strip_gpt_prefix(hf, arch):
    """GPT-2 files saved from GPT2Model (the hub's ``gpt2``) lack ``transformer.``."""
    if arch == "GPT2Model" or any(n.startswith("transformer.") for n in hf):
        return hf
    return {(n if n == "lm_head.weight" else f"transformer.{n}"): t for n, t in hf.items()}


def _check_tied(hf, family, untied, path):
    """Our BERT ties the LM head to the word embeddings; so does a tied GPT-2."""
    pairs = [("lm_head.weight", "transformer.wte.weight")] if family == "gpt" and not untied \
        else [("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")]
    for head, emb in pairs:
        if head in hf and emb in hf and not torch.equal(hf[head], hf[emb]):
            raise UserError(f"{path}: {head} differs from {emb}, but this model ties them")


def import_(directory, save, target_tp=1, target_pp=1, make_divisible=128, log=print,
            reading=ReadOptions()):
    """Write a Megatron checkpoint of ``target_tp`` x ``target_pp`` to ``save`` from the HF
    directory ``directory``; returns the checkpoint's args."""
    from megatron.arguments import flag_defaults

    transformers = _transformers()
    if target_tp < 1 or target_pp < 1 or make_divisible < 1:
        raise UserError("--target-tensor-parallel-size, --target-pipeline-parallel-size and "
                        "--make-vocab-size-divisible-by must be >= 1")
    if os.path.exists(os.path.join(save, TRACKER_FILENAME)):
        raise UserError(f"--save {save}: already holds a checkpoint")
    raw, arch = read_hf_config(directory)
    family = SUPPORTED_IMPORTS[arch]
    path = os.path.join(directory, "config.json")
    if family == "gpt":
        hf_config, settings = _gpt_settings(raw, path, transformers)
    else:
        hf_config, settings = _bert_settings(raw, path, transformers, directory)
    hf = read_hf_weights(directory, reading)
    if family == "gpt":
        hf = _strip_gpt_prefix(hf, arch)
    _check_tied(hf, family, settings.get("untie_embeddings_and_output_weights"), directory)
    check_divisible({"order": [], "model": {}, "num_layers": settings["num_layers"]},
                    settings["num_attention_heads"], target_tp, target_pp)
    tok, file_tokens, names, files = _import_tokenizer(directory, family, settings,
                                                       make_divisible, target_tp)
    _check_vocab(hf_config.vocab_size, file_tokens, tok, files["padded_vocab_size"], directory)
    rules = _hf_rules(family, arch, settings)
    ctx = {"heads": settings["num_attention_heads"], "padded": files["padded_vocab_size"]}
    full = from_hf(hf, rules, ctx, directory)
    _check_unused(hf, rules, directory)
    args = argparse.Namespace(**{
        **flag_defaults(), **settings, **files, "seq_length": settings["max_position_embeddings"],
        "position_embedding_type": "learned_absolute",
        "bert_binary_head": arch == "BertForPreTraining",
        "tensor_model_parallel_size": target_tp, "pipeline_model_parallel_size": target_pp,
        "iteration": IMPORT_ITERATION, "consumed_train_samples": 0,
        "consumed_valid_samples": 0, "consumed_train_tokens": 0})
    _check_against_our_model(full, args, family, arch, directory)
    vars(args).update(_copy_tokenizer(directory, names, save))
    _write_checkpoint(full, args, save, target_tp, target_pp)
    log(f"imported {directory} ({arch}, {settings['num_layers']} layers, vocabulary "
        f"{tok.vocab_size} padded to {files['padded_vocab_size']}) to {save} as TP {target_tp} "
        f"x PP {target_pp}, iteration {IMPORT_ITERATION} (model only: load with --finetune)")
    return args


def _check_unused(hf, rules, directory):
    used = {n for _, names, _ in rules for n in names}
    tied = ("lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
    extra = [n for n in hf if n not in used and n not in tied and not n.endswith(IGNORED_HF)]
    if extra:
        raise UserError(f"--input {directory}: {len(extra)} tensors its config.json does not "
                        f"describe or this converter does not map, e.g. {extra[0]}")


def _check_against_our_model(full, args, family, arch, directory):
    """Build our model from the args and load the converted state strictly: names and shapes
    must match what the args describe (a one-line UserError otherwise)."""
    from megatron.arguments import transformer_config_from_args
    from megatron.model import BertModel, GPTModel
    from megatron.model.module import load_flat_state

    if family == "gpt":
        model = GPTModel(transformer_config_from_args(args))
    else:
        model = BertModel(transformer_config_from_args(args, num_tokentypes=2),
                          add_binary_head=arch != "BertForMaskedLM")
        if arch == "BertModel":  # no LM head, no binary head: compare the rest
            model.lm_head, model.binary_head = None, None
    load_flat_state(model, full, directory)


def _write_checkpoint(full, args, save, tp, pp):
    """Every (tp, pp) file, written atomically; the tracker last."""
    import copy

    described = full_model(full)
    check_divisible(described, args.num_attention_heads, tp, pp)
    for p in range(pp):
        for t in range(tp):
            ckpt = {"args": copy.deepcopy(args), "checkpoint_version": CHECKPOINT_VERSION,
                    "iteration": IMPORT_ITERATION, "tokens": 0,
                    "model": megatron_model_state(split_model(described, t, p, tp, pp))}
            atomic_torch_save(ckpt, checkpoint_file(save, IMPORT_ITERATION, t, p, pp))
    atomic_write_text(os.path.join(save, TRACKER_FILENAME), str(IMPORT_ITERATION))


# -- command line ------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="Megatron checkpoint -> Hugging Face directory")
    exp.add_argument("--load", required=True, help="Megatron checkpoint directory")
    exp.add_argument("--output", required=True, help="new (or empty) Hugging Face directory")
    exp.add_argument("--iteration", type=int, default=None,
                     help="default: the tracker file's")
    exp.add_argument("--vocab-file", default=None, help="override the checkpoint's")
    exp.add_argument("--merge-file", default=None, help="override the checkpoint's")
    add_read_flags(exp)
    imp = sub.add_parser("import", help="Hugging Face directory -> Megatron checkpoint")
    imp.add_argument("--input", required=True, help="Hugging Face model directory")
    imp.add_argument("--save", required=True, help="directory for the Megatron checkpoint")
    imp.add_argument("--target-tensor-parallel-size", type=int, default=1)
    imp.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="pad the vocabulary to a multiple of this x TP (Megatron's default)")
    add_read_flags(imp)
    return parser.parse_args(argv)


def main(argv=None):
    opts = parse_args(argv)
    if opts.command == "export":
        export(opts.load, opts.output, opts.iteration, opts.vocab_file, opts.merge_file,
               reading=ReadOptions.from_args(opts))
    else:
        import_(opts.input, opts.save, opts.target_tensor_parallel_size,
                opts.target_pipeline_parallel_size, opts.make_vocab_size_divisible_by,
                reading=ReadOptions.from_args(opts))


if __name__ == "__main__":
    run_main(main)
