"""Communication volume of each parallel layout, measured against Megatron's analytical formulas,
and the step-time overhead of TP2 / PP2 against one process (CPU, gloo).

    python benchmarks/bench_parallel_comm.py                  # all layouts, ~5 min on 2 cores
    python benchmarks/bench_parallel_comm.py --layouts TP2 PP2 --skip-timing

Each layout (TP2, PP2, DP2, TP2xPP2, TP2xDP2) trains a small GPT with pretrain_gpt.py on mock
data in N gloo processes (tests/distributed_harness.py). Inside every rank, before training, the
torch.distributed functions (all_reduce, all_gather, reduce_scatter, broadcast, send, isend, ...)
are wrapped by counting versions; DDP is given torch's stock ``allreduce_hook`` so its bucket
all-reduces go through the counted ``all_reduce`` too (the same reduction DDP runs natively).
Each call is filed under the code that issued it (mappings.py: tensor-parallel activations;
cross_entropy.py: vocab-parallel CE; p2p.py: pipeline; DDP hook / schedules.average_gradients:
data-parallel gradients; pipeline_utils.py: tied embedding; optim/: grad norm / inf check;
training.py: loss reduction and the stop flag) and converted to the bytes this rank sends:

    all_reduce of N bytes over n ranks      2 (n-1)/n * N   (ring: reduce-scatter + all-gather)
    all_gather / reduce_scatter, chunk N    (n-1) * N
    broadcast of N bytes                    (n-1) * N on the source rank, 0 elsewhere
    send / isend of N bytes                 N

"Measured" is therefore the size of the tensors our code really hands to the collectives in one
steady-state step (the second of three), priced with the ring model; the wire bytes of gloo's
own algorithms (and TCP/IP framing) are not observed. "Analytical" is computed from the model
shape alone, with the formulas of Megatron-LM (Narayanan et al. 2021; Korthikanti et al. 2022),
fp32 (4 bytes per element), per rank per step of m micro-batches of b x s tokens, hidden h,
padded vocabulary V, t/p/d = TP/PP/DP sizes, L_r = layers on this rank's stage:

    TP activations   2(t-1)/t * 4 * m * b * h * (4 * sum_{layers} s_l + [first stage] s
                                                 + [last stage] s)
                     (forward: attention and MLP outputs all-reduced (row-parallel); backward:
                     the gradients of the QKV and fc1 inputs (column-parallel); the
                     vocab-parallel embedding's forward all-reduce and the LM head's input-
                     gradient all-reduce; s_l is the kept length of layer l under random-LTD)
    vocab-parallel CE  last stage: 3 all-reduces of [b, s] fp32 per micro-batch (max, target
                     logit, sum of exponentials): 2(t-1)/t * 4 * 3 * m * b * s
    PP p2p           m * 4 * b * s * h per direction: activations forward (all but the last
                     stage), their gradients backward (all but the first)
    DP gradients     2(d-1)/d * 4 * P_rank, P_rank = parameters held by the rank:
                     per layer 12h^2/t + 7h/t (split QKV/proj/fc1/fc2 weights, QKV and fc1
                     biases) + 6h (replicated proj/fc2 biases, two layer norms); first stage
                     + V h / t + s h (word and position embeddings); last stage + 2h (final
                     norm) + V h / t (its copy of the tied embedding when p > 1)
    tied embedding   p > 1, first and last stage: all-reduce of V h / t over 2 ranks: 4 V h / t
    grad norm        one fp32 all-reduce over the t*p model-parallel ranks (fp32: no inf check)
    loss / stop      last stage: all-reduce of the float64 loss over DP; the loss dict is
                     pickled and broadcast along the pipeline (8-byte size + pickle); every
                     iteration an int32 "stop" flag is all-reduced over the world

The timing part runs the same model at the same global batch (4 micro-batches of 2) as one
process with 1 and with 2 threads, TP2 and PP2 (one thread per rank), and reports the median
step time of the steps after the first. On a shared 2-core CPU these figures are recorded, not a
target: gloo over loopback and 2 processes per 2 cores make TP/PP slower than one process.
"""

import argparse
import json
import multiprocessing
import os
import pickle
import statistics
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

