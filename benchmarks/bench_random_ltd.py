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
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import (  # noqa: E402
    MiB, StepMemory, interleaved_times, median, synchronize)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DENSE = "dense"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=int, default=None, help="default 1 on CPU, 8 on GPU")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257, help="padded to a multiple of 128")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--kept", type=int, nargs="+", default=[128, 256, 512, 1024],
                   help="kept lengths of the middle layers")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1 CPU, 3 GPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-e2e", action="store_true", help="time the layer stack only")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile one stack step (smallest r, and dense); print the top N ops")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.batch_size = args.batch_size or (8 if gpu else 1)
    args.repeats = args.repeats or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if any(not 1 <= r <= args.seq_length for r in args.kept):
        p.error(f"--kept values must be in [1, {args.seq_length}]")
    return args


def theoretical_saving(layers: int, s: int, r: int) -> float:
    """SPEC 2b: 1 - (2s + (l-2)r) / (l s), the layer-token saving (r capped at s)."""
    return 1.0 - (2 * s + (layers - 2) * min(r, s)) / (layers * s)


class Setup:
    """Config, parallel state (with the dropout RNG tracker), inputs shared by every item."""

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

        stack = ParallelTransformer(self.config, self.parallel, post_process=False)
        return stack.to(self.device).train()

    def build_gpt(self):
        from megatron.model import GPTModel

        return GPTModel(self.config, parallel=self.parallel).to(self.device).train()

    def stack_step(self, stack, kept):
        x = self.hidden.detach().requires_grad_(True)

        def step():
            stack.zero_grad(set_to_none=True)
            out = stack(x, self.position_ids, None, token_drop=self.token_drop(kept))
            out.backward(self.out_grad)
            x.grad = None
        return step

    def gpt_step(self, model, kept):
        def step():
            model.zero_grad(set_to_none=True)
            loss = model(self.tokens, labels=self.labels, token_drop=self.token_drop(kept))
            loss.mean().backward()
        return step

    def layer_step(self, layer, r):
        x = self.hidden[:, :r].detach().clone().requires_grad_(True)
        grad = self.out_grad[:, :r].contiguous()

        def step():
            layer.zero_grad(set_to_none=True)
            layer(x, None, None).backward(grad)
            x.grad = None
        return step


def config_name(kept, s):
    return DENSE if kept is None else (f"r={kept}" if kept < s else f"r={kept} (=s)")


def time_pieces(setup, kept, repeats=15):
    """Median seconds of (index sampling for all dropping layers, gather+scatter fwd+bwd for all
    dropping layers) at kept length ``kept``, each alone."""
    from megatron.ltd.dropping import (flat_token_indices, gather_tokens, kept_indices_by_layer,
                                       scatter_tokens)

    args, device = setup.args, setup.device
    s = args.seq_length
    layer_ids = list(range(args.layers))

    def sample():
        return kept_indices_by_layer(setup.token_drop(kept), layer_ids, s, device)

    drops = sample()
    x = setup.hidden.detach().requires_grad_(True)

    def move():
        hidden = x
        for indices in drops.values():
            flat = flat_token_indices(indices, s)
            hidden = scatter_tokens(hidden, indices, gather_tokens(hidden, indices, flat), flat)
        hidden.backward(setup.out_grad)
        x.grad = None

    out = []
    for fn in (sample, move):
        fn()
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        out.append(median(times))
    return out


def profile_stack(setup, stack, kept, rows):
    from torch.profiler import ProfilerActivity, profile

    device = setup.device
    step = setup.stack_step(stack, kept)
    step()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    name = config_name(kept, setup.args.seq_length)
    print(f"\n--- profile: layer stack, {name} (one forward+backward, sorted by {sort}) ---")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=52))


def memory_child(args):
    """One configuration in this fresh process: peak of one stack step and of one e2e step."""
    kept = None if args.memory_child == DENSE else int(args.memory_child)
    setup = Setup(args)
    out = {}
    for what, build, make in (("stack", setup.build_stack, setup.stack_step),
                              ("e2e", setup.build_gpt, setup.gpt_step)):
        if what == "e2e" and args.no_e2e:
            continue
        module = build()
        step = make(module, kept)
        step()  # warm-up: lazy initialisation, allocator pools
        module.zero_grad(set_to_none=True)
        with StepMemory(setup.device) as mem:
            step()
        out[what] = mem.peak_bytes / MiB
        out["method"] = mem.method
        del module, step
    print("MEMORY " + json.dumps(out))


