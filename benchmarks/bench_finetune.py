"""Finetuning-step time of our classifier (tasks/glue) against Hugging Face's
BertForSequenceClassification, same shape, batch and dtype, side by side.

    python benchmarks/bench_finetune.py                       # BERT-base, seq 128, batch 8, fp32
    python benchmarks/bench_finetune.py --profile 25           # + per-op CPU time of one step
    python benchmarks/bench_finetune.py --device cuda --dtype bf16 --batch-size 32 --steps 20
    python benchmarks/bench_finetune.py --real-lengths 20:80   # a GLUE-like batch (mostly padding)
    python benchmarks/bench_finetune.py --quick                # tiny shape, seconds (smoke)

One step is forward + backward + optimizer step on one micro-batch of sentence-pair samples (no
data loading): [CLS] A [SEP] B [SEP] then padding (``MockBertDataset`` samples, real lengths
uniform in [s/2, s], so every batch has padding; the fraction is printed), a label in 0..2 per
sample (MNLI's 3 classes). Both models get the same tokens, token types, padding mask and labels,
and dropout 0.1 on embeddings, attention probabilities, residual branches and the pooled output.

- ours: ``Classification`` (megatron/model/classification.py) as tasks/main.py --task MNLI
  builds it (BERT encoder, 2 token types, pooler, dropout, ``classification_head``; vocabulary
  padded to a multiple of 128), the RNG tracker, ``build_optimizer`` (torch AdamW, fused where
  the device supports it, the paper's finetuning weight decay 0.1 except biases/norms, clip 1.0;
  bf16: fp32 master weights and main grads), one call of the training loop's
  ``StepRunner.train_step`` with tasks/finetune_utils' forward step (weighted cross entropy,
  'lm loss').
- HF: ``BertForSequenceClassification(config)`` (num_labels 3) with
  ``attn_implementation="sdpa"``, vocabulary 30522, ``model(..., labels=labels).loss``; the same
  optimizer settings (fused ``torch.optim.AdamW``, lr 1e-5, weight decay 0.1 except biases and
  LayerNorms, ``clip_grad_norm_`` 1.0); bf16: ``model.to(torch.bfloat16)``.

Time: median over ``--steps`` timed steps after ``--warmup``, the two models alternating
(A B, B A, ...); "paired" = median over rounds of HF/ours (benchmarks/common.py). The target of
issue 11 is ours at least 1.2x faster.
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

NUM_CLASSES = 3
LR = 1e-5
WEIGHT_DECAY = 0.1
CLIP = 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p, dtype=["fp32"], batch_help="micro-batch size (default 8 on CPU, 32 on "
                   "GPU)", seq_length=128, vocab=30522, vocab_help="tokenizer vocabulary "
                   "(HF's size)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 1 CPU, 5 GPU)")
    p.add_argument("--only", choices=("ours", "hf"), default=None, help="run one side only")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one step of each side; print the N ops with the "
                        "most self time")
    p.add_argument("--quick", action="store_true",
                   help="tiny shape (2 layers, hidden 64, seq 64, vocab 1000), 2 steps: seconds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--real-lengths", default=None, metavar="LO:HI",
                   help="real lengths uniform in LO..HI, the rest padding (default: the mock "
                        "samples', s/2..s). MNLI's premise + hypothesis in BERT WordPieces are "
                        "mostly 20..80 tokens: --real-lengths 20:80 is a GLUE-like batch")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if args.real_lengths is not None:
        try:
            lo, hi = (int(x) for x in args.real_lengths.split(":"))
        except ValueError:
            p.error(f"--real-lengths {args.real_lengths}: expected LO:HI, e.g. 20:80")
        if not 3 <= lo <= hi <= args.seq_length:
            p.error(f"--real-lengths {args.real_lengths}: need 3 <= LO <= HI <= --seq-length")
        args.real_lengths = (lo, hi)
    gpu = gpu_requested(p, args)
    if args.quick:
        args.layers, args.hidden, args.heads, args.seq_length, args.vocab = 2, 64, 4, 64, 1000
        args.steps = args.steps or 2
        args.warmup = 1 if args.warmup is None else args.warmup
    args.batch_size = args.batch_size or (32 if gpu else 8)
    args.steps = args.steps or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.mask_prob = 0.0  # finetuning inputs: no [MASK]
    return args


def make_batch(args, device):
    """A collated micro-batch of sentence pairs (Megatron's keys) with a label per sample, the
    loader's sample indices and the finetuning loss weights (1: a full global batch)."""
    batch = mock_bert_batch(args, device)
    g = torch.Generator().manual_seed(args.seed)
    if args.real_lengths is not None:  # shorten each sample: [CLS] ... [SEP] then padding
        lo, hi = args.real_lengths
        for i, n in enumerate(torch.randint(lo, hi + 1, (args.batch_size,), generator=g)):
            batch["text"][i, n - 1] = BERT_SPECIAL_IDS["sep"]
            batch["text"][i, n:] = BERT_SPECIAL_IDS["pad"]
            batch["types"][i, n:] = 0
            batch["padding_mask"][i, n:] = 0
    batch["label"] = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=g).to(device)
    batch["loss_weight"] = torch.ones(args.batch_size, device=device)
    batch["index"] = torch.arange(args.batch_size)
    return batch