LAYOUTS = {  # name: (tp, pp, dp)
    "TP2": (2, 1, 1),
    "PP2": (1, 2, 1),
    "DP2": (1, 1, 2),
    "TP2xPP2": (2, 2, 1),
    "TP2xDP2": (2, 1, 2),
}
CATEGORIES = ["tp", "ce", "pp", "dp", "emb", "norm", "loss"]
TITLES = {"tp": "TP act", "ce": "vocab CE", "pp": "PP p2p", "dp": "DP grads",
          "emb": "tied emb", "norm": "grad norm", "loss": "loss/stop", "other": "other"}


def model_argv(args, tp, pp, dp, iters, extra=()):
    return ["--num-layers", str(args.layers), "--hidden-size", str(args.hidden),
            "--num-attention-heads", str(args.heads), "--seq-length", str(args.seq),
            "--max-position-embeddings", str(args.seq),
            "--micro-batch-size", str(args.micro_batch),
            "--global-batch-size", str(args.micro_batch * args.micro_batches * dp),
            "--train-iters", str(iters), "--lr", "1e-4", "--lr-warmup-iters", "0",
            "--hidden-dropout", "0", "--attention-dropout", "0",
            "--mock-data", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(args.vocab - 1), "--make-vocab-size-divisible-by", "64",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--log-interval", "1000", "--eval-iters", "0", "--eval-interval", "1000",
            "--num-workers", "0", "--device", "cpu", "--seed", "1234", *extra]


# --------------------------------------------------------------------------------------------
# Counting, inside one rank

def _category(frame):
    """The kind of traffic, from the first caller frame outside torch.distributed."""
    while frame is not None:
        name = frame.f_code.co_filename.replace(os.sep, "/")
        if "ddp_comm_hooks" in name:
            return "dp"
        if "/torch/" not in name:
            break
        frame = frame.f_back
    if frame is None:
        return "other"
    name = frame.f_code.co_filename.replace(os.sep, "/")
    for part, cat in (("megatron/parallel/mappings.py", "tp"),
                      ("megatron/parallel/layers.py", "tp"),
                      ("megatron/parallel/cross_entropy.py", "ce"),
                      ("megatron/parallel/p2p.py", "pp"),
                      ("megatron/parallel/schedules.py", "dp"),
                      ("megatron/parallel/pipeline_utils.py", "emb"),
                      ("megatron/optim/", "norm"),
                      ("megatron/training.py", "loss")):
        if part in name:
            return cat
    return "other"


def _nbytes(t):
    return t.numel() * t.element_size()


class CommCounter:
    """Wraps torch.distributed's communication functions; files each call's bytes-sent (ring
    model) under (step, category, function)."""

    FUNCTIONS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                 "reduce_scatter_tensor", "broadcast", "send", "isend", "reduce", "gather",
                 "scatter", "all_to_all", "all_to_all_single")

    def __init__(self):
        self.step = -1  # -1: setup, before the first train_step
        self.sent = defaultdict(float)  # (step, category, function) -> bytes
        self.calls = defaultdict(int)

    def install(self):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for fn_name in self.FUNCTIONS:
            original = getattr(c10d, fn_name, None)
            if original is None:
                continue
            wrapper = self._wrap(fn_name, original)
            setattr(c10d, fn_name, wrapper)  # internal callers (broadcast_object_list, P2POp)
            if getattr(dist, fn_name, None) is original:
                setattr(dist, fn_name, wrapper)

    def _wrap(self, fn_name, original):
        import torch.distributed as dist

        counter = self

        def counted(*args, **kwargs):
            group = kwargs.get("group")
            n = dist.get_world_size(group) if group is not None else dist.get_world_size()
            sent = counter._price(fn_name, args, kwargs, n, group)
            key = (counter.step, _category(sys._getframe(1)), fn_name)
            counter.sent[key] += sent
            counter.calls[key] += 1
            return original(*args, **kwargs)

        counted.__name__ = fn_name
        counted.__wrapped__ = original
        return counted

    @staticmethod
    def _price(fn_name, args, kwargs, n, group):
        """Bytes this rank sends in the call, under the ring model."""
        import torch.distributed as dist

        def arg(i, name):
            return args[i] if len(args) > i else kwargs.get(name)

        if fn_name == "all_reduce":
            return 2.0 * (n - 1) / n * _nbytes(arg(0, "tensor"))
        if fn_name in ("all_gather", "all_gather_into_tensor"):
            return (n - 1) * _nbytes(arg(1, "tensor" if fn_name == "all_gather"
                                         else "input_tensor"))
        if fn_name in ("reduce_scatter", "reduce_scatter_tensor"):
            return (n - 1) * _nbytes(arg(0, "output"))
        if fn_name == "broadcast":
            raw = _nbytes(arg(0, "tensor"))
            src = arg(1, "src")
            if src is None:  # group_src
                src = dist.get_global_rank(group, kwargs.get("group_src", 0)) \
                    if group is not None else kwargs.get("group_src", 0)
            return (n - 1) * raw if dist.get_rank() == src else 0.0
        if fn_name in ("send", "isend"):
            return _nbytes(arg(0, "tensor"))
        tensor = args[0] if args else None
        return _nbytes(tensor) if hasattr(tensor, "numel") else 0  # not used by our code

    def per_step(self, step):
        out = defaultdict(float)
        for (s, cat, _), value in self.sent.items():
            if s == step:
                out[cat] += value
        return dict(out)

    def functions(self, step):
        out = defaultdict(lambda: [0, 0.0])
        for (s, cat, fn), value in self.sent.items():
            if s == step:
                out[f"{cat}:{fn}"][0] += self.calls[(s, cat, fn)]
                out[f"{cat}:{fn}"][1] += value
        return {k: tuple(v) for k, v in out.items()}


