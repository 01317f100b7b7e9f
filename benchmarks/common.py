"""Helpers shared by the benchmarks: GPT and BERT run the same measurements, so the timing,
memory, command-line, table and sweep code lives here and each script keeps its model.

Timing and memory:

- ``interleaved_times``: warm up, then time several implementations in alternating order
  (A B, B A, A B ...), so that slow phases of a shared, noisy machine hit all of them alike;
  report medians.
- ``StepMemory``: the peak memory one call adds on top of what was live before it:
  ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's resident-set high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set at the start, after
  handing freed heap pages back to the OS (glibc ``malloc_trim``). Where /proc cannot be reset,
  it falls back to ``tracemalloc`` (which sees only Python allocations, not tensor storage) and
  says so in ``method``.
- ``run_memory_children``: one configuration per fresh subprocess of a script (its hidden
  ``--memory-child`` mode), which prints its figures on a ``MEMORY {json}`` line.

Command line and device: ``add_shape_args`` (device, dtype, batch, model shape, dropout),
``add_sweep_args``, ``gpu_requested``, ``setup_device``, ``print_load_average``.

Our model against Hugging Face's, one training step (bench_train_step.py, GPT-2;
bench_bert_train_step.py, BERT): ``compare_train_steps`` builds both sides per dtype, times
them interleaved, measures their memory and prints the table; ``profile_step``.

random-LTD sweeps (bench_random_ltd.py, GPT; bench_bert_random_ltd.py, BERT): ``ltd_sweep``
times the layer stack, the full model and one layer at every kept length against the dense
model and prints the savings table; the script gives a ``Setup`` (bench_random_ltd.Setup or a
subclass) that builds the model pieces and their steps. ``ltd_memory_child`` /
``ltd_memory`` measure each configuration's peak in a fresh process.

BERT inputs: ``mock_bert_batch`` (MockBertDataset samples, as ``pretrain_bert.py --mock-data``).
"""

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024.0 * 1024.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def interleaved_times(steps: Dict[str, Callable[[], None]], repeats: int, warmup: int,
                      device: torch.device, log: Callable[[str], None] = lambda _: None
                      ) -> Dict[str, Dict[str, List[float]]]:
    """Seconds per call of each function, ``repeats`` times each after ``warmup`` untimed calls:
    ``{name: {"wall": [...], "cpu": [...]}}`` (``cpu``: this process's CPU seconds, all
    threads, user + system; on a shared CPU it is less disturbed by other jobs than wall time).

    Calls alternate between the implementations and the order is reversed every round, so
    neither side always runs first (after the other's allocations, in a warmer cache ...).
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    synchronize(device)
    times = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            synchronize(device)
            cpu_start, start = time.process_time(), time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name]["wall"].append(time.perf_counter() - start)
            times[name]["cpu"].append(time.process_time() - cpu_start)
        log("  round %d: %s" % (r + 1, "  ".join(
            f"{n} {times[n]['wall'][-1] * 1e3:.0f} ms (cpu {times[n]['cpu'][-1] * 1e3:.0f})"
            for n in names)))
    return times


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
        return True
    except OSError:
        return False
    except KeyError:
        return False


class StepMemory:
    """``with StepMemory(device) as m: step()`` -> ``m.peak_bytes``: the most memory in use at
    any time inside the block minus what was in use when it began."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        elif _can_reset_hwm():
            self.method = "RSS high-water mark (/proc VmHWM)"
        else:
            self.method = "tracemalloc (Python objects only)"

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("RSS"):
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _proc_status_kib("VmRSS") * 1024
        else:
            tracemalloc.start()
            self._base = 0
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("RSS"):
            peak = _proc_status_kib("VmHWM") * 1024
        else:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        self.peak_bytes = max(0, peak - self._base)
        return False