def measure_memory(args, configs):
    """Run ``memory_child`` for each configuration in a fresh subprocess."""
    results = {}
    passthrough = ["--device", args.device, "--dtype", args.dtype,
                   "--batch-size", str(args.batch_size), "--seq-length", str(args.seq_length),
                   "--layers", str(args.layers), "--hidden", str(args.hidden),
                   "--heads", str(args.heads), "--vocab", str(args.vocab),
                   "--dropout", str(args.dropout), "--seed", str(args.seed),
                   "--kept", *map(str, args.kept)]
    if args.no_e2e:
        passthrough.append("--no-e2e")
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    for kept in configs:
        child = DENSE if kept is None else str(kept)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", child,
                               *passthrough], capture_output=True, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")]
        if proc.returncode or not line:
            print(f"  memory child {child} failed:\n{proc.stderr[-2000:]}")
            continue
        results[kept] = json.loads(line[-1][len("MEMORY "):])
        print(f"  memory {config_name(kept, args.seq_length)}: " + ", ".join(
            f"{k} {v:.0f} MiB" for k, v in results[kept].items() if k != "method"))
    return results


def paired_saving(times, name, base, kind):
    """Median over rounds of 1 - t(name)/t(base) within the round."""
    return median([1.0 - t / b for t, b in zip(times[name][kind], times[base][kind])])


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        return memory_child(args)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
        hw = torch.cuda.get_device_name(device)
    else:
        hw = f"CPU, {torch.get_num_threads()} threads"
    l, s, b = args.layers, args.seq_length, args.batch_size
    print(f"random-LTD step time: {l} layers, hidden {args.hidden}, {args.heads} heads, seq {s}, "
          f"batch {b}, vocab {args.vocab} (padded to a multiple of 128), dropout "
          f"{args.dropout}, {args.dtype}, layers 1..{l - 2} drop to r")
    print(f"device: {hw}; torch {torch.__version__}; {args.repeats} rounds after "
          f"{args.warmup} warm-up, interleaved")

    setup = Setup(args)
    configs = [None] + sorted(set(args.kept))
    stack = setup.build_stack()
    steps = {}
    for kept in configs:
        steps[("stack", kept)] = setup.stack_step(stack, kept)
    gpt = None
    if not args.no_e2e:
        gpt = setup.build_gpt()
        for kept in configs:
            steps[("e2e", kept)] = setup.gpt_step(gpt, kept)
    layer = stack.layers[min(1, l - 1)]
    lengths = sorted({min(r, s) for r in args.kept} | {s})
    for r in lengths:
        steps[("layer", r)] = setup.layer_step(layer, r)
    named = {f"{k[0]}:{k[1] if k[1] is not None else DENSE}": v for k, v in steps.items()}
    start = time.perf_counter()
    times = interleaved_times(named, args.repeats, args.warmup, device,
                              log=lambda line: print(line[:400] + ("..." if len(line) > 400 else "")))
    print(f"  timing took {time.perf_counter() - start:.0f} s")
    if hasattr(os, "getloadavg"):
        print("  load average after timing: %.1f %.1f %.1f" % os.getloadavg())

    pieces = {kept: time_pieces(setup, kept) for kept in configs if kept is not None and kept < s}

    if args.profile:
        profile_stack(setup, stack, min(args.kept), args.profile)
        profile_stack(setup, stack, None, args.profile)
    del stack, gpt, steps, named

    memory = {}
    if not args.no_memory:
        print("peak memory, one fresh subprocess per configuration:")
        memory = measure_memory(args, configs)

    def med(key, kind="wall"):
        return median(times[key][kind]) * 1e3

    t_layer_s = med(f"layer:{s}")
    rows = []
    for kept in configs:
        key = DENSE if kept is None else kept
        row = {"config": config_name(kept, s), "kept": kept,
               "theory": 0.0 if kept is None else theoretical_saving(l, s, kept),
               "stack_ms": med(f"stack:{key}"), "stack_cpu_ms": med(f"stack:{key}", "cpu")}
        for kind in ("wall", "cpu"):
            row[f"stack_saving_{kind}"] = paired_saving(times, f"stack:{key}", f"stack:{DENSE}",
                                                        kind)
        if kept is not None:
            r = min(kept, s)
            row["layer_ms"] = med(f"layer:{r}")
            row["predicted"] = 1.0 - (2 * t_layer_s + (l - 2) * row["layer_ms"]) / (l * t_layer_s)
        if kept is not None and kept < s:
            row["sample_ms"], row["move_ms"] = (x * 1e3 for x in pieces[kept])
        if not args.no_e2e:
            row["e2e_ms"] = med(f"e2e:{key}")
            row["e2e_cpu_ms"] = med(f"e2e:{key}", "cpu")
            for kind in ("wall", "cpu"):
                row[f"e2e_saving_{kind}"] = paired_saving(times, f"e2e:{key}", f"e2e:{DENSE}",
                                                          kind)
        if kept in memory:
            row.update({f"mem_{k}": v for k, v in memory[kept].items()})
        rows.append(row)

    dense = rows[0]
    layer_share = dense["stack_ms"] / dense["e2e_ms"] if "e2e_ms" in dense else None
    method = next((m["method"] for m in memory.values()), None)
    print()
    if layer_share is not None:
        print(f"dense step: layer stack {dense['stack_ms']:.0f} ms of the e2e step "
              f"{dense['e2e_ms']:.0f} ms = {layer_share:.1%} (layers 1..{l - 2}: "
              f"{layer_share * (l - 2) / l:.1%}); outside the layers (embedding, LM head, loss): "
              f"{1 - layer_share:.1%}")
    print(f"single layer fwd+bwd at s={s}: {t_layer_s:.1f} ms")
    head = (f"{'config':<14}{'theory':>8}{'stack ms':>10}{'saving':>8}{'ratio':>7}{'cpu sav':>8}"
            f"{'cpu rat':>8}{'pred':>7}{'e2e ms':>9}{'e2e sav':>8}{'ceiling':>8}{'cpu sav':>8}"
            f"{'stackMiB':>9}{'e2eMiB':>8}")
    print(head)
    print("-" * len(head))
    for row in rows:
        th = row["theory"]

        def ratio(x):
            return f"{x / th:>7.2f}" if th > 0 else f"{'-':>7}"
        line = (f"{row['config']:<14}{th:>8.1%}{row['stack_ms']:>10.0f}"
                f"{row['stack_saving_wall']:>8.1%}{ratio(row['stack_saving_wall'])}"
                f"{row['stack_saving_cpu']:>8.1%}{ratio(row['stack_saving_cpu']):>8}"
                f"{row['predicted'] if 'predicted' in row else 0:>7.1%}")
        if "e2e_ms" in row:
            ceiling = th * layer_share
            line += (f"{row['e2e_ms']:>9.0f}{row['e2e_saving_wall']:>8.1%}{ceiling:>8.1%}"
                     f"{row['e2e_saving_cpu']:>8.1%}")
        else:
            line += f"{'':>33}"
        line += (f"{row.get('mem_stack', float('nan')):>9.0f}"
                 f"{row.get('mem_e2e', float('nan')):>8.0f}")
        print(line)
    print("\ntheory: layer-token saving 1-(2s+(l-2)r)/(ls); saving: 1 - T(r)/T(dense) of the "
          "layer stack fwd+bwd, wall, median of per-round pairs; ratio = saving/theory; cpu: "
          "the same in process CPU time; pred: the stack saving predicted from one layer's "
          "time at r and s (no sampling/gather/scatter); e2e: full GPTModel forward + loss + "
          "backward, no optimizer; ceiling: theory x the layers' share of the dense e2e step; "
          f"MiB: peak added by one step ({method or 'not measured'})")
    print("\nthe method's own pieces alone (all dropping layers, median of 15 calls):")
    for row in rows:
        if "sample_ms" in row:
            print(f"  {row['config']:<8} index sampling {row['sample_ms']:6.2f} ms, "
                  f"gather+scatter fwd+bwd {row['move_ms']:6.2f} ms = "
                  f"{(row['sample_ms'] + row['move_ms']) / dense['stack_ms']:.1%} of the dense "
                  f"stack; one layer at r: {row['layer_ms']:.1f} ms "
                  f"({row['layer_ms'] / t_layer_s:.3f} of s, r/s = {row['kept'] / s:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "layer_share": layer_share,
                       "memory_method": method, "times": times}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
