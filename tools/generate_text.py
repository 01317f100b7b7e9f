"""Sample text from a GPT checkpoint saved in Megatron-LM's layout.

    python tools/generate_text.py --load checkpoints/gpt-125m --prompt "The meaning of life" \\
        --top-p 0.9 --temperature 0.8 --max-new-tokens 64 --num-samples 3 --seed 1234

Reads ``<load>/latest_checkpointed_iteration.txt`` (or ``--iteration``), then
``<load>/iter_{:07d}/mp_rank_00/model_optim_rng.pt`` (``release/`` for release checkpoints): the
model shape and tokenizer come from the checkpoint's ``args``. Runs on one process (TP = PP = 1)
in fp32; use --device cuda on a GPU. Checkpoint files are read as by training (verified,
unpickled with an allowlist: a file that would run code is refused; see
``megatron.checkpoint_files``, and its --unsafe-load-checkpoint / --no-verify-checkpoint).
"""

import argparse
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from megatron.arguments import transformer_config_from_args
from megatron.checkpoint_files import ReadOptions, add_read_flags, read_checkpoint_file
from megatron.checkpointing import TRACKER_FILENAME, flat_model_state, read_tracker
from megatron.errors import UserError, run_main
from megatron.model import GPTModel, TransformerConfig
from megatron.text_generation import generate


def checkpoint_path(load_dir: str, iteration=None) -> str:
    """Path of the TP/PP rank-0 model file of ``iteration`` (default: the tracker's)."""
    if iteration is None:
        found = read_tracker(load_dir)
        if found is None:
            raise UserError(f"--load {load_dir}: no {TRACKER_FILENAME} "
                            f"(not a Megatron checkpoint directory)")
        iteration = "release" if found[1] else found[0]
    sub = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    for rank_dir in ("mp_rank_00", "mp_rank_00_000"):
        path = os.path.join(load_dir, sub, rank_dir, "model_optim_rng.pt")
        if os.path.isfile(path):
            return path
    raise UserError(f"--load {load_dir}: no {sub}/mp_rank_00/model_optim_rng.pt")


def config_from_args(args, **overrides) -> TransformerConfig:
    """The fp32, dropout-free TransformerConfig that a checkpoint's Megatron ``args`` describe
    (``megatron.arguments.transformer_config_from_args``, the one flags -> model mapping);
    ``overrides``: the model family's own fields (BERT's ``num_tokentypes``)."""
    if getattr(args, "num_layers", None) is None or getattr(args, "padded_vocab_size", None) is None:
        raise UserError("checkpoint args lack num_layers / padded_vocab_size: not a GPT checkpoint")
    return transformer_config_from_args(
        args, hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
        recompute_granularity=None, sequence_parallel=False, **overrides)


def load_model(load_dir: str, iteration=None, device="cpu", reading=ReadOptions()):
    """Build a GPTModel (eval mode, fp32) from a Megatron checkpoint directory -> (model, args);
    ``reading``: how the file is read (``ReadOptions``)."""
    path = checkpoint_path(load_dir, iteration)
    ckpt = read_checkpoint_file(path, reading)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise UserError(f"{path} is not a Megatron checkpoint (needs 'model' and 'args')")
    args = ckpt["args"]
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    if tp != 1 or pp != 1:
        # mp_rank_00 holds one tensor shard of one stage only: its shapes (or its missing
        # layers) do not describe the model.
        raise UserError(f"{load_dir} was saved with tensor-parallel size {tp} and pipeline-"
                        f"parallel size {pp}; this tool reads TP=1 PP=1 checkpoints: convert "
                        f"it first with python tools/checkpoint_util.py --load {load_dir} "
                        f"--save DIR --target-tensor-parallel-size 1 "
                        f"--target-pipeline-parallel-size 1")
    model = GPTModel(config_from_args(args))
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in flat_model_state(ckpt["model"]).items()}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"{path} does not match the model its args describe: missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}")
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if state[k].shape != v.shape]
    if shapes:
        raise UserError(f"{path} does not match the model its args describe: "
                        f"{'; '.join(shapes[:3])}")
    model.load_state_dict(state)
    return model.to(device).eval(), args


def build_tokenizer_from_args(args, vocab_file=None, merge_file=None, tokenizer_model=None):
    """The checkpoint's tokenizer; file flags given here override the paths stored in ``args``.

    A tokenizer with more ids than the checkpoint's (padded) vocabulary is refused: those ids
    have no embedding, so the files do not belong to this model."""
    from megatron import tokenizer
    try:
        tok = tokenizer.build_tokenizer(
            getattr(args, "tokenizer_type", None) or "GPT2BPETokenizer",
            vocab_file=vocab_file or getattr(args, "vocab_file", None),
            merge_file=merge_file or getattr(args, "merge_file", None),
            tokenizer_model=tokenizer_model or getattr(args, "tokenizer_model", None),
            vocab_size=getattr(args, "vocab_size", None),
            vocab_extra_ids=getattr(args, "vocab_extra_ids", 0) or 0)
    except UserError as err:
        if vocab_file or merge_file or tokenizer_model:
            raise
        # The paths came from the checkpoint (the run may have been on another machine).
        raise UserError(f"{err} (path stored in the checkpoint's args; pass --vocab-file, "
                        f"--merge-file or --tokenizer-model)") from None
    padded = getattr(args, "padded_vocab_size", None)
    if padded is not None and tok.vocab_size > padded:
        raise UserError(f"the tokenizer ({getattr(args, 'tokenizer_type', None)}, "
                        f"--vocab-file/--tokenizer-model) has {tok.vocab_size} tokens but the "
                        f"checkpoint's model has a vocabulary of {padded}: the tokenizer files "
                        f"do not belong to this checkpoint")
    return tok


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="Megatron checkpoint directory")
    p.add_argument("--iteration", type=int, default=None, help="default: the tracker file's")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (repeat for several); default: start from EOD")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab-file", default=None, help="override the checkpoint's --vocab-file")
    p.add_argument("--merge-file", default=None, help="override the checkpoint's --merge-file")
    p.add_argument("--tokenizer-model", default=None, help="override --tokenizer-model")
    add_read_flags(p)
    args = p.parse_args(argv)
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0.0 <= args.top_p <= 1.0:
        raise UserError(f"--top-p must be in [0, 1], got {args.top_p}")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise UserError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    return args


def main(argv=None, out=sys.stdout):
    opts = parse_args(argv)
    model, ckpt_args = load_model(opts.load, opts.iteration, opts.device,
                                  ReadOptions.from_args(opts))
    tok = build_tokenizer_from_args(ckpt_args, opts.vocab_file, opts.merge_file,
                                    opts.tokenizer_model)
    generator = torch.Generator(device=opts.device).manual_seed(opts.seed)
    for prompt in opts.prompt or [""]:
        ids = tok.tokenize(prompt) if prompt else [tok.eod]
        for n in range(opts.num_samples):
            tokens = generate(model, ids, opts.max_new_tokens, greedy=opts.greedy,
                              top_k=opts.top_k, top_p=opts.top_p, temperature=opts.temperature,
                              eod=tok.eod, generator=generator, vocab_size=tok.vocab_size)
            new = tokens[len(ids):]
            if new and new[-1] == tok.eod:
                new = new[:-1]
            print(f"--- sample {n + 1} for prompt {prompt!r}", file=out)
            print(prompt + tok.detokenize(new), file=out, flush=True)


if __name__ == "__main__":
    run_main(main)