def tensor_bytes(tensors) -> int:
    """Bytes held by distinct tensor storages among ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def optimizer_state_tensors(optimizer):
    """Every tensor a torch optimizer (or a wrapper with ``.optimizer``) keeps between steps:
    the parameters it updates (fp32 masters for a float16 wrapper) and their state."""
    torch_opt = getattr(optimizer, "optimizer", optimizer)
    for group in torch_opt.param_groups:
        yield from group["params"]
    for state in torch_opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


def run_memory_children(script: str, children: Sequence[str], flags: Sequence[str],
                        label: Callable[[str], str]) -> Dict[str, dict]:
    """``python script --memory-child NAME *flags`` for each NAME in a fresh process (so that no
    allocator pool or high-water mark of an earlier configuration counts) -> ``{NAME: the dict
    of its last "MEMORY {json}" line}``; a child that fails is reported and left out."""
    results = {}
    for child in children:
        proc = subprocess.run([sys.executable, os.path.abspath(script), "--memory-child", child,
                               *flags], capture_output=True, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")]
        if proc.returncode or not line:
            print(f"  memory child {child} failed:\n{proc.stderr[-2000:]}")
            continue
        results[child] = json.loads(line[-1][len("MEMORY "):])
        print(f"  memory {label(child)}: " + ", ".join(
            f"{k} {v:.0f} MiB" for k, v in results[child].items() if k != "method"))
    return results


# ---- command line and device --------------------------------------------------------------

def add_shape_args(p: argparse.ArgumentParser, *, dtype, batch_help: str, seq_length: int,
                   vocab: int, vocab_help: str) -> None:
    """The flags every benchmark starts with, in this order: --device, --dtype (a list default
    takes several), --batch-size (default None: the script's CPU/GPU default), --seq-length,
    --layers / --hidden / --heads (12 / 768 / 12: the -small/-base shape), --vocab, --dropout."""
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    if isinstance(dtype, list):
        p.add_argument("--dtype", nargs="+", default=dtype, choices=sorted(DTYPES))
    else:
        p.add_argument("--dtype", default=dtype, choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=int, default=None, help=batch_help)
    p.add_argument("--seq-length", type=int, default=seq_length)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=vocab, help=vocab_help)
    p.add_argument("--dropout", type=float, default=0.1)


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """The random-LTD sweeps' flags after --kept: rounds, what to skip, profile, JSON, threads."""
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1 CPU, 3 GPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-e2e", action="store_true", help="time the layer stack only")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile one stack step (smallest r, and dense); print the top N ops")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice)")


def finish_sweep_args(p: argparse.ArgumentParser, args, batch_cpu: int, batch_gpu: int):
    """The sweeps' defaults that depend on the device (batch, 5/20 rounds, 1/3 warm-up) and the
    check of --kept; returns ``args``."""
    gpu = gpu_requested(p, args)
    args.batch_size = args.batch_size or (batch_gpu if gpu else batch_cpu)
    args.repeats = args.repeats or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if any(not 1 <= r <= args.seq_length for r in args.kept):
        p.error(f"--kept values must be in [1, {args.seq_length}]")
    return args


def gpu_requested(p: argparse.ArgumentParser, args) -> bool:
    """Whether --device is cuda; a parser error if torch sees no GPU."""
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return gpu


def setup_device(args):
    """Seed torch with --seed -> (the device, a description of the hardware). On GPU, TF32 is
    turned off: fp32 means fp32 (on both sides of a comparison)."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        hw = torch.cuda.get_device_name(device)
    else:
        hw = f"CPU, {torch.get_num_threads()} threads"
    return device, hw


def print_load_average() -> None:
    """The machine's load after timing: a busy machine explains a noisy run."""
    if hasattr(os, "getloadavg"):
        print("  load average after timing: %.1f %.1f %.1f" % os.getloadavg())


# ---- our model against Hugging Face's: one training step ----------------------------------

def persistent_bytes(model, optimizer) -> int:
    """Parameters + what the optimizer keeps (fp32 masters, moments) between steps."""
    return tensor_bytes(list(model.parameters()) + list(optimizer_state_tensors(optimizer)))


def hf_train_model(model, dtype, device):
    """A Hugging Face model (its config asking for SDPA attention) on ``device`` in ``dtype``
    (pure low-precision weights when not fp32), in training mode; fails if HF fell back from
    SDPA, which would compare another attention kernel."""
    model = model.to(device)
    if dtype != torch.float32:
        model.to(dtype)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    model.train()
    return model


def profile_step(name, step, device, rows):
    """Profile one call of ``step``; print the ``rows`` ops with the most self time, overall
    and by input shapes."""
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


