#!/bin/bash
#SBATCH --job-name=gpt3-1.3B
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=7-00:00:00
#SBATCH --output=%x-%j.out
#
# GPT-3 1.3B (XL: 24 layers, hidden 2048, 16 heads, seq 2048) on the PILE with the
# hyper-parameters of Megatron-DeepSpeed's data_efficiency recipe
# (examples_deepspeed/data_efficiency/gpt/pretrain/ds_pretrain_gpt_1.3B_dense_base_script.sh and
# its random-LTD variant), with random-LTD (default) or as the dense baseline.
# Sized for 64 GPUs (8 nodes x 8) as the recipe: TP 1, PP 1, DP 64, micro-batch 8, global batch
# 512 (one micro-batch per step per GPU), full activation recompute, and
# --use-distributed-optimizer sharding the fp32 weights and Adam state 64 ways (the recipe's
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
#
# Variables (environment):
#   DATA_PATH    preprocessed PILE prefix(es); a blend "0.5 /p/a 0.5 /p/b" is word-split
#                (default /data/pile-gpt2/pile_all, see tools/merge_datasets.py in README)
#   VOCAB_FILE, MERGE_FILE   GPT-2 BPE files (default gpt2-vocab.json / gpt2-merges.txt next to
#                the data)
#   DATA_CACHE_PATH          where the .npy index caches go (default: next to the data)
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
#   TRAIN_LAYER_TOKENS     if set: stop at this many layer tokens (tokens summed over layers;
#                the baseline's 300B tokens are 24 x 300e9 = 7.2e12) instead of --train-tokens:
#                equal-compute comparisons by an explicit budget
#   LAYER_TOKEN_LR         1: the paper's LayerToken LR (warmup/decay in layer tokens)
#   TP, PP       tensor / pipeline parallel sizes (default 1, 1); DP = GPUs / (TP x PP)
#   MICRO_BATCH  per-GPU micro-batch (default 8)
#   PRECISION    fp16 (default, as the recipe) or bf16
#   CHECKPOINT_DIR, TENSORBOARD_DIR, SAVE_INTERVAL
#   LAUNCHER     slurm (default inside a SLURM job: examples/run_slurm.sbatch, plain srun) or
#                torchrun (examples/run_torchrun.sh, one node; GPUS_PER_NODE, MASTER_PORT)
#   MASTER_PORT  rendezvous port (both launchers; see run_slurm.sbatch for the SLURM default)
set -euo pipefail

if [[ -n "${MEGATRON_LTD_ROOT:-}" ]]; then
    ROOT="$MEGATRON_LTD_ROOT"
elif [[ -f "$(dirname "${BASH_SOURCE[0]}")/../pretrain_gpt.py" ]]; then
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
else  # sbatch ran a spooled copy of this file: use the submission directory
    ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
fi

# ---- model (GPT-3 XL) and batch ----------------------------------------------------------
NUM_LAYERS=24
HIDDEN=2048
HEADS=16
SEQ=2048
INIT_STD=0.013
GLOBAL_BATCH=512
MICRO_BATCH=${MICRO_BATCH:-8}
TP=${TP:-1}
PP=${PP:-1}

# ---- schedule (recipe: lr by token budget, 3B warmup tokens, cosine to 1e-6) -------------
TRAIN_TOKENS_IN_BILLION=${TRAIN_TOKENS_IN_BILLION:-300}
case "$TRAIN_TOKENS_IN_BILLION" in
    300) DEFAULT_LR=2.0e-4; DEFAULT_LTD_STEPS=200000 ;;
    200) DEFAULT_LR=3.0e-4; DEFAULT_LTD_STEPS=133333 ;;
    150) DEFAULT_LR=4.0e-4; DEFAULT_LTD_STEPS=100000 ;;
    *) echo "TRAIN_TOKENS_IN_BILLION: the recipe has 300, 200 and 150 (set LR and LTD_STEPS" \
            "for other budgets)" >&2
       DEFAULT_LR=${LR:-}; DEFAULT_LTD_STEPS=${LTD_STEPS:-}
       [[ -n "$DEFAULT_LR" && -n "$DEFAULT_LTD_STEPS" ]] || exit 2 ;;
esac
TRAIN_TOKENS=$(( TRAIN_TOKENS_IN_BILLION * 1000000000 ))
TRAIN_SAMPLES=$(( 300000000000 * 2 / SEQ ))   # an upper bound; the token budget stops the run
LR=${LR:-$DEFAULT_LR}
MIN_LR=1.0e-6
WARMUP_TOKENS=3000000000

