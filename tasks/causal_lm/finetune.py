"""GPT causal-LM finetuning on a plain-text corpus (PTB, WikiText-2/103, any text), with
random-LTD or TokenBypass, as the random-LTD paper's GPT-2 finetuning (Yao et al. 2022,
Appendix D.4).

    python tasks/causal_lm/finetune.py --train-text ptb/ptb.train.txt \\
        --valid-text ptb/ptb.valid.txt --format ptb \\
        --pretrained-checkpoint checkpoints/gpt2-medium --save checkpoints/ptb-ltd \\
        --data-dir data/ptb --random-ltd-start 128 [-- extra pretrain_gpt.py flags]

The paper's settings are the defaults: global batch 32, constant learning rate 5e-5 (no decay,
no warmup unless --lr-warmup-iters is given after ``--``), AdamW, the sequence length of the
checkpoint (1024 for GPT-2). The number of iterations comes from --epochs and the training text:
``ceil(epochs * samples_per_epoch / global_batch)`` with ``samples_per_epoch = (tokens - 1) //
seq_length`` (Megatron's sample count of one pass). --train-iters overrides it.

random-LTD (--random-ltd-start N): the kept length grows linearly (DeepSpeed fixed_linear, in
steps of --random-ltd-step, 16 as the paper's MSLG) from N to the full length, which it reaches
after --random-ltd-full-at of the run (default 0.8 for PTB and 0.7 otherwise, as the paper), in
layers 1..L-2 (--random-ltd-layer-ids to choose). --random-ltd-schedule constant keeps N for the
whole run (the single-layer sweep, ``layer_sweep.py``). --tokenbypass drops with TokenBypass
(Hou et al. 2022: the most important tokens bypass layers L/2..L-2) on the same schedule when
--random-ltd-start is given, else on its own default (half the tokens, constant).

The data: each text file is tokenized once into --data-dir (``tasks/causal_lm/data.py``: rows
tokenized one by one and concatenated without EOD, as Hugging Face's run_clm.py; the cache is
reused by later runs). Under torchrun/SLURM global rank 0 tokenizes and the other ranks wait for
it (--prep-timeout).

The run is pretrain_gpt.py's loop in this process, with ``--finetune --use-checkpoint-args
--load CKPT`` (the model's shape and tokenizer from the checkpoint, its weights only, iteration
0); when --save already holds a checkpoint of this run it resumes from there instead (without
--finetune), so a preempted job continues bit-identically by rerunning the same command.

At the end, the final model's validation loss is computed over the WHOLE --valid-text with
Megatron's WIKITEXT103 evaluation (tasks/zeroshot_gpt: windows of seq_length + 1 tokens every
--overlapping-eval tokens, every target scored once; the default stride is the sequence length,
i.e. disjoint windows, as run_clm's blocks) on the same token stream the model was finetuned on:
no detokenizer is applied (tasks/main.py would pick one from the file's path -- PTB's for a path
containing 'ptb', WikiText's otherwise -- and score text that differs from the finetuning data).
One summary line is printed and ``<save>/finetune_result.json`` written (tokens, iterations,
layer tokens, final validation loss and perplexity).
"""

import argparse
import dataclasses
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if __name__ == "__main__":  # before torch's import: a SLURM signal during start-up is kept
    from megatron.dist_signal_handler import hold_exit_signals_until_ready

    hold_exit_signals_until_ready(sys.argv[1:])

from megatron.errors import UserError, run_main  # noqa: E402
from megatron.utils import print_rank_0  # noqa: E402
from tasks.causal_lm import data as text_data  # noqa: E402

RESULT_FILE = "finetune_result.json"
SETTINGS_FILE = "finetune_settings.json"
PAPER = {"global_batch_size": 32, "lr": 5e-5}
DEFAULT_FULL_AT = {"ptb": 0.8, "wikitext": 0.7, "lines": 0.7}
# Flags finetune.py derives itself: giving them after '--' would break what it derives.
RESERVED = ("--train-iters", "--train-samples", "--train-tokens", "--train-layer-tokens",
            "--load", "--save", "--finetune", "--data-path", "--train-data-path",
            "--valid-data-path", "--test-data-path", "--use-checkpoint-args",
            "--pretrained-checkpoint", "--random-ltd", "--random-ltd-method",
            "--random-ltd-start", "--random-ltd-step", "--random-ltd-schedule",
            "--random-ltd-schedule-steps", "--random-ltd-schedule-tokens",
            "--random-ltd-layer-ids", "--random-ltd-allow-edge-layers", "--random-ltd-preset",
            "--deepspeed-config", "--deepspeed_config", "--skip-train")