def _instrumented_rank(rank, world_size, argv):
    """One rank: count communication per training step while pretrain_gpt trains."""
    import torch.distributed as dist

    import megatron.training as training
    import pretrain_gpt
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    import warnings

    warnings.filterwarnings("ignore", message=".*broadcast_buffers", category=FutureWarning)
    counter = CommCounter()
    counter.install()
    captured = {}

    original_state = training.build_parallel_state

    def build_parallel_state(*a, **k):
        captured["parallel"] = original_state(*a, **k)
        return captured["parallel"]

    original_wrap = training.wrap_data_parallel

    def wrap_data_parallel(model, parallel, *a, **k):
        wrapped = original_wrap(model, parallel, *a, **k)
        if wrapped is not model:  # DDP: route its bucket all-reduces through dist.all_reduce
            wrapped.register_comm_hook(parallel.dp_group, default_hooks.allreduce_hook)
        return wrapped

    original_step = training.StepRunner.train_step
    times = []

    def train_step(self, *a, **k):
        counter.step += 1
        start = time.perf_counter()
        out = original_step(self, *a, **k)
        times.append(time.perf_counter() - start)
        return out

    training.build_parallel_state = build_parallel_state
    training.wrap_data_parallel = wrap_data_parallel
    training.StepRunner.train_step = train_step
    try:
        result = pretrain_gpt.pretrain(pretrain_gpt.datasets_provider,
                                       pretrain_gpt.model_provider,
                                       pretrain_gpt.forward_step_provider, argv=argv,
                                       log=lambda *a: None)
    finally:
        training.build_parallel_state = original_state
        training.wrap_data_parallel = original_wrap
        training.StepRunner.train_step = original_step
    p = captured["parallel"]
    n_params = sum(x.numel() for x in result.model.parameters() if x.requires_grad)
    steps = counter.step + 1
    return {"rank": dist.get_rank(), "tp_rank": p.tp_rank, "pp_rank": p.pp_rank,
            "dp_rank": p.dp_rank, "params": n_params,
            "per_step": [counter.per_step(s) for s in range(steps)],
            "functions": [counter.functions(s) for s in range(steps)],
            "times": times}


# --------------------------------------------------------------------------------------------
# The analytical model

def stage_layers(num_layers, pp, pp_rank):
    per = num_layers // pp
    return list(range(pp_rank * per, (pp_rank + 1) * per))


