"""random-LTD speed for BERT: forward+backward time at several kept lengths against the dense model.

    python benchmarks/bench_bert_random_ltd.py                  # BERT-base, s 512, b 2, fp32
    python benchmarks/bench_bert_random_ltd.py --device cuda --dtype bf16 --batch-size 16
    python benchmarks/bench_bert_random_ltd.py --repeats 3 --no-memory   # quicker
    python benchmarks/bench_bert_random_ltd.py --quick          # tiny shape, seconds (smoke)

The BERT counterpart of bench_random_ltd.py (GPT), measured the same way and reported in the
same table (``benchmarks.common.ltd_sweep``: the timing rounds, savings, the cost of index
sampling and gather/scatter, the memory subprocesses, the table), plus the spread over rounds;
bench_random_ltd.py's ``Setup`` is extended here (``BertSetup``) with what BERT changes:

- shape: BERT-base (12 layers, hidden 768, 12 heads, seq 512, vocabulary 30522 padded to 30592,
  two token types, binary head, dropout 0.1), training mode; batch: ``MockBertDataset`` samples
  as in bench_bert_train_step.py (real lengths in [s/2, s], so padding is present, 15% masked);
- the layer stack is bidirectional (``causal=False``) and gets BERT's padding mask [b, 1, 1, s];
  a dropping layer gets the kept tokens' columns of it (the block's gather), so kept padding
  tokens are never attended to. random-LTD's "random" method draws the kept positions uniformly
  over all s positions, padding included, as ``pretrain_bert.py --random-ltd`` does;
- ``e2e``: the full ``BertModel`` forward (embeddings, layers, final LayerNorm, pooler + binary
  head, LM head transform + tied logits over 30592 entries at every position, per-token cross
  entropy) + the loss ``pretrain_bert`` takes (masked-token mean + sentence-order CE) +
  backward; no optimizer step;
- ``layer@r``: layer 1 alone on r tokens spread evenly over the sequence (their padding-mask
  columns with them, so the padding share is the batch's).

Reported per kept length r (default 128, 256, 384, 512 = s, the control): theoretical
layer-token saving 1-(2s+(l-2)r)/(l s) (SPEC 2b), the measured layer-stack saving (median over
rounds of 1 - T(r)/T(dense), wall and process CPU time), their ratio (target >= 0.85), the
saving predicted from single-layer timings, the end-to-end saving beside its ceiling (theory x
the layers' share of the dense e2e step) and the peak memory one step adds (fresh subprocess per
configuration).
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.bench_random_ltd import Setup  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_shape_args, add_sweep_args, finish_sweep_args, ltd_memory_child, ltd_sweep,
    mock_bert_batch, setup_device)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p, dtype="fp32", batch_help="default 2 on CPU, 16 on GPU", seq_length=512,
                   vocab=30522, vocab_help="padded to a multiple of 128")
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--kept", type=int, nargs="+", default=None,
                   help="kept lengths of the middle layers (default 128 256 384 512)")
    add_sweep_args(p)
    p.add_argument("--quick", action="store_true",
                   help="tiny shape (4 layers, hidden 64, seq 64, vocab 1000, kept 16 32 64), "
                        "2 rounds: seconds")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.seq_length, args.vocab = 4, 64, 4, 64, 1000
        args.kept = args.kept or [16, 32, 64]
        args.repeats = args.repeats or 2
    args.kept = args.kept or [128, 256, 384, 512]
    return finish_sweep_args(p, args, batch_cpu=2, batch_gpu=16)


class BertSetup(Setup):
    """bench_random_ltd's Setup for BERT: bidirectional stack with the padding mask, BertModel
    for the e2e step, MockBertDataset's batch."""

    causal = False  # bidirectional; the stack gets the padding mask (self.attention_mask)

    def __init__(self, args):
        super().__init__(args)
        import dataclasses

        from megatron.model.bert import bert_attention_mask

        self.config = dataclasses.replace(self.config, num_tokentypes=2,
                                          max_position_embeddings=args.seq_length)
        self.batch = batch = mock_bert_batch(args, self.device)
        self.attention_mask = bert_attention_mask(batch["padding_mask"])  # [b, 1, 1, s]
        self.real_lengths = batch["padding_mask"].sum(1).tolist()

    def build_e2e(self):
        from megatron.model import BertModel

        return BertModel(self.config, parallel=self.parallel,
                         add_binary_head=True).to(self.device).train()

    def e2e_step(self, model, kept):  # pretrain_bert's loss
        import torch.nn.functional as F

        b = self.batch
        loss_mask = b["loss_mask"].float()

        def step():
            model.zero_grad(set_to_none=True)
            lm_loss, sop_logits = model(b["text"], b["padding_mask"], tokentype_ids=b["types"],
                                        lm_labels=b["labels"], token_drop=self.token_drop(kept))
            loss = (lm_loss.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
            loss = loss + F.cross_entropy(sop_logits.float(), b["is_random"])
            loss.backward()
        return step

    def layer_positions(self, r):
        """r positions spread evenly over the sequence, so that their share of padding is the
        batch's (``layer_step`` takes their padding-mask columns with them)."""
        s = self.args.seq_length
        return torch.arange(r, device=self.device) * s // r


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        return ltd_memory_child(BertSetup(args))
    device, hw = setup_device(args)
    l, s, b = args.layers, args.seq_length, args.batch_size
    setup = BertSetup(args)
    pad = 1.0 - sum(setup.real_lengths) / (b * s)
    print(f"BERT random-LTD step time: {l} layers, hidden {args.hidden}, {args.heads} heads, "
          f"seq {s}, batch {b} (real lengths {setup.real_lengths}, {pad:.1%} padding), vocab "
          f"{args.vocab} (padded to a multiple of 128), dropout {args.dropout}, {args.dtype}, "
          f"layers 1..{l - 2} drop to r")
    return ltd_sweep(args, setup, hw, __file__,
                     e2e_text="full BertModel forward + MLM and sentence-order loss + backward, "
                              "no optimizer",
                     outside_text="embeddings, pooler and binary head, LM head, loss",
                     memory_flags=["--mask-prob", str(args.mask_prob)], spread=True)


if __name__ == "__main__":
    main()
