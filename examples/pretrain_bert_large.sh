#!/bin/bash
#SBATCH --job-name=bert-large
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
# BERT-large (24 layers, hidden 1024, 16 heads, seq 512) on the PILE with the recipe of the
# random-LTD paper (Yao et al. 2022, BERT-large: 2M iterations, global batch 1024, 64 GPUs with
# 16 per GPU) and Megatron-DeepSpeed's data_efficiency BERT script
# (examples_deepspeed/data_efficiency/bert/pretrain/ds_pretrain_bert_336M_base_script.sh):
# lr 1e-4 -> 1e-5 linear, 10000 warmup iterations, Adam (0.9, 0.999), weight decay 1e-2,
# clip 1.0, init std 0.02, fp16, split 949,50,1, Megatron's SOP binary head.
# Sized for 64 GPUs (8 nodes x 8): TP 1, PP 1, DP 64, micro-batch 16, one micro-batch per step
# per GPU (16 x 64 = 1024). BERT-large needs no model parallelism and, at 16 x 512 tokens, no
# activation recompute on 40/80 GB GPUs (pass --checkpoint-activations on smaller ones). Any
# layout where MICRO_BATCH x DP divides 1024 keeps the global batch (more micro-batches per GPU
# on fewer GPUs); the script refuses the others in one line before anything starts.
#
#   sbatch examples/pretrain_bert_large.sh                        # 8 x 8 GPUs, random-LTD-1
#   RANDOM_LTD=0 sbatch examples/pretrain_bert_large.sh           # dense baseline
#   RANDOM_LTD=2 sbatch examples/pretrain_bert_large.sh           # random-LTD-2
#   ABLATION=1 RANDOM_LTD=2 sbatch examples/pretrain_bert_large.sh   # 0.2M iterations, lr 4e-4
#   DS_CONFIG=examples/deepspeed_configs/ds_config_bert_large_random_ltd.json \
#       sbatch examples/pretrain_bert_large.sh                    # random-LTD from the DS JSON
#   LAUNCHER=torchrun GPUS_PER_NODE=8 bash examples/pretrain_bert_large.sh   # one node
#   sbatch examples/pretrain_bert_large.sh --eval-interval 2000   # extra flags pass through
#   DRY_RUN=1 LAUNCHER=slurm bash examples/pretrain_bert_large.sh   # print; check for 64 GPUs
#
# Variables (environment):
#   DATA_PATH    sentence-level PILE prefix(es) made by tools/preprocess_data.py
#                --split-sentences (<prefix>_text_sentence, without .bin/.idx); a blend
#                "0.5 /p/a 0.5 /p/b" is word-split (so a blend's paths cannot contain spaces; a
#                single existing prefix can) (default /data/pile-bert/pile_bert_train_text_sentence)
#   VOCAB_FILE   BERT WordPiece vocabulary (default bert-large-uncased-vocab.txt next to the
#                data); TOKENIZER_TYPE BertWordPieceLowerCase (default) or BertWordPieceCase
#   DATA_CACHE_PATH          where the .npy index caches go (default: next to the data)
#   RANDOM_LTD   0: dense baseline. 1 (default): the paper's random-LTD-1 (--random-ltd-preset
#                bert-ltd-1: kept length 200 -> 512, +16 per 48B tokens; 26.2% layer-token
#                saving over 2M iterations). 2: random-LTD-2 (bert-ltd-2: 128 -> 512, +16 per
#                38B tokens; 31.1%). Layers 1..22 drop, the first and last run at full length.
#                The presets scale the schedule to ITERS (same shape on a shorter run)
#   ABLATION     1: the paper's 0.2M-iteration ablation: ITERS 200000, max lr 4e-4; RANDOM_LTD=1
#                is then --random-ltd-preset bert-ablation-3.8b (256 -> 512, +16 per 3.8B
#                tokens; 14.1%) and RANDOM_LTD=2 bert-ablation-6b (+16 per 6B tokens; 22.3%)
#   LTD_PRESET   a preset name (bert-ltd-1, bert-ltd-2, bert-ablation-3.8b, bert-ablation-6b)
#                instead of the one RANDOM_LTD / ABLATION pick (not with RANDOM_LTD=0)
#   DS_CONFIG    path of a DeepSpeed JSON: random-LTD from its data_efficiency.data_routing.
#                random_ltd section instead of a preset (its train_batch_size must be 1024 and
#                its max_value 512). examples/deepspeed_configs/ds_config_bert_large_random_ltd.json
#                is Megatron-DeepSpeed's recipe (start 128, +16, require_steps 2000000: 35.8%
#                layer-token saving over 2M iterations; the paper's random-LTD-2 is
#                RANDOM_LTD=2). Not with RANDOM_LTD=0 or LTD_PRESET
#   ITERS        training iterations (default 2000000, ABLATION=1: 200000); LR decays linearly
#                to MIN_LR over them after WARMUP_ITERS (default 10000)
#   LR, MIN_LR   max / min learning rate (default 1e-4 (ABLATION=1: 4e-4) / 1e-5)
#   MICRO_BATCH  per-GPU micro-batch (default 16)
#   TP, PP       tensor / pipeline parallel sizes (default 1, 1); DP = GPUs / (TP x PP)
#   PRECISION    fp16 (default, as the recipe) or bf16
#   CHECKPOINT_PATH  --save/--load directory (CHECKPOINT_DIR is accepted too; default
#                checkpoints/<run name> in the repository); TENSORBOARD_DIR, SAVE_INTERVAL
#                (default 10000)
#   LAUNCHER     slurm (default inside a SLURM job: examples/run_slurm.sbatch, plain srun) or
#                torchrun (examples/run_torchrun.sh, one node; GPUS_PER_NODE, MASTER_PORT)
#   MASTER_PORT  rendezvous port (both launchers; see run_slurm.sbatch for the SLURM default)
#   DRY_RUN      1: print the launch command instead of running it, after checking the flags
#                with megatron/arguments.py and pretrain_bert.py's checks for the launcher's
#                process count (LAUNCHER=slurm outside a job: the 64 tasks of 8 x 8 GPUs) and
#                printing the layout and the kept-length schedule; missing data is then a warning
#
# The data prefixes and VOCAB_FILE must exist where the script runs (under sbatch: the first
# node): a missing one stops it with one line, before any process starts.
set -euo pipefail

