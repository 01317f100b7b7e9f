#!/bin/bash
# Single-node launcher: torchrun starts GPUS_PER_NODE processes of an entry script on this
# machine and passes every other argument through unchanged.
#
#   bash examples/run_torchrun.sh [ENTRY.py] [flags ...]
#
#   GPUS_PER_NODE=8 bash examples/run_torchrun.sh pretrain_gpt.py --tensor-model-parallel-size 2 ...
#   GPUS_PER_NODE=4 bash examples/run_torchrun.sh --device cpu ...   # 4 gloo processes on CPU
#
# ENTRY.py defaults to pretrain_gpt.py (a path, or a name relative to the repository root).
# Environment:
#   GPUS_PER_NODE  processes to start (default: the number of visible GPUs, else 1)
#   MASTER_ADDR    rendezvous address (default 127.0.0.1)
#   MASTER_PORT    rendezvous TCP port (default 6000); set another free port when two jobs share
#                  a machine
#   PYTHON         interpreter for torchrun (default: python3 on PATH, via `torchrun`)
#   DRY_RUN        1: print the torchrun command line instead of running it, after checking
#                  pretrain_gpt.py's flags with megatron/arguments.py for GPUS_PER_NODE
#                  processes (no GPU and no data needed); exit status 1 if they are rejected
#
# torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT to each process;
# megatron/parallel/initialize.py reads them (nccl on GPU, gloo on CPU, or
# --distributed-backend). Each process uses GPU number LOCAL_RANK. torchrun sets
# OMP_NUM_THREADS=1 per process unless it is already set.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

ENTRY="$ROOT/pretrain_gpt.py"
if [[ $# -gt 0 && "$1" == *.py ]]; then
    ENTRY="$1"
    shift
    if [[ ! -f "$ENTRY" && -f "$ROOT/$ENTRY" ]]; then
        ENTRY="$ROOT/$ENTRY"
    fi
fi
if [[ ! -f "$ENTRY" ]]; then
    echo "run_torchrun.sh: entry script $ENTRY not found" >&2
    exit 2
fi

if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then  # only these GPUs are usable
        IFS=, read -r -a VISIBLE <<< "$CUDA_VISIBLE_DEVICES"
        GPUS_PER_NODE=${#VISIBLE[@]}
    else
        GPUS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    fi
    [[ "$GPUS_PER_NODE" -ge 1 ]] 2>/dev/null || GPUS_PER_NODE=1
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}

if [[ -n "${PYTHON:-}" ]]; then
    LAUNCH=("$PYTHON" -m torch.distributed.run)
else
    LAUNCH=(torchrun)
fi

# No SLURM variables must reach the workers alongside torchrun's (they would not be used:
# RANK/WORLD_SIZE win), but an inherited RANK from an outer launcher would confuse torchrun.
unset RANK WORLD_SIZE LOCAL_RANK

CMD=("${LAUNCH[@]}" --nnodes 1 --nproc_per_node "$GPUS_PER_NODE"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$ENTRY" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    # shellcheck source=examples/dry_run.sh
    source "$ROOT/examples/dry_run.sh"
    dry_run "$GPUS_PER_NODE" "$ENTRY" "$@"
    exit $?
fi

set -x
exec "${CMD[@]}"
