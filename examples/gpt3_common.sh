#!/bin/bash
# The part of the GPT-3 random-LTD scripts (examples/pretrain_gpt3_350M.sh,
# examples/pretrain_gpt3_1.3B.sh) that does not depend on the model: data, random-LTD /
# DeepSpeed-JSON / layer-token switches, precision, the flag list and the launcher (with the
# pieces BERT-large shares, from examples/launch_common.sh). Not run on
# its own: a model script finds the repository root (ROOT), sets its model variables and then
# sources this file from "$ROOT/examples" (not from its own directory: under sbatch the model
# script runs as a spooled copy elsewhere) with its command-line arguments, which pass through
# to pretrain_gpt.py after the flags built here (so they win).
#
# Set by the model script before sourcing:
#   ROOT         the repository root
#   MODEL        350M or 1.3B: names the run (gpt3-$MODEL-...) and the DeepSpeed JSON
#                (examples/deepspeed_configs/ds_config_gpt3_${MODEL}_random_ltd.json)
#   NUM_LAYERS, HIDDEN, HEADS, SEQ, INIT_STD, GLOBAL_BATCH, MICRO_BATCH
#   TRAIN_TOKENS, TRAIN_SAMPLES, LR, LTD_STEPS
#
# Variables (environment), shared by the model scripts:
#   DATA_PATH    preprocessed PILE prefix(es); a blend "0.5 /p/a 0.5 /p/b" is word-split
#                (so a blend's paths cannot contain spaces; a single existing prefix can)
#                (default /data/pile-gpt2/pile_all, see tools/merge_datasets.py in README)
#   VOCAB_FILE, MERGE_FILE   GPT-2 BPE files (default gpt2-vocab.json / gpt2-merges.txt next to
#                the data)
#   DATA_CACHE_PATH          where the .npy index caches go (default: next to the data)
#   RANDOM_LTD   1 (default): random-LTD in layers 1..22, kept length 128 -> 2048, +16 at a
#                time, over LTD_STEPS iterations (default: the model script's); 0: dense
#   USE_DS_CONFIG  1: take the random-LTD settings from the model's DeepSpeed JSON instead of
#                flags
#   TRAIN_LAYER_TOKENS     if set: stop at this many layer tokens (tokens summed over layers;
#                the baseline's 300B tokens are 24 x 300e9 = 7.2e12) instead of --train-tokens:
#                equal-compute comparisons by an explicit budget
#   LAYER_TOKEN_LR         1: the paper's LayerToken LR (warmup/decay in layer tokens)
#   TP, PP       tensor / pipeline parallel sizes (default 1, 1); DP = GPUs / (TP x PP)
#   PRECISION    fp16 (default, as the recipe) or bf16
#   CHECKPOINT_DIR, TENSORBOARD_DIR, SAVE_INTERVAL
#   LAUNCHER     slurm (default inside a SLURM job: examples/run_slurm.sbatch, plain srun) or
#                torchrun (examples/run_torchrun.sh, one node; GPUS_PER_NODE, MASTER_PORT)
#   MASTER_PORT  rendezvous port (both launchers; see run_slurm.sbatch for the SLURM default)
#   DRY_RUN      1: print the launch command instead of running it, after checking the flags
#                with megatron/arguments.py for the launcher's process count (LAUNCHER=slurm
#                outside a job: the 64 tasks of 8 x 8 GPUs); missing data is then a warning
#
# The data prefixes, VOCAB_FILE and MERGE_FILE must exist where the script runs (under sbatch:
# the first node): a missing one stops it with one line, before any process starts.

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "gpt3_common.sh is sourced by examples/pretrain_gpt3_*.sh; run one of those" >&2
    exit 2
fi

# ---- parallel layout and the recipe's schedule shape (3B warmup tokens, cosine to 1e-6) --
TP=${TP:-1}
PP=${PP:-1}
MIN_LR=1.0e-6
WARMUP_TOKENS=3000000000

# ---- data --------------------------------------------------------------------------------
# shellcheck source=examples/launch_common.sh
source "$ROOT/examples/launch_common.sh"
SCRIPT_NAME="pretrain_gpt3_${MODEL}.sh"
DATA_PATH=${DATA_PATH:-/data/pile-gpt2/pile_all}
split_data_path
DATA_DIR=$(dirname "${DATA_ARGS[${#DATA_ARGS[@]} - 1]:-.}")
VOCAB_FILE=${VOCAB_FILE:-$DATA_DIR/gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-$DATA_DIR/gpt2-merges.txt}
HINT="set DATA_PATH to the prefix of the preprocessed PILE, without .bin/.idx, and"
HINT="$HINT VOCAB_FILE / MERGE_FILE to the GPT-2 BPE files; see README, Usage 1"
require_inputs "$HINT" "$VOCAB_FILE" "$MERGE_FILE"

# ---- random-LTD --------------------------------------------------------------------------
RANDOM_LTD=${RANDOM_LTD:-1}
USE_DS_CONFIG=${USE_DS_CONFIG:-0}
LTD_START=128
LTD_STEP=16
DS_CONFIG="$ROOT/examples/deepspeed_configs/ds_config_gpt3_${MODEL}_random_ltd.json"

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

precision_args || { echo "PRECISION must be fp16 or bf16" >&2; exit 2; }

NAME="gpt3-${MODEL}-${TAG}-$((TRAIN_TOKENS / 1000000000))B"
NAME="$NAME-lr${LR}-gbs${GLOBAL_BATCH}-tp${TP}-pp${PP}"
CHECKPOINT_DIR=${CHECKPOINT_DIR:-$ROOT/checkpoints/$NAME}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$ROOT/tensorboard/$NAME}
cache_args

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

launch "${LAUNCHER:-$(default_launcher)}" "$ROOT/pretrain_gpt.py" "${ARGS[@]}" ||
    { echo "LAUNCHER must be slurm or torchrun" >&2; exit 2; }