def compare_one_dtype(args, dtype_name, device, builders):
    """Build each side (``builders``: name -> ``build(args, dtype, device)`` returning (model,
    optimizer, step)), time their steps interleaved, then measure one more step's memory of
    each -> ({name: figures}, how memory was measured). With both sides, ``results["hf"]``
    also holds the paired HF/ours ratios."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(args.seed)
    if args.only:
        builders = {args.only: builders[args.only]}
    sides = {name: build(args, dtype, device) for name, build in builders.items()}
    steps = {name: side[2] for name, side in sides.items()}
    print(f"\n[{dtype_name}] warmup {args.warmup}, {args.steps} timed steps, alternating")
    times = interleaved_times(steps, args.steps, args.warmup, device, log=print)
    print_load_average()

    results = {}
    for name, (model, optimizer, step) in sides.items():
        optimizer.zero_grad()  # gradients are not kept between steps in the peak figure
        with StepMemory(device) as mem:
            loss = step()
        wall = median(times[name]["wall"])
        results[name] = dict(ms=wall * 1e3, cpu_ms=median(times[name]["cpu"]) * 1e3,
                             ms_min=min(times[name]["wall"]) * 1e3,
                             ms_max=max(times[name]["wall"]) * 1e3,
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
            results["hf"][f"paired_{kind}_range"] = (min(ratios), max(ratios))
    del sides, steps
    return results, method


def compare_train_steps(args, device, hw, builders, spread=False):
    """For each --dtype: ``compare_one_dtype``; then the table of both sides (time, tokens/s,
    memory, loss, parameters), their ratios and the paired ratio. ``spread``: also the min-max
    of the step times and of the paired ratio. Returns [(dtype, results)]."""
    import transformers

    print(f"device: {hw}; torch {torch.__version__}, transformers {transformers.__version__}")
    table = []
    for dtype_name in args.dtype:
        results, method = compare_one_dtype(args, dtype_name, device, builders)
        table.append((dtype_name, results))

    gap = f"{'':>14}" if spread else ""  # the min-max column, empty in the ratio row
    print(f"\npeak = parameters + optimizer state + the most one step adds ({method})")
    header = (f"{'dtype':<6}{'impl':<6}{'ms/step':>10}" + (f"{'min-max':>14}" if spread else "")
              + f"{'cpu ms':>10}{'tokens/s':>11}{'state MiB':>11}{'step MiB':>10}"
              f"{'peak MiB':>10}{'loss':>9}{'params':>13}")
    print(header)
    print("-" * len(header))
    for dtype_name, results in table:
        for name, r in results.items():
            span = format(f"{r['ms_min']:.0f}-{r['ms_max']:.0f}", ">14") if spread else ""
            print(f"{dtype_name:<6}{name:<6}{r['ms']:>10.1f}{span}{r['cpu_ms']:>10.0f}"
                  f"{r['tokens_s']:>11.1f}"
                  f"{r['state_mib']:>11.0f}{r['step_mib']:>10.0f}"
                  f"{r['state_mib'] + r['step_mib']:>10.0f}{r['loss']:>9.3f}{r['params']:>13,}")
        if len(results) == 2:
            ours, hf = results["ours"], results["hf"]
            peak_ratio = ((hf['state_mib'] + hf['step_mib'])
                          / (ours['state_mib'] + ours['step_mib']))
            print(f"{dtype_name:<6}{'HF/ours':<6}{hf['ms'] / ours['ms']:>9.2f}x{gap}"
                  f"{hf['cpu_ms'] / ours['cpu_ms']:>9.2f}x{'':>11}{'':>11}{'':>10}"
                  f"{peak_ratio:>9.2f}x")
            if spread:
                lo, hi = hf["paired_wall_range"]
                paired_span, what = f"{f'{lo:.2f}-{hi:.2f}':>14}", "median and range"
            else:
                paired_span, what = "", "median"
            print(f"{dtype_name:<6}{'paired':<6}{hf['paired_wall']:>9.2f}x{paired_span}"
                  f"{hf['paired_cpu']:>9.2f}x   ({what} over rounds of HF/ours)")
    return table


# ---- random-LTD sweeps: layer stack, full model and one layer at each kept length ---------

DENSE = "dense"


def theoretical_saving(layers: int, s: int, r: int) -> float:
    """SPEC 2b: 1 - (2s + (l-2)r) / (l s), the layer-token saving (r capped at s)."""
    return 1.0 - (2 * s + (layers - 2) * min(r, s)) / (layers * s)


def config_name(kept, s):
    return DENSE if kept is None else (f"r={kept}" if kept < s else f"r={kept} (=s)")


def paired_saving(times, name, base, kind):
    """Median over rounds of 1 - t(name)/t(base) within the round."""
    return median([1.0 - t / b for t, b in zip(times[name][kind], times[base][kind])])


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
    """Profile one forward+backward of the layer stack at ``kept`` (None: dense); print the
    ``rows`` ops with the most self time."""
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


def ltd_memory_child(setup):
    """--memory-child: one configuration in this fresh process: the peak of one stack step and
    of one e2e step, printed on a ``MEMORY {json}`` line."""
    args = setup.args
    kept = None if args.memory_child == DENSE else int(args.memory_child)
    out = {}
    for what, build, make in (("stack", setup.build_stack, setup.stack_step),
                              ("e2e", setup.build_e2e, setup.e2e_step)):
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


def ltd_memory(args, configs, script, extra_flags=()):
    """``ltd_memory_child`` for each configuration in a fresh subprocess of ``script``, which
    gets the shape flags of ``args`` plus ``extra_flags`` -> {kept: figures}."""
    flags = ["--device", args.device, "--dtype", args.dtype,
             "--batch-size", str(args.batch_size), "--seq-length", str(args.seq_length),
             "--layers", str(args.layers), "--hidden", str(args.hidden),
             "--heads", str(args.heads), "--vocab", str(args.vocab),
             "--dropout", str(args.dropout), *extra_flags, "--seed", str(args.seed),
             "--kept", *map(str, args.kept)]
    if args.no_e2e:
        flags.append("--no-e2e")
    if args.threads:
        flags += ["--threads", str(args.threads)]
    by_name = {DENSE if kept is None else str(kept): kept for kept in configs}
    results = run_memory_children(
        script, list(by_name), flags,
        label=lambda child: config_name(by_name[child], args.seq_length))
    return {by_name[child]: figures for child, figures in results.items()}


def ltd_sweep(args, setup, hw, script, e2e_text, outside_text, memory_flags=(), spread=False):
    """Time every configuration (dense, then each kept length) interleaved, measure the method's
    own pieces and (unless --no-memory) each configuration's peak memory in a subprocess of
    ``script``; print the savings table -> its rows.

    ``setup`` builds the pieces (``build_stack``, ``build_e2e``, ``stack_step``, ``e2e_step``,
    ``layer_step``); ``e2e_text`` says what the e2e step is and ``outside_text`` what of it lies
    outside the layers; ``spread``: also report the range over rounds of the stack time and
    saving.
    """
    l, s, device = args.layers, args.seq_length, setup.device
    print(f"device: {hw}; torch {torch.__version__}; {args.repeats} rounds after "
          f"{args.warmup} warm-up, interleaved")

    configs = [None] + sorted(set(args.kept))
    stack = setup.build_stack()
    steps = {}
    for kept in configs:
        steps[("stack", kept)] = setup.stack_step(stack, kept)
    e2e = None
    if not args.no_e2e:
        e2e = setup.build_e2e()
        for kept in configs:
            steps[("e2e", kept)] = setup.e2e_step(e2e, kept)
    layer = stack.layers[min(1, l - 1)]
    lengths = sorted({min(r, s) for r in args.kept} | {s})
    for r in lengths:
        steps[("layer", r)] = setup.layer_step(layer, r)
    named = {f"{k[0]}:{k[1] if k[1] is not None else DENSE}": v for k, v in steps.items()}
    start = time.perf_counter()
    times = interleaved_times(  # a round's line is long with many items: cut at 400
        named, args.repeats, args.warmup, device,
        log=lambda line: print(line[:400] + ("..." if len(line) > 400 else "")))
    print(f"  timing took {time.perf_counter() - start:.0f} s")
    print_load_average()

    pieces = {kept: time_pieces(setup, kept) for kept in configs if kept is not None and kept < s}

    if args.profile:
        profile_stack(setup, stack, min(args.kept), args.profile)
        profile_stack(setup, stack, None, args.profile)
    del stack, e2e, steps, named

    memory = {}
    if not args.no_memory:
        print("peak memory, one fresh subprocess per configuration:")
        memory = ltd_memory(args, configs, script, memory_flags)

    def med(key, kind="wall"):
        return median(times[key][kind]) * 1e3

    t_layer_s = med(f"layer:{s}")
    rows = []
    for kept in configs:
        key = DENSE if kept is None else kept
        row = {"config": config_name(kept, s), "kept": kept,
               "theory": 0.0 if kept is None else theoretical_saving(l, s, kept),
               "stack_ms": med(f"stack:{key}"), "stack_cpu_ms": med(f"stack:{key}", "cpu")}
        if spread:
            wall = times[f"stack:{key}"]["wall"]
            row["stack_ms_range"] = (min(wall) * 1e3, max(wall) * 1e3)
        for kind in ("wall", "cpu"):
            row[f"stack_saving_{kind}"] = paired_saving(times, f"stack:{key}", f"stack:{DENSE}",
                                                        kind)
        if spread:
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
              f"{layer_share * (l - 2) / l:.1%}); outside the layers ({outside_text}): "
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
          f"time at r and s (no sampling/gather/scatter); e2e: {e2e_text}; ceiling: theory x "
          "the layers' share of the dense e2e step; MiB: peak added by one step "
          f"({method or 'not measured'})")
    if spread:
        print("\nspread (wall, over rounds): " + "; ".join(
            f"{row['config']}: stack {row['stack_ms_range'][0]:.0f}-"
            f"{row['stack_ms_range'][1]:.0f} ms"
            + (f", saving {row['stack_saving_range'][0]:.1%}-{row['stack_saving_range'][1]:.1%}"
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


# ---- BERT inputs ---------------------------------------------------------------------------

BERT_SPECIAL_IDS = dict(cls=101, sep=102, pad=0, mask=103)  # bert-base-uncased's ids


def mock_bert_batch(args, device):
    """A collated batch of ``args.batch_size`` MockBertDataset samples (what ``pretrain_bert.py
    --mock-data`` trains on; Megatron's keys: text, types, labels, loss_mask, padding_mask,
    is_random ...) on ``device``."""
    from megatron.data.mock_dataset import MockBertDataset

    data = MockBertDataset(args.batch_size, args.seq_length, args.vocab,
                           cls_id=BERT_SPECIAL_IDS["cls"], sep_id=BERT_SPECIAL_IDS["sep"],
                           pad_id=BERT_SPECIAL_IDS["pad"], mask_id=BERT_SPECIAL_IDS["mask"],
                           seed=args.seed, mask_prob=args.mask_prob)
    samples = [data[i] for i in range(args.batch_size)]
    return {key: torch.as_tensor(np.stack([np.asarray(x[key]) for x in samples])).to(device)
            for key in samples[0]}


# ---- training studies (study_random_ltd.py, GPT; study_bert_ltd.py, BERT) ------------------
# One run trained in-process through a family's entry point (pretrain_gpt / pretrain_bert),
# measured: layer tokens counted by forward hooks on the transformer layers (checked against
# the framework's "consumed layer tokens"), training time with evaluation subtracted, and every
# evaluation's loss on the same fixed validation batches.


class FixedSamples(torch.utils.data.Dataset):
    """``base[i % k]``: every evaluation (``k`` samples each) reads the same ``k`` samples."""

    def __init__(self, base, k, length):
        if len(base) < k:
            raise ValueError(f"the validation split has {len(base)} samples, fewer than the "
                             f"{k} one evaluation needs: lower --eval-batches or widen --split")
        self.base, self.k, self.length = base, k, max(length, k)

    def __len__(self):
        return self.length

    def __getitem__(self, idx):
        return self.base[idx % self.k]


class Probe:
    """Wraps the providers of one run of ``family`` (a module with ``model_provider``,
    ``datasets_provider``, ``forward_step_provider`` and optionally ``PROVIDER``, e.g.
    pretrain_gpt or pretrain_bert): counts the layer tokens the layers actually process, times
    training with evaluation subtracted, and records every evaluation (``loss_key`` of the
    reported losses). ``eval_seed``: build the validation set with this seed whatever the run's
    --seed (so that runs with different seeds are evaluated on the same samples and masks)."""

    def __init__(self, eval_batches, family=None, loss_key="lm loss", eval_seed=None):
        if family is None:
            import pretrain_gpt as family
        self.family, self.loss_key, self.eval_seed = family, loss_key, eval_seed
        self.eval_batches = eval_batches
        self.layer_tokens = 0
        self.train_calls = 0
        self.num_micro = None
        self.t0 = self.c0 = None
        self.eval_wall = self.eval_cpu = 0.0
        self.current = None
        self.evals = []  # dicts: iteration, layer_tokens, wall_s, cpu_s, loss

    def _count(self, module, inputs, output):
        if module.training and torch.is_grad_enabled():
            # [b, r, h]: the layer produces r tokens per sample (TokenBypass's query layer reads
            # all s as keys/values and produces its r kept queries: r, as the framework counts).
            # BERT's packed layers (PackedTokens, the 5th input) compute the real tokens of a
            # [b, r] batch only; layer tokens count all b x r positions, padding included.
            from megatron.model.transformer import layer_call_packing

            packed = layer_call_packing(inputs)
            if packed is not None:
                self.layer_tokens += packed.batch * packed.seq
            else:
                self.layer_tokens += int(output.shape[0]) * int(output.shape[1])

    def provider(self):
        """A ``megatron.training.Provider`` with the family's flag checks and these hooks."""
        from megatron.training import Provider

        base = getattr(self.family, "PROVIDER", None)
        extra = {} if base is None else {"check_args": base.check_args,
                                         "flops_per_sample": base.flops_per_sample,
                                         "load_policy": base.load_policy}
        return Provider(model=self.model_provider, datasets=self.datasets_provider,
                        forward_step=self.forward_step_provider, **extra)

    def model_provider(self, args, parallel):
        from megatron.model.transformer import ParallelTransformerLayer

        model = self.family.model_provider(args, parallel)
        layers = [m for m in model.modules() if isinstance(m, ParallelTransformerLayer)]
        if len(layers) != args.num_layers:
            raise RuntimeError(f"found {len(layers)} transformer layers, expected "
                               f"{args.num_layers}")
        for layer in layers:
            layer.register_forward_hook(self._count)
        return model

    def datasets_provider(self, args, tokenizer, num_samples):
        k = self.eval_batches * args.global_batch_size
        train, valid, test = self.family.datasets_provider(
            args, tokenizer, (num_samples[0], k, num_samples[2]))
        if self.eval_seed is not None and self.eval_seed != args.seed:
            import copy

            fixed = copy.copy(args)
            fixed.seed = self.eval_seed
            _, valid, _ = self.family.datasets_provider(fixed, tokenizer,
                                                        (num_samples[0], k, num_samples[2]))
        return train, FixedSamples(valid, k, num_samples[1]), test

    def forward_step_provider(self, args, tokenizer):
        inner = self.family.forward_step_provider(args, tokenizer)
        self.num_micro = args.num_micro_batches
        per_eval = self.eval_batches * self.num_micro

        def forward_step(data_iterator, model, token_drop=None):
            if model.training:
                if self.t0 is None:
                    self.t0, self.c0 = time.perf_counter(), time.process_time()
                self.train_calls += 1
                return inner(data_iterator, model, token_drop)
            if self.current is None:  # an evaluation starts
                wall, cpu = time.perf_counter(), time.process_time()
                self.current = {
                    "iteration": self.train_calls // self.num_micro,
                    "layer_tokens": self.layer_tokens,
                    "wall_s": (wall - self.t0 - self.eval_wall) if self.t0 else 0.0,
                    "cpu_s": (cpu - self.c0 - self.eval_cpu) if self.c0 else 0.0,
                    "_wall": wall, "_cpu": cpu, "_sum": 0.0, "_n": 0}
            output, loss_func = inner(data_iterator, model, token_drop)

            def measured_loss(out):
                loss, reported = loss_func(out)
                cur = self.current
                cur["_sum"] += float(reported[self.loss_key])
                cur["_n"] += 1
                if cur["_n"] == per_eval:  # the evaluation is complete
                    self.eval_wall += time.perf_counter() - cur.pop("_wall")
                    self.eval_cpu += time.process_time() - cur.pop("_cpu")
                    cur["loss"] = cur.pop("_sum") / cur.pop("_n")
                    if not self.evals or self.evals[-1]["iteration"] != cur["iteration"]:
                        self.evals.append(cur)
                    self.current = None
                return loss, reported

            return output, measured_loss

        return forward_step


