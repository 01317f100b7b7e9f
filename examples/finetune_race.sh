#!/bin/bash
#SBATCH --job-name=finetune-race
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=2-00:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=B:USR1@300   # save and requeue before the time limit (tasks/run_finetune_seeds.py)
#SBATCH --requeue
#SBATCH --open-mode=append
#
# The random-LTD paper's RACE finetuning (Tab. 2 / E.1): each pretrained BERT checkpoint,
# 3 epochs, global batch 32, lr 2e-5 (tasks/finetune_presets.py), seeds 1234-1238, one run after another
# (tasks/run_finetune_seeds.py); then the median / best table in OUTPUT_DIR. Any GPU count whose
# data-parallel size divides the global batch (the micro-batch adapts).
#
#   CHECKPOINTS="baseline=checkpoints/bert-dense random-ltd=checkpoints/bert-ltd-2" \
#       DATA_ROOT=/data/finetune sbatch examples/finetune_race.sh
#   LAUNCHER=torchrun GPUS_PER_NODE=4 CHECKPOINTS=... bash examples/finetune_race.sh
#   DRY_RUN=1 LAUNCHER=slurm CHECKPOINTS=... bash examples/finetune_race.sh   # print; check
#
# Variables: see examples/finetune_common.sh (CHECKPOINTS, DATA_ROOT, SEEDS, OUTPUT_DIR, MODEL,
# VOCAB_FILE, TP, PP, MICRO_BATCH, PRECISION, LAUNCHER, DRY_RUN). Extra arguments go to every
# tasks/main.py run.
set -euo pipefail

if [[ -n "${MEGATRON_LTD_ROOT:-}" ]]; then
    ROOT="$MEGATRON_LTD_ROOT"
elif [[ -f "$(dirname "${BASH_SOURCE[0]}")/../tasks/main.py" ]]; then
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
else  # sbatch ran a spooled copy of this file: use the submission directory
    ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
fi
SCRIPT_NAME=finetune_race.sh
TASK=RACE
[[ -f "$ROOT/examples/finetune_common.sh" ]] || { echo "$SCRIPT_NAME: $ROOT/examples/" \
    "finetune_common.sh not found: submit from the repository root or set MEGATRON_LTD_ROOT" >&2
    exit 2; }
# shellcheck source=examples/finetune_common.sh
source "$ROOT/examples/finetune_common.sh"