def build_parser():
    p = argparse.ArgumentParser(
        prog="tasks/causal_lm/finetune.py", allow_abbrev=False,
        description="GPT causal-LM finetuning on plain text with random-LTD / TokenBypass. "
                    "Flags after '--' go to pretrain_gpt.py.")
    g = p.add_argument_group("data")
    g.add_argument("--train-text", required=True, help="training text file")
    g.add_argument("--valid-text", required=True, help="validation text file")
    g.add_argument("--format", required=True, choices=text_data.FORMATS,
                   help="ptb (ptb.*.txt), wikitext (raw wiki.*.raw) or lines (any text)")
    g.add_argument("--data-dir", required=True,
                   help="where the tokenized files are cached (shared by all ranks)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="tokenizer processes for the data preparation")
    g.add_argument("--prep-timeout", type=float, default=7200.0,
                   help="seconds ranks > 0 wait for rank 0 to tokenize the data")
    g = p.add_argument_group("model and checkpoints")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="the pretrained GPT checkpoint (e.g. from tools/convert_hf.py import)")
    g.add_argument("--save", required=True, help="output checkpoint directory (resumed from)")
    g.add_argument("--tokenizer-type", default=None, help="default: the checkpoint's")
    g.add_argument("--vocab-file", default=None, help="default: the checkpoint's")
    g.add_argument("--merge-file", default=None, help="default: the checkpoint's")
    g.add_argument("--tokenizer-model", default=None, help="default: the checkpoint's")
    g.add_argument("--seq-length", type=int, default=None,
                   help="default: the checkpoint's (1024 for GPT-2)")
    g = p.add_argument_group("training (paper defaults)")
    g.add_argument("--epochs", type=float, default=2.0,
                   help="passes over the training text (default 2, as DeepSpeed's random-LTD "
                        "GPT finetuning example)")
    g.add_argument("--train-iters", type=int, default=None,
                   help="iterations (overrides --epochs)")
    g.add_argument("--global-batch-size", type=int, default=PAPER["global_batch_size"])
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--lr", type=float, default=PAPER["lr"], help="constant learning rate")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--eval-interval", type=int, default=None,
                   help="iterations between validation passes (default: one epoch)")
    g.add_argument("--eval-iters", type=int, default=None,
                   help="global batches per validation pass (default: the validation text "
                        "once)")
    g.add_argument("--save-interval", type=int, default=None,
                   help="iterations between checkpoints (default: one epoch, at most 1000)")
    g.add_argument("--log-interval", type=int, default=10)
    g = p.add_argument_group("token dropping")
    g.add_argument("--random-ltd-start", type=int, default=None,
                   help="random-LTD: kept tokens per sample at the start (128/256/512 in the "
                        "paper)")
    g.add_argument("--random-ltd-full-at", type=float, default=None,
                   help="fraction of the run after which the full length is kept (default "
                        "0.8 for ptb, else 0.7)")
    g.add_argument("--random-ltd-step", type=int, default=16,
                   help="kept-length granularity (DeepSpeed seq_per_step)")
    g.add_argument("--random-ltd-schedule", default="fixed_linear",
                   choices=["fixed_linear", "constant"])
    g.add_argument("--random-ltd-layer-ids", type=int, nargs="+", default=None,
                   help="dropping layers (default 1..L-2)")
    g.add_argument("--random-ltd-allow-edge-layers", action="store_true",
                   help="ablation: let --random-ltd-layer-ids name the first/last layer")
    g.add_argument("--tokenbypass", action="store_true",
                   help="TokenBypass instead of random dropping")
    g = p.add_argument_group("final evaluation")
    g.add_argument("--overlapping-eval", type=int, default=None,
                   help="stride of the evaluation windows (default: the sequence length, "
                        "disjoint windows; Megatron's WikiText-103 evaluation uses 32)")
    g.add_argument("--no-final-eval", action="store_true",
                   help="skip the whole-file validation at the end")
    return p