def console_fields(line):
    """Selected fields of a training log line (None where absent)."""
    import re

    out = {}
    for key, pattern in (("iteration", r"iteration\s+(\d+)/"),
                         ("lr", r"learning rate: ([0-9.E+-]+)"),
                         ("layer_tokens", r"consumed layer tokens:\s+(\d+)"),
                         ("kept", r"random ltd reserved length:\s+(\d+)")):
        m = re.search(pattern, line)
        out[key] = None if m is None else (int(m.group(1)) if key != "lr"
                                           else float(m.group(1)))
    return out


def train_run(name, argv, eval_batches, log=print, labels=None, family=None,
              loss_key="lm loss", eval_seed=None):
    """Train one configuration in-process through ``family``'s providers (default
    pretrain_gpt); returns its measured record. A disagreement between the hooks' layer-token
    count and the log's is an error."""
    import contextlib
    import io
    import math

    from megatron.training import pretrain

    probe = Probe(eval_batches, family=family, loss_key=loss_key, eval_seed=eval_seed)
    logs = []
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # dataset-building chatter
        result = pretrain(probe.provider(), argv=argv, log=logs.append)
    total = time.perf_counter() - start
    logged = {}
    for line in logs:
        if line.startswith(" iteration"):
            fields = console_fields(line)
            logged[fields["iteration"]] = fields
    # The framework's own layer-token count must agree with what the layers processed.
    for ev in probe.evals:
        fields = logged.get(ev["iteration"])
        ev["lr"] = fields["lr"] if fields else None
        ev["kept"] = fields["kept"] if fields else None
        if fields and fields["layer_tokens"] is not None \
                and fields["layer_tokens"] != ev["layer_tokens"]:
            raise RuntimeError(f"{name}: layers processed {ev['layer_tokens']} layer tokens by "
                               f"iteration {ev['iteration']}, the log says "
                               f"{fields['layer_tokens']}")
    final = probe.evals[-1]
    if final["iteration"] != result.state.iteration:
        raise RuntimeError(f"{name}: no evaluation after the last iteration")
    valid_hist = dict(result.valid_losses)
    for ev in probe.evals:  # our evaluation is the framework's evaluation
        reported = valid_hist.get(ev["iteration"])
        if reported is not None and not math.isclose(reported[loss_key], ev["loss"],
                                                      rel_tol=1e-5):
            raise RuntimeError(f"{name}: evaluation mismatch at iteration {ev['iteration']}")
    record = {
        "name": name, "label": (labels or {}).get(name.split("@")[0], name),
        "argv": argv, "iterations": result.state.iteration,
        "layer_tokens": probe.layer_tokens, "final_valid_loss": final["loss"],
        "train_wall_s": final["wall_s"], "train_cpu_s": final["cpu_s"],
        "eval_wall_s": probe.eval_wall, "total_wall_s": total,
        "evals": probe.evals,
        "train_losses": [(it, d[loss_key]) for it, d in result.train_losses],
    }
    log(f"  {name:24s} {record['iterations']:5d} it  {probe.layer_tokens / 1e6:8.2f}M layer "
        f"tokens  valid {final['loss']:.4f}  train {final['wall_s']:6.1f} s wall "
        f"{final['cpu_s']:6.1f} s cpu  ({total:.0f} s with setup/eval)")
    return record


def interpolate(evals, key, x):
    """The validation loss of a curve at ``x`` (linear between evaluations; its last value for
    an ``x`` at most 1% past its end, as a layer-token budget overshoots by part of a step;
    None further outside)."""
    pts = [(e[key], e["loss"]) for e in evals]
    if pts and pts[-1][0] < x <= 1.01 * pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None
