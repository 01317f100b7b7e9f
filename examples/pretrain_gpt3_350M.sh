#!/bin/bash
#SBATCH --job-name=gpt3-350M
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=7-00:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=B:USR1@300   # save and requeue before the time limit: examples/run_slurm.sbatch
#SBATCH --requeue
#SBATCH --open-mode=append
#
# GPT-3 350M (Medium: 24 layers, hidden 1024, 16 heads, seq 2048) on the PILE with the
# hyper-parameters of Megatron-DeepSpeed's data_efficiency recipe
# (examples_deepspeed/data_efficiency/gpt), with random-LTD (default) or as the dense baseline.
# Sized for 64 GPUs (8 nodes x 8): TP 1, PP 1, DP 64, micro-batch 4, global batch 256 (one
# micro-batch per step per GPU); a 350M model fits on one GPU, so data parallelism alone is
# the fastest layout, and --use-distributed-optimizer shards the Adam state 64 ways (the
# recipe's ZeRO stage 1). Any GPU count that divides 256/4 = 64 keeps the global batch (more
# micro-batches per GPU on fewer GPUs).
#
#   sbatch examples/pretrain_gpt3_350M.sh                         # 8 x 8 GPUs, random-LTD
#   RANDOM_LTD=0 sbatch examples/pretrain_gpt3_350M.sh            # dense baseline
#   RANDOM_LTD=1 USE_DS_CONFIG=1 sbatch examples/pretrain_gpt3_350M.sh   # LTD from the DS JSON
#   TRAIN_LAYER_TOKENS=7200000000000 sbatch examples/pretrain_gpt3_350M.sh   # compute budget
#   LAUNCHER=torchrun GPUS_PER_NODE=8 bash examples/pretrain_gpt3_350M.sh  # one node
#   sbatch examples/pretrain_gpt3_350M.sh --eval-interval 1000    # extra flags pass through
#   DRY_RUN=1 LAUNCHER=slurm bash examples/pretrain_gpt3_350M.sh   # print; check for 64 GPUs
#
# Variables (environment); the ones shared with the other GPT-3 script (DATA_PATH, VOCAB_FILE,
# MERGE_FILE, DATA_CACHE_PATH, TRAIN_LAYER_TOKENS, LAYER_TOKEN_LR, TP, PP, PRECISION,
# CHECKPOINT_DIR, TENSORBOARD_DIR, SAVE_INTERVAL, LAUNCHER, MASTER_PORT, DRY_RUN) are
# described in examples/gpt3_common.sh, which builds the flags and starts the launcher:
#   RANDOM_LTD   1 (default): random-LTD in layers 1..22, kept length 128 -> 2048, +16 at a
#                time, over LTD_STEPS iterations (default 400000: the paper's +16 every 1.75B
#                tokens, full length after 210B tokens, at 256 x 2048 tokens per step); 0: dense
#   USE_DS_CONFIG  1: take the random-LTD settings from
#                examples/deepspeed_configs/ds_config_gpt3_350M_random_ltd.json instead of flags
#   TRAIN_TOKENS           300000000000 (the paper's 300B). As in Megatron-DeepSpeed, with
#                random-LTD "tokens" are layer-averaged, so both runs stop at the same layer-
#                token compute (random-LTD takes more steps)
#   MICRO_BATCH  per-GPU micro-batch (default 4)
set -euo pipefail

if [[ -n "${MEGATRON_LTD_ROOT:-}" ]]; then
    ROOT="$MEGATRON_LTD_ROOT"
elif [[ -f "$(dirname "${BASH_SOURCE[0]}")/../pretrain_gpt.py" ]]; then
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
else  # sbatch ran a spooled copy of this file: use the submission directory
    ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
fi

MODEL=350M

# ---- model (GPT-3 Medium) and batch ------------------------------------------------------
NUM_LAYERS=24
HIDDEN=1024
HEADS=16
SEQ=2048
INIT_STD=0.018
GLOBAL_BATCH=256
MICRO_BATCH=${MICRO_BATCH:-4}

# ---- schedule (recipe: 300B tokens, lr 3e-4, 3B warmup tokens, cosine to 1e-6) ----------
TRAIN_TOKENS=${TRAIN_TOKENS:-300000000000}
TRAIN_SAMPLES=$(( TRAIN_TOKENS * 2 / SEQ ))   # an upper bound; the token budget stops the run
LR=${LR:-3.0e-4}

# ---- random-LTD: kept length 128 -> 2048 over LTD_STEPS iterations -----------------------
LTD_STEPS=${LTD_STEPS:-400000}

# ---- the rest (flags, LTD / DS-JSON / layer-token switches, launcher) is shared ----------
COMMON="$ROOT/examples/gpt3_common.sh"
if [[ ! -f "$COMMON" ]]; then
    echo "$COMMON not found: submit from the repository root or set MEGATRON_LTD_ROOT" >&2
    exit 2
fi
source "$COMMON" "$@"
