#!/bin/bash
# DRY_RUN=1 support for examples/run_torchrun.sh and examples/run_slurm.sbatch (sourced by them;
# not run on its own). Those launchers build their command in the array CMD and then call
#
#   dry_run WORLD_SIZE ENTRY FLAGS...
#
# which prints CMD shell-quoted on stdout (ready to paste) and, when ENTRY is pretrain_gpt.py,
# pretrain_bert.py or tasks/main.py, checks FLAGS as every rank does at start-up for WORLD_SIZE
# processes:
# megatron/arguments.py (layout, batch sizes, schedules, random-LTD presets / DeepSpeed JSON)
# and then the entry's own checks (its PROVIDER.check_args, e.g. pretrain_bert.check_args).
# On stderr: one line saying what would run (TP x PP x DP, micro-batches, model) or why it
# would not, and with random-LTD a second line with the kept-length schedule (start -> full
# length, growth, the iteration where it reaches full length, layer-token saving over the run).
# No GPU, data or network is needed. Returns 1 if the flags are rejected, else 0.

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "dry_run.sh is sourced by examples/run_torchrun.sh and examples/run_slurm.sbatch;" \
         "run one of those with DRY_RUN=1" >&2
    exit 2
fi

dry_run() {
    local world=$1 entry=$2
    shift 2
    local arg line=""
    for arg in "${CMD[@]}"; do  # quote only what needs it
        if [[ "$arg" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then line+="$arg "; else
            line+="$(printf '%q' "$arg") "; fi
    done
    echo "${line% }"
    case "$(basename "$(dirname "$entry")")/$(basename "$entry")" in
        */pretrain_gpt.py|*/pretrain_bert.py|tasks/main.py) ;;
        *) echo "DRY_RUN: flags not checked (only pretrain_gpt.py's, pretrain_bert.py's and" \
                "tasks/main.py's parsers are known here)" >&2
           return 0 ;;
    esac
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" - "$world" "$entry" "$@" \
        <<'EOF'
import importlib.util
import os
import sys

world, entry = int(sys.argv[1]), sys.argv[2]
name = os.path.basename(entry)
procs = f"{world} process" + ("es" if world != 1 else "")
try:
    import numpy as np
    from megatron.arguments import parse_args
    from megatron.batch_rampup import train_iters_for_samples
    from megatron.errors import UserError
    from megatron.ltd.config import random_ltd_config_from_args  # imports torch: fail here
    from megatron.ltd.schedule import RandomLTDScheduler
    # The entry script as the launcher would start it (its __main__ block does not run): its
    # PROVIDER carries the model family's own flag checks (pretrain_bert.check_args).
    spec = importlib.util.spec_from_file_location(name[:-3], entry)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
except ImportError as e:
    print(f"DRY_RUN: flags not checked: {e}", file=sys.stderr)
    sys.exit(0)
provider = getattr(module, "PROVIDER", None)
try:
    if name == "main.py":  # tasks/main.py: Megatron's flags plus the task flags
        a = module.parse_task_args(sys.argv[3:], world_size=world)
    else:
        a = parse_args(sys.argv[3:], world_size=world)
    if getattr(provider, "check_args", None) is not None:
        provider.check_args(a)
    cfg = random_ltd_config_from_args(a)
except UserError as e:
    print(f"DRY_RUN: rejected for {procs}: {e}", file=sys.stderr)
    sys.exit(1)
ltd = "random-LTD" if cfg is not None and cfg.enabled else "dense"
ramp = ""
if a.rampup_batch_size is not None:
    ramp = (f" (ramped up from {a.rampup_batch_size[0]} by {a.rampup_batch_size[1]} over "
            f"{a.rampup_batch_size[2]:,} samples)")
elif a.step_batch_size_schedule is not None:
    ramp = f" (the last of --step-batch-size-schedule {a.step_batch_size_schedule!r})"
print(f"DRY_RUN: flags valid for {procs}: TP {a.tensor_model_parallel_size} x "
      f"PP {a.pipeline_model_parallel_size} x DP {a.data_parallel_size}; micro-batch "
      f"{a.micro_batch_size} x {a.num_micro_batches} micro-batches x DP "
      f"{a.data_parallel_size} = global batch {a.global_batch_size}{ramp}; {a.num_layers} layers, "
      f"hidden {a.hidden_size}, seq {a.seq_length}; {ltd} ({name})", file=sys.stderr)
if ltd == "dense":
    sys.exit(0)

# -- the kept-length schedule, evaluated as the training loop will (RandomLTDScheduler) --------
L, s, gbs = a.num_layers, a.seq_length, a.global_batch_size
sched = RandomLTDScheduler.from_config(cfg, L, s)
if getattr(a, "random_ltd_preset", None):
    source = f"preset {a.random_ltd_preset}"
elif cfg.deepspeed_config:
    source = f"DeepSpeed JSON {os.path.basename(str(cfg.deepspeed_config))}"
else:
    source = "flags"
ids = list(cfg.layer_ids)
contiguous = ids == list(range(ids[0], ids[-1] + 1))
layers = f"layers {ids[0]}-{ids[-1]}" if contiguous else "layers " + ",".join(map(str, ids))
# The run's length in iterations, when the flags fix it (a token budget stops it elsewhere).
run_iters = None
if not (getattr(a, "train_tokens", None) or getattr(a, "train_layer_tokens", None)):
    if a.train_iters:
        run_iters = int(a.train_iters)
    elif a.train_samples:
        run_iters = train_iters_for_samples(a, int(a.train_samples))
tokens_per_iter = gbs * s
if cfg.schedule == "constant":
    horizon, growth = None, "constant"
elif cfg.schedule_steps is not None:
    horizon = int(cfg.schedule_steps)
else:  # token-based: full length once the raw consumed tokens reach the horizon
    horizon = -(-int(cfg.schedule_tokens) // tokens_per_iter)
if horizon is not None:
    if cfg.schedule == "fixed_linear" and not cfg.layer_starts and s > cfg.start:
        every = horizon * cfg.step / (s - cfg.start)
        growth = (f"+{cfg.step} every {every:,.0f} iterations "
                  f"({every * tokens_per_iter / 1e9:.1f}B tokens)")
    else:
        growth = f"{cfg.schedule}, kept lengths multiples of {cfg.step}"
starts = sorted(set(cfg.layer_starts or (cfg.start,)))
first = sched.kept_length_table(1, gbs)[0]  # iteration 0 as DeepSpeed rounds it
start_text = (f"{first.min()}" if len(set(first.tolist())) == 1
              else f"{first.min()}..{first.max()}")
if start_text != ",".join(map(str, starts)) and len(starts) == 1:
    start_text += f" (start {starts[0]} rounded down to a multiple of {cfg.step})"
text = f"DRY_RUN: kept length ({source}): {start_text} -> {s} in {layers} of {L}, {growth}"
if horizon is not None:
    text += f", full length from iteration {horizon:,}"
    if run_iters is not None:
        text += f" of {run_iters:,}"
if run_iters is not None:
    per_layer = {}
    steps = np.arange(run_iters, dtype=np.int64)
    kept_sum = np.zeros(run_iters, dtype=np.int64)
    for layer in ids:  # layers with the same schedule are evaluated once
        sch = sched.schedules[layer]
        if sch not in per_layer:
            per_layer[sch] = np.minimum(sch.values(steps, steps * tokens_per_iter), s)
        kept_sum += per_layer[sch]
    dense = run_iters * s * L
    used = kept_sum.sum() + run_iters * s * (L - len(ids))
    text += f"; layer-token saving {100 * (1 - used / dense):.1f}% over the run"
print(text, file=sys.stderr)
EOF
}
