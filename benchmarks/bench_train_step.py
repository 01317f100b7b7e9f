"""Training-step time of our GPT against Hugging Face GPT2LMHeadModel, same shape, side by side.

    python benchmarks/bench_train_step.py                        # GPT-2 small, CPU, fp32 + bf16
    python benchmarks/bench_train_step.py --device cuda --steps 20 --warmup 5
    python benchmarks/bench_train_step.py --layers 2 --hidden 128 --heads 4 --seq-length 256
    python benchmarks/bench_train_step.py --dtype fp32 --profile 25   # per-op CPU time, both sides

One step is forward + backward + optimizer step on one micro-batch of random tokens (no data
loading). Both models get the same tokens, batch and sequence length, and dropout 0.1 on
embeddings, attention probabilities and residual branches.

- ours: ``GPTModel`` (tied embeddings, vocabulary padded to a multiple of 128 as Megatron does:
  50257 -> 50304) with the model-parallel RNG tracker of ``megatron.training``, the optimizer
  from ``build_optimizer`` (torch AdamW, fused where the device supports it, weight decay 0.01
  except biases/norms, gradient clipping at 1.0 as Megatron's default; bf16:
  ``Float16OptimizerWithFloat16Params``, bf16 model with fp32 master weights), and one call of
  ``megatron.training``'s training step (``StepRunner.train_step``, or ``train_step`` in the
  earlier layout) with ``pretrain_gpt``'s forward step (loss: mean per-token
  cross entropy in fp32, from our vocab-parallel cross entropy).
- HF: ``GPT2LMHeadModel(config)`` with ``attn_implementation="sdpa"``, vocabulary 50257,
  ``model(input_ids, labels=input_ids).loss`` (HF shifts the labels; mean cross entropy over
  s - 1 tokens, logits upcast to fp32), ``torch.optim.AdamW(model.parameters())`` with default
  settings; bf16: ``model.to(torch.bfloat16)`` (pure bf16 weights and optimizer state).

Time: median over ``--steps`` timed steps after ``--warmup``, the two models alternating
(A B, B A, ...). Peak memory: the parameters and optimizer state kept between steps plus the
most memory one step adds on top of them (activations, gradients, temporaries); see
benchmarks/common.py for how it is measured on CPU and GPU. ``--compile`` wraps both models in
``torch.compile`` (opt-in; compile time is excluded by the warmup).
"""

import argparse
import contextlib
import os
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import (  # noqa: E402
    add_shape_args, compare_train_steps, gpu_requested, hf_train_model, setup_device)

LR = 1e-3  # torch AdamW's default, used by the HF side


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p, dtype=["fp32", "bf16"],
                   batch_help="micro-batch size (default 1 on CPU, 8 on GPU)", seq_length=1024,
                   vocab=50257, vocab_help="tokenizer vocabulary (HF's size)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 1 CPU, 5 GPU)")
    p.add_argument("--only", choices=("ours", "hf"), default=None, help="run one side only")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one step of each side; print the N ops with the "
                        "most self time")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    gpu = gpu_requested(p, args)
    args.batch_size = args.batch_size or (8 if gpu else 1)
    args.steps = args.steps or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    return args


def build_ours(args, dtype, device):
    """GPTModel + build_optimizer + the training loop's step, wired as megatron.training does."""
    import pretrain_gpt
    from megatron import training
    from megatron.model import GPTModel
    from megatron.model.config import TransformerConfig
    from megatron.optim import build_optimizer
    from megatron.parallel.random import build_rng_tracker
    from megatron.parallel.state import ParallelState
    from megatron.tokenizer.abstract import vocab_size_with_padding

    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        seq_length=args.seq_length, padded_vocab_size=vocab_size_with_padding(args.vocab, 128, 1),
        hidden_dropout=args.dropout, attention_dropout=args.dropout, params_dtype=dtype)
    parallel = ParallelState(rng_tracker=build_rng_tracker(args.seed, tp_rank=0))
    model = GPTModel(config, parallel=parallel).to(device)
    optimizer = build_optimizer(model, lr=LR, bf16=dtype == torch.bfloat16, log=lambda _: None)
    flags = types.SimpleNamespace(
        device=str(device), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, num_micro_batches=1, micro_batch_size=args.batch_size,
        seq_length=args.seq_length, hidden_size=args.hidden, tensor_model_parallel_size=1,
        sequence_parallel=False, params_dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    forward_step = pretrain_gpt.forward_step_provider(flags, types.SimpleNamespace(eod=0))
    runner = torch.compile(model) if args.compile else model
    text = make_tokens(args, device, args.seq_length + 1)  # tokens + the next-token labels
    batch = {"text": text, "index": torch.arange(args.batch_size)}  # what the data loader gives

    if hasattr(training, "StepRunner"):  # the loop's per-rank step object
        stepper = training.StepRunner(flags, parallel, model, runner, optimizer, forward_step)

        def train_step():
            return stepper.train_step(iter([batch]))
    else:  # earlier layout: a train_step function
        def train_step():
            return training.train_step(flags, forward_step, iter([batch]), runner, optimizer)

    def step():
        losses, _, _ = train_step()
        return float(losses["lm loss"])

    return model, optimizer, step


def build_hf(args, dtype, device):
    """GPT2LMHeadModel(config), SDPA attention, labels -> loss, default torch AdamW."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config notices about the loss type and token ids
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq_length, n_embd=args.hidden,
                        n_layer=args.layers, n_head=args.heads, resid_pdrop=args.dropout,
                        embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                        bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1)
    config._attn_implementation = "sdpa"
    model = hf_train_model(GPT2LMHeadModel(config), dtype, device)
    optimizer = torch.optim.AdamW(model.parameters())
    runner = torch.compile(model) if args.compile else model
    tokens = make_tokens(args, device, args.seq_length)

    def step():
        optimizer.zero_grad()
        loss = runner(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return model, optimizer, step


def make_tokens(args, device, length):
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, args.vocab, (args.batch_size, length), generator=gen).to(device)


def main(argv=None):
    args = parse_args(argv)
    device, hw = setup_device(args)
    print(f"GPT train step: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
          f"seq {args.seq_length}, batch {args.batch_size}, vocab {args.vocab} "
          f"(ours padded to a multiple of 128), dropout {args.dropout}"
          f"{', torch.compile' if args.compile else ''}")
    return compare_train_steps(args, device, hw, {"ours": build_ours, "hf": build_hf})


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