def build_ours(args, dtype, device, batch):
    """Classification + build_optimizer + the training loop's step, wired as tasks/main.py
    does for MNLI."""
    from megatron import training
    from megatron.model.classification import Classification
    from megatron.model.config import TransformerConfig
    from megatron.optim import build_optimizer
    from megatron.parallel.random import build_rng_tracker
    from megatron.parallel.state import ParallelState
    from megatron.tokenizer.abstract import vocab_size_with_padding
    from tasks.finetune_utils import train_forward_step_provider

    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        seq_length=args.seq_length, max_position_embeddings=args.seq_length,
        padded_vocab_size=vocab_size_with_padding(args.vocab, 128, 1), num_tokentypes=2,
        hidden_dropout=args.dropout, attention_dropout=args.dropout, params_dtype=dtype)
    parallel = ParallelState(rng_tracker=build_rng_tracker(args.seed, tp_rank=0))
    model = Classification(config, NUM_CLASSES, parallel=parallel).to(device)
    optimizer = build_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, clip_grad=CLIP,
                                bf16=dtype == torch.bfloat16, log=lambda _: None)
    flags = types.SimpleNamespace(
        device=str(device), num_micro_batches=1, micro_batch_size=args.batch_size,
        seq_length=args.seq_length, hidden_size=args.hidden, tensor_model_parallel_size=1,
        sequence_parallel=False, params_dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    special_ids = types.SimpleNamespace(**BERT_SPECIAL_IDS)
    forward_step = train_forward_step_provider()(flags, special_ids)
    stepper = training.StepRunner(flags, parallel, model, model, optimizer, forward_step)

    def step():
        losses, _, _ = stepper.train_step(iter([batch]))
        return float(losses["lm loss"])

    return model, optimizer, step


def build_hf(args, dtype, device, batch):
    """BertForSequenceClassification(config), SDPA attention, labels -> loss, the same AdamW."""
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        intermediate_size=4 * args.hidden, hidden_dropout_prob=args.dropout,
                        attention_probs_dropout_prob=args.dropout,
                        max_position_embeddings=args.seq_length, type_vocab_size=2,
                        pad_token_id=BERT_SPECIAL_IDS["pad"], num_labels=NUM_CLASSES)
    config._attn_implementation = "sdpa"
    model = hf_train_model(BertForSequenceClassification(config), dtype, device)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY},
              {"params": no_decay, "weight_decay": 0.0}]
    try:
        optimizer = torch.optim.AdamW(groups, lr=LR, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(groups, lr=LR)
    inputs = dict(input_ids=batch["text"], attention_mask=batch["padding_mask"],
                  token_type_ids=batch["types"], labels=batch["label"])

    def step():
        optimizer.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
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
    print(f"BERT finetuning step ({NUM_CLASSES}-class classifier): {args.layers} layers, hidden "
          f"{args.hidden}, {args.heads} heads, seq {args.seq_length}, batch {args.batch_size}, "
          f"vocab {args.vocab} (ours padded to a multiple of 128), dropout {args.dropout}; real "
          f"lengths {real} ({pad_frac:.1%} padding)")
    builders = {"ours": functools.partial(build_ours, batch=batch),
                "hf": functools.partial(build_hf, batch=batch)}
    return compare_train_steps(args, device, hw, builders, spread=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
