"""Training-step time of our BERT against Hugging Face BertForPreTraining, same shape, side by side.

    python benchmarks/bench_bert_train_step.py                   # BERT-base, seq 512, batch 2
    python benchmarks/bench_bert_train_step.py --dtype fp32 --profile 25   # + per-op CPU time
    python benchmarks/bench_bert_train_step.py --device cuda --batch-size 16 --steps 20 --warmup 5
    python benchmarks/bench_bert_train_step.py --quick             # tiny shape, seconds (smoke)

One step is forward + backward + optimizer step on one micro-batch of BERT pretraining samples
(no data loading): ``MockBertDataset`` samples (what ``pretrain_bert.py --mock-data`` trains on),
[CLS] A [SEP] B [SEP] then padding, real lengths uniform in [s/2, s] so every batch has padding
(the fraction is printed), 15% of the real tokens masked, a random sentence-order label. Both
models get the same tokens, token types, padding mask, labels, batch and sequence length, and
dropout 0.1 on embeddings, attention probabilities and residual branches.

- ours: ``BertModel`` as ``pretrain_bert.py`` builds it (binary head, two token types,
  vocabulary padded to a multiple of 128 as Megatron does: 30522 -> 30592, pre-LN, Megatron's
  defaults), the RNG tracker, ``build_optimizer`` (torch AdamW, fused where the device supports
  it, weight decay 0.01 except biases/norms, gradient clipping at 1.0; bf16:
  ``Float16OptimizerWithFloat16Params``, bf16 model, fp32 master weights and main grads), one
  call of the training loop's ``StepRunner.train_step`` with ``pretrain_bert``'s forward step
  (MLM loss over the masked positions from the LM logits of every position + sentence-order
  loss).
- HF: ``BertForPreTraining(config)`` with ``attn_implementation="sdpa"``, vocabulary 30522,
  ``model(input_ids, attention_mask, token_type_ids, labels, next_sentence_label).loss`` (logits
  of every position, cross entropy over the masked ones, + the NSP loss); bf16:
  ``model.to(torch.bfloat16)`` (pure bf16 weights and optimizer state). Optimizer
  (``--hf-optimizer``): ``same`` (default) = what ours does: ``torch.optim.AdamW`` fused where
  supported, lr 1e-3, weight decay 0.01 except biases and LayerNorms, clip at 1.0; ``default``
  = ``torch.optim.AdamW(model.parameters())`` as bench_train_step.py gives GPT-2.

Time: median over ``--steps`` timed steps after ``--warmup``, the two models alternating
(A B, B A, ...); "paired" = median over rounds of HF/ours. Peak memory: parameters + optimizer
state + the most one step adds (benchmarks/common.py).
"""

import argparse
import contextlib
import functools
import os
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import (  # noqa: E402
    BERT_SPECIAL_IDS, add_shape_args, compare_train_steps, gpu_requested, hf_train_model,
    mock_bert_batch, setup_device)

