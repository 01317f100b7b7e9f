#!/bin/bash
#SBATCH --job-name=gpt3-1.3B
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
# GPT-3 1.3B (XL: 24 layers, hidden 2048, 16 heads, seq 2048) on the PILE with the
# hyper-parameters of Megatron-DeepSpeed's data_efficiency recipe
# (examples_deepspeed/data_efficiency/gpt/pretrain/ds_pretrain_gpt_1.3B_dense_base_script.sh and
# its random-LTD variant), with random-LTD (default) or as the dense baseline.
# Sized for 64 GPUs (8 nodes x 8) as the recipe: TP 1, PP 1, DP 64, micro-batch 8, global batch
# 512 (one micro-batch per step per GPU). With full activation recompute (--checkpoint-activations)
# and --use-distributed-optimizer sharding the fp32 weights and Adam state 64 ways (the recipe's
# ZeRO stage 1): about 2.6 GB of fp16 weights + 2.6 GB of gradients + 0.3 GB of sharded
# state per GPU, so the model needs no tensor parallelism on 40/80 GB GPUs. On smaller GPUs use
# TP=2 MICRO_BATCH=4 (DP 32, 4 micro-batches per step; TP ranks stay inside a node). Any GPU
# count that divides 512/MICRO_BATCH keeps the global batch.
#
#   sbatch examples/pretrain_gpt3_1.3B.sh                         # 8 x 8 GPUs, random-LTD
#   RANDOM_LTD=0 sbatch examples/pretrain_gpt3_1.3B.sh            # dense baseline
#   TRAIN_TOKENS_IN_BILLION=200 sbatch examples/pretrain_gpt3_1.3B.sh   # the 200B-token run
#   RANDOM_LTD=1 USE_DS_CONFIG=1 sbatch examples/pretrain_gpt3_1.3B.sh   # LTD from the DS JSON
#   TRAIN_LAYER_TOKENS=7200000000000 sbatch examples/pretrain_gpt3_1.3B.sh   # compute budget
#   LAUNCHER=torchrun GPUS_PER_NODE=8 bash examples/pretrain_gpt3_1.3B.sh  # one node
#   sbatch examples/pretrain_gpt3_1.3B.sh --eval-interval 1000    # extra flags pass through
#   DRY_RUN=1 LAUNCHER=slurm bash examples/pretrain_gpt3_1.3B.sh   # print; check for 64 GPUs
#
# Variables (environment); the ones shared with the other GPT-3 script (DATA_PATH, VOCAB_FILE,
# MERGE_FILE, DATA_CACHE_PATH, TRAIN_LAYER_TOKENS, LAYER_TOKEN_LR, TP, PP, PRECISION,
# CHECKPOINT_DIR, TENSORBOARD_DIR, SAVE_INTERVAL, LAUNCHER, MASTER_PORT, DRY_RUN) are
# described in examples/gpt3_common.sh, which builds the flags and starts the launcher:
#   TRAIN_TOKENS_IN_BILLION  300 (default), 200 or 150: the recipe's runs, with lr 2e-4 /
#                3e-4 / 4e-4 and random-LTD steps 200000 / 133333 / 100000
#   RANDOM_LTD   1 (default): random-LTD in layers 1..22, kept length 128 -> 2048, +16 at a
#                time, over LTD_STEPS iterations (300B: 200000, the paper's +16 every 1.75B
#                tokens, full length after 210B tokens, at 512 x 2048 tokens per step); 0: dense
#   USE_DS_CONFIG  1: take the random-LTD settings from
#                examples/deepspeed_configs/ds_config_gpt3_1.3B_random_ltd.json instead of flags
#                (its schedule is the 300B run's)
#   TRAIN_TOKENS = TRAIN_TOKENS_IN_BILLION x 1e9. As in Megatron-DeepSpeed, with
#                random-LTD "tokens" are layer-averaged, so both runs stop at the same layer-
#                token compute (random-LTD takes more steps)
#   MICRO_BATCH  per-GPU micro-batch (default 8)
set -euo pipefail

if [[ -n "${MEGATRON_LTD_ROOT:-}" ]]; then
    ROOT="$MEGATRON_LTD_ROOT"
elif [[ -f "$(dirname "${BASH_SOURCE[0]}")/../pretrain_gpt.py" ]]; then
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
else  # sbatch ran a spooled copy of this file: use the submission directory
    ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
fi

MODEL=1.3B

# ---- model (GPT-3 XL) and batch ----------------------------------------------------------
NUM_LAYERS=24
HIDDEN=2048
HEADS=16
SEQ=2048
INIT_STD=0.013
GLOBAL_BATCH=512
MICRO_BATCH=${MICRO_BATCH:-8}

# ---- schedule (recipe: lr by token budget, 3B warmup tokens, cosine to 1e-6) -------------
TRAIN_TOKENS_IN_BILLION=${TRAIN_TOKENS_IN_BILLION:-300}
case "$TRAIN_TOKENS_IN_BILLION" in
    300) DEFAULT_LR=2.0e-4; DEFAULT_LTD_STEPS=200000 ;;
    200) DEFAULT_LR=3.0e-4; DEFAULT_LTD_STEPS=133333 ;;
    150) DEFAULT_LR=4.0e-4; DEFAULT_LTD_STEPS=100000 ;;
    *) DEFAULT_LR=${LR:-}; DEFAULT_LTD_STEPS=${LTD_STEPS:-}
       if [[ -z "$DEFAULT_LR" || -z "$DEFAULT_LTD_STEPS" ]]; then
           echo "pretrain_gpt3_1.3B.sh: TRAIN_TOKENS_IN_BILLION=$TRAIN_TOKENS_IN_BILLION: the" \
                "recipe has 300, 200 and 150; set LR and LTD_STEPS for other budgets" >&2
           exit 2
       fi ;;
esac
TRAIN_TOKENS=$(( TRAIN_TOKENS_IN_BILLION * 1000000000 ))
TRAIN_SAMPLES=$(( 300000000000 * 2 / SEQ ))   # an upper bound; the token budget stops the run
LR=${LR:-$DEFAULT_LR}

# ---- random-LTD: kept length 128 -> 2048 over LTD_STEPS iterations -----------------------
LTD_STEPS=${LTD_STEPS:-$DEFAULT_LTD_STEPS}

# ---- the rest (flags, LTD / DS-JSON / layer-token switches, launcher) is shared ----------
COMMON="$ROOT/examples/gpt3_common.sh"
if [[ ! -f "$COMMON" ]]; then
    echo "$COMMON not found: submit from the repository root or set MEGATRON_LTD_ROOT" >&2
    exit 2
fi
source "$COMMON" "$@"