# ---- data --------------------------------------------------------------------------------
DATA_PATH=${DATA_PATH:-/data/pile-gpt2/pile_all}
DATA_DIR=$(dirname "${DATA_PATH##* }")
VOCAB_FILE=${VOCAB_FILE:-$DATA_DIR/gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-$DATA_DIR/gpt2-merges.txt}
read -r -a DATA_ARGS <<< "$DATA_PATH"

# ---- random-LTD --------------------------------------------------------------------------
RANDOM_LTD=${RANDOM_LTD:-1}
USE_DS_CONFIG=${USE_DS_CONFIG:-0}
LTD_START=128
LTD_STEP=16
LTD_STEPS=${LTD_STEPS:-$DEFAULT_LTD_STEPS}
DS_CONFIG="$ROOT/examples/deepspeed_configs/ds_config_gpt3_1.3B_random_ltd.json"

if [[ "$RANDOM_LTD" == 1 ]]; then
    TAG="random-ltd-${LTD_START}-${LTD_STEPS}"
    if [[ "$USE_DS_CONFIG" == 1 ]]; then
        LTD_ARGS=(--random-ltd --deepspeed_config "$DS_CONFIG")
    else
        LTD_ARGS=(--random-ltd --random-ltd-start "$LTD_START" --random-ltd-step "$LTD_STEP"
                  --random-ltd-schedule fixed_linear --random-ltd-schedule-steps "$LTD_STEPS")
    fi
else
    TAG=dense
    LTD_ARGS=()
fi
if [[ "${LAYER_TOKEN_LR:-0}" == 1 ]]; then
    LTD_ARGS+=(--layer-token-lr)
    TAG="$TAG-ltlr"
fi
if [[ -n "${TRAIN_LAYER_TOKENS:-}" ]]; then
    BUDGET_ARGS=(--train-layer-tokens "$TRAIN_LAYER_TOKENS")
    TAG="$TAG-lt${TRAIN_LAYER_TOKENS}"
else
    BUDGET_ARGS=(--train-tokens "$TRAIN_TOKENS")
fi

case "${PRECISION:-fp16}" in
    fp16) PRECISION_ARGS=(--fp16 --initial-loss-scale 2048 --loss-scale-window 500
                          --hysteresis 2 --min-loss-scale 1) ;;
    bf16) PRECISION_ARGS=(--bf16) ;;
    *) echo "PRECISION must be fp16 or bf16" >&2; exit 2 ;;
esac

NAME="gpt3-1.3B-${TAG}-$((TRAIN_TOKENS / 1000000000))B-lr${LR}-gbs${GLOBAL_BATCH}-tp${TP}-pp${PP}"
CHECKPOINT_DIR=${CHECKPOINT_DIR:-$ROOT/checkpoints/$NAME}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$ROOT/tensorboard/$NAME}
CACHE_ARGS=()
if [[ -n "${DATA_CACHE_PATH:-}" ]]; then
    CACHE_ARGS=(--data-cache-path "$DATA_CACHE_PATH")
fi

ARGS=(
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS"
    --seq-length "$SEQ" --max-position-embeddings "$SEQ"
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --use-distributed-optimizer
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
    --train-samples "$TRAIN_SAMPLES" "${BUDGET_ARGS[@]}"
    --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
    --lr-warmup-tokens "$WARMUP_TOKENS" --lr-decay-tokens "$TRAIN_TOKENS"
    --override-opt_param-scheduler
    --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0
    --init-method-std "$INIT_STD" --hidden-dropout 0.1 --attention-dropout 0.1
    "${PRECISION_ARGS[@]}" --checkpoint-activations --seed 1234
    --data-path "${DATA_ARGS[@]}" --split 949,50,1 "${CACHE_ARGS[@]}"
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE"
    --log-interval 100 --eval-interval 100 --eval-iters 10
    --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval "${SAVE_INTERVAL:-10000}"
    --tensorboard-dir "$TENSORBOARD_DIR" --log-validation-ppl-to-tensorboard
    --log-batch-size-to-tensorboard
    "${LTD_ARGS[@]}"
    "$@"
)

if [[ -n "${SLURM_JOB_ID:-}" ]]; then DEFAULT_LAUNCHER=slurm; else DEFAULT_LAUNCHER=torchrun; fi
case "${LAUNCHER:-$DEFAULT_LAUNCHER}" in
    slurm) exec bash "$ROOT/examples/run_slurm.sbatch" "$ROOT/pretrain_gpt.py" "${ARGS[@]}" ;;
    torchrun) exec bash "$ROOT/examples/run_torchrun.sh" "$ROOT/pretrain_gpt.py" "${ARGS[@]}" ;;
    *) echo "LAUNCHER must be slurm or torchrun" >&2; exit 2 ;;
esac
