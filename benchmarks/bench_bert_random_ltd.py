"""random-LTD speed for BERT: forward+backward time at several kept lengths against the dense model.

    python benchmarks/bench_bert_random_ltd.py                  # BERT-base, s 512, b 2, fp32
    python benchmarks/bench_bert_random_ltd.py --device cuda --dtype bf16 --batch-size 16
    python benchmarks/bench_bert_random_ltd.py --repeats 3 --no-memory   # quicker
    python benchmarks/bench_bert_random_ltd.py --quick          # tiny shape, seconds (smoke)

The BERT counterpart of bench_random_ltd.py (GPT), measured the same way and reported in the
same table; its helpers (the theoretical saving, per-round paired savings, the cost of index
sampling and gather/scatter, the stack profile) are imported from there, and its ``Setup`` is
extended here (``BertSetup``) with what BERT changes:

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
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import bench_random_ltd as gpt_bench  # noqa: E402
from benchmarks.bench_random_ltd import (  # noqa: E402
    DENSE, DTYPES, config_name, paired_saving, profile_stack, theoretical_saving, time_pieces)
from benchmarks.common import MiB, StepMemory, interleaved_times, median  # noqa: E402

SPECIAL = dict(cls=101, sep=102, pad=0, mask=103)  # bert-base-uncased's ids


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=int, default=None, help="default 2 on CPU, 16 on GPU")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=30522, help="padded to a multiple of 128")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--kept", type=int, nargs="+", default=None,
                   help="kept lengths of the middle layers (default 128 256 384 512)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1 CPU, 3 GPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-e2e", action="store_true", help="time the layer stack only")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile one stack step (smallest r, and dense); print the top N ops")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shape (4 layers, hidden 64, seq 64, vocab 1000, kept 16 32 64), "
                        "2 rounds: seconds")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.quick:
        args.layers, args.hidden, args.heads, args.seq_length, args.vocab = 4, 64, 4, 64, 1000
        args.kept = args.kept or [16, 32, 64]
        args.repeats = args.repeats or 2
    args.kept = args.kept or [128, 256, 384, 512]
    args.batch_size = args.batch_size or (16 if gpu else 2)
    args.repeats = args.repeats or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if any(not 1 <= r <= args.seq_length for r in args.kept):
        p.error(f"--kept values must be in [1, {args.seq_length}]")
    return args


class BertSetup(gpt_bench.Setup):
    """bench_random_ltd's Setup for BERT: bidirectional stack with the padding mask, BertModel
    for the e2e step, MockBertDataset's batch."""

    def __init__(self, args):
        super().__init__(args)
        import dataclasses

        from megatron.data.mock_dataset import MockBertDataset
        from megatron.model.bert import bert_attention_mask

        self.config = dataclasses.replace(self.config, num_tokentypes=2,
                                          max_position_embeddings=args.seq_length)
        data = MockBertDataset(args.batch_size, args.seq_length, args.vocab,
                               cls_id=SPECIAL["cls"], sep_id=SPECIAL["sep"],
                               pad_id=SPECIAL["pad"], mask_id=SPECIAL["mask"], seed=args.seed,
                               mask_prob=args.mask_prob)
        samples = [data[i] for i in range(args.batch_size)]
        batch = {key: torch.as_tensor(np.stack([np.asarray(x[key]) for x in samples]))
                 .to(self.device) for key in samples[0]}
        self.batch = batch
        self.attention_mask = bert_attention_mask(batch["padding_mask"])  # [b, 1, 1, s]
        self.real_lengths = batch["padding_mask"].sum(1).tolist()

    def build_stack(self):
        from megatron.model.transformer import ParallelTransformer

        stack = ParallelTransformer(self.config, self.parallel, post_process=False, causal=False)
        return stack.to(self.device).train()

    def build_gpt(self):  # the e2e model (name kept: bench_random_ltd's helpers call it)
        from megatron.model import BertModel

        return BertModel(self.config, parallel=self.parallel,
                         add_binary_head=True).to(self.device).train()

    build_bert = build_gpt

    def stack_step(self, stack, kept):
        x = self.hidden.detach().requires_grad_(True)

        def step():
            stack.zero_grad(set_to_none=True)
            out = stack(x, self.position_ids, self.attention_mask,
                        token_drop=self.token_drop(kept))
            out.backward(self.out_grad)
            x.grad = None
        return step

    def gpt_step(self, model, kept):  # the e2e step (BERT): pretrain_bert's loss
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

    bert_step = gpt_step

    def layer_step(self, layer, r):
        s = self.args.seq_length
        cols = torch.arange(r, device=self.device) * s // r  # r positions spread over s
        x = self.hidden[:, cols].detach().clone().requires_grad_(True)
        grad = self.out_grad[:, cols].contiguous()
        mask = self.attention_mask[..., cols].contiguous()

        def step():
            layer.zero_grad(set_to_none=True)
            layer(x, None, mask).backward(grad)
            x.grad = None
        return step