def split_argv(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        k = argv.index("--")
        return argv[:k], argv[k + 1:]
    return argv, []


def check_extra(extra, parser):
    """Flags after '--' may not be ones finetune.py sets itself."""
    own = {s for a in parser._actions for s in a.option_strings}
    for token in extra:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        if name in own:
            raise UserError(f"{name}: a finetune.py flag; give it before '--'")
        if name in RESERVED:
            raise UserError(f"{name}: finetune.py sets it (see --help); leave it out after '--'")


def _extra_value(extra, flag, cast=str):
    """The last value of ``flag`` among the pass-through flags, else None."""
    value = None
    for i, token in enumerate(extra):
        if token == flag and i + 1 < len(extra):
            value = extra[i + 1]
        elif token.startswith(flag + "="):
            value = token.split("=", 1)[1]
    return None if value is None else cast(value)


# ---------------------------------------------------------------------------------------------
# checkpoint and tokenizer


def has_checkpoint(root):
    from megatron.checkpointing import read_tracker

    return root is not None and os.path.isdir(root) and read_tracker(root) is not None


def resolve_model(opts):
    """(checkpoint to read the model from, its saved args, resume?)."""
    from megatron.checkpoint_args import checkpoint_args

    resume = has_checkpoint(opts.save)
    source = opts.save if resume else opts.pretrained_checkpoint
    if source is None:
        raise UserError("--pretrained-checkpoint is required (the GPT checkpoint to finetune; "
                        "e.g. an imported GPT-2 from tools/convert_hf.py import)")
    if not resume and not os.path.isdir(source):
        raise UserError(f"--pretrained-checkpoint {source}: no such directory")
    flag = "--save" if resume else "--pretrained-checkpoint"
    try:
        saved = checkpoint_args(source)
    except UserError as err:
        text = str(err)
        prefix = "--use-checkpoint-args: "
        raise UserError(f"{flag} {source}: "
                        f"{text[len(prefix):] if text.startswith(prefix) else text}") from None
    return source, saved, resume


def resolve_tokenizer(opts, saved, source):
    """The tokenizer spec: the flags where given, else the checkpoint's (its files must exist
    here)."""
    spec = {"tokenizer_type": opts.tokenizer_type or getattr(saved, "tokenizer_type", None),
            "vocab_file": opts.vocab_file, "merge_file": opts.merge_file,
            "tokenizer_model": opts.tokenizer_model, "vocab_size": None}
    if spec["tokenizer_type"] is None:
        raise UserError(f"--tokenizer-type: the checkpoint {source} does not record one; give "
                        f"--tokenizer-type (and its files)")
    if opts.tokenizer_type is None and getattr(saved, "tokenizer_type", None) == "NullTokenizer":
        spec["vocab_size"] = getattr(saved, "vocab_size", None)
    needs = {"GPT2BPETokenizer": ("vocab_file", "merge_file"),
             "SentencePieceTokenizer": ("tokenizer_model",),
             "GPTSentencePieceTokenizer": ("tokenizer_model",)}.get(spec["tokenizer_type"], ())
    for key in needs:
        if spec[key] is not None:
            continue
        value = getattr(saved, key, None)
        if value is not None and not os.path.isfile(value):
            # a relative path, or a checkpoint moved since: the copy kept beside it
            # (tools/convert_hf.py import copies the tokenizer files into the checkpoint)
            for candidate in (os.path.join(source, value),
                              os.path.join(source, os.path.basename(value))):
                if os.path.isfile(candidate):
                    value = candidate
                    break
        if value is None or not os.path.isfile(value):
            where = f"names {value}, which is not here" if value else "names none"
            raise UserError(f"--{key.replace('_', '-')}: the checkpoint {source} {where}; give "
                            f"--{key.replace('_', '-')}")
        spec[key] = value
    return spec


def check_vocab(spec, saved, source):
    """The tokenizer must give the checkpoint's (padded) vocabulary: one line otherwise."""
    from megatron.tokenizer import build_tokenizer, vocab_size_with_padding

    tokenizer = build_tokenizer(spec["tokenizer_type"], vocab_file=spec["vocab_file"],
                                merge_file=spec["merge_file"],
                                tokenizer_model=spec["tokenizer_model"],
                                vocab_size=spec["vocab_size"])
    padded = getattr(saved, "padded_vocab_size", None)
    if padded is None:
        return tokenizer
    divisible = getattr(saved, "make_vocab_size_divisible_by", 128) or 128
    tp = getattr(saved, "tensor_model_parallel_size", 1) or 1
    ours = vocab_size_with_padding(tokenizer.vocab_size, divisible, tp)
    if ours != padded:
        files = spec.get("vocab_file") or spec.get("tokenizer_model")
        raise UserError(f"tokenizer ({spec['tokenizer_type']}, {files}) has "
                        f"{tokenizer.vocab_size} tokens (padded {ours}) but the checkpoint "
                        f"{source} has a vocabulary of {padded}: wrong --vocab-file for this "
                        f"model?")
    if padded > tokenizer.vocab_size:
        print_rank_0(f" > note: {source} pads its vocabulary from {tokenizer.vocab_size} to "
                     f"{padded} rows; their logits join the softmax (as in Megatron), so the "
                     f"loss differs from the unpadded model's (for Hugging Face GPT-2 parity "
                     f"import with --make-vocab-size-divisible-by 1)")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# the run's flags


def plan(opts, train, valid, seq_length, num_layers):
    """Iterations, evaluation and random-LTD settings of the run (a dict)."""
    gbs = opts.global_batch_size
    if gbs < 1 or opts.micro_batch_size < 1 or gbs % opts.micro_batch_size:
        raise UserError(f"--global-batch-size {gbs} must be a positive multiple of "
                        f"--micro-batch-size {opts.micro_batch_size}")
    samples_per_epoch = (train.tokens - 1) // seq_length
    if samples_per_epoch < 1:
        raise UserError(f"--train-text {opts.train_text}: {train.tokens} tokens, fewer than one "
                        f"sample of --seq-length {seq_length} + 1")
    iters_per_epoch = max(1, math.ceil(samples_per_epoch / gbs))
    if opts.train_iters is not None:
        if opts.train_iters < 1:
            raise UserError(f"--train-iters must be positive, got {opts.train_iters}")
        iters = opts.train_iters
    else:
        if not opts.epochs > 0:
            raise UserError(f"--epochs must be positive, got {opts.epochs}")
        iters = max(1, math.ceil(opts.epochs * samples_per_epoch / gbs))
    valid_samples = (valid.tokens - 1) // seq_length
    eval_iters = opts.eval_iters if opts.eval_iters is not None else \
        (math.ceil(valid_samples / gbs) if valid_samples >= 1 else 0)
    if eval_iters < 0:
        raise UserError(f"--eval-iters must be >= 0, got {eval_iters}")
    if eval_iters and valid_samples < 1:
        raise UserError(f"--valid-text {opts.valid_text}: {valid.tokens} tokens, fewer than one "
                        f"sample of --seq-length {seq_length} + 1 (set --eval-iters 0; the "
                        f"final evaluation still scores it)")
    out = {"iterations": iters, "iters_per_epoch": iters_per_epoch,
           "samples_per_epoch": samples_per_epoch, "valid_samples": valid_samples,
           "eval_iters": eval_iters,
           "eval_interval": opts.eval_interval or min(iters_per_epoch, iters),
           "save_interval": opts.save_interval or min(iters_per_epoch, iters, 1000),
           "seq_length": seq_length, "num_layers": num_layers, "random_ltd": None}
    for name in ("eval_interval", "save_interval"):
        if out[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {out[name]}")
    ltd_flags = opts.random_ltd_start is not None or opts.tokenbypass
    if not ltd_flags:
        for given, flag in ((opts.random_ltd_full_at, "--random-ltd-full-at"),
                            (opts.random_ltd_layer_ids, "--random-ltd-layer-ids"),
                            (opts.random_ltd_allow_edge_layers or None,
                             "--random-ltd-allow-edge-layers"),
                            (None if opts.random_ltd_schedule == "fixed_linear" else 1,
                             "--random-ltd-schedule")):
            if given is not None:
                raise UserError(f"{flag} needs --random-ltd-start (or --tokenbypass)")
        return out
    ltd = {"method": "tokenbypass" if opts.tokenbypass else "random",
           "start": opts.random_ltd_start, "schedule": None, "step": opts.random_ltd_step,
           "full_at": None, "schedule_steps": None, "layer_ids": opts.random_ltd_layer_ids,
           "allow_edge_layers": opts.random_ltd_allow_edge_layers}
    if opts.random_ltd_start is not None:
        if not 0 < opts.random_ltd_start <= seq_length:
            raise UserError(f"--random-ltd-start {opts.random_ltd_start} must be in [1, the "
                            f"sequence length {seq_length}]")
        ltd["schedule"] = opts.random_ltd_schedule
        if opts.random_ltd_schedule == "fixed_linear" and \
                not 0 < opts.random_ltd_step <= opts.random_ltd_start:
            raise UserError(f"--random-ltd-step {opts.random_ltd_step} must be in [1, "
                            f"--random-ltd-start {opts.random_ltd_start}] (kept lengths are "
                            f"rounded down to a multiple of it)")
        if opts.random_ltd_schedule == "fixed_linear":
            full_at = opts.random_ltd_full_at if opts.random_ltd_full_at is not None \
                else DEFAULT_FULL_AT[opts.format]
            if not 0 < full_at <= 1:
                raise UserError(f"--random-ltd-full-at {full_at} must be in (0, 1]")
            ltd["full_at"] = full_at
            ltd["schedule_steps"] = max(1, round(full_at * iters))
        elif opts.random_ltd_full_at is not None:
            raise UserError("--random-ltd-full-at needs --random-ltd-schedule fixed_linear (a "
                            "constant kept length never reaches the full length)")
    elif opts.random_ltd_full_at is not None:
        raise UserError("--random-ltd-full-at needs --random-ltd-start (TokenBypass without "
                        "it keeps a constant half of the tokens)")
    out["random_ltd"] = ltd
    return out


def ltd_argv(ltd):
    if ltd is None:
        return []
    argv = ["--random-ltd"]
    if ltd["method"] != "random":
        argv += ["--random-ltd-method", ltd["method"]]
    if ltd["start"] is not None:
        argv += ["--random-ltd-start", str(ltd["start"]), "--random-ltd-schedule",
                 ltd["schedule"]]
        if ltd["schedule"] != "constant":
            argv += ["--random-ltd-step", str(ltd["step"]), "--random-ltd-schedule-steps",
                     str(ltd["schedule_steps"])]
    if ltd["layer_ids"]:
        argv += ["--random-ltd-layer-ids", *map(str, ltd["layer_ids"])]
    if ltd["allow_edge_layers"]:
        argv.append("--random-ltd-allow-edge-layers")
    return argv


def pretrain_argv(opts, extra, spec, train, valid, run, resume):
    argv = ["--use-checkpoint-args", "--save", opts.save]
    argv += ["--load", opts.save] if resume else ["--load", opts.pretrained_checkpoint,
                                                  "--finetune"]
    argv += ["--train-data-path", train.prefix]
    if run["eval_iters"]:
        argv += ["--valid-data-path", valid.prefix]
    argv += ["--tokenizer-type", spec["tokenizer_type"]]
    for key in ("vocab_file", "merge_file", "tokenizer_model", "vocab_size"):
        if spec.get(key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(spec[key])]
    if opts.seq_length is not None:
        argv += ["--seq-length", str(opts.seq_length)]
    argv += ["--micro-batch-size", str(opts.micro_batch_size),
             "--global-batch-size", str(opts.global_batch_size),
             "--train-iters", str(run["iterations"]),
             "--lr", repr(opts.lr), "--lr-decay-style", "constant", "--lr-warmup-iters", "0",
             "--min-lr", "0.0", "--optimizer", "adam", "--weight-decay", "0.0",
             "--eval-interval", str(run["eval_interval"]), "--eval-iters", str(run["eval_iters"]),
             "--save-interval", str(run["save_interval"]),
             "--log-interval", str(opts.log_interval), "--seed", str(opts.seed)]
    argv += ltd_argv(run["random_ltd"])
    return argv + list(extra)  # after ours: --lr-warmup-iters, --weight-decay ... override


def settings_of(opts, extra, run):
    """What makes a run this run (a resumed --save must hold the same)."""
    return {"train_text": os.path.abspath(opts.train_text),
            "valid_text": os.path.abspath(opts.valid_text), "format": opts.format,
            "pretrained_checkpoint": (os.path.abspath(opts.pretrained_checkpoint)
                                      if opts.pretrained_checkpoint else None),
            "iterations": run["iterations"], "global_batch_size": opts.global_batch_size,
            "micro_batch_size": opts.micro_batch_size, "lr": opts.lr, "seed": opts.seed,
            "seq_length": run["seq_length"], "random_ltd": run["random_ltd"],
            "extra": [t for t in extra if t not in ("--exit-interval",)]}


def check_settings(opts, settings):
    old = text_data.read_json(os.path.join(opts.save, SETTINGS_FILE))
    if old is None:
        return
    ignore = {"extra", "pretrained_checkpoint"}  # --exit-interval & co may change on resume
    diff = [k for k in settings if k not in ignore and old.get(k) != settings[k]]
    if diff:
        k = diff[0]
        raise UserError(f"--save {opts.save} holds a run with other settings ({k}: "
                        f"{old.get(k)!r} there, {settings[k]!r} now); use another --save or "
                        f"remove it")


# ---------------------------------------------------------------------------------------------
# final evaluation (Megatron's WIKITEXT103 windows over the finetuning token stream)


def evaluate_stream(args, step, tokenizer, tokens, words, stride, log,
                    name="the validation text"):
    """Whole-stream validation with tasks/zeroshot_gpt's windowed evaluation -> metrics."""
    import numpy as np

    from megatron.data.samplers import build_eval_data_loader
    from tasks.zeroshot_gpt.datasets import WindowedLMDataset
    from tasks.zeroshot_gpt.evaluate import (_check_counts, format_results,
                                             forward_step_provider, print_framed)

    dataset = WindowedLMDataset(np.asarray(tokens), args.seq_length, tokenizer.eod,
                                max(words, 2), len(tokens), stride)
    loader = build_eval_data_loader(dataset, args.micro_batch_size, step.parallel.dp_rank,
                                    step.parallel.dp_size)
    forward = forward_step_provider("loss")(args, tokenizer)
    sums = step.evaluate_dataset(loader, forward_step=forward)
    total = _check_counts("loss", sums, dataset)
    line, metrics = format_results(name, "loss", total, dataset)
    print_framed(line, log)
    metrics["windows"] = len(dataset)
    metrics["stride"] = dataset.stride
    return metrics


# ---------------------------------------------------------------------------------------------
# main


def _last_logged(lines, pattern):
    for line in reversed(lines):
        m = re.search(pattern, line)
        if m:
            return m.group(1)
    return None


def main(argv=None, log=None):
    """Run (or resume) the finetuning; returns the result dict (also written to
    ``<save>/finetune_result.json``), with ``finished`` False when an --exit-* flag stopped it."""
    start = time.time()
    own, extra = split_argv(argv)
    parser = build_parser()
    opts = parser.parse_args(own)
    check_extra(extra, parser)
    emit = log or print_rank_0
    lines = []

    def keep(*parts):
        text = " ".join(str(p) for p in parts)
        lines.append(text)
        emit(text)

    rank = text_data.global_rank()
    source, saved, resume = resolve_model(opts)
    spec = resolve_tokenizer(opts, saved, source)
    tokenizer = check_vocab(spec, saved, source)
    seq_length = opts.seq_length or getattr(saved, "seq_length", None) \
        or getattr(saved, "max_position_embeddings", None)
    if not seq_length:
        raise UserError(f"--seq-length: the checkpoint {source} records no sequence length")
    num_layers = int(saved.num_layers)

    prep = dict(data_dir=opts.data_dir, tokenizer=spec, workers=opts.workers,
                timeout=opts.prep_timeout, log=keep)
    train = text_data.prepare_on_rank0(opts.train_text, opts.format, flag="--train-text",
                                       **prep)
    valid = text_data.prepare_on_rank0(opts.valid_text, opts.format, flag="--valid-text",
                                       **prep)
    run = plan(opts, train, valid, int(seq_length), num_layers)
    settings = settings_of(opts, extra, run)
    if resume:
        check_settings(opts, settings)
    elif rank == 0:
        os.makedirs(opts.save, exist_ok=True)
        text_data.write_json(os.path.join(opts.save, SETTINGS_FILE), settings)
    argv = pretrain_argv(opts, extra, spec, train, valid, run, resume)
    ltd = run["random_ltd"]
    keep(f" > causal-LM finetuning: {train.tokens} train tokens ({run['samples_per_epoch']} "
         f"samples of {seq_length} + 1 per epoch), {run['iterations']} iterations of "
         f"{opts.global_batch_size}, lr {opts.lr} constant"
         + (f", {'resuming from' if resume else 'from'} {source}")
         + ("" if ltd is None else
            f", {ltd['method']} dropping" + (f" {ltd['start']} -> {seq_length} at "
                                             f"{ltd['full_at']:.0%} ({ltd['schedule_steps']} "
                                             f"iterations)" if ltd["full_at"] else
                                             (f" constant {ltd['start']}" if ltd["start"]
                                              else " (TokenBypass default)"))))

    import pretrain_gpt
    from megatron.training import build_token_dropping, pretrain

    found = {}
    valid_tokens = valid_words = None
    if not opts.no_final_eval:
        from megatron.data.indexed_dataset import IndexedDataset

        valid_tokens = IndexedDataset(valid.prefix).get(0)
        valid_words = valid.words

    def after_training(args, state, step, log_):
        driver = build_token_dropping(args, log=lambda *a, **k: None)
        found["layer_tokens"] = driver.scheduler.total_layer_tokens(state.iteration,
                                                                    args.global_batch_size)
        found["state"] = state
        found["args"] = args
        if valid_tokens is not None:
            stride = opts.overlapping_eval or args.seq_length
            found["metrics"] = evaluate_stream(args, step, tokenizer, valid_tokens,
                                               valid_words, stride, log_,
                                               os.path.basename(opts.valid_text))

    provider = dataclasses.replace(pretrain_gpt.PROVIDER, after_training=after_training)
    result = pretrain(provider, argv=argv, log=keep)
    state = result.state
    finished = "state" in found
    record = {
        "finished": finished, "train_text": opts.train_text, "valid_text": opts.valid_text,
        "format": opts.format, "pretrained_checkpoint": opts.pretrained_checkpoint,
        "save": opts.save, "resumed": resume, "train_tokens": train.tokens,
        "valid_tokens": valid.tokens, "valid_words": valid.words,
        "train_rows": train.rows, "valid_rows": valid.rows,
        "seq_length": int(seq_length), "num_layers": num_layers,
        "global_batch_size": opts.global_batch_size, "lr": opts.lr, "seed": opts.seed,
        "epochs": (run["iterations"] * opts.global_batch_size / run["samples_per_epoch"]),
        "train_iters": run["iterations"], "iterations": state.iteration,
        "consumed_train_samples": state.consumed_train_samples,
        "consumed_train_tokens": state.consumed_train_tokens,
        "random_ltd": ltd, "argv": argv, "seconds": round(time.time() - start, 2),
    }
    if not finished:
        keep(f" > finetuning stopped at iteration {state.iteration} of {run['iterations']} "
             f"(--exit-*); rerun the same command to continue from {opts.save}")
        return record
    dense = state.iteration * opts.global_batch_size * int(seq_length) * num_layers
    logged = _last_logged(lines, r"consumed layer tokens:\s+(\d+)")
    if logged is not None and int(logged) != found["layer_tokens"]:
        raise RuntimeError(f"layer tokens: the log says {logged}, the schedule "
                           f"{found['layer_tokens']}")
    record.update({"layer_tokens": found["layer_tokens"], "dense_layer_tokens": dense,
                   "layer_token_saving": 1 - found["layer_tokens"] / dense if dense else 0.0})
    if result.valid_losses:
        record["last_loop_valid_loss"] = result.valid_losses[-1][1].get("lm loss")
    metrics = found.get("metrics")
    if metrics is not None:
        record.update({"valid_loss": metrics["avg loss"], "valid_ppl": metrics["ppl"],
                       "valid_word_ppl": metrics["adjusted ppl"],
                       "eval_stride": metrics["stride"], "eval_windows": metrics["windows"]})
    if rank == 0:
        text_data.write_json(os.path.join(opts.save, RESULT_FILE), record)
    keep(f"finetune {opts.format}: {state.iteration} iterations, {train.tokens} train tokens, "
         f"{record['layer_tokens']} layer tokens ({100 * record['layer_token_saving']:.1f}% "
         f"saved)" + (f", valid loss {record['valid_loss']:.4f} ppl {record['valid_ppl']:.2f} "
                      f"over {valid.tokens} tokens" if metrics is not None else "")
         + f" -> {os.path.join(opts.save, RESULT_FILE)}")
    return record


if __name__ == "__main__":
    run_main(main)