LR = 1e-3
WEIGHT_DECAY = 0.01
CLIP = 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p, dtype=["fp32", "bf16"],
                   batch_help="micro-batch size (default 2 on CPU, 16 on GPU)", seq_length=512,
                   vocab=30522, vocab_help="tokenizer vocabulary (HF's size)")
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 1 CPU, 5 GPU)")
    p.add_argument("--only", choices=("ours", "hf"), default=None, help="run one side only")
    p.add_argument("--hf-optimizer", choices=("same", "default"), default="same",
                   help="same: ours' AdamW settings, fused, clipping; default: "
                        "torch.optim.AdamW(model.parameters())")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one step of each side; print the N ops with the "
                        "most self time")
    p.add_argument("--quick", action="store_true",
                   help="tiny shape (2 layers, hidden 64, seq 64, vocab 1000), 2 steps: seconds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice); 1 is the steadiest "
                        "on a shared machine (no OpenMP threads waiting for a busy core)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    gpu = gpu_requested(p, args)
    if args.quick:
        args.layers, args.hidden, args.heads, args.seq_length, args.vocab = 2, 64, 4, 64, 1000
        args.steps = args.steps or 2
        args.warmup = 1 if args.warmup is None else args.warmup
    args.batch_size = args.batch_size or (16 if gpu else 2)
    args.steps = args.steps or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    return args


def make_batch(args, device):
    """A collated micro-batch of MockBertDataset samples (Megatron's keys), on ``device``, with
    the sample indices the data loader adds (on the CPU)."""
    batch = mock_bert_batch(args, device)
    batch["index"] = torch.arange(args.batch_size)
    return batch


def build_ours(args, dtype, device, batch):
    """BertModel + build_optimizer + the training loop's step, wired as pretrain_bert does."""
    import pretrain_bert
    from megatron import training
    from megatron.model import BertModel
    from megatron.model.config import TransformerConfig
    from megatron.optim import build_optimizer
    from megatron.parallel.random import build_rng_tracker
    from megatron.parallel.state import ParallelState
    from megatron.tokenizer.abstract import vocab_size_with_padding

    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        seq_length=args.seq_length, max_position_embeddings=args.seq_length,
        padded_vocab_size=vocab_size_with_padding(args.vocab, 128, 1), num_tokentypes=2,
        hidden_dropout=args.dropout, attention_dropout=args.dropout, params_dtype=dtype)
    parallel = ParallelState(rng_tracker=build_rng_tracker(args.seed, tp_rank=0))
    model = BertModel(config, parallel=parallel, add_binary_head=True).to(device)
    optimizer = build_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, clip_grad=CLIP,
                                bf16=dtype == torch.bfloat16, log=lambda _: None)
    flags = types.SimpleNamespace(
        device=str(device), bert_binary_head=True, num_micro_batches=1,
        micro_batch_size=args.batch_size, seq_length=args.seq_length, hidden_size=args.hidden,
        tensor_model_parallel_size=1, sequence_parallel=False,
        params_dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    special_ids = types.SimpleNamespace(**BERT_SPECIAL_IDS)
    forward_step = pretrain_bert.forward_step_provider(flags, special_ids)
    stepper = training.StepRunner(flags, parallel, model, model, optimizer, forward_step)

    def step():
        losses, _, _ = stepper.train_step(iter([batch]))
        return float(losses["lm loss"] + losses["sop loss"])

    return model, optimizer, step


def build_hf(args, dtype, device, batch):
    """BertForPreTraining(config), SDPA attention, labels -> loss, AdamW (see --hf-optimizer)."""
    from transformers import BertConfig, BertForPreTraining
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        intermediate_size=4 * args.hidden, hidden_dropout_prob=args.dropout,
                        attention_probs_dropout_prob=args.dropout,
                        max_position_embeddings=args.seq_length, type_vocab_size=2,
                        pad_token_id=BERT_SPECIAL_IDS["pad"])
    config._attn_implementation = "sdpa"
    model = hf_train_model(BertForPreTraining(config), dtype, device)
    if args.hf_optimizer == "same":
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
        groups = [{"params": decay, "weight_decay": WEIGHT_DECAY},
                  {"params": no_decay, "weight_decay": 0.0}]
        try:
            optimizer = torch.optim.AdamW(groups, lr=LR, fused=True)
        except (RuntimeError, TypeError):
            optimizer = torch.optim.AdamW(groups, lr=LR)
        clip = CLIP
    else:
        optimizer, clip = torch.optim.AdamW(model.parameters()), None
    labels = torch.where(batch["loss_mask"] > 0, batch["labels"], -100)  # HF's ignore index
    inputs = dict(input_ids=batch["text"], attention_mask=batch["padding_mask"],
                  token_type_ids=batch["types"], labels=labels,
                  next_sentence_label=batch["is_random"])

    def step():
        optimizer.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        return float(loss.detach())

    return model, optimizer, step


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, hw = setup_device(args)
    batch = make_batch(args, device)
    real = batch["padding_mask"].sum(1).tolist()
    pad_frac = 1.0 - sum(real) / (args.batch_size * args.seq_length)
    print(f"BERT train step: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
          f"seq {args.seq_length}, batch {args.batch_size}, vocab {args.vocab} (ours padded to a "
          f"multiple of 128), dropout {args.dropout}; real lengths {real} ({pad_frac:.1%} "
          f"padding), {int(batch['loss_mask'].sum())} masked tokens; HF optimizer: "
          f"{args.hf_optimizer}")
    builders = {"ours": functools.partial(build_ours, batch=batch),
                "hf": functools.partial(build_hf, batch=batch)}
    return compare_train_steps(args, device, hw, builders, spread=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
