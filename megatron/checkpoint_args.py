"""Megatron-LM's ``--use-checkpoint-args``: take the model's shape (and tokenizer) from the
checkpoint being loaded instead of repeating every flag on the command line.

As Megatron-LM's ``load_args_from_checkpoint``: the fields below are read from the ``args``
stored in the checkpoint named by ``--load`` (here also ``--pretrained-checkpoint`` when there
is no ``--load``), each one only where the command line does not give it; a checkpoint without
``seq_length`` uses its ``max_position_embeddings``. ``--use-mp-args-from-checkpoint-args``
also takes the tensor- and pipeline-parallel sizes. Then the flags are validated as usual.
"""

import argparse
import os

from megatron.errors import UserError
from megatron.utils import print_rank_0

MODEL_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads",
    "kv_channels", "max_position_embeddings", "position_embedding_type",
    "use_rotary_position_embeddings", "rotary_percent", "rotary_base", "add_bias_linear",
    "swiglu", "squared_relu", "openai_gelu", "bias_gelu_fusion",
    "untie_embeddings_and_output_weights",
    "apply_residual_connection_post_layernorm", "layernorm_epsilon",
    "make_vocab_size_divisible_by", "tokenizer_type", "vocab_size", "vocab_extra_ids",
)
FILE_FIELDS = ("vocab_file", "merge_file", "tokenizer_model")  # kept where the file exists
MP_FIELDS = ("tensor_model_parallel_size", "pipeline_model_parallel_size")


def given_dests(parser, argv):
    """The destinations the command line sets explicitly (defaults left out)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
            if action.nargs == 0:
                probe.add_argument(*action.option_strings, action="store_const",
                                   const=True, **kwargs)
            else:
                probe.add_argument(*action.option_strings, nargs=action.nargs, **kwargs)
    return set(vars(probe.parse_known_args(argv)[0]))


def checkpoint_args(root, reading=None):
    """The ``args`` stored in the checkpoint directory ``root`` (its first rank's file), read
    as ``reading`` says (``megatron.checkpoint_files.ReadOptions``; default safe, verified)."""
    from megatron.checkpoint_files import ReadOptions, read_checkpoint_file
    from megatron.checkpointing import TRACKER_FILENAME, iteration_dir, read_tracker

    found = read_tracker(root) if os.path.isdir(root) else None
    if found is None:
        raise UserError(f"--use-checkpoint-args: {root} holds no {TRACKER_FILENAME} (not a "
                        "Megatron checkpoint directory)")
    directory = iteration_dir(root, *found)
    ranks = sorted(d for d in os.listdir(directory) if d.startswith("mp_rank_")) \
        if os.path.isdir(directory) else []
    if not ranks:
        raise UserError(f"--use-checkpoint-args: {directory} holds no mp_rank_* directory")
    path = os.path.join(directory, ranks[0], "model_optim_rng.pt")
    ckpt = read_checkpoint_file(path, reading or ReadOptions())
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    if saved is None or getattr(saved, "num_layers", None) is None:
        raise UserError(f"--use-checkpoint-args: {path} stores no model args")
    return saved


def apply_checkpoint_args(args, given, log=None):
    """Fill ``args`` (parsed, not yet validated) from the checkpoint's args; see the module
    docstring. ``given``: the destinations set on the command line (``given_dests``)."""
    from megatron.checkpoint_files import ReadOptions
    from megatron.checkpointing import read_tracker

    pretrained = getattr(args, "pretrained_checkpoint", None)
    root = args.load or pretrained
    if root is None:
        raise UserError("--use-checkpoint-args needs --load (or --pretrained-checkpoint)")
    if args.load and pretrained and read_tracker(args.load) is None:
        root = pretrained  # a finetune's own --load before its first save: the pretrained one

    saved = checkpoint_args(root, ReadOptions.from_args(args))
    fields = MODEL_FIELDS + (MP_FIELDS if args.use_mp_args_from_checkpoint_args else ())
    taken = []
    for name in fields + FILE_FIELDS:
        if name in given or not hasattr(args, name) or not hasattr(saved, name):
            continue
        value = getattr(saved, name)
        if name in FILE_FIELDS and (value is None or not os.path.isfile(value)):
            continue  # a path from another machine: the flag (or its error) stays the user's
        if name == "add_bias_linear" and value is None:
            continue
        setattr(args, name, value)
        taken.append(name)
    if "seq_length" not in given and getattr(saved, "seq_length", None) is None:
        args.seq_length = getattr(saved, "max_position_embeddings", None)
        taken.append("seq_length (from max_position_embeddings)")
    (log or print_rank_0)(f" > --use-checkpoint-args: {len(taken)} model settings from {root}")
    return args