if [[ -n "${MEGATRON_LTD_ROOT:-}" ]]; then
    ROOT="$MEGATRON_LTD_ROOT"
elif [[ -f "$(dirname "${BASH_SOURCE[0]}")/../pretrain_bert.py" ]]; then
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
else  # sbatch ran a spooled copy of this file: use the submission directory
    ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
fi
SCRIPT_NAME=pretrain_bert_large.sh
ENTRY="$ROOT/pretrain_bert.py"
if [[ ! -f "$ENTRY" ]]; then
    echo "$SCRIPT_NAME: $ENTRY not found: submit from the repository root or set" \
         "MEGATRON_LTD_ROOT" >&2
    exit 2
fi
die() { echo "$SCRIPT_NAME: $*" >&2; exit 2; }
# data path, input checks, precision and launcher, shared with the GPT-3 scripts
# shellcheck source=examples/launch_common.sh
source "$ROOT/examples/launch_common.sh"

# ---- model (BERT-large) and batch ---------------------------------------------------------
NUM_LAYERS=24
HIDDEN=1024
HEADS=16
SEQ=512
INIT_STD=0.02
GLOBAL_BATCH=1024
MICRO_BATCH=${MICRO_BATCH:-16}
TP=${TP:-1}
PP=${PP:-1}

# ---- schedule (paper: 2M iterations, lr 1e-4; ablation: 0.2M iterations, lr 4e-4) -------
ABLATION=${ABLATION:-0}
case "$ABLATION" in
    0) ITERS=${ITERS:-2000000}; LR=${LR:-1.0e-4} ;;
    1) ITERS=${ITERS:-200000}; LR=${LR:-4.0e-4} ;;
    *) die "ABLATION must be 0 or 1, got '$ABLATION'" ;;
