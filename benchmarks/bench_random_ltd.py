"""random-LTD speed: GPT forward+backward time at several kept lengths against the dense model.

    python benchmarks/bench_random_ltd.py                          # GPT-2 small, CPU, fp32, batch 1
    python benchmarks/bench_random_ltd.py --device cuda --dtype bf16 --batch-size 8
    python benchmarks/bench_random_ltd.py --repeats 3 --no-memory   # quicker
    python benchmarks/bench_random_ltd.py --profile 25              # + per-op CPU time

Shape: GPT-2 small (12 layers, hidden 768, 12 heads, seq 1024, vocabulary 50257 padded to 50304,
dropout 0.1 on embeddings, attention probabilities and residual branches), training mode. For
each kept length r (default 128, 256, 512, 1024) the middle layers 1..l-2 run on r tokens per
sample (``middle_layer_kept_lengths``: random-LTD's default; the first and last layer stay full).
r = 1024 = s is the control: the block then runs the dense path (no dropping at all).

What is timed (all in one interleaved loop: every round runs every item once, the order reversed
every other round; medians over rounds, and savings as the median over rounds of the per-round
saving, so that slow phases of the shared machine cancel):

- ``stack``: the transformer layers alone: ``ParallelTransformer`` (all l layers, no final
  LayerNorm) on random hidden states [b, s, h] that require grad, with the position ids the GPT
  model passes, forward then backward with a fixed random output gradient; parameter gradients
  are set to None before each call. The random-LTD time includes everything the method adds:
  the hash-based index sampling for all dropping layers (a new iteration number every call, so
  new indices), the flat index computation, gather/scatter forward and backward.
- ``e2e``: the full ``GPTModel`` step: embedding, layers, final LayerNorm, tied LM head over
  50304 entries, vocab-parallel cross entropy, mean loss, backward. No optimizer step (its cost
  does not depend on r; with it the e2e saving would be smaller still).
- ``layer@r``: one transformer layer (layer 1) alone on r contiguous tokens, forward+backward:
  how the layer's own cost scales with r, without sampling or gather/scatter.

Reported per kept length:
- theoretical layer-token saving 1 - (2s + (l-2)r)/(l s) (SPEC 2b; excludes attention's
  quadratic term and the LM head);
- measured layer-stack saving 1 - T_stack(r)/T_stack(dense), and the implementation-efficiency
  ratio measured/theoretical (target >= 0.85);
- predicted stack saving from the single-layer timings, 1 - (2 t(s) + (l-2) t(r)) / (l t(s)):
  what the stack would save with free sampling and gather/scatter; the gap to the measured
  saving is the method's overhead;
- end-to-end saving 1 - T_e2e(r)/T_e2e(dense) beside its ceiling at this r: the saving if the
  layers achieved exactly the theoretical layer-token saving and nothing else changed,
  theoretical(r) * T_stack(dense)/T_e2e(dense); the share of the dense step outside the layers
  (embedding, LM head, loss) is 1 - T_stack(dense)/T_e2e(dense);
- peak memory of one step above the parameters, measured for each configuration in a fresh
  subprocess (one warm-up step, then the measured one): on GPU torch.cuda.max_memory_allocated;
  on CPU the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs,
  freed heap handed back with malloc_trim first) minus the resident set before the step; see
  benchmarks/common.py. torch has no CPU caching-allocator statistics, and tracemalloc does not
  see tensor storage.

Also printed: the cost of the method's own pieces alone (index sampling for all dropping
layers; gather + scatter for all dropping layers, forward and backward), as a share of the dense
stack time. ``--profile N`` profiles one stack step at the smallest kept length and one dense
step and prints the N ops with the most self CPU (or CUDA) time.
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import (  # noqa: E402
    DTYPES, add_shape_args, add_sweep_args, finish_sweep_args, ltd_memory_child, ltd_sweep,
    setup_device)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(p, dtype="fp32", batch_help="default 1 on CPU, 8 on GPU", seq_length=1024,
                   vocab=50257, vocab_help="padded to a multiple of 128")
    p.add_argument("--kept", type=int, nargs="+", default=[128, 256, 512, 1024],
                   help="kept lengths of the middle layers")
    add_sweep_args(p)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return finish_sweep_args(p, p.parse_args(argv), batch_cpu=1, batch_gpu=8)


class Setup:
    """Config, parallel state (with the dropout RNG tracker), inputs shared by every item, and
    the pieces ``benchmarks.common.ltd_sweep`` times: the layer stack, the e2e model (here
    GPTModel), one layer, and a step function for each."""

    causal = True  # the layer stack's attention

    def __init__(self, args):
        from megatron.model.config import TransformerConfig
        from megatron.parallel.random import build_rng_tracker
        from megatron.parallel.state import ParallelState
        from megatron.tokenizer.abstract import vocab_size_with_padding

        self.args = args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.config = TransformerConfig(
            num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
            seq_length=args.seq_length,
            padded_vocab_size=vocab_size_with_padding(args.vocab, 128, 1),
            hidden_dropout=args.dropout, attention_dropout=args.dropout, params_dtype=self.dtype)
        self.parallel = ParallelState(rng_tracker=build_rng_tracker(args.seed, tp_rank=0))
        b, s, h = args.batch_size, args.seq_length, args.hidden
        gen = torch.Generator().manual_seed(args.seed)
        self.hidden = torch.randn(b, s, h, generator=gen).to(self.device, self.dtype)
        self.out_grad = torch.randn(b, s, h, generator=gen).to(self.device, self.dtype)
        self.position_ids = torch.arange(s, device=self.device).expand(b, s)  # as GPTModel does
        text = torch.randint(0, args.vocab, (b, s + 1), generator=gen).to(self.device)
        self.tokens, self.labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
        self.sample_ids = torch.arange(b)  # the data loader's sample indices (CPU)
        self.attention_mask = None  # GPT: the layers apply the causal mask themselves
        self.iteration = 0

    def token_drop(self, kept):
        """A TokenDropState for the next iteration (new indices every call); None = dense."""
        from megatron.ltd.dropping import TokenDropState, middle_layer_kept_lengths

        if kept is None:
            return None
        self.iteration += 1
        return TokenDropState(seed=self.args.seed, iteration=self.iteration,
                              kept_lengths=middle_layer_kept_lengths(self.args.layers, kept),
                              sample_ids=self.sample_ids)

    def build_stack(self):
        from megatron.model.transformer import ParallelTransformer

        stack = ParallelTransformer(self.config, self.parallel, post_process=False,
                                    causal=self.causal)
        return stack.to(self.device).train()

    def build_e2e(self):
        from megatron.model import GPTModel

        return GPTModel(self.config, parallel=self.parallel).to(self.device).train()

    def stack_step(self, stack, kept):
        x = self.hidden.detach().requires_grad_(True)

        def step():
            stack.zero_grad(set_to_none=True)
            out = stack(x, self.position_ids, self.attention_mask,
                        token_drop=self.token_drop(kept))
            out.backward(self.out_grad)
            x.grad = None
        return step

    def e2e_step(self, model, kept):
        def step():
            model.zero_grad(set_to_none=True)
            loss = model(self.tokens, labels=self.labels, token_drop=self.token_drop(kept))
            loss.mean().backward()
        return step

    def layer_positions(self, r):
        """The r positions the single-layer item runs on: here the first r."""
        return slice(0, r)

    def layer_step(self, layer, r):
        cols = self.layer_positions(r)
        x = self.hidden[:, cols].detach().clone().requires_grad_(True)
        grad = self.out_grad[:, cols].contiguous()
        mask = (None if self.attention_mask is None
                else self.attention_mask[..., cols].contiguous())  # the kept tokens' columns

        def step():
            layer.zero_grad(set_to_none=True)
            layer(x, None, mask).backward(grad)
            x.grad = None
        return step


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        return ltd_memory_child(Setup(args))
    device, hw = setup_device(args)
    l, s, b = args.layers, args.seq_length, args.batch_size
    print(f"random-LTD step time: {l} layers, hidden {args.hidden}, {args.heads} heads, seq {s}, "
          f"batch {b}, vocab {args.vocab} (padded to a multiple of 128), dropout "
          f"{args.dropout}, {args.dtype}, layers 1..{l - 2} drop to r")
    return ltd_sweep(args, Setup(args), hw, __file__,
                     e2e_text="full GPTModel forward + loss + backward, no optimizer",
                     outside_text="embedding, LM head, loss")


if __name__ == "__main__":
    main()
