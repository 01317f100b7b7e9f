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
    MiB, StepMemory, interleaved_times, median, optimizer_state_tensors, synchronize,
    tensor_bytes)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LR = 1e-3  # torch AdamW's default, used by the HF side


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=int, default=None,
                   help="micro-batch size (default 1 on CPU, 8 on GPU)")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257, help="tokenizer vocabulary (HF's size)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 1 CPU, 5 GPU)")
    p.add_argument("--only", choices=("ours", "hf"), default=None, help="run one side only")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one step of each side; print the N ops with the "
                        "most self time")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
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
    model = GPT2LMHeadModel(config).to(device)
    if dtype != torch.float32:
        model.to(dtype)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    model.train()
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


def persistent_bytes(model, optimizer):
    """Parameters + what the optimizer keeps (fp32 masters, moments) between steps."""
    return tensor_bytes(list(model.parameters()) + list(optimizer_state_tensors(optimizer)))


def profile_step(name, step, device, rows):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n--- profile: {name} (one step, sorted by {sort}) ---")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=48))
    print(f"\n--- profile: {name}, by input shapes ---")
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by=sort, row_limit=rows, max_name_column_width=32, max_shapes_column_width=60))


def run_dtype(args, dtype_name, device):
    dtype = DTYPES[dtype_name]
    torch.manual_seed(args.seed)
    builders = {"ours": build_ours, "hf": build_hf}
    if args.only:
        builders = {args.only: builders[args.only]}
    sides = {name: build(args, dtype, device) for name, build in builders.items()}
    steps = {name: side[2] for name, side in sides.items()}
    print(f"\n[{dtype_name}] warmup {args.warmup}, {args.steps} timed steps, alternating")
    times = interleaved_times(steps, args.steps, args.warmup, device, log=print)
    if hasattr(os, "getloadavg"):
        print("  load average after timing: %.1f %.1f %.1f" % os.getloadavg())

    results = {}
    for name, (model, optimizer, step) in sides.items():
        optimizer.zero_grad()  # gradients are not kept between steps in the peak figure
        with StepMemory(device) as mem:
            loss = step()
        wall = median(times[name]["wall"])
        results[name] = dict(ms=wall * 1e3, cpu_ms=median(times[name]["cpu"]) * 1e3,
                             tokens_s=args.batch_size * args.seq_length / wall,
                             state_mib=persistent_bytes(model, optimizer) / MiB,
                             step_mib=mem.peak_bytes / MiB, loss=loss,
                             params=sum(p.numel() for p in model.parameters()))
        method = mem.method
    if args.profile:
        for name, step in steps.items():
            profile_step(f"{name} {dtype_name}", step, device, args.profile)
    if len(times) == 2:
        # Median of the per-round ratios: each round runs both sides back to back, so a
        # slow phase of a shared machine cancels better than in the ratio of the medians.
        for kind in ("wall", "cpu"):
            ratios = [h / o for h, o in zip(times["hf"][kind], times["ours"][kind])]
            results["hf"][f"paired_{kind}"] = median(ratios)
    del sides, steps
    return results, method


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
        torch.backends.cudnn.allow_tf32 = False
        hw = torch.cuda.get_device_name(device)
    else:
        hw = f"CPU, {torch.get_num_threads()} threads"
    import transformers

    print(f"GPT train step: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
          f"seq {args.seq_length}, batch {args.batch_size}, vocab {args.vocab} "
          f"(ours padded to a multiple of 128), dropout {args.dropout}"
          f"{', torch.compile' if args.compile else ''}")
    print(f"device: {hw}; torch {torch.__version__}, transformers {transformers.__version__}")

    table = []
    for dtype_name in args.dtype:
        results, method = run_dtype(args, dtype_name, device)
        table.append((dtype_name, results))

    print(f"\npeak = parameters + optimizer state + the most one step adds ({method})")
    header = (f"{'dtype':<6}{'impl':<6}{'ms/step':>10}{'cpu ms':>10}{'tokens/s':>11}{'state MiB':>11}"
              f"{'step MiB':>10}{'peak MiB':>10}{'loss':>9}{'params':>13}")
    print(header)
    print("-" * len(header))
    for dtype_name, results in table:
        for name, r in results.items():
            print(f"{dtype_name:<6}{name:<6}{r['ms']:>10.1f}{r['cpu_ms']:>10.0f}"
                  f"{r['tokens_s']:>11.1f}"
                  f"{r['state_mib']:>11.0f}{r['step_mib']:>10.0f}"
                  f"{r['state_mib'] + r['step_mib']:>10.0f}{r['loss']:>9.3f}{r['params']:>13,}")
        if len(results) == 2:
            ours, hf = results["ours"], results["hf"]
            print(f"{dtype_name:<6}{'HF/ours':<6}{hf['ms'] / ours['ms']:>9.2f}x"
                  f"{hf['cpu_ms'] / ours['cpu_ms']:>9.2f}x{'':>11}{'':>11}{'':>10}"
                  f"{(hf['state_mib'] + hf['step_mib']) / (ours['state_mib'] + ours['step_mib']):>9.2f}x")
            print(f"{dtype_name:<6}{'paired':<6}{hf['paired_wall']:>9.2f}x"
                  f"{hf['paired_cpu']:>9.2f}x   (median over rounds of HF/ours)")
    return table


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