esac
MIN_LR=${MIN_LR:-1.0e-5}
WARMUP_ITERS=${WARMUP_ITERS:-10000}
for v in MICRO_BATCH TP PP ITERS WARMUP_ITERS; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done

# ---- parallel layout: refuse a micro-batch / layout that does not divide the global batch --
# (the launcher's process count: SLURM's tasks, or GPUS_PER_NODE for torchrun; unknown ones are
# checked by every rank at start-up, and DRY_RUN=1 lets the flag parser give its verdict)
LAUNCHER=${LAUNCHER:-$(default_launcher)}
case "$LAUNCHER" in
    slurm) WORLD=${SLURM_NTASKS:-}; [[ -n "${SLURM_JOB_ID:-}" ]] || WORLD=${SLURM_NTASKS:-64} ;;
    torchrun) WORLD=${GPUS_PER_NODE:-} ;;
    *) die "LAUNCHER must be slurm or torchrun, got '$LAUNCHER'" ;;
esac
if [[ "${DRY_RUN:-0}" != 1 && "$WORLD" =~ ^[1-9][0-9]*$ ]]; then
    (( WORLD % (TP * PP) == 0 )) || die "$WORLD GPUs are not divisible by TP $TP x PP $PP"
    DP=$(( WORLD / (TP * PP) ))
    (( GLOBAL_BATCH % (MICRO_BATCH * DP) == 0 )) || die "global batch $GLOBAL_BATCH is not" \
        "divisible by MICRO_BATCH $MICRO_BATCH x DP $DP ($WORLD GPUs / (TP $TP x PP $PP));" \
        "choose MICRO_BATCH so that $GLOBAL_BATCH / (MICRO_BATCH x $DP) is a whole number"
fi

