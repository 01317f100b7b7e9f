#!/bin/bash
# DRY_RUN=1 support for examples/run_torchrun.sh and examples/run_slurm.sbatch (sourced by them;
# not run on its own). Those launchers build their command in the array CMD and then call
#
#   dry_run WORLD_SIZE ENTRY FLAGS...
#
# which prints CMD shell-quoted on stdout (ready to paste) and, when ENTRY is pretrain_gpt.py,
# checks FLAGS with megatron/arguments.py for WORLD_SIZE processes, as every rank does at start-up
# (layout, batch sizes, schedules, random-LTD / DeepSpeed JSON): one line on stderr saying what
# would run, or why it would not. No GPU, data or network is needed. Returns 1 if the flags are
# rejected, else 0.

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
    if [[ "$(basename "$entry")" != pretrain_gpt.py ]]; then
        echo "DRY_RUN: flags not checked (only pretrain_gpt.py's parser is known here)" >&2
        return 0
    fi
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" - "$world" "$@" <<'EOF'
import sys

world = int(sys.argv[1])
procs = f"{world} process" + ("es" if world != 1 else "")
try:
    from megatron.arguments import parse_args
    from megatron.errors import UserError
    import megatron.ltd.config  # noqa: F401  (imports torch: fail here, not inside parse_args)
except ImportError as e:
    print(f"DRY_RUN: flags not checked: {e}", file=sys.stderr)
    sys.exit(0)
try:
    a = parse_args(sys.argv[2:], world_size=world)
except UserError as e:
    print(f"DRY_RUN: rejected for {procs}: {e}", file=sys.stderr)
    sys.exit(1)
ltd = "random-LTD" if a.random_ltd else "dense"
print(f"DRY_RUN: flags valid for {procs}: TP {a.tensor_model_parallel_size} x "
      f"PP {a.pipeline_model_parallel_size} x DP {a.data_parallel_size}; micro-batch "
      f"{a.micro_batch_size} x {a.num_micro_batches} micro-batches x DP "
      f"{a.data_parallel_size} = global batch {a.global_batch_size}; {a.num_layers} layers, "
      f"hidden {a.hidden_size}, seq {a.seq_length}; {ltd}", file=sys.stderr)
EOF
}