def memory_child(args):
    """One configuration in this fresh process: peak of one stack step and of one e2e step."""
    kept = None if args.memory_child == DENSE else int(args.memory_child)
    setup = BertSetup(args)
    out = {}
    for what, build, make in (("stack", setup.build_stack, setup.stack_step),
                              ("e2e", setup.build_bert, setup.bert_step)):
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
    """``memory_child`` for each configuration in a fresh subprocess of this script."""
    results = {}
    passthrough = ["--device", args.device, "--dtype", args.dtype,
                   "--batch-size", str(args.batch_size), "--seq-length", str(args.seq_length),
                   "--layers", str(args.layers), "--hidden", str(args.hidden),
                   "--heads", str(args.heads), "--vocab", str(args.vocab),
                   "--dropout", str(args.dropout), "--mask-prob", str(args.mask_prob),
                   "--seed", str(args.seed), "--kept", *map(str, args.kept)]
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
    setup = BertSetup(args)
    pad = 1.0 - sum(setup.real_lengths) / (b * s)
    print(f"BERT random-LTD step time: {l} layers, hidden {args.hidden}, {args.heads} heads, "
          f"seq {s}, batch {b} (real lengths {setup.real_lengths}, {pad:.1%} padding), vocab "
          f"{args.vocab} (padded to a multiple of 128), dropout {args.dropout}, {args.dtype}, "
          f"layers 1..{l - 2} drop to r")
    print(f"device: {hw}; torch {torch.__version__}; {args.repeats} rounds after "
          f"{args.warmup} warm-up, interleaved")

    configs = [None] + sorted(set(args.kept))
    stack = setup.build_stack()
    steps = {}
    for kept in configs:
        steps[("stack", kept)] = setup.stack_step(stack, kept)
    bert = None
    if not args.no_e2e:
        bert = setup.build_bert()
        for kept in configs:
            steps[("e2e", kept)] = setup.bert_step(bert, kept)
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
    del stack, bert, steps, named

    memory = {}
    if not args.no_memory:
        print("peak memory, one fresh subprocess per configuration:")
        memory = measure_memory(args, configs)

    def med(key, kind="wall"):
        return median(times[key][kind]) * 1e3

    def spread(key):
        return min(times[key]["wall"]) * 1e3, max(times[key]["wall"]) * 1e3

    t_layer_s = med(f"layer:{s}")
    rows = []
    for kept in configs:
        key = DENSE if kept is None else kept
        row = {"config": config_name(kept, s), "kept": kept,
               "theory": 0.0 if kept is None else theoretical_saving(l, s, kept),
               "stack_ms": med(f"stack:{key}"), "stack_cpu_ms": med(f"stack:{key}", "cpu"),
               "stack_ms_range": spread(f"stack:{key}")}
        for kind in ("wall", "cpu"):
            row[f"stack_saving_{kind}"] = paired_saving(times, f"stack:{key}", f"stack:{DENSE}",
                                                        kind)
        per_round = [1.0 - t / d for t, d in zip(times[f"stack:{key}"]["wall"],
                                                 times[f"stack:{DENSE}"]["wall"])]
        row["stack_saving_range"] = (min(per_round), max(per_round))
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
              f"{layer_share * (l - 2) / l:.1%}); outside the layers (embeddings, pooler and "
              f"binary head, LM head, loss): {1 - layer_share:.1%}")
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
            line += (f"{row['e2e_ms']:>9.0f}{row['e2e_saving_wall']:>8.1%}"
                     f"{th * layer_share:>8.1%}{row['e2e_saving_cpu']:>8.1%}")
        else:
            line += f"{'':>33}"
        line += (f"{row.get('mem_stack', float('nan')):>9.0f}"
                 f"{row.get('mem_e2e', float('nan')):>8.0f}")
        print(line)
    print("\ntheory: layer-token saving 1-(2s+(l-2)r)/(ls); saving: 1 - T(r)/T(dense) of the "
          "layer stack fwd+bwd, wall, median of per-round pairs; ratio = saving/theory; cpu: "
          "the same in process CPU time; pred: the stack saving predicted from one layer's "
          "time at r and s (no sampling/gather/scatter); e2e: full BertModel forward + MLM and "
          "sentence-order loss + backward, no optimizer; ceiling: theory x the layers' share "
          f"of the dense e2e step; MiB: peak added by one step ({method or 'not measured'})")
    print("\nspread (wall, over rounds): " + "; ".join(
        f"{row['config']}: stack {row['stack_ms_range'][0]:.0f}-{row['stack_ms_range'][1]:.0f} "
        f"ms" + (f", saving {row['stack_saving_range'][0]:.1%}-{row['stack_saving_range'][1]:.1%}"
                 if row["kept"] is not None else "") for row in rows))
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