# ---- data ----------------------------------------------------------------------------------
DATA_PATH=${DATA_PATH:-/data/pile-bert/pile_bert_train_text_sentence}
split_data_path
[[ ${#DATA_ARGS[@]} -gt 0 ]] || die "DATA_PATH is empty"
DATA_DIR=$(dirname "${DATA_ARGS[${#DATA_ARGS[@]} - 1]}")
VOCAB_FILE=${VOCAB_FILE:-$DATA_DIR/bert-large-uncased-vocab.txt}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-BertWordPieceLowerCase}

DOCUMENT_LEVEL=()
for ITEM in "${DATA_PREFIXES[@]}"; do
    [[ "$ITEM" != *_document ]] || DOCUMENT_LEVEL+=("$ITEM")
done
if [[ ${#DOCUMENT_LEVEL[@]} -gt 0 ]]; then  # a GPT-style prefix: no sentence boundaries
    die "${DOCUMENT_LEVEL[*]}: BERT needs sentence-level data; preprocess with" \
        "tools/preprocess_data.py --split-sentences and set DATA_PATH to the" \
        "<prefix>_text_sentence it writes"
fi
HINT="set DATA_PATH to the prefix of the sentence-level PILE (tools/preprocess_data.py"
HINT="$HINT --split-sentences), without .bin/.idx, and VOCAB_FILE to the BERT WordPiece"
HINT="$HINT vocabulary; see README"
require_inputs "$HINT" "$VOCAB_FILE"

# ---- random-LTD: a paper preset, or the DeepSpeed JSON's section ---------------------------
RANDOM_LTD=${RANDOM_LTD:-1}
case "$RANDOM_LTD" in 0|1|2) ;; *) die "RANDOM_LTD must be 0, 1 or 2, got '$RANDOM_LTD'" ;; esac
DS_CONFIG=${DS_CONFIG:-}
LTD_PRESET=${LTD_PRESET:-}
if [[ -n "$DS_CONFIG" ]]; then
    [[ "$RANDOM_LTD" != 0 ]] || die "DS_CONFIG takes random-LTD from the JSON: leave out" \
        "RANDOM_LTD=0 (or DS_CONFIG for the dense baseline)"
    [[ -z "$LTD_PRESET" ]] || die "DS_CONFIG and LTD_PRESET both set the random-LTD schedule;" \
        "give one"
    if [[ ! -f "$DS_CONFIG" && -f "$ROOT/$DS_CONFIG" ]]; then DS_CONFIG="$ROOT/$DS_CONFIG"; fi
    [[ -f "$DS_CONFIG" ]] || die "DS_CONFIG $DS_CONFIG: no such file"
    LTD_ARGS=(--random-ltd --deepspeed-config "$DS_CONFIG")
    TAG="random-ltd-ds-$(basename "$DS_CONFIG" .json)"
elif [[ "$RANDOM_LTD" == 0 ]]; then
    [[ -z "$LTD_PRESET" ]] || die "LTD_PRESET=$LTD_PRESET with RANDOM_LTD=0: the baseline" \
        "drops nothing; leave out one of them"
    LTD_ARGS=()
    TAG=dense
else
    if [[ -z "$LTD_PRESET" ]]; then
        if [[ "$ABLATION" == 1 && "$RANDOM_LTD" == 1 ]]; then
            LTD_PRESET=bert-ablation-3.8b
        elif [[ "$ABLATION" == 1 ]]; then
            LTD_PRESET=bert-ablation-6b
        else
            LTD_PRESET=bert-ltd-$RANDOM_LTD
        fi
    fi
    case "$LTD_PRESET" in
        bert-ltd-1|bert-ltd-2|bert-ablation-3.8b|bert-ablation-6b) ;;
        *) die "LTD_PRESET must be bert-ltd-1, bert-ltd-2, bert-ablation-3.8b or" \
               "bert-ablation-6b, got '$LTD_PRESET'" ;;
    esac
    LTD_ARGS=(--random-ltd-preset "$LTD_PRESET")
    TAG="$LTD_PRESET"
fi

precision_args || die "PRECISION must be fp16 or bf16, got '${PRECISION}'"

if (( ITERS % 1000000 == 0 )); then ITERS_LABEL="$((ITERS / 1000000))M"
elif (( ITERS % 1000 == 0 )); then ITERS_LABEL="$((ITERS / 1000))k"
else ITERS_LABEL="$ITERS"; fi
NAME="bert-large-${TAG}-${ITERS_LABEL}-lr${LR}-gbs${GLOBAL_BATCH}-mbs${MICRO_BATCH}-tp${TP}-pp${PP}"
CHECKPOINT_PATH=${CHECKPOINT_PATH:-${CHECKPOINT_DIR:-$ROOT/checkpoints/$NAME}}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$ROOT/tensorboard/$NAME}
cache_args

ARGS=(
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS"
    --seq-length "$SEQ" --max-position-embeddings "$SEQ"
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
    --train-iters "$ITERS"
    --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style linear
    --lr-warmup-iters "$WARMUP_ITERS" --lr-decay-iters "$ITERS"
    --adam-beta1 0.9 --adam-beta2 0.999 --weight-decay 1e-2 --clip-grad 1.0
    --init-method-std "$INIT_STD" --hidden-dropout 0.1 --attention-dropout 0.1
    "${PRECISION_ARGS[@]}" --seed 1234
    --data-path "${DATA_ARGS[@]}" --split 949,50,1 "${CACHE_ARGS[@]}"
    --mask-prob 0.15 --short-seq-prob 0.1 --num-workers 4
    --tokenizer-type "$TOKENIZER_TYPE" --vocab-file "$VOCAB_FILE"
    --log-interval 100 --eval-interval 1000 --eval-iters 10
    --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH"
    --save-interval "${SAVE_INTERVAL:-10000}"
    --tensorboard-dir "$TENSORBOARD_DIR" --log-validation-ppl-to-tensorboard
    --log-batch-size-to-tensorboard
    "${LTD_ARGS[@]}"
    "$@"
)

launch "$LAUNCHER" "$ENTRY" "${ARGS[@]}"  # LAUNCHER was checked above