def analytical(args, tp, pp, dp, tp_rank, pp_rank, kept=None):
    """Bytes sent by one rank in one step, per category (see the module docstring)."""
    del tp_rank  # every TP rank of a stage sends the same volume
    b, s, h, m, V, L = args.micro_batch, args.seq, args.hidden, args.micro_batches, args.vocab, \
        args.layers
    first, last = pp_rank == 0, pp_rank == pp - 1
    layers = stage_layers(L, pp, pp_rank)
    kept_len = {lid: (kept if kept is not None and 0 < lid < L - 1 else s) for lid in layers}
    fp32 = 4
    ring = lambda n: 2.0 * (n - 1) / n  # noqa: E731
    out = {}
    tp_elems = m * b * h * (4 * sum(kept_len.values()) + (s if first else 0)
                            + (s if last else 0))
    out["tp"] = ring(tp) * fp32 * tp_elems if tp > 1 else 0.0
    out["ce"] = ring(tp) * fp32 * 3 * m * b * s if tp > 1 and last else 0.0
    out["pp"] = (fp32 * m * b * s * h * ((0 if last else 1) + (0 if first else 1))
                 if pp > 1 else 0.0)
    params = len(layers) * (12 * h * h // tp + 7 * h // tp + 6 * h)
    if first:
        params += V * h // tp + s * h
    if last:
        params += 2 * h + (V * h // tp if pp > 1 else 0)
    out["dp"] = ring(dp) * fp32 * params if dp > 1 else 0.0
    out["emb"] = ring(2) * fp32 * V * h // tp if pp > 1 and (first or last) else 0.0
    out["norm"] = ring(tp * pp) * fp32 if tp * pp > 1 else 0.0
    loss = 0.0
    if last and dp > 1:
        loss += ring(dp) * 8  # one float64 ("lm loss") over DP
    if last and pp > 1:
        loss += (pp - 1) * (8 + len(pickle.dumps({"lm loss": 0.0})))
    world = tp * pp * dp
    loss += ring(world) * 4  # the int32 stop flag over the world
    out["loss"] = loss
    out["_params"] = params
    return out


# --------------------------------------------------------------------------------------------
# Runs

def _single_process(argv, threads, queue):
    import torch

    torch.set_num_threads(threads)
    queue.put(_timed_pretrain(argv))


def run_single(argv, threads):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    env_before = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(key, None)
    proc = ctx.Process(target=_single_process, args=(argv, threads, queue))
    proc.start()
    times = queue.get(timeout=1800)
    proc.join()
    os.environ.clear()
    os.environ.update(env_before)
    return times


def fmt_mb(x):
    """Bytes in B / kB / MB (powers of 1000)."""
    if x >= 1e6:
        return f"{x / 1e6:.3f} MB"
    if x >= 1e3:
        return f"{x / 1e3:.2f} kB"
    return f"{x:.0f} B"


def comm_table(args, results):
    rows = []
    header = ("| layout | rank (tp,pp,dp) | " + " | ".join(TITLES[c] for c in CATEGORIES)
              + " | measured total | analytical total | ratio |")
    print("\nBytes sent per rank per training step (kB = 1e3, MB = 1e6 bytes; each category: "
          "measured / analytical)\n")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for layout, (kept, per_rank) in results.items():
        tp, pp, dp = LAYOUTS[layout.split("+")[0]]
        for r in per_rank:
            step = r["per_step"][1]
            ana = analytical(args, tp, pp, dp, r["tp_rank"], r["pp_rank"], kept)
            cells = []
            for c in CATEGORIES:
                meas = step.get(c, 0.0)
                cells.append("-" if meas == 0 and ana[c] == 0 else
                             f"{fmt_mb(meas)} / {fmt_mb(ana[c])}")
            other = step.get("other", 0.0)
            m_total = sum(step.values())
            a_total = sum(v for k, v in ana.items() if not k.startswith("_"))
            ratio = m_total / a_total if a_total else float("nan")
            print(f"| {layout} | {r['rank']} ({r['tp_rank']},{r['pp_rank']},{r['dp_rank']}) | "
                  + " | ".join(cells) + f" | {fmt_mb(m_total)} | {fmt_mb(a_total)} | "
                  f"{ratio:.4f} |" + (f" other {other:.0f} B" if other else ""))
            same = all(r["per_step"][i] == r["per_step"][1] for i in range(1, len(r["per_step"])))
            rows.append({"layout": layout, "rank": r["rank"], "tp_rank": r["tp_rank"],
                         "pp_rank": r["pp_rank"], "dp_rank": r["dp_rank"],
                         "measured": step, "analytical": {k: v for k, v in ana.items()},
                         "params_measured": r["params"], "ratio": ratio,
                         "steady": same, "functions": r["functions"][1]})
    print("\ncalls per step (category:function count), one rank per pipeline stage:")
    seen = set()
    for x in rows:
        if (x["layout"], x["pp_rank"]) in seen:
            continue
        seen.add((x["layout"], x["pp_rank"]))
        calls = ", ".join(f"{k} {v[0]}" for k, v in sorted(x["functions"].items()))
        print(f"  {x['layout']} rank {x['rank']}: {calls}")
    bad = [f"{x['layout']} rank {x['rank']}: {x['params_measured']} != "
           f"{x['analytical']['_params']}" for x in rows
           if x["params_measured"] != x["analytical"]["_params"]]
    print("\nparameters per rank: " + ("analytical count == model's count on every rank"
                                       if not bad else "MISMATCH " + "; ".join(bad)))
    unsteady = [f"{x['layout']} rank {x['rank']}" for x in rows if not x["steady"]]
    print("steps 2..n identical volume: " + ("yes" if not unsteady else
                                              "no: " + ", ".join(unsteady)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=4,
                        help="micro-batches per step per data-parallel rank")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size (padded)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--ltd-kept", type=int, default=64,
                        help="also measure TP2 with random-LTD keeping this many tokens in the "
                             "middle layers (constant schedule); 0 to skip")
    parser.add_argument("--comm-iters", type=int, default=3)
    parser.add_argument("--time-iters", type=int, default=10)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--json", default=None, help="write all figures to this file")
    args = parser.parse_args()
    if args.vocab % 128:
        parser.error("--vocab must be a multiple of 128 (no padding differences under TP2)")

    from distributed_harness import run_distributed

    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq "
          f"{args.seq}, vocab {args.vocab}, micro-batch {args.micro_batch}, "
          f"{args.micro_batches} micro-batches per step per DP rank, fp32, gloo on CPU; "
          f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    results = {}
    runs = [(name, None) for name in args.layouts]
    if args.ltd_kept:
        runs.append(("TP2", args.ltd_kept))
    for layout, kept in runs:
        tp, pp, dp = LAYOUTS[layout]
        extra = () if kept is None else (
            "--random-ltd", "--random-ltd-start", str(kept), "--random-ltd-schedule", "constant")
        name = layout if kept is None else f"{layout}+LTD{kept}"
        t0 = time.time()
        per_rank = run_distributed(_instrumented_rank, tp * pp * dp,
                                   args=(model_argv(args, tp, pp, dp, args.comm_iters, extra),),
                                   timeout=1800)
        results[name] = (kept, per_rank)
        print(f"  {name}: {tp * pp * dp} ranks, {time.time() - t0:.0f} s", flush=True)
    rows = comm_table(args, results)

    timing = {}
    if not args.skip_timing:
        print(f"\nStep time at the same global batch ({args.micro_batches} x "
              f"{args.micro_batch}), median of steps 2..{args.time_iters}; load average "
              f"{os.getloadavg()[0]:.2f}")
        for threads in (1, 2):
            t = run_single(model_argv(args, 1, 1, 1, args.time_iters), threads)
            timing[f"1 process, {threads} thread{'s' if threads > 1 else ''}"] = t[1:]
        for layout in ("TP2", "PP2"):
            tp, pp, dp = LAYOUTS[layout]
            per_rank = run_distributed(_timed_rank, tp * pp,
                                       args=(model_argv(args, tp, pp, 1, args.time_iters),),
                                       timeout=1800)
            # a step ends when its slowest rank ends
            timing[f"{layout} (2 processes x 1 thread)"] = [max(ts) for ts in
                                                            zip(*per_rank)][1:]
        base = statistics.median(timing["1 process, 1 thread"])
        base2 = statistics.median(timing["1 process, 2 threads"])
        print("\n| run | step time (s) | vs 1 process, 1 thread | vs 1 process, 2 threads |")
        print("| --- | --- | --- | --- |")
        for name, ts in timing.items():
            med = statistics.median(ts)
            print(f"| {name} | {med:.3f} | {med / base:.2f}x | {med / base2:.2f}x |")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "comm": rows, "timing": timing}, f, indent=1,
                      default=str)


def _timed_rank(rank, world_size, argv):
    """One rank, no counting: seconds per train_step."""
    return _timed_pretrain(argv)


def _timed_pretrain(argv):
    """Run pretrain_gpt with ``argv``; seconds of each StepRunner.train_step."""
    import megatron.training as training
    import pretrain_gpt

    times = []
    original_step = training.StepRunner.train_step

    def train_step(self, *a, **k):
        start = time.perf_counter()
        out = original_step(self, *a, **k)
        times.append(time.perf_counter() - start)
        return out

    training.StepRunner.train_step = train_step
    try:
        pretrain_gpt.pretrain(pretrain_gpt.datasets_provider, pretrain_gpt.model_provider,
                              pretrain_gpt.forward_step_provider, argv=argv,
                              log=lambda *a: None)
    finally:
        training.StepRunner.train_step = original_step
    return times


if __name__ == "__main__":
    main()
